//! Support for the real-cluster suite (`tests/e2e_cluster.rs`, `make e2e`): finding the
//! cluster, bringing the stand-in node where it has no kubelet, installing zeroscale the
//! way a user does (the Helm chart rendered and applied, or `kubectl apply -k`), test
//! namespaces that are always cleaned up, and an HTTP client that reaches a Function the
//! way a client in the cluster does (its Service's ClusterIP), or through a port-forward
//! to the activator where the host cannot reach ClusterIPs.
//!
//! Environment:
//! - `KUBECONFIG`: the cluster (no cluster reachable: every test is skipped, or fails
//!   with `ZEROSCALE_E2E_REQUIRE=1`);
//! - `ZEROSCALE_E2E_STANDIN`: `1` always runs the stand-in node, `0` never; unset runs it
//!   when the cluster has no Ready node (a bare control plane);
//! - `ZEROSCALE_E2E_STANDIN_ARGS`: more flags for the stand-in node (space-separated), e.g.
//!   `--bridge zs-br1 --pod-cidr 10.245.0.0/16 --services-interface zs-svc1` to run a
//!   second one for another cluster on the same host;
//! - `ZEROSCALE_E2E_LOGS=1`: the stand-in echoes every container's output;
//! - `ZEROSCALE_E2E_IMAGE`: the zeroscale image the installs run (default
//!   `ghcr.io/zeroscale/zeroscale:e2e`, which the stand-in maps to the binary under test;
//!   on kind, build and `kind load docker-image` your own and name it here).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::json;
use tokio::time::Instant;

/// The label on every namespace the suite creates, so a crashed run's leftovers are found.
pub const E2E_LABEL: &str = "zeroscale.dev/e2e";
/// The stand-in node's name.
pub const STANDIN_NODE: &str = "zeroscale-standin";

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The cluster under test.
#[derive(Clone)]
pub struct Cluster {
    pub client: Client,
    /// `major.minor` of the API server, e.g. `1.24`.
    pub version: (u32, u32),
    /// Whether pods run on the stand-in node (so ClusterIPs are reachable from here).
    pub standin: bool,
    /// The zeroscale image installs run.
    pub image: String,
}

impl Cluster {
    pub fn version_string(&self) -> String {
        format!("{}.{}", self.version.0, self.version.1)
    }
}

/// The cluster in KUBECONFIG, with a node to run pods; `None` (the test is skipped) when
/// there is none, or a failure with `ZEROSCALE_E2E_REQUIRE=1`.
pub async fn cluster(test: &str) -> Option<Cluster> {
    let required = std::env::var("ZEROSCALE_E2E_REQUIRE").is_ok_and(|v| v == "1");
    let connect = async {
        let client = Client::try_default().await.map_err(|e| e.to_string())?;
        let info = client
            .apiserver_version()
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, String>((client, info))
    };
    let (client, info) = match tokio::time::timeout(Duration::from_secs(15), connect).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return skip(test, required, &e),
        Err(_) => return skip(test, required, "timed out connecting"),
    };
    let minor: u32 = info
        .minor
        .trim_end_matches('+')
        .parse()
        .expect("a numeric minor version");
    let major: u32 = info.major.parse().expect("a numeric major version");
    let (standin_running, other_nodes) = ready_nodes(&client).await;
    let standin = match std::env::var("ZEROSCALE_E2E_STANDIN").as_deref() {
        Ok("0") => false,
        Ok("1") => true,
        _ => standin_running || !other_nodes,
    };
    // A stand-in someone already runs for this cluster (a long-lived one shared by
    // several runs) is used as it is; otherwise this process starts its own.
    if standin && !standin_running {
        if let Err(e) = ensure_standin() {
            panic!("{test}: starting the stand-in node: {e}");
        }
        wait_node_ready(&client).await;
    }
    eprintln!(
        "{test}: Kubernetes {}.{} ({}), {}",
        major,
        minor,
        info.git_version,
        if standin {
            "pods on the stand-in node"
        } else {
            "pods on the cluster's nodes"
        }
    );
    Some(Cluster {
        client,
        version: (major, minor),
        standin,
        image: std::env::var("ZEROSCALE_E2E_IMAGE")
            .unwrap_or_else(|_| "ghcr.io/zeroscale/zeroscale:e2e".into()),
    })
}

