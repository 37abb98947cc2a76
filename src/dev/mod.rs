//! TODO(dev): filled in by its issue.

/// Errors of the dev.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}

/// Flags of `zeroscale dev`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    #[command(flatten)]
    pub shared: crate::api::config::SharedArgs,
}

/// Runs dev mode until Ctrl-C.
pub async fn run(_config: Config) -> crate::Result<()> {
    Err(Error::Other("not implemented yet".into()).into())
}
