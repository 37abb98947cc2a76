//! `zeroscale-standin-node`: test support for the real-cluster suite. It plays the node
//! of a cluster that has a control plane but no kubelet, container runtime, kube-proxy or
//! DNS: it registers a Node and keeps it alive ([`node`]), binds every unscheduled pod to
//! it ([`scheduler`]), runs each pod's containers as local processes in a network
//! namespace of the pod's own and a private root per container, reporting the status a
//! kubelet reports ([`kubelet`], [`pod`], [`container`], [`sandbox`]), and proxies Service
//! ClusterIPs to their endpoints in userspace ([`proxy`]).
//!
//! It runs as root on the control plane's machine and talks to the API server with the
//! kubeconfig in `KUBECONFIG`. It prints `stand-in node <name> ready` on stdout once the
//! node is registered and the proxy listens, and on SIGTERM/SIGINT stops every pod,
//! removes what it created on the host and marks the node NotReady (or deletes it).

mod backoff;
mod container;
mod env;
mod images;
mod ipam;
mod kubelet;
mod logs;
mod net;
mod node;
mod pod;
mod probe;
mod proxy;
mod sandbox;
mod scheduler;
mod status;
mod volumes;

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use ipnet::Ipv4Net;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, Store};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeroscale::telemetry::{self, LogFormat};

use crate::images::{ImageMap, Images, parse_image_map};
use crate::ipam::Ipam;
use crate::net::Network;

/// A stand-in kubelet and kube-proxy for a control plane without nodes (test support).
#[derive(Debug, Parser)]
#[command(name = "zeroscale-standin-node", version, about, long_about = None)]
struct Args {
    /// Name of the Node to register.
    #[arg(long, default_value = "zeroscale-standin")]
    node_name: String,
    /// Where pod volumes, container roots, helper specs and logs live.
    #[arg(long, default_value = "/tmp/zeroscale-standin")]
    state_dir: PathBuf,
    /// The Linux bridge the pods' veths join; its address is the node IP.
    #[arg(long, default_value = "zs-br0")]
    bridge: String,
    /// Pod IPs come from here; the first address is the gateway (the node IP).
    #[arg(long, default_value = "10.244.0.0/16")]
    pod_cidr: Ipv4Net,
    /// The dummy interface that holds the Service ClusterIPs.
    #[arg(long, default_value = "zs-svc0")]
    services_interface: String,
    /// `PREFIX=HOST[:IMAGEPATH]`: images starting with PREFIX run the host binary HOST,
    /// mounted at IMAGEPATH (default `/<file name>`), as their entrypoint. Repeatable.
    #[arg(long = "image", value_parser = parse_image_map)]
    images: Vec<ImageMap>,
    /// Images that "pull" without an entrypoint mapping (their `command` runs host
    /// programs), besides python, busybox and alpine. Repeatable.
    #[arg(long = "available-image")]
    available: Vec<String>,
    /// First restart back-off (doubling up to 5m), also the image-pull back-off.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    restart_backoff: Duration,
    /// Copy every container's output to stderr, prefixed `[ns/pod/container]`.
    #[arg(long)]
    echo_logs: bool,
    /// Delete the Node on exit instead of marking it NotReady.
    #[arg(long)]
    delete_node_on_exit: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    zeroscale::api::duration::parse_duration(s).map_err(|e| e.to_string())
}

/// What every part of the stand-in shares.
pub struct Ctx {
    pub client: Client,
    pub node_name: String,
    pub node_ip: Ipv4Addr,
    pub state_dir: PathBuf,
    pub network: Network,
    pub ipam: Mutex<Ipam>,
    pub images: Images,
    pub restart_backoff: Duration,
    pub echo_logs: bool,
    /// Every Service, for the variables the kubelet injects into containers.
    pub services: Store<Service>,
    /// Events from the node ("kubelet") and from the binding ("default-scheduler").
    pub recorder: Recorder,
    pub scheduler_recorder: Recorder,
    /// The API server's `gitVersion`, reported as the kubelet version.
    pub git_version: String,
    /// `major.minor`, for the probes' `kube-probe/` User-Agent.
    pub version: String,
    /// This process's pid: sandbox helpers exit when their parent is no longer it.
    pub parent_pid: i32,
}