fn skip(test: &str, required: bool, why: &str) -> Option<Cluster> {
    assert!(
        !required,
        "{test}: ZEROSCALE_E2E_REQUIRE=1 but no cluster is reachable: {why}"
    );
    eprintln!("SKIPPED {test}: no Kubernetes cluster reachable via KUBECONFIG ({why})");
    None
}

fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether a stand-in node is running, and whether any other node is Ready.
async fn ready_nodes(client: &Client) -> (bool, bool) {
    let nodes: Api<Node> = Api::all(client.clone());
    let items = nodes
        .list(&ListParams::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    let ready = |standin: bool| {
        items
            .iter()
            .any(|n| (n.name_any() == STANDIN_NODE) == standin && node_ready(n))
    };
    (ready(true) && standin_alive(client).await, ready(false))
}

/// Whether the stand-in node renewed its Lease within the last 20 s (it does every
/// 10 s). A stand-in that just exited with a test binary, or was killed, still says
/// Ready until the node controller notices, about 40 s later; pods bound to it would
/// never run.
pub async fn standin_alive(client: &Client) -> bool {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let Ok(Some(lease)) = leases.get_opt(STANDIN_NODE).await else {
        return false;
    };
    let Some(renewed) = lease.spec.and_then(|s| s.renew_time) else {
        return false;
    };
    let age = jiff::Timestamp::now().duration_since(renewed.0);
    age < jiff::SignedDuration::from_secs(20)
}

async fn wait_node_ready(client: &Client) {
    let nodes: Api<Node> = Api::all(client.clone());
    eventually(
        "the stand-in node to be Ready",
        Duration::from_secs(60),
        || {
            let nodes = nodes.clone();
            async move {
                let n = nodes.get_opt(STANDIN_NODE).await.ok().flatten()?;
                node_ready(&n).then_some(())
            }
        },
    )
    .await;
}

static STANDIN: OnceLock<Result<(), String>> = OnceLock::new();

/// Starts the stand-in node once for this test process. It runs from a thread that lives
/// as long as the process (its parent-death signal is tied to the spawning thread) and
/// gets SIGTERM, stopping its pods, when the test process exits.
fn ensure_standin() -> Result<(), String> {
    STANDIN
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Result<(), String>>();
            std::thread::spawn(move || run_standin(tx));
            rx.recv_timeout(Duration::from_secs(120))
                .unwrap_or_else(|e| Err(format!("no word from the stand-in node: {e}")))
        })
        .clone()
}

fn run_standin(ready: std::sync::mpsc::Sender<Result<(), String>>) {
    use std::os::unix::process::CommandExt;
    let image = std::env::var("ZEROSCALE_E2E_IMAGE")
        .unwrap_or_else(|_| "ghcr.io/zeroscale/zeroscale:e2e".into());
    let repository = image
        .rsplit_once(':')
        .filter(|(_, tag)| !tag.contains('/'))
        .map_or(image.as_str(), |(r, _)| r)
        .to_string();
    let mut command = Command::new(env!("CARGO_BIN_EXE_zeroscale-standin-node"));
    command
        .args([
            "--node-name",
            STANDIN_NODE,
            "--image",
            &format!(
                "{repository}={}:/zeroscale",
                env!("CARGO_BIN_EXE_zeroscale")
            ),
            "--restart-backoff",
            "1s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if std::env::var("ZEROSCALE_E2E_LOGS").is_ok_and(|v| v == "1") {
        command.arg("--echo-logs");
    }
    if let Ok(extra) = std::env::var("ZEROSCALE_E2E_STANDIN_ARGS") {
        command.args(extra.split_whitespace());
    }
    // SAFETY: prctl is async-signal-safe; it runs in the child before exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
                .map_err(std::io::Error::from)
        });
    }
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(format!("spawning the stand-in node: {e}")));
            return;
        }
    };
    let Some(stdout) = child.stdout.take() else {
        let _ = ready.send(Err("no stdout".into()));
        return;
    };
    let mut told = false;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        eprintln!("[stand-in] {line}");
        if !told && line.contains("ready") {
            told = true;
            let _ = ready.send(Ok(()));
        }
    }
    let status = child.wait();
    if !told {
        let _ = ready.send(Err(format!("the stand-in node exited: {status:?}")));
    }
}

