//! `zeroscale dev`: the whole loop on one machine. The activator and the autoscaler run
//! unchanged over a [`LocalPlatform`] whose replicas are local processes, fed by the
//! same Function manifests a cluster takes, re-read when they change.

pub mod manifests;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::StatusCode;
use prometheus::Registry;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::activator::{self, Activator};
use crate::api::{Defaults, Function};
use crate::autoscaler::{Autoscaler, InProcessSource};
use crate::platform::Platform;
use crate::platform::local::{LocalPlatform, LocalSettings, Output, Stream};
use crate::telemetry::{self, AdminRoute, Readiness};

/// How often manifests are checked for changes.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Errors of the dev.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no manifest file found in {0}")]
    NoManifests(String),
    #[error("{0}")]
    Other(String),
}

/// Flags of `zeroscale dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// A Function manifest file, or a directory of them (.yaml, .yml, .json); repeatable.
    /// Multi-document files are read whole; documents of other kinds are skipped.
    #[arg(short = 'f', long = "file", required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
    /// Where the activator listens; call Functions here with their Host header.
    #[arg(long, env = "ZEROSCALE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Where to serve /metrics, /stats (the activator's counters) and /functions (the
    /// local replicas); off when unset.
    #[arg(long, env = "ZEROSCALE_ADMIN_LISTEN")]
    pub admin_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub shared: crate::api::config::SharedArgs,
}

/// Runs dev mode until SIGTERM or Ctrl-C (a second one kills the replicas at once).
pub async fn run(config: Config) -> crate::Result<()> {
    let defaults = Defaults::load(config.shared.defaults_file.as_deref())?;
    let output = Output::terminal();
    let platform = LocalPlatform::new(LocalSettings {
        defaults: defaults.clone(),
        cluster_domain: config.shared.cluster_domain.clone(),
        output: output.clone(),
    });

    let (files, missing) = manifests::list_files(&config.files).await;
    if let Some(e) = missing.first() {
        return Err(Error::Other(e.to_string()).into());
    }
    if files.is_empty() {
        let names: Vec<String> = config
            .files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        return Err(Error::NoManifests(names.join(", ")).into());
    }
    let mut watcher = manifests::Watcher::new(config.files.clone(), platform.clone());
    watcher.poll().await;

    let registry = Registry::new();
    let settings = activator::Settings {
        cluster_domain: config.shared.cluster_domain.clone(),
        defaults: defaults.clone(),
        id: format!("dev-{}", std::process::id()),
        drain_timeout: Duration::from_secs(10),
        workers: activator::Settings::threads_per_cpu(),
        ..activator::Settings::default()
    };
    let shared: Arc<dyn Platform> = Arc::new(platform.clone());
    let activator = Activator::new(shared.clone(), settings, &registry)?;
    let weak: Weak<Activator> = Arc::downgrade(&activator);
    platform.set_in_flight(move |addr| {
        weak.upgrade()
            .map(|a| a.endpoint_in_flight(addr))
            .unwrap_or(0)
    });
    let source = {
        let activator = activator.clone();
        Arc::new(InProcessSource(move || activator.snapshot()))
    };
    let autoscaler = Autoscaler::new(shared, source, defaults, &registry)?;

    let listener = telemetry::bind(config.listen, "dev").await?;
    let listen = listener.local_addr().unwrap_or(config.listen);
    let admin = match config.admin_listen {
        Some(addr) => Some(telemetry::bind(addr, "admin").await?),
        None => None,
    };
    banner(
        &output,
        listen,
        admin.as_ref().and_then(|a| a.local_addr().ok()),
        watcher.functions(),
    )
    .await;

    let shutdown = CancellationToken::new();
    let readiness = Readiness::default();
    let mut activator_task = tokio::spawn(activator.clone().run(listener, shutdown.clone()));
    let autoscaler_task = tokio::spawn(autoscaler.run(shutdown.child_token()));
    if let Some(admin) = admin {
        let route = admin_route(activator.admin_route(), platform.clone());
        tokio::spawn(telemetry::serve_admin(
            admin,
            registry,
            readiness.clone(),
            Some(route),
            shutdown.child_token(),
        ));
    }
    readiness.set(true);
    let watch_task = tokio::spawn(
        watch(watcher, listen, output.clone(), shutdown.child_token())
            .instrument(info_span!("manifests")),
    );

    let mut result = Ok(());
    let activator_done = tokio::select! {
        () = telemetry::shutdown_signal() => false,
        r = &mut activator_task => {
            result = flatten(r);
            if let Err(e) = &result {
                warn!(error = %e, "the activator stopped; shutting down");
            }
            true
        }
    };
    readiness.set(false);
    shutdown.cancel();
    if !activator_done {
        result = flatten(activator_task.await);
    }
    let _ = watch_task.await;
    if let Err(e) = flatten(autoscaler_task.await) {
        warn!(error = %e, "autoscaler");
    }
    info!("stopping every replica (Ctrl-C again to kill them at once)");
    let stopping = platform.shutdown();
    tokio::pin!(stopping);
    tokio::select! {
        () = &mut stopping => {}
        () = telemetry::shutdown_signal() => {
            platform.kill_now();
            stopping.await;
        }
    }
    info!("all replicas stopped");
    result
}

fn flatten(r: Result<crate::Result<()>, tokio::task::JoinError>) -> crate::Result<()> {
    match r {
        Ok(r) => r,
        Err(e) => Err(Error::Other(format!("task failed: {e}")).into()),
    }
}

/// The command that calls a Function through the dev activator.
pub fn curl_line(f: &Function, listen: SocketAddr) -> String {
    let key = f.key();
    format!(
        "curl -H 'Host: {}.{}' http://{listen}/",
        key.name, key.namespace
    )
}

async fn banner<'a>(
    output: &Output,
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    functions: impl Iterator<Item = &'a Function>,
) {
    let mut lines = vec![format!(
        "zeroscale dev: serving Functions on http://{listen}"
    )];
    if let Some(admin) = admin {
        lines.push(format!(
            "  admin: http://{admin}/metrics  /stats  /functions"
        ));
    }
    let functions: Vec<&Function> = functions.collect();
    if functions.is_empty() {
        lines.push("  no Functions yet; add manifests and they are picked up".into());
    }
    for f in functions {
        lines.push(format!(
            "  {:<24} {}",
            f.key().to_string(),
            curl_line(f, listen)
        ));
    }
    for line in lines {
        output.line(Stream::Stdout, line).await;
    }
}

/// Re-reads the manifests every [`POLL_INTERVAL`] until `stop`.
async fn watch(
    mut watcher: manifests::Watcher,
    listen: SocketAddr,
    output: Output,
    stop: CancellationToken,
) {
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        let before: Vec<_> = watcher.functions().map(Function::key).collect();
        watcher.poll().await;
        for f in watcher.functions() {
            if !before.contains(&f.key()) {
                output
                    .line(
                        Stream::Stdout,
                        format!("  {:<24} {}", f.key().to_string(), curl_line(f, listen)),
                    )
                    .await;
            }
        }
    }
}

/// `/functions` (the local replicas as JSON), then the activator's routes.
fn admin_route(activator: AdminRoute, platform: LocalPlatform) -> AdminRoute {
    Arc::new(move |path: &str| {
        if path == "/functions" || path.starts_with("/functions?") {
            let body = match serde_json::to_vec_pretty(&platform.view()) {
                Ok(b) => b,
                Err(e) => {
                    return Some(telemetry::text_response(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        e.to_string(),
                    ));
                }
            };
            let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(body)));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            return Some(resp);
        }
        activator(path)
    })
}