impl Ctx {
    /// Publishes an Event about `pod` in the background.
    pub fn event(&self, pod: &Pod, type_: EventType, reason: &str, note: String) {
        publish(self.recorder.clone(), pod, type_, reason, note);
    }

    /// An Event of the scheduler's.
    pub fn scheduler_event(&self, pod: &Pod, type_: EventType, reason: &str, note: String) {
        publish(self.scheduler_recorder.clone(), pod, type_, reason, note);
    }
}

fn publish(recorder: Recorder, pod: &Pod, type_: EventType, reason: &str, note: String) {
    let reference = pod::reference(pod);
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    tokio::spawn(async move {
        if let Err(e) = recorder.publish(&event, &reference).await {
            tracing::debug!(error = %e, "publishing an event");
        }
    });
}

fn main() -> ExitCode {
    // A sandbox helper never gets here: it becomes the container or exits.
    sandbox::run_helper_if_asked();
    let args = Args::parse();
    telemetry::init_tracing(LogFormat::Text, "info,kube=warn,hyper=warn");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `host:port` of the API server when the kubeconfig reaches it on a loopback address.
fn loopback_api_server(uri: &http::Uri) -> Option<String> {
    let host = uri.host()?.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("http") => 80,
        _ => 443,
    });
    loopback.then(|| {
        if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        }
    })
}