/// Polls `check` every 200 ms until it returns `Some`, failing the test after `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs kubectl against the cluster in KUBECONFIG; `Err` carries its stderr.
pub fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("kubectl")
        .args(args)
        .current_dir(root())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running kubectl: {e}"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .map_err(|e| format!("writing to kubectl: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("kubectl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// A namespace of the test's own, labelled, deleted when dropped (also on failure).
pub struct TestNamespace {
    pub name: String,
}

impl TestNamespace {
    pub async fn new(cluster: &Cluster, prefix: &str) -> Self {
        let name = format!("{prefix}-{:06x}", rand::random::<u32>() & 0xff_ffff);
        create_namespace(cluster, &name, &[]).await;
        Self { name }
    }
}

/// Creates a labelled namespace and waits until pods can be created in it (its
/// `default` ServiceAccount exists).
pub async fn create_namespace(cluster: &Cluster, name: &str, labels: &[(&str, &str)]) {
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    let mut all: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    all.insert(E2E_LABEL.into(), "true".into());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name, "labels": all}}))
        .expect("a namespace");
    api.create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating namespace {name}: {e}"));
    let accounts: Api<k8s_openapi::api::core::v1::ServiceAccount> =
        Api::namespaced(cluster.client.clone(), name);
    eventually(
        "the namespace's default ServiceAccount",
        Duration::from_secs(60),
        || {
            let accounts = accounts.clone();
            async move { accounts.get_opt("default").await.ok().flatten() }
        },
    )
    .await;
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        // The Functions first: since Kubernetes 1.33 a namespace's pods go before its
        // other objects, so deleting only the namespace would keep the Functions' activator
        // slices until their pods are gone, and an activator being uninstalled alongside
        // would sit out its whole lame duck for routes that are about to disappear.
        let _ = kubectl(
            &[
                "delete",
                "functions.zeroscale.dev",
                "--all",
                "--namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
        let _ = kubectl(
            &[
                "delete",
                "namespace",
                &self.name,
                "--wait=false",
                "--ignore-not-found",
            ],
            None,
        );
    }
}

/// Deletes what a crashed earlier run left: its namespaces (an install's too), once they
/// are an hour old, so that runs sharing a cluster never delete each other's.
pub async fn remove_leftovers(cluster: &Cluster) {
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    let Ok(list) = api
        .list(&ListParams::default().labels(&format!("{E2E_LABEL}=true")))
        .await
    else {
        return;
    };
    let hour_ago = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(3600);
    for ns in list.items {
        let old = ns
            .metadata
            .creation_timestamp
            .as_ref()
            .is_some_and(|t| t.0 < hour_ago);
        if old && ns.metadata.deletion_timestamp.is_none() {
            eprintln!(
                "deleting namespace {} left by an earlier run",
                ns.name_any()
            );
            let _ = api.delete(&ns.name_any(), &DeleteParams::default()).await;
        }
    }
}

/// How zeroscale was installed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// The Helm chart, rendered with Helm's SDK and applied as `helm install` would.
    Chart,
    /// `kubectl apply --server-side -k config/default`.
    Kustomize,
}

/// An install of zeroscale; uninstalled when dropped (also on failure).
pub struct Install {
    pub method: Method,
    pub namespace: String,
    pub operator: String,
    pub activator: String,
    /// What to delete on uninstall (the CRD left out, as `helm uninstall` does).
    manifest: String,
}

