//! Probes and lifecycle handlers as the kubelet runs them: parsed once from the container
//! spec (defaults, named ports), checked from the host against the pod IP (`httpGet`,
//! `tcpSocket`; `grpc` is a TCP connect here) or inside the container (`exec`, through
//! [`Exec`]), and tracked with success/failure thresholds. One task per probe reports the
//! verdict changes to the container's supervisor.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Container, HTTPGetAction, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};

/// What a probe or a handler does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Tcp {
        host: Option<String>,
        port: u16,
    },
    Http {
        host: Option<String>,
        port: u16,
        path: String,
        https: bool,
        headers: Vec<(String, String)>,
    },
    Exec(Vec<String>),
    /// The `sleep` lifecycle handler.
    Sleep(Duration),
    /// A handler that does nothing (the deprecated `tcpSocket` handler).
    Nothing,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Startup,
    Readiness,
    Liveness,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Readiness => "Readiness",
            Kind::Liveness => "Liveness",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeSpec {
    pub action: Action,
    pub initial_delay: Duration,
    pub period: Duration,
    pub timeout: Duration,
    pub success_threshold: u32,
    pub failure_threshold: u32,
    /// The probe's own `terminationGracePeriodSeconds` (liveness and startup kills).
    pub termination_grace: Option<Duration>,
}

fn secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

/// A probe of `container` with the API's defaults (period 10 s, timeout 1 s, thresholds
/// 1 and 3).
pub fn parse_probe(probe: &Probe, container: &Container) -> Result<ProbeSpec, String> {
    let action = if let Some(exec) = &probe.exec {
        Action::Exec(exec.command.clone().unwrap_or_default())
    } else if let Some(http) = &probe.http_get {
        http_action(http, container)?
    } else if let Some(tcp) = &probe.tcp_socket {
        Action::Tcp {
            host: tcp.host.clone().filter(|h| !h.is_empty()),
            port: resolve_port(&tcp.port, container)?,
        }
    } else if let Some(grpc) = &probe.grpc {
        Action::Tcp {
            host: None,
            port: u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?,
        }
    } else {
        return Err("probe has no handler".into());
    };
    let positive = |v: Option<i32>, default: u32| {
        v.and_then(|v| u32::try_from(v).ok())
            .filter(|v| *v > 0)
            .unwrap_or(default)
    };
    Ok(ProbeSpec {
        action,
        initial_delay: secs(probe.initial_delay_seconds, 0),
        period: secs(probe.period_seconds, 10).max(Duration::from_secs(1)),
        timeout: secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)),
        success_threshold: positive(probe.success_threshold, 1),
        failure_threshold: positive(probe.failure_threshold, 3),
        termination_grace: probe
            .termination_grace_period_seconds
            .and_then(|s| u64::try_from(s).ok())
            .map(Duration::from_secs),
    })
}

/// A lifecycle handler (`preStop`, `postStart`).
pub fn parse_handler(handler: &LifecycleHandler, container: &Container) -> Result<Action, String> {
    if let Some(exec) = &handler.exec {
        Ok(Action::Exec(exec.command.clone().unwrap_or_default()))
    } else if let Some(http) = &handler.http_get {
        http_action(http, container)
    } else if let Some(sleep) = &handler.sleep {
        Ok(Action::Sleep(Duration::from_secs(
            u64::try_from(sleep.seconds).unwrap_or(0),
        )))
    } else {
        Ok(Action::Nothing)
    }
}

fn http_action(http: &HTTPGetAction, container: &Container) -> Result<Action, String> {
    let mut path = http.path.clone().unwrap_or_default();
    if !path.starts_with('/') {
        path.insert(0, '/');
    }
    Ok(Action::Http {
        host: http.host.clone().filter(|h| !h.is_empty()),
        port: resolve_port(&http.port, container)?,
        path,
        https: http.scheme.as_deref() == Some("HTTPS"),
        headers: http
            .http_headers
            .iter()
            .flatten()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect(),
    })
}

/// A port number, or the name of one of the container's ports.
pub fn resolve_port(port: &IntOrString, container: &Container) -> Result<u16, String> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("invalid port number: {n}")),
        IntOrString::String(s) => {
            if let Ok(n) = s.parse::<u16>() {
                return Ok(n);
            }
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
                .ok_or_else(|| format!("couldn't find port: {s} in {}", container.name))
        }
    }
}

/// Consecutive-result bookkeeping: the verdict flips after `success_threshold` successes
/// or `failure_threshold` failures in a row. Readiness and startup start failed, liveness
/// starts passed (as in the kubelet).
#[derive(Debug, Clone)]
pub struct Tracker {
    verdict: bool,
    run: u32,
    success_threshold: u32,
    failure_threshold: u32,
}

