//! The scaler loop: once per tick it collects the activators' stats, asks each
//! Function's [`Decider`] for a replica count and applies it through the platform, only
//! on change and with optimistic concurrency, so it never fights the activator's wakes.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use prometheus::{GaugeVec, Histogram, HistogramOpts, IntGaugeVec, Opts, Registry};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use super::collector::{Aggregator, Round};
use super::decider::{Decider, Observation};
use super::{Error, Settings, StatsSource};
use crate::api::config::{FunctionConfig, ScaleConfig};
use crate::api::{Defaults, Function, FunctionKey};
use crate::platform::{AutoscalerStatus, FunctionEvent, Platform, PlatformError, Scale};

/// The autoscaler's Prometheus metrics.
///
/// The per-Function gauges (desired, actual, panic, observed load) exist only while a
/// Function is not idle at zero: a Function at zero with no load has no series (read
/// an absent series as 0). Most of 10,000 Functions idle at zero, and four series each
/// cost the operator 1.6 KB per Function and every scrape 40,000 lines (issue 16).
#[derive(Clone)]
pub(crate) struct Metrics {
    desired: IntGaugeVec,
    actual: IntGaugeVec,
    panic: IntGaugeVec,
    observed: GaugeVec,
    sources: IntGaugeVec,
    decision: Histogram,
}

impl Metrics {
    pub(crate) fn register(registry: &Registry) -> Result<Self, Error> {
        let labels = &["namespace", "function"];
        let m = Self {
            desired: IntGaugeVec::new(
                Opts::new(
                    "zeroscale_autoscaler_desired_replicas",
                    "Replicas the autoscaler decided for a Function.",
                ),
                labels,
            )?,
            actual: IntGaugeVec::new(
                Opts::new(
                    "zeroscale_autoscaler_actual_replicas",
                    "Ready replicas of a Function as the autoscaler last saw them.",
                ),
                labels,
            )?,
            panic: IntGaugeVec::new(
                Opts::new(
                    "zeroscale_autoscaler_panic_mode",
                    "1 while the autoscaler is in panic mode for a Function, else 0.",
                ),
                labels,
            )?,
            observed: GaugeVec::new(
                Opts::new(
                    "zeroscale_autoscaler_observed_load",
                    "The load sample of the last tick (average concurrency or requests/s, per the Function's metric).",
                ),
                labels,
            )?,
            sources: IntGaugeVec::new(
                Opts::new(
                    "zeroscale_autoscaler_stats_sources",
                    "Activators in the last stats round by state: fresh (read), stale (last values used), failed (read failed). Any stale or failed one holds every scale-down.",
                ),
                &["state"],
            )?,
            decision: Histogram::with_opts(
                HistogramOpts::new(
                    "zeroscale_autoscaler_decision_duration_seconds",
                    "Time to decide and apply the replica count of one Function.",
                )
                .buckets(vec![
                    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ]),
            )?,
        };
        registry.register(Box::new(m.desired.clone()))?;
        registry.register(Box::new(m.actual.clone()))?;
        registry.register(Box::new(m.panic.clone()))?;
        registry.register(Box::new(m.observed.clone()))?;
        registry.register(Box::new(m.sources.clone()))?;
        registry.register(Box::new(m.decision.clone()))?;
        Ok(m)
    }

    fn forget(&self, key: &FunctionKey) {
        let labels = [key.namespace.as_str(), key.name.as_str()];
        // Absent label sets are fine: a Function deleted before its first tick has none.
        let _ = self.desired.remove_label_values(&labels);
        let _ = self.actual.remove_label_values(&labels);
        let _ = self.panic.remove_label_values(&labels);
        let _ = self.observed.remove_label_values(&labels);
    }
}

/// One Function the scaler follows.
struct Tracked {
    config: ScaleConfig,
    decider: Decider,
    /// The status last published successfully.
    published: Option<AutoscalerStatus>,
    /// Its per-Function gauges exist (see [`Metrics`]).
    exported: bool,
}

/// The loop's state.
pub(crate) struct Scaler {
    platform: Arc<dyn Platform>,
    source: Arc<dyn StatsSource>,
    defaults: Defaults,
    settings: Settings,
    metrics: Metrics,
    functions: HashMap<FunctionKey, Tracked>,
    aggregator: Aggregator,
}

impl Scaler {
    pub(crate) fn new(
        platform: Arc<dyn Platform>,
        source: Arc<dyn StatsSource>,
        defaults: Defaults,
        settings: Settings,
        metrics: Metrics,
    ) -> Self {
        Self {
            aggregator: Aggregator::new(settings.stale_after),
            platform,
            source,
            defaults,
            settings,
            metrics,
            functions: HashMap::new(),
        }
    }

