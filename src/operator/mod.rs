//! The operator: reconciles Functions into Deployments, Services and routing.
//! (Stub: the operator issue fills this in.)

pub mod rbac;

/// Errors of the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}

/// Flags of `zeroscale operator`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub shared: crate::api::config::SharedArgs,
}

/// Runs the operator until SIGTERM.
pub async fn run(_config: Config) -> crate::Result<()> {
    Err(Error::Other("not implemented yet".into()).into())
}