impl Install {
    /// The chart, as release `release` (which must contain `zeroscale`, so that it is the
    /// prefix of the objects' names) in a fresh namespace `namespace`, with `values`
    /// merged over the suite's (the image).
    pub async fn chart(
        cluster: &Cluster,
        release: &str,
        namespace: &str,
        values: serde_json::Value,
    ) -> Install {
        let (repository, tag) = split_image(&cluster.image);
        let mut all = json!({
            "image": {"repository": repository, "tag": tag, "pullPolicy": "IfNotPresent"},
            "logging": {"level": "info,zeroscale=debug"},
        });
        merge(&mut all, &values);
        let dir = tempfile::tempdir().expect("a temp dir");
        let values_file = dir.path().join("values.yaml");
        std::fs::write(&values_file, serde_json::to_string(&all).expect("json"))
            .expect("writing values");
        let out = Command::new("python3")
            .args([
                "tests/packaging/render.py",
                values_file.to_str().expect("utf-8"),
                "--name",
                release,
                "--namespace",
                namespace,
            ])
            .current_dir(root())
            .output()
            .expect("python3 runs (tests/packaging/requirements.txt)");
        assert!(
            out.status.success(),
            "rendering the chart: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rendered = String::from_utf8(out.stdout).expect("utf-8");
        let (crds, rest) = split_crds(&rendered);
        // As `helm install`: the CRDs of crds/ first (kept on uninstall), then the rest.
        kubectl(&["apply", "-f", "-"], Some(&crds)).expect("the chart's CRD applies");
        create_namespace(
            cluster,
            namespace,
            &[("pod-security.kubernetes.io/enforce", "restricted")],
        )
        .await;
        let install = Install {
            method: Method::Chart,
            namespace: namespace.into(),
            operator: format!("{release}-operator"),
            activator: format!("{release}-activator"),
            manifest: rest.clone(),
        };
        kubectl(&["apply", "-f", "-"], Some(&rest)).expect("the chart's objects apply");
        install
    }

    /// `kubectl apply --server-side -k config/default` (the image replaced when the suite
    /// runs another one).
    pub async fn kustomize(cluster: &Cluster) -> Install {
        let rendered = kubectl(&["kustomize", "config/default"], None).expect("kustomize");
        let (repository, tag) = split_image(&cluster.image);
        let rendered = rendered.replace(
            "image: ghcr.io/zeroscale/zeroscale:0.1.0",
            &format!("image: {repository}:{tag}"),
        );
        let (_, rest) = split_crds(&rendered);
        let install = Install {
            method: Method::Kustomize,
            namespace: "zeroscale-system".into(),
            operator: "zeroscale-operator".into(),
            activator: "zeroscale-activator".into(),
            manifest: rest,
        };
        kubectl(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(&rendered),
        )
        .expect("config/default applies");
        // Label the namespace for the leftover sweep.
        let _ = kubectl(
            &[
                "label",
                "namespace",
                "zeroscale-system",
                &format!("{E2E_LABEL}=true"),
                "--overwrite",
            ],
            None,
        );
        install
    }

    /// Waits until both components' Deployments have every replica available.
    pub async fn wait_ready(&self, cluster: &Cluster) {
        let deployments: Api<Deployment> = Api::namespaced(cluster.client.clone(), &self.namespace);
        for name in [&self.operator, &self.activator] {
            eventually(
                &format!("Deployment {name} to be available"),
                Duration::from_secs(120),
                || {
                    let deployments = deployments.clone();
                    async move {
                        let d = deployments.get_opt(name).await.ok().flatten()?;
                        let want = d.spec.as_ref()?.replicas.unwrap_or(1);
                        let status = d.status?;
                        (status.available_replicas.unwrap_or(0) >= want
                            && status.updated_replicas.unwrap_or(0) >= want)
                            .then_some(())
                    }
                },
            )
            .await;
        }
    }

    /// The running pods of one component.
    pub async fn pods(&self, cluster: &Cluster, component: &str) -> Vec<Pod> {
        let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), &self.namespace);
        pods.list(
            &ListParams::default().labels(&format!("app.kubernetes.io/component={component}")),
        )
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .collect()
        })
        .unwrap_or_default()
    }

    /// The `/stats` of every activator pod, as JSON.
    pub async fn activator_stats(&self, cluster: &Cluster) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        for pod in self.pods(cluster, "activator").await {
            let Some(ip) = pod.status.as_ref().and_then(|s| s.pod_ip.clone()) else {
                continue;
            };
            let Ok(addr) = format!("{ip}:9090").parse::<SocketAddr>() else {
                continue;
            };
            if let Ok(r) = get(addr, "stats", "/stats").await
                && let Ok(v) = serde_json::from_str(&r.body)
            {
                out.push(v);
            }
        }
        out
    }

    fn uninstall(&self) {
        let _ = kubectl(
            &["delete", "--ignore-not-found", "--wait=false", "-f", "-"],
            Some(&self.manifest),
        );
        let _ = kubectl(
            &[
                "delete",
                "namespace",
                &self.namespace,
                "--ignore-not-found",
                "--wait=false",
            ],
            None,
        );
    }
}

