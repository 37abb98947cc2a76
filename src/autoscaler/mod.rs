//! The autoscaler: replicas that follow the request load, and zero when idle.
//!
//! [`decider`] is the pure KPA-style decision (its docs hold the algorithm and the
//! defaults), [`collector`] reads and sums the activators' stats, `scaler` is the loop
//! that applies decisions through the [`Platform`], and [`simulate`] replays synthetic
//! traces through the decider for tests and benchmarks.

pub mod collector;
pub mod decider;
mod scaler;
pub mod simulate;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use crate::api::Defaults;
use crate::platform::Platform;
use crate::stats::StatsSnapshot;

/// Errors of the autoscaler.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
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

/// How the autoscaler loop runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Time between decisions. Default 1s.
    pub tick: Duration,
    /// How long an activator that stopped answering still counts with its last values
    /// before it is forgotten. Default 5s.
    pub stale_after: Duration,
    /// Platform calls in flight at once during a tick. Default 16.
    pub concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            stale_after: Duration::from_secs(5),
            concurrency: 16,
        }
    }
}

/// Collects stats, decides, and applies replica counts for every Function.
pub struct Autoscaler {
    scaler: scaler::Scaler,
}

impl Autoscaler {
    /// An autoscaler with the default [`Settings`], registering its metrics in `registry`.
    pub fn new(
        platform: Arc<dyn Platform>,
        source: Arc<dyn StatsSource>,
        defaults: Defaults,
        registry: &prometheus::Registry,
    ) -> crate::Result<Self> {
        Self::with_settings(platform, source, defaults, registry, Settings::default())
    }

    /// An autoscaler with explicit [`Settings`] (tests use a short tick).
    pub fn with_settings(
        platform: Arc<dyn Platform>,
        source: Arc<dyn StatsSource>,
        defaults: Defaults,
        registry: &prometheus::Registry,
        settings: Settings,
    ) -> crate::Result<Self> {
        if settings.tick.is_zero() {
            return Err(Error::Other("the autoscaler tick must be longer than zero".into()).into());
        }
        let metrics = scaler::Metrics::register(registry).map_err(crate::Error::from)?;
        Ok(Self {
            scaler: scaler::Scaler::new(platform, source, defaults, settings, metrics),
        })
    }

    /// Runs one decision per tick until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> crate::Result<()> {
        self.scaler.run(shutdown).await
    }
}
