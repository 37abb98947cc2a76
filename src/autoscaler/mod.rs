//! The autoscaler: replicas that follow the request load, and zero when idle.
//! (Stub: the autoscaler issue fills this in; the public API below is the contract.)

use std::sync::Arc;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::api::Defaults;
use crate::platform::Platform;
use crate::stats::StatsSnapshot;

/// Errors of the autoscaler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Other(String),
}

/// One activator's answer in one collection round.
#[derive(Debug, Clone)]
pub struct Reading {
    /// Which activator (its address or id).
    pub source: String,
    /// Its stats, or why they could not be read.
    pub result: Result<StatsSnapshot, String>,
}

/// Where the autoscaler reads request stats from: every activator, once per tick.
#[async_trait]
pub trait StatsSource: Send + Sync + 'static {
    async fn collect(&self) -> Vec<Reading>;
}

/// A source that reads an activator in the same process (`dev`).
pub struct InProcessSource<F>(pub F);

#[async_trait]
impl<F> StatsSource for InProcessSource<F>
where
    F: Fn() -> StatsSnapshot + Send + Sync + 'static,
{
    async fn collect(&self) -> Vec<Reading> {
        let snapshot = (self.0)();
        vec![Reading {
            source: snapshot.activator.clone(),
            result: Ok(snapshot),
        }]
    }
}

/// Collects stats, decides, and applies replica counts for every Function.
pub struct Autoscaler {
    _platform: Arc<dyn Platform>,
}

impl Autoscaler {
    pub fn new(
        platform: Arc<dyn Platform>,
        _source: Arc<dyn StatsSource>,
        _defaults: Defaults,
        _registry: &prometheus::Registry,
    ) -> crate::Result<Self> {
        Ok(Self {
            _platform: platform,
        })
    }

    /// Runs one decision per tick until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> crate::Result<()> {
        shutdown.cancelled().await;
        Ok(())
    }
}

pub mod collector {
    //! Reads stats from every activator pod. (Stub: the autoscaler issue fills it in.)
    use async_trait::async_trait;

    use super::{Reading, StatsSource};

    /// Reads `/stats` from each ready endpoint of the activator Service (port `admin`).
    pub struct HttpSource {
        _client: kube::Client,
        _namespace: String,
        _service: String,
    }

    impl HttpSource {
        pub fn new(client: kube::Client, namespace: String, service: String) -> Self {
            Self {
                _client: client,
                _namespace: namespace,
                _service: service,
            }
        }
    }

    #[async_trait]
    impl StatsSource for HttpSource {
        async fn collect(&self) -> Vec<Reading> {
            Vec::new()
        }
    }
}