impl Drop for Install {
    fn drop(&mut self) {
        self.uninstall();
    }
}

/// Waits until an install's namespace is gone, so the next install may reuse its names.
/// The namespace controller retries with a growing back-off while pods still stop, so
/// the last step can come minutes after the namespace emptied.
pub async fn wait_namespace_gone(cluster: &Cluster, name: &str) {
    let api: Api<Namespace> = Api::all(cluster.client.clone());
    eventually(
        &format!("namespace {name} to be deleted"),
        Duration::from_secs(600),
        || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok()?.is_none().then_some(()) }
        },
    )
    .await;
}

fn split_image(image: &str) -> (String, String) {
    match image.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => (r.to_string(), t.to_string()),
        _ => (image.to_string(), "latest".to_string()),
    }
}

/// The CustomResourceDefinitions of a multi-document YAML, and the other documents.
fn split_crds(yaml: &str) -> (String, String) {
    let mut crds = String::new();
    let mut rest = String::new();
    for doc in yaml.split("\n---") {
        let doc = doc.trim_start_matches("---");
        if doc.trim().is_empty() {
            continue;
        }
        let target = if doc.contains("\nkind: CustomResourceDefinition") {
            &mut crds
        } else {
            &mut rest
        };
        target.push_str("---\n");
        target.push_str(doc.trim_start_matches('\n'));
        target.push('\n');
    }
    (crds, rest)
}

/// Merges `from` into `into`, objects key by key, anything else replaced.
pub fn merge(into: &mut serde_json::Value, from: &serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge(a.entry(k.clone()).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, v) => *slot = v.clone(),
    }
}

/// A Function manifest of the suite's test app (python, answers `?delay=S` after S
/// seconds, body `host=<pod name>`), with `scale` and extra spec fields.
pub fn test_function(
    namespace: &str,
    name: &str,
    spec_extra: serde_json::Value,
) -> serde_json::Value {
    let mut f = json!({
        "apiVersion": "zeroscale.dev/v1alpha1",
        "kind": "Function",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "template": {"spec": {
                "terminationGracePeriodSeconds": 10,
                "containers": [{
                    "name": "app",
                    "image": "python:3.12-alpine",
                    "command": ["python3", "-u", "-c", TEST_APP],
                    "env": [{"name": "PORT", "value": "8080"}],
                    "ports": [{"containerPort": 8080}],
                    "readinessProbe": {"tcpSocket": {"port": 8080}, "periodSeconds": 1},
                }],
            }},
        },
    });
    merge(&mut f["spec"], &spec_extra);
    f
}

/// The suite's test app: HTTP/1.1 keep-alive, threads, `?delay=S`, and `IGNORE_TERM=1`
/// to ignore SIGTERM (an app that must be killed).
pub const TEST_APP: &str = r#"
import os, signal, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        q = parse_qs(urlparse(self.path).query)
        d = float(q.get("delay", ["0"])[0])
        if d:
            time.sleep(d)
        body = ("host=%s\n" % os.environ.get("HOSTNAME", "")).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
if os.environ.get("IGNORE_TERM"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer(("", int(os.environ["PORT"])), H).serve_forever()
"#;

/// Applies a manifest (JSON) with kubectl, as a user would.
pub fn apply(manifest: &serde_json::Value) -> Result<String, String> {
    kubectl(
        &["apply", "-f", "-"],
        Some(&serde_json::to_string(manifest).expect("json")),
    )
}

/// One HTTP response, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

/// GET `path` from `addr` with a Host header, on a fresh connection.
pub async fn get(addr: SocketAddr, host: &str, path: &str) -> Result<Reply, String> {
    let mut conn = Conn::open(addr).await?;
    conn.get(host, path).await
}

/// One HTTP/1.1 keep-alive connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> Result<Self, String> {
        let stream =
            tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| format!("connect {addr}: timed out"))?
                .map_err(|e| format!("connect {addr}: {e}"))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    pub async fn get(&mut self, host: &str, path: &str) -> Result<Reply, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let req = http::Request::get(path)
            .header(http::header::HOST, host)
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let resp = self
            .sender
            .send_request(req)
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}

