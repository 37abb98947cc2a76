//! Logging, metrics and the admin HTTP endpoint shared by every component.
//!
//! Logs go through `tracing` (`RUST_LOG` honoured, text or JSON). Each component
//! registers its Prometheus metrics in its own [`prometheus::Registry`] and serves it with
//! [`serve_admin`] on its admin port, together with `/healthz` (the process is alive),
//! `/readyz` (it should get traffic / is ready) and component routes such as `/stats`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore the error.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A component route on the admin port: gets the request path and query, returns a
/// response or `None` (404).
pub type AdminRoute = Arc<dyn Fn(&str) -> Option<Response<Full<Bytes>>> + Send + Sync>;

/// Readiness flag shared between a component and its `/readyz`.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A plain-text response.
pub fn text_response(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Renders a registry in the Prometheus text format.
pub fn render_metrics(registry: &Registry) -> Response<Full<Bytes>> {
    let mut buf = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        return text_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding metrics: {e}"),
        );
    }
    let mut resp = Response::new(Full::new(Bytes::from(buf)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

/// Serves `/metrics`, `/healthz`, `/readyz` and `route` on `listener` until `shutdown`.
pub async fn serve_admin(
    listener: TcpListener,
    registry: Registry,
    readiness: Readiness,
    route: Option<AdminRoute>,
    shutdown: CancellationToken,
) {
    let addr = listener.local_addr().ok();
    info!(?addr, "admin endpoint listening");
    let registry = Arc::new(registry);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let readiness = readiness.clone();
        let route = route.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.as_str().to_string())
                    .unwrap_or_default();
                let resp = match req.uri().path() {
                    "/metrics" => render_metrics(&registry),
                    "/healthz" | "/livez" => text_response(StatusCode::OK, "ok"),
                    "/readyz" if readiness.is_ready() => text_response(StatusCode::OK, "ready"),
                    "/readyz" => text_response(StatusCode::SERVICE_UNAVAILABLE, "not ready"),
                    _ => route
                        .as_ref()
                        .and_then(|r| r(&path))
                        .unwrap_or_else(|| text_response(StatusCode::NOT_FOUND, "not found")),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(%peer, error = %e, "admin connection ended");
            }
        });
    }
}

/// Binds a TCP listener with a clear error.
pub async fn bind(addr: SocketAddr, what: &str) -> crate::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::Error::Io {
            context: format!("binding the {what} listener on {addr}"),
            source,
        })
}

/// Resolves when the process gets SIGTERM or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM received, shutting down"),
                _ = int.recv() => info!("SIGINT received, shutting down"),
            }
        }
        _ => {
            // Signal handlers could not be installed; fall back to Ctrl-C only.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `process_resident_memory_bytes`, read from `/proc/self/status` at each scrape (the
/// name Prometheus client libraries use), so a component's memory is on its own
/// `/metrics` wherever it runs. Absent where there is no `/proc`.
#[derive(Clone)]
pub struct ProcessMemory {
    desc: prometheus::core::Desc,
}

impl ProcessMemory {
    /// Registers the collector in `registry`.
    pub fn register(registry: &Registry) -> Result<(), prometheus::Error> {
        let desc = prometheus::core::Desc::new(
            "process_resident_memory_bytes".into(),
            "Resident memory size in bytes.".into(),
            Vec::new(),
            std::collections::HashMap::new(),
        )?;
        registry.register(Box::new(Self { desc }))
    }

    /// The resident set size of this process, in bytes (`VmRSS`).
    pub fn resident_bytes() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}

impl prometheus::core::Collector for ProcessMemory {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        vec![&self.desc]
    }

    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(bytes) = Self::resident_bytes() else {
            return Vec::new();
        };
        let gauge = prometheus::Gauge::with_opts(prometheus::Opts::new(
            self.desc.fq_name.clone(),
            self.desc.help.clone(),
        ));
        match gauge {
            Ok(g) => {
                g.set(bytes as f64);
                g.collect()
            }
            Err(_) => Vec::new(),
        }
    }
}
