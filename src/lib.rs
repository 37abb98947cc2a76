//! zeroscale: a Kubernetes operator that runs HTTP workloads which cost nothing while idle.
//!
//! One crate, one binary with subcommands:
//! - [`operator`]: reconciles Functions into Deployments, Services and routing, and runs
//!   the [`autoscaler`] (leader-elected);
//! - [`activator`]: the HTTP data plane that routes, holds, wakes and balances;
//! - [`dev`]: the whole loop on one machine, replicas as local processes;
//! - `crd`: prints the CustomResourceDefinition ([`api::crd`]).
//!
//! The data plane and the autoscaler talk to the world only through the [`platform`]
//! boundary, so they run unchanged on Kubernetes and in `dev`.

pub mod activator;
pub mod api;
pub mod autoscaler;
pub mod dev;
pub mod operator;
pub mod platform;
pub mod stats;
pub mod telemetry;

/// Errors that cross module boundaries. Each part has its own small error type; this
/// enum wraps them so `main` and the admin endpoints see one type.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("invalid Function: {0}")]
    Invalid(#[from] api::config::ValidationErrors),
    #[error("platform: {0}")]
    Platform(#[from] platform::PlatformError),
    #[error("operator: {0}")]
    Operator(#[from] operator::Error),
    #[error("activator: {0}")]
    Activator(#[from] activator::Error),
    #[error("autoscaler: {0}")]
    Autoscaler(#[from] autoscaler::Error),
    #[error("dev: {0}")]
    Dev(#[from] dev::Error),
}

impl Error {
    /// A short, bounded label for metrics (`reason="kube"`...).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Io { .. } => "io",
            Error::Config(_) => "config",
            Error::Invalid(_) => "invalid",
            Error::Platform(_) => "platform",
            Error::Operator(_) => "operator",
            Error::Activator(_) => "activator",
            Error::Autoscaler(_) => "autoscaler",
            Error::Dev(_) => "dev",
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