impl Tracker {
    pub fn new(kind: Kind, spec: &ProbeSpec) -> Self {
        Self {
            verdict: kind == Kind::Liveness,
            run: 0,
            success_threshold: spec.success_threshold,
            failure_threshold: spec.failure_threshold,
        }
    }

    /// Records one result; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.verdict {
            self.run = 0;
            return None;
        }
        self.run += 1;
        let needed = if ok {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.run >= needed {
            self.verdict = ok;
            self.run = 0;
            Some(ok)
        } else {
            None
        }
    }
}

/// Runs a command inside the running container; resolves to its exit code.
pub trait Exec: Send + Sync {
    fn exec(&self, argv: Vec<String>, timeout: Duration)
    -> BoxFuture<'static, Result<i32, String>>;
}

/// Where probes go: the pod IP (the node IP for host-network pods) and the container.
#[derive(Clone)]
pub struct Target {
    pub ip: String,
    pub exec: Arc<dyn Exec>,
    /// `major.minor` of the cluster, for the `kube-probe/` User-Agent.
    pub version: String,
}

/// One check or handler run, bounded by `timeout`.
pub async fn run_action(action: &Action, target: &Target, timeout: Duration) -> Result<(), String> {
    let host = |h: &Option<String>| h.clone().unwrap_or_else(|| target.ip.clone());
    let attempt = async {
        match action {
            Action::Tcp { host: h, port } => {
                let addr = format!("{}:{port}", host(h));
                TcpStream::connect(&addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("dial tcp {addr}: {e}"))
            }
            // No TLS client here: an HTTPS probe checks that the port accepts connections.
            Action::Http {
                host: h,
                port,
                https: true,
                ..
            } => {
                let addr = format!("{}:{port}", host(h));
                TcpStream::connect(&addr)
                    .await
                    .map(drop)
                    .map_err(|e| format!("dial tcp {addr}: {e}"))
            }
            Action::Http {
                host: h,
                port,
                path,
                headers,
                https: false,
            } => http_get(&host(h), *port, path, headers, &target.version).await,
            Action::Exec(argv) => match target.exec.exec(argv.clone(), timeout).await {
                Ok(0) => Ok(()),
                Ok(code) => Err(format!("command {argv:?} exited with {code}")),
                Err(e) => Err(e),
            },
            Action::Sleep(d) => {
                sleep(*d).await;
                Ok(())
            }
            Action::Nothing => Ok(()),
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!(
            "timeout after {} (Client.Timeout exceeded)",
            crate::backoff::go_duration(timeout)
        )),
    }
}

async fn http_get(
    host: &str,
    port: u16,
    path: &str,
    headers: &[(String, String)],
    version: &str,
) -> Result<(), String> {
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let url = format!("http://{authority}{path}");
    let addr: SocketAddr = authority
        .parse()
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("Get \"{url}\": dial tcp {addr}: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let conn = tokio::spawn(conn);
    let mut request = http::Request::get(path)
        .header(http::header::USER_AGENT, format!("kube-probe/{version}"))
        .header(http::header::ACCEPT, "*/*")
        .header(http::header::CONNECTION, "close");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        request = request.header(http::header::HOST, authority.as_str());
    }
    for (name, value) in headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("Get \"{url}\": {e}"))?;
    let result = sender.send_request(request).await;
    conn.abort();
    let status = result.map_err(|e| format!("Get \"{url}\": {e}"))?.status();
    if (200..400).contains(&status.as_u16()) {
        Ok(())
    } else {
        Err(format!(
            "HTTP probe failed with statuscode: {}",
            status.as_u16()
        ))
    }
}

/// What a probe task tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub kind: Kind,
    /// The new verdict, when it changed.
    pub verdict: Option<bool>,
    /// The failure of this check, for the `Unhealthy` Event.
    pub failure: Option<String>,
}