/// Where the suite sends a Function's traffic: its Service's ClusterIP, as a client in
/// the cluster does (the stand-in node proxies ClusterIPs), or a port-forward to the
/// activator Service with the Function's host name (as an Ingress does).
pub struct Gateway {
    pub addr: SocketAddr,
    pub host: String,
    _forward: Option<std::process::Child>,
}

impl Gateway {
    /// A gateway to an address already known (no port-forward of its own).
    pub fn direct(addr: SocketAddr, host: String) -> Self {
        Self {
            addr,
            host,
            _forward: None,
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(child) = self._forward.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The gateway to Function `namespace/name` of `install`: its Service's ClusterIP where
/// the stand-in proxies Services, else a port-forward to the activator Service.
pub async fn gateway(cluster: &Cluster, install: &Install, namespace: &str, name: &str) -> Gateway {
    let host = format!("{name}.{namespace}.svc.cluster.local");
    if cluster.standin {
        let ip = cluster_ip(cluster, namespace, name).await;
        return standin_gateway(&ip, host).await;
    }
    port_forward(&install.namespace, &install.activator, host)
}

/// A gateway to an ordinary Service of the user's (port 80): its ClusterIP where the
/// stand-in proxies them, else a port-forward to it.
pub async fn service_gateway(cluster: &Cluster, namespace: &str, name: &str) -> Gateway {
    let host = format!("{name}.{namespace}.svc.cluster.local");
    let ip = cluster_ip(cluster, namespace, name).await;
    if cluster.standin {
        return standin_gateway(&ip, host).await;
    }
    port_forward(namespace, name, host)
}

/// A ClusterIP the stand-in node serves, once it does: the node puts each ClusterIP on a
/// local interface when its Service proxy takes the Service up, which with thousands of
/// Services can be a while after the Service has its IP. Before that, a connection to the
/// IP leaves the host (and whatever answers there is not the Service).
async fn standin_gateway(ip: &str, host: String) -> Gateway {
    eventually(
        &format!("the stand-in node to serve ClusterIP {ip}"),
        Duration::from_secs(300),
        || async {
            let out = tokio::process::Command::new("ip")
                .args(["-o", "-4", "addr", "show", "to", &format!("{ip}/32")])
                .output()
                .await
                .ok()?;
            (!out.stdout.is_empty()).then_some(())
        },
    )
    .await;
    Gateway::direct(format!("{ip}:80").parse().expect("an IP"), host)
}

/// Service `namespace/name`'s ClusterIP, once it has one.
async fn cluster_ip(cluster: &Cluster, namespace: &str, name: &str) -> String {
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), namespace);
    eventually(
        &format!("Service {namespace}/{name} to have a ClusterIP"),
        Duration::from_secs(60),
        || {
            let services = services.clone();
            async move {
                let s = services.get_opt(name).await.ok().flatten()?;
                s.spec?
                    .cluster_ip
                    .filter(|ip| ip != "None" && !ip.is_empty())
            }
        },
    )
    .await
}

/// `kubectl port-forward` to port 80 of Service `namespace/service`, on a free local port,
/// for as long as the gateway lives.
fn port_forward(namespace: &str, service: &str, host: String) -> Gateway {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        l.local_addr().expect("an address").port()
    };
    let child = Command::new("kubectl")
        .args([
            "port-forward",
            "-n",
            namespace,
            &format!("svc/{service}"),
            &format!("{port}:80"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("kubectl port-forward runs");
    Gateway {
        addr: format!("127.0.0.1:{port}").parse().expect("an address"),
        host,
        _forward: Some(child),
    }
}

/// What a closed-loop load run saw.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// Requests sent.
    pub sent: u64,
    /// Responses by status code.
    pub statuses: BTreeMap<u16, u64>,
    /// Requests that got no response (connection errors), with the first few errors.
    pub failed: u64,
    pub errors: Vec<String>,
    /// When the first 200 arrived and when the last one did.
    pub first_ok: Option<tokio::time::Instant>,
    pub last_ok: Option<tokio::time::Instant>,
}

impl LoadReport {
    pub fn ok(&self) -> u64 {
        self.statuses.get(&200).copied().unwrap_or(0)
    }

    /// Every request answered 200.
    pub fn lossless(&self) -> bool {
        self.failed == 0 && self.ok() == self.sent
    }

    /// Answers per second from the first 200 to the last: the rate once serving, with
    /// the wait for the platform to start a pod left out.
    pub fn serving_rate(&self) -> Option<f64> {
        let seconds = (self.last_ok? - self.first_ok?).as_secs_f64();
        (seconds > 0.0).then(|| self.ok().saturating_sub(1) as f64 / seconds)
    }
}

/// Runs `during` while `clients` keep-alive clients send `path` to `gw` back to back,
/// then 2 s longer, and returns what `during` returned and what the clients saw.
pub async fn under_load<T, F, Fut>(
    gw: &Gateway,
    path: &str,
    clients: usize,
    during: F,
) -> (T, LoadReport)
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = T>,
{
    let stop = tokio_util::sync::CancellationToken::new();
    let run = {
        let (stop, addr, host, path) = (stop.clone(), gw.addr, gw.host.clone(), path.to_string());
        tokio::spawn(async move {
            let gw = Gateway::direct(addr, host);
            load(&gw, &path, clients, stop).await
        })
    };
    let out = during().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    (out, run.await.expect("the load run"))
}

/// `clients` keep-alive clients sending `path` back to back through `gw` until `stop`
/// resolves; a broken connection is reopened (a client would retry on a fresh one).
pub async fn load(
    gw: &Gateway,
    path: &str,
    clients: usize,
    stop: tokio_util::sync::CancellationToken,
) -> LoadReport {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (addr, host, path, stop) = (gw.addr, gw.host.clone(), path.to_string(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut report = LoadReport::default();
            let mut conn: Option<Conn> = None;
            while !stop.is_cancelled() {
                if conn.as_ref().is_none_or(Conn::is_closed) {
                    conn = match Conn::open(addr).await {
                        Ok(c) => Some(c),
                        Err(e) => {
                            report.sent += 1;
                            report.failed += 1;
                            if report.errors.len() < 5 {
                                report.errors.push(e);
                            }
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                }
                let Some(c) = conn.as_mut() else { continue };
                report.sent += 1;
                match c.get(&host, &path).await {
                    Ok(r) => {
                        *report.statuses.entry(r.status).or_default() += 1;
                        if r.status == 200 {
                            let now = tokio::time::Instant::now();
                            report.first_ok.get_or_insert(now);
                            report.last_ok = Some(now);
                        }
                        if r.status != 200 && report.errors.len() < 5 {
                            report
                                .errors
                                .push(format!("{}: {}", r.status, r.body.trim()));
                        }
                    }
                    Err(e) => {
                        report.failed += 1;
                        if report.errors.len() < 5 {
                            report.errors.push(e);
                        }
                        conn = None;
                    }
                }
            }
            report
        }));
    }
    let mut total = LoadReport::default();
    for t in tasks {
        let r = t.await.expect("a load client");
        total.sent += r.sent;
        total.failed += r.failed;
        for (k, v) in r.statuses {
            *total.statuses.entry(k).or_default() += v;
        }
        total.errors.extend(r.errors);
        total.first_ok = match (total.first_ok, r.first_ok) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        total.last_ok = total.last_ok.max(r.last_ok);
    }
    total
}

/// Deletes a pod at once (`--grace-period=0 --force`), as a node failure would.
pub async fn kill_pod(cluster: &Cluster, namespace: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(cluster.client.clone(), namespace);
    let _ = pods
        .delete(
            name,
            &DeleteParams {
                grace_period_seconds: Some(0),
                ..DeleteParams::default()
            },
        )
        .await;
}