    pub(crate) async fn run(mut self, shutdown: CancellationToken) -> crate::Result<()> {
        let mut events = self.platform.functions();
        let mut ticks = tokio::time::interval(self.settings.tick);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        info!(tick = ?self.settings.tick, "autoscaler started");
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                event = events.next() => match event {
                    Some(event) => self.on_event(event),
                    None => {
                        return Err(Error::Other("the platform's Function stream ended".into()).into());
                    }
                },
                _ = ticks.tick() => {
                    let span = info_span!("autoscaler_tick", functions = self.functions.len());
                    self.tick().instrument(span).await;
                }
            }
        }
        info!("autoscaler stopped");
        Ok(())
    }

    fn on_event(&mut self, event: FunctionEvent) {
        match event {
            FunctionEvent::Applied(f) => self.upsert(&f),
            FunctionEvent::Deleted(key) => self.remove(&key),
            FunctionEvent::Reset(all) => {
                let keep: std::collections::HashSet<FunctionKey> =
                    all.iter().map(|f| f.key()).collect();
                let gone: Vec<FunctionKey> = self
                    .functions
                    .keys()
                    .filter(|k| !keep.contains(*k))
                    .cloned()
                    .collect();
                for key in gone {
                    self.remove(&key);
                }
                for f in &all {
                    self.upsert(f);
                }
            }
        }
    }

    fn upsert(&mut self, f: &Function) {
        let key = f.key();
        match FunctionConfig::resolve(&f.spec, &self.defaults) {
            Ok(config) => match self.functions.get_mut(&key) {
                // Keep the history across spec changes: the load did not change.
                Some(t) => t.config = config.scale,
                None => {
                    debug!(function = %key, "following");
                    self.functions.insert(
                        key,
                        Tracked {
                            config: config.scale,
                            decider: Decider::new(),
                            published: None,
                            exported: false,
                        },
                    );
                }
            },
            Err(e) => {
                // The reconciler reports it on the status; leave the replicas alone.
                if self.functions.contains_key(&key) {
                    warn!(function = %key, error = %e, "invalid spec, no longer autoscaled");
                }
                self.remove(&key);
            }
        }
    }

    fn remove(&mut self, key: &FunctionKey) {
        if self.functions.remove(key).is_some() {
            debug!(function = %key, "no longer followed");
        }
        self.metrics.forget(key);
    }

    /// One round: collect, decide and apply for every Function.
    async fn tick(&mut self) {
        // A source that hangs must not stop the loop: no answer in a tick is a round
        // without readings (every activator stale, so no scale-down).
        let readings = tokio::time::timeout(self.settings.tick, self.source.collect())
            .await
            .unwrap_or_else(|_| {
                warn!("reading activator stats took longer than a tick");
                Vec::new()
            });
        let now = Instant::now();
        let round = self.aggregator.observe(readings, now);
        for (state, n) in [
            ("fresh", round.fresh),
            ("stale", round.stale),
            ("failed", round.failed),
        ] {
            self.metrics
                .sources
                .with_label_values(&[state])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if round.partial {
            debug!(
                fresh = round.fresh,
                stale = round.stale,
                failed = round.failed,
                "stats incomplete this tick: scale-downs held"
            );
        }
        let platform = self.platform.clone();
        let keys: Vec<FunctionKey> = self.functions.keys().cloned().collect();
        let scales: Vec<(FunctionKey, Result<Scale, PlatformError>)> = futures::stream::iter(keys)
            .map(|key| {
                let platform = platform.clone();
                async move {
                    let scale = platform.scale(&key).await;
                    (key, scale)
                }
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        let mut work = Vec::new();
        for (key, scale) in scales {
            let scale = match scale {
                Ok(s) => s,
                Err(PlatformError::NotFound(_)) => {
                    debug!(function = %key, "no workload yet");
                    continue;
                }
                Err(e) => {
                    warn!(function = %key, error = %e, "reading scale");
                    continue;
                }
            };
            if let Some(item) = self.decide(&key, scale, &round, now) {
                work.push(item);
            }
        }
        let results: Vec<(FunctionKey, Option<AutoscalerStatus>)> = futures::stream::iter(work)
            .map(|w| {
                let platform = platform.clone();
                let metrics = self.metrics.clone();
                async move {
                    let published = apply(platform.as_ref(), &w).await;
                    metrics.decision.observe(w.started.elapsed().as_secs_f64());
                    (w.key, published)
                }
            })
            .buffer_unordered(self.settings.concurrency.max(1))
            .collect()
            .await;
        for (key, published) in results {
            if let (Some(t), Some(p)) = (self.functions.get_mut(&key), published) {
                t.published = Some(p);
            }
        }
    }

    fn decide(
        &mut self,
        key: &FunctionKey,
        scale: Scale,
        round: &Round,
        now: Instant,
    ) -> Option<Work> {
        let started = std::time::Instant::now();
        let tracked = self.functions.get_mut(key)?;
        let load = round.load(key);
        let obs = Observation {
            current: scale.desired,
            ready: scale.ready,
            load,
        };
        let decision = tracked.decider.decide(&tracked.config, &obs, now);
        debug!(
            function = %key,
            current = scale.desired,
            ready = scale.ready,
            desired = decision.desired,
            panic = decision.panic,
            reason = %decision.reason,
            "decided"
        );
        let sample = match tracked.config.metric {
            crate::api::config::Metric::Concurrency => obs.load.concurrency,
            crate::api::config::Metric::Rps => obs.load.rps,
        };
        let idle = decision.desired == 0
            && scale.desired == 0
            && scale.ready == 0
            && !decision.panic
            && sample == 0.0;
        if idle {
            if tracked.exported {
                self.metrics.forget(key);
                tracked.exported = false;
            }
        } else {
            let labels = [key.namespace.as_str(), key.name.as_str()];
            self.metrics
                .desired
                .with_label_values(&labels)
                .set(i64::from(decision.desired));
            self.metrics
                .actual
                .with_label_values(&labels)
                .set(i64::from(scale.ready));
            self.metrics
                .panic
                .with_label_values(&labels)
                .set(i64::from(decision.panic));
            self.metrics.observed.with_label_values(&labels).set(sample);
            tracked.exported = true;
        }

        let mut desired = decision.desired;
        if desired == 0 && obs.load.live() > 0 {
            // The decider never does this; the guard makes it impossible.
            desired = scale.desired;
        }
        let change = (desired != scale.desired).then(|| Change {
            from: scale.desired,
            to: desired,
            version: scale.version.clone(),
            reason: decision.reason.clone(),
        });
        let status = AutoscalerStatus {
            desired_replicas: desired,
            last_request_time: round
                .last_request_unix_ms
                .get(key)
                .and_then(|ms| jiff::Timestamp::from_millisecond(*ms).ok())
                .or_else(|| tracked.published.as_ref().and_then(|p| p.last_request_time)),
        };
        let publish = needs_publishing(tracked.published.as_ref(), &status).then_some(status);
        if change.is_none() && publish.is_none() {
            self.metrics
                .decision
                .observe(started.elapsed().as_secs_f64());
            return None;
        }
        Some(Work {
            key: key.clone(),
            change,
            publish,
            started,
        })
    }
}

/// How stale `lastRequestTime` on the status may get under steady traffic: it is written
/// when the desired count changes, and otherwise at most this often, so a busy Function
/// does not cost an API write per tick.
const LAST_REQUEST_TIME_GRANULARITY: jiff::SignedDuration = jiff::SignedDuration::from_secs(30);

fn needs_publishing(published: Option<&AutoscalerStatus>, status: &AutoscalerStatus) -> bool {
    let Some(p) = published else { return true };
    if p.desired_replicas != status.desired_replicas {
        return true;
    }
    match (p.last_request_time, status.last_request_time) {
        (None, Some(_)) => true,
        (Some(old), Some(new)) => new.duration_since(old) >= LAST_REQUEST_TIME_GRANULARITY,
        _ => false,
    }
}

struct Change {
    from: u32,
    to: u32,
    version: Option<String>,
    reason: String,
}

/// What one Function needs done this tick.
struct Work {
    key: FunctionKey,
    change: Option<Change>,
    publish: Option<AutoscalerStatus>,
    started: std::time::Instant,
}

/// Applies a change and publishes the status; returns the status when published.
async fn apply(platform: &dyn Platform, w: &Work) -> Option<AutoscalerStatus> {
    if let Some(c) = &w.change {
        match platform
            .set_scale(&w.key, c.to, c.version.as_deref(), &c.reason)
            .await
        {
            Ok(()) => {
                info!(function = %w.key, from = c.from, to = c.to, reason = %c.reason, "scaled")
            }
            Err(PlatformError::Conflict(_)) => {
                // Someone (an activator's wake) changed it since it was read: their
                // change stands; the next tick decides on the new count.
                debug!(function = %w.key, "scale changed concurrently, retrying next tick");
                return None;
            }
            Err(e) => {
                warn!(function = %w.key, to = c.to, error = %e, "setting scale");
                return None;
            }
        }
    }
    let status = w.publish.as_ref()?;
    match platform.publish_autoscaler_status(&w.key, status).await {
        Ok(()) => Some(status.clone()),
        Err(e) => {
            warn!(function = %w.key, error = %e, "publishing autoscaler status");
            None
        }
    }
}