async fn run(args: Args) -> Result<(), String> {
    let config = kube::Config::infer()
        .await
        .map_err(|e| format!("no kubeconfig: {e}"))?;
    let api_upstream = loopback_api_server(&config.cluster_url);
    let client = Client::try_from(config).map_err(|e| format!("client: {e}"))?;
    let info = client
        .apiserver_version()
        .await
        .map_err(|e| format!("the API server does not answer: {e}"))?;
    let version = format!("{}.{}", info.major, info.minor.trim_end_matches('+'));

    let gateway = args
        .pod_cidr
        .hosts()
        .next()
        .ok_or("the pod CIDR has no host addresses")?;
    let network = Network::new(&args.bridge, args.pod_cidr, gateway);
    // Pod directories hold Secrets and tokens: for root only. Containers see their
    // volumes through bind mounts, which do not care about the directories above.
    let pods_dir = args.state_dir.join("pods");
    std::fs::create_dir_all(&pods_dir)
        .and_then(|()| std::fs::set_permissions(&pods_dir, std::fs::Permissions::from_mode(0o700)))
        .map_err(|e| format!("{}: {e}", pods_dir.display()))?;
    // One stand-in per state directory: a second one would take the first one's
    // namespaces, veths and bridge for leftovers. The lock dies with the process.
    let lock_path = args.state_dir.join("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| format!("{}: {e}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, e)| {
            format!(
                "another stand-in node runs with state dir {} ({e})",
                args.state_dir.display()
            )
        })?;
    // What a previous run left: sandboxes (its processes died with it) and pod dirs.
    let removed = network
        .cleanup_leftovers()
        .await
        .map_err(|e| e.to_string())?;
    if let Ok(entries) = std::fs::read_dir(&pods_dir) {
        for entry in entries.flatten() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    if removed > 0 {
        info!(removed, "removed network leftovers of an earlier run");
    }
    network.ensure_bridge().await.map_err(|e| e.to_string())?;

    let (services, services_writer) = reflector::store::<Service>();
    let (slices, slices_writer) = reflector::store::<EndpointSlice>();
    let mut available: Vec<String> = images::DEFAULT_AVAILABLE
        .iter()
        .map(|s| s.to_string())
        .collect();
    available.extend(args.available.clone());
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        node_name: args.node_name.clone(),
        node_ip: gateway,
        state_dir: args.state_dir.clone(),
        ipam: Mutex::new(Ipam::new(args.pod_cidr, gateway)),
        network,
        images: Images {
            maps: args.images.clone(),
            available,
        },
        restart_backoff: args.restart_backoff,
        echo_logs: args.echo_logs,
        services: services.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "kubelet".into(),
                instance: Some(args.node_name.clone()),
            },
        ),
        scheduler_recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "default-scheduler".into(),
                instance: None,
            },
        ),
        git_version: info.git_version.clone(),
        version,
        parent_pid: i32::try_from(std::process::id()).map_err(|e| e.to_string())?,
    });

    let since = node::register(&ctx)
        .await
        .map_err(|e| format!("registering the node: {e}"))?;
    match node::delete_leftover_pods(&ctx).await {
        Ok(0) => {}
        Ok(n) => info!(pods = n, "deleted pods an earlier run left on this node"),
        Err(e) => warn!(error = %e, "deleting leftover pods"),
    }

    let shutdown = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(node::keep_alive(ctx.clone(), since, shutdown.clone()));
    tasks.spawn(proxy::follow_slices(
        client.clone(),
        slices_writer,
        shutdown.clone(),
    ));
    let proxy = proxy::Proxy::new(&args.services_interface, api_upstream, slices.clone())
        .await
        .map_err(|e| format!("service proxy: {e}"))?;
    let (proxy_ready, proxy_ready_rx) = tokio::sync::oneshot::channel();
    let proxy_task = tokio::spawn(proxy::run(
        client.clone(),
        proxy,
        services_writer,
        proxy_ready,
        shutdown.clone(),
    ));
    let _ = slices.wait_until_ready().await;
    proxy_ready_rx
        .await
        .map_err(|_| "the service proxy ended before it was ready".to_string())?;
    let kubelet_stop = CancellationToken::new();
    let kubelet = tokio::spawn(kubelet::run(ctx.clone(), kubelet_stop.clone()));
    tasks.spawn(scheduler::run(ctx.clone(), shutdown.clone()));

    println!("stand-in node {} ready", args.node_name);
    let _ = std::io::stdout().flush();

    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: shutting down"),
        _ = int.recv() => info!("SIGINT: shutting down"),
    }
    // Cordoned first, so a stopping node is not taken for one in service while its pods
    // get their grace periods; then the pods (they may still use the proxy while they
    // stop), then the rest.
    node::cordon(&ctx).await;
    kubelet_stop.cancel();
    let _ = kubelet.await;
    shutdown.cancel();
    let _ = proxy_task.await;
    while tasks.join_next().await.is_some() {}
    node::stop(&ctx, args.delete_node_on_exit).await;
    if let Err(e) = ctx.network.delete_bridge().await {
        warn!(error = %e, "removing the bridge");
    }
    info!("stand-in node stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_api_servers_are_used_directly() {
        let uri: http::Uri = "https://127.0.0.1:6436".parse().unwrap();
        assert_eq!(loopback_api_server(&uri).as_deref(), Some("127.0.0.1:6436"));
        let uri: http::Uri = "https://localhost".parse().unwrap();
        assert_eq!(loopback_api_server(&uri).as_deref(), Some("localhost:443"));
        let uri: http::Uri = "https://10.0.0.5:6443".parse().unwrap();
        assert_eq!(loopback_api_server(&uri), None);
    }

    #[test]
    fn the_cli_parses() {
        let args = Args::try_parse_from([
            "zeroscale-standin-node",
            "--image",
            "ghcr.io/zeroscale/zeroscale=/t/zeroscale:/zeroscale",
            "--available-image",
            "nginx",
            "--restart-backoff",
            "1s",
            "--echo-logs",
        ])
        .unwrap();
        assert_eq!(args.images[0].image_path, "/zeroscale");
        assert_eq!(args.restart_backoff, Duration::from_secs(1));
        assert_eq!(args.pod_cidr, "10.244.0.0/16".parse::<Ipv4Net>().unwrap());
        assert!(args.echo_logs);
    }
}