/// Probes from `first_at` (container start + initialDelaySeconds) every period until the
/// task is dropped; a startup probe ends with its first passing verdict.
pub async fn probe_task(
    kind: Kind,
    spec: ProbeSpec,
    first_at: Instant,
    target: Target,
    reports: mpsc::UnboundedSender<Report>,
) {
    let mut tracker = Tracker::new(kind, &spec);
    sleep_until(first_at).await;
    loop {
        let started = Instant::now();
        let result = run_action(&spec.action, &target, spec.timeout).await;
        let verdict = tracker.record(result.is_ok());
        let failure = result.err();
        if (verdict.is_some() || failure.is_some())
            && reports
                .send(Report {
                    kind,
                    verdict,
                    failure,
                })
                .is_err()
        {
            return;
        }
        if kind == Kind::Startup && verdict == Some(true) {
            return;
        }
        sleep_until(started + spec.period).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn container() -> Container {
        serde_json::from_value(json!({"name": "app", "image": "x",
            "ports": [{"name": "http", "containerPort": 8080}]}))
        .unwrap()
    }

    fn probe(v: serde_json::Value) -> ProbeSpec {
        parse_probe(&serde_json::from_value(v).unwrap(), &container()).unwrap()
    }

    #[test]
    fn defaults_and_named_ports() {
        let p = probe(json!({"httpGet": {"port": "http", "path": "healthz",
            "httpHeaders": [{"name": "X-A", "value": "1"}]}}));
        assert_eq!(
            p.action,
            Action::Http {
                host: None,
                port: 8080,
                path: "/healthz".into(),
                https: false,
                headers: vec![("X-A".into(), "1".into())]
            }
        );
        assert_eq!(p.period, Duration::from_secs(10));
        assert_eq!(p.timeout, Duration::from_secs(1));
        assert_eq!((p.success_threshold, p.failure_threshold), (1, 3));
        assert_eq!(p.initial_delay, Duration::ZERO);
    }

    #[test]
    fn explicit_timing_tcp_exec_grpc() {
        let p = probe(
            json!({"tcpSocket": {"port": 9000}, "initialDelaySeconds": 2,
            "periodSeconds": 1, "timeoutSeconds": 3, "successThreshold": 2, "failureThreshold": 5}),
        );
        assert_eq!(
            p.action,
            Action::Tcp {
                host: None,
                port: 9000
            }
        );
        assert_eq!(p.initial_delay, Duration::from_secs(2));
        assert_eq!(p.period, Duration::from_secs(1));
        assert_eq!(p.timeout, Duration::from_secs(3));
        assert_eq!((p.success_threshold, p.failure_threshold), (2, 5));
        let p = probe(json!({"exec": {"command": ["cat", "/tmp/ok"]}}));
        assert_eq!(p.action, Action::Exec(vec!["cat".into(), "/tmp/ok".into()]));
        let p = probe(json!({"grpc": {"port": 50051}}));
        assert_eq!(
            p.action,
            Action::Tcp {
                host: None,
                port: 50051
            }
        );
    }

    #[test]
    fn unknown_port_names_are_errors() {
        let p: Probe = serde_json::from_value(json!({"tcpSocket": {"port": "nope"}})).unwrap();
        assert_eq!(
            parse_probe(&p, &container()).unwrap_err(),
            "couldn't find port: nope in app"
        );
    }

    #[test]
    fn handlers() {
        let h = |v| parse_handler(&serde_json::from_value(v).unwrap(), &container()).unwrap();
        assert_eq!(
            h(json!({"sleep": {"seconds": 5}})),
            Action::Sleep(Duration::from_secs(5))
        );
        assert_eq!(
            h(json!({"exec": {"command": ["sh", "-c", "x"]}})),
            Action::Exec(vec!["sh".into(), "-c".into(), "x".into()])
        );
        assert!(matches!(
            h(json!({"httpGet": {"port": 8080, "path": "/drain"}})),
            Action::Http { port: 8080, .. }
        ));
    }

    #[test]
    fn readiness_needs_success_threshold_in_a_row() {
        let spec =
            probe(json!({"tcpSocket": {"port": 1}, "successThreshold": 2, "failureThreshold": 2}));
        let mut t = Tracker::new(Kind::Readiness, &spec);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None, "the run of successes is broken");
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
    }

    #[test]
    fn liveness_starts_passed_and_fails_after_the_threshold() {
        let spec = probe(json!({"tcpSocket": {"port": 1}}));
        let mut t = Tracker::new(Kind::Liveness, &spec);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        let mut s = Tracker::new(Kind::Startup, &spec);
        assert_eq!(s.record(true), Some(true));
    }

    struct NoExec;
    impl Exec for NoExec {
        fn exec(&self, _: Vec<String>, _: Duration) -> BoxFuture<'static, Result<i32, String>> {
            Box::pin(async { Ok(3) })
        }
    }

    #[tokio::test]
    async fn probes_report_verdict_changes_against_a_real_listener() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let target = Target {
            ip: "127.0.0.1".into(),
            exec: Arc::new(NoExec),
            version: "1.36".into(),
        };
        let spec = probe(json!({"tcpSocket": {"port": port}}));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(probe_task(
            Kind::Readiness,
            spec,
            Instant::now(),
            target.clone(),
            tx,
        ));
        let report = rx.recv().await.unwrap();
        assert_eq!(report.verdict, Some(true));
        task.abort();

        let exec = run_action(
            &Action::Exec(vec!["x".into()]),
            &target,
            Duration::from_secs(1),
        )
        .await;
        assert_eq!(exec.unwrap_err(), "command [\"x\"] exited with 3");
    }
}
