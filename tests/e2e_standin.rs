//! The stand-in node on a real control plane (`make e2e`): a Deployment's pods run, turn
//! Ready, are listed ready in their Service's EndpointSlice and answer through the
//! ClusterIP; scaled to zero they stop and their objects go away. When the cluster in
//! KUBECONFIG already has a Ready node (a real one, or a stand-in someone else runs) the
//! test uses it; otherwise it starts `zeroscale-standin-node`, which needs root.
//!
//! Without a reachable cluster (or root, when a stand-in is needed) the test prints a
//! note and passes; with `ZEROSCALE_E2E_REQUIRE=1` it fails instead.

use std::process::Stdio;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::{Instant, sleep, timeout};

mod e2e_support;

const DEADLINE: Duration = Duration::from_secs(90);

fn required() -> bool {
    std::env::var("ZEROSCALE_E2E_REQUIRE").is_ok_and(|v| v == "1")
}

fn skip(why: &str) {
    assert!(!required(), "ZEROSCALE_E2E_REQUIRE=1 but {why}");
    eprintln!("SKIPPED: {why}");
}

async fn cluster() -> Result<Client, String> {
    let connect = async {
        let client = Client::try_default().await.map_err(|e| e.to_string())?;
        client
            .apiserver_version()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>(client)
    };
    timeout(Duration::from_secs(15), connect)
        .await
        .map_err(|_| "timed out connecting".to_string())?
}

/// Polls `check` until it returns `Some` or the deadline passes.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(250)).await;
    }
}

/// The stand-in node this test started, if it had to.
struct StandIn(Option<Child>);

impl StandIn {
    async fn ensure(client: &Client) -> Result<Self, String> {
        let nodes: Api<Node> = Api::all(client.clone());
        // A Ready node of the cluster's own is used. A running stand-in may be a
        // long-lived one someone shares, or the one of the test binary that ran just
        // before this one, stopping as that process exits: a stopping stand-in cordons
        // its node and is waited for (its pods get their grace periods, up to the
        // activator's lame duck), and one still in service after a minute is shared.
        let patience = Instant::now() + Duration::from_secs(60);
        let stopping_patience = Instant::now() + Duration::from_secs(600);
        let ready = loop {
            let listed = nodes
                .list(&ListParams::default())
                .await
                .map_err(|e| e.to_string())?
                .items;
            let other_ready = listed.iter().any(|n| {
                n.metadata.name.as_deref() != Some(e2e_support::STANDIN_NODE)
                    && n.status
                        .iter()
                        .flat_map(|s| s.conditions.iter().flatten())
                        .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if other_ready {
                break true;
            }
            if !e2e_support::standin_alive(client).await {
                break false;
            }
            let stopping = listed.iter().any(|n| {
                n.metadata.name.as_deref() == Some(e2e_support::STANDIN_NODE)
                    && n.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
            });
            let now = Instant::now();
            if stopping && now >= stopping_patience {
                return Err("the stand-in node has been stopping for ten minutes".into());
            }
            if !stopping && now >= patience {
                break true;
            }
            sleep(Duration::from_secs(1)).await;
        };
        if ready {
            return Ok(Self(None));
        }
        if !nix::unistd::geteuid().is_root() {
            return Err("the cluster has no Ready node and the stand-in node needs root".into());
        }
        let mut child = Command::new(env!("CARGO_BIN_EXE_zeroscale-standin-node"))
            .args(["--restart-backoff", "1s", "--echo-logs"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let ready = timeout(DEADLINE, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with("stand-in node ") && line.ends_with(" ready") {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            return Err("the stand-in node did not get ready".into());
        }
        Ok(Self(Some(child)))
    }

    /// SIGTERM: the stand-in stops its pods and removes what it made on the host.
    async fn stop(mut self) {
        if let Some(mut child) = self.0.take() {
            if let Some(pid) = child.id() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = timeout(Duration::from_secs(30), child.wait()).await;
        }
    }
}

/// `GET /` through `host:port`; the status code.
async fn http_status(addr: &str) -> Option<u16> {
    let mut s = timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: web\r\n\r\n")
        .await
        .ok()?;
    let mut head = [0u8; 12];
    timeout(Duration::from_secs(5), s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

#[tokio::test]
#[ignore = "needs a cluster: make e2e"]
async fn deployment_pods_run_serve_through_the_cluster_ip_and_stop_on_scale_to_zero() {
    let client = match cluster().await {
        Ok(c) => c,
        Err(e) => {
            return skip(&format!(
                "no Kubernetes cluster reachable via KUBECONFIG ({e})"
            ));
        }
    };
    let standin = match StandIn::ensure(&client).await {
        Ok(s) => s,
        Err(e) => return skip(&e),
    };
    let ns = format!(
        "zeroscale-e2e-standin-{:06x}",
        rand::random::<u32>() & 0xff_ffff
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .unwrap();

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment: Deployment = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {
                    "terminationGracePeriodSeconds": 5,
                    "containers": [{
                        "name": "app",
                        "image": "python:3.12-alpine",
                        "command": ["python3", "-m", "http.server", "$(PORT)"],
                        "env": [{"name": "PORT", "value": "8080"}],
                        "ports": [{"name": "http", "containerPort": 8080}],
                        "readinessProbe": {"tcpSocket": {"port": "http"}, "periodSeconds": 1},
                    }],
                },
            },
        },
    }))
    .unwrap();
    deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    }))
    .unwrap();
    let service = services
        .create(&PostParams::default(), &service)
        .await
        .unwrap();
    let cluster_ip = service.spec.unwrap().cluster_ip.unwrap();

    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), &ns);
    eventually("two ready endpoints", || {
        let slices = slices.clone();
        async move {
            let list = slices
                .list(&ListParams::default().labels("kubernetes.io/service-name=web"))
                .await
                .ok()?;
            let ready = list
                .items
                .iter()
                .flat_map(|s| s.endpoints.iter())
                .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) == Some(true))
                .count();
            (ready == 2).then_some(())
        }
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for pod in pods.list(&ListParams::default()).await.unwrap() {
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert!(status.pod_ip.is_some_and(|ip| !ip.is_empty()));
    }
    let addr = format!("{cluster_ip}:80");
    for _ in 0..4 {
        assert_eq!(http_status(&addr).await, Some(200), "GET http://{addr}/");
    }

    deployments
        .patch(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 0}})),
        )
        .await
        .unwrap();
    eventually("the pods to be gone", || {
        let pods = pods.clone();
        async move {
            pods.list(&ListParams::default())
                .await
                .ok()?
                .items
                .is_empty()
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        http_status(&addr).await,
        None,
        "no endpoint: the proxy closes"
    );

    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    standin.stop().await;
}
