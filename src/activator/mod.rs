//! The activator: the HTTP data plane every request to a Function passes through.
//! (Stub: the activator issue fills this in; the public API below is the contract the
//! operator, `dev` and the autoscaler build against.)

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::Defaults;
use crate::platform::Platform;
use crate::stats::StatsSnapshot;
use crate::telemetry::AdminRoute;

/// Errors of the activator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}

/// Flags of `zeroscale activator`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub shared: crate::api::config::SharedArgs,
}

/// Runs the activator until SIGTERM.
pub async fn run(_config: Config) -> crate::Result<()> {
    Err(Error::Other("not implemented yet".into()).into())
}

/// How an activator behaves (parsed once from flags, or built by `dev` and tests).
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_domain: String,
    pub defaults: Defaults,
    /// Identifies this activator in its stats (pod name, or a random id).
    pub id: String,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: u64,
    /// Largest request head accepted (431 beyond).
    pub max_header_bytes: usize,
    /// Time a client has to send its request head.
    pub header_read_timeout: Duration,
    /// Time in-flight requests get to finish on shutdown.
    pub drain_timeout: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            cluster_domain: "cluster.local".into(),
            defaults: Defaults::default(),
            id: "activator".into(),
            max_body_bytes: 64 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            header_read_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// The data plane: routing table, queues, balancer and proxy.
pub struct Activator {
    settings: Settings,
}

impl Activator {
    /// Builds an activator over a platform, registering its metrics in `registry`.
    pub fn new(
        _platform: Arc<dyn Platform>,
        settings: Settings,
        _registry: &prometheus::Registry,
    ) -> crate::Result<Arc<Self>> {
        Ok(Arc::new(Self { settings }))
    }

    /// Follows the platform's Functions and endpoints and serves traffic on `listener`
    /// until `shutdown`, then drains in-flight requests.
    pub async fn run(
        self: Arc<Self>,
        _listener: TcpListener,
        _shutdown: CancellationToken,
    ) -> crate::Result<()> {
        Err(Error::Other(format!(
            "activator {} not implemented yet",
            self.settings.id
        ))
        .into())
    }

    /// The per-Function counters the autoscaler reads.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot::default()
    }

    /// Requests in flight to one replica now; `dev` waits for zero before it stops a
    /// replica, so a scale-down never cuts a request.
    pub fn endpoint_in_flight(&self, _addr: std::net::SocketAddr) -> u64 {
        0
    }

    /// The `/stats` route for the admin endpoint.
    pub fn admin_route(self: &Arc<Self>) -> AdminRoute {
        Arc::new(|_| None)
    }
}
