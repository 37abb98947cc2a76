//! Per-Function request counters (what `/stats` serves to the autoscaler) and the
//! Prometheus metrics. Both are created lazily, the first time a Function sees traffic,
//! so ten thousand idle Functions cost no label sets and no counters.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use tokio::time::Instant;

use crate::api::FunctionKey;
use crate::stats::FunctionStats;

const LABELS: &[&str] = &["namespace", "function"];

/// The activator's Prometheus metrics, labelled by Function.
#[derive(Clone)]
pub(crate) struct Metrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    cold_starts: IntCounterVec,
    queue_depth: IntGaugeVec,
    wake_to_ready: HistogramVec,
    /// Replicas routed early, and early routes dropped, by outcome (no Function label:
    /// a handful of series in all).
    pub(crate) early_routes: IntCounterVec,
    /// Requests sent to a replica routed early, by outcome.
    pub(crate) early_requests: IntCounterVec,
    /// Client connections the fast lane handed to hyper, by the reason (no Function
    /// label: a handful of series in all).
    pub(crate) lane_handoffs: IntCounterVec,
    /// Requests the fast lane had the full proxy serve on its connection, by reason.
    pub(crate) lane_full_path: IntCounterVec,
}

impl Metrics {
    pub(crate) fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "zeroscale_activator_requests_total",
                "Requests answered, by Function and HTTP status code.",
            ),
            &["namespace", "function", "code"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "zeroscale_activator_request_duration_seconds",
                "Time from a request's arrival to the end of its response, queueing included.",
            )
            .buckets(vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0,
            ]),
            LABELS,
        )?;
        let cold_starts = IntCounterVec::new(
            Opts::new(
                "zeroscale_activator_cold_starts_total",
                "Wakes from zero this activator started (one per cold episode).",
            ),
            LABELS,
        )?;
        let queue_depth = IntGaugeVec::new(
            Opts::new(
                "zeroscale_activator_queue_depth",
                "Requests waiting for a replica or for capacity.",
            ),
            LABELS,
        )?;
        let wake_to_ready = HistogramVec::new(
            HistogramOpts::new(
                "zeroscale_activator_wake_to_ready_seconds",
                "Time from the wake of a Function at zero to its first ready replica.",
            )
            .buckets(vec![
                0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0, 300.0,
            ]),
            LABELS,
        )?;
        let early_routes = IntCounterVec::new(
            Opts::new(
                "zeroscale_activator_early_routes_total",
                "Replicas routed early (probed ready by the activator before the platform \
                 listed them: outcome=routed) and early routes dropped (outcome=why).",
            ),
            &["outcome"],
        )?;
        let early_requests = IntCounterVec::new(
            Opts::new(
                "zeroscale_activator_early_requests_total",
                "Requests sent to a replica routed early: answered, or replayed after a \
                 failure or a 5xx answer.",
            ),
            &["outcome"],
        )?;
        let lane_handoffs = IntCounterVec::new(
            Opts::new(
                "zeroscale_activator_lane_handoffs_total",
                "Client connections the HTTP/1.1 fast lane handed to hyper's server, by \
                 the first request it did not take: protocol (not an HTTP/1.1 head in \
                 origin form), headers (hop-by-hop, Expect, Transfer-Encoding, \
                 X-Zeroscale-*), body (longer than the lane buffers), host (unknown or \
                 missing), function (invalid).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(lane_handoffs.clone()))?;
        let lane_full_path = IntCounterVec::new(
            Opts::new(
                "zeroscale_activator_lane_full_path_requests_total",
                "Requests the HTTP/1.1 fast lane had the full proxy serve without leaving \
                 its connection: replica (none ready with room: at zero, waking, at its \
                 cap, or others queued) or connect (a new connection to the replica failed).",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(lane_full_path.clone()))?;
        registry.register(Box::new(early_routes.clone()))?;
        registry.register(Box::new(early_requests.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(cold_starts.clone()))?;
        registry.register(Box::new(queue_depth.clone()))?;
        registry.register(Box::new(wake_to_ready.clone()))?;
        Ok(Self {
            requests,
            duration,
            cold_starts,
            queue_depth,
            wake_to_ready,
            early_routes,
            early_requests,
            lane_handoffs,
            lane_full_path,
        })
    }

    /// The label sets of one Function (created now).
    pub(crate) fn for_function(&self, key: &FunctionKey) -> FunctionMetrics {
        let l = [key.namespace.as_str(), key.name.as_str()];
        FunctionMetrics {
            requests: self.requests.clone(),
            codes: RwLock::new(Vec::new()),
            duration: self.duration.with_label_values(&l),
            cold_starts: self.cold_starts.with_label_values(&l),
            queue_depth: self.queue_depth.with_label_values(&l),
            wake_to_ready: self.wake_to_ready.with_label_values(&l),
        }
    }

    /// Drops the series of a deleted Function.
    pub(crate) fn forget(&self, key: &FunctionKey, fm: &FunctionMetrics) {
        let l = [key.namespace.as_str(), key.name.as_str()];
        let _ = self.duration.remove_label_values(&l);
        let _ = self.cold_starts.remove_label_values(&l);
        let _ = self.queue_depth.remove_label_values(&l);
        let _ = self.wake_to_ready.remove_label_values(&l);
        let codes = fm.codes.read().map(|c| c.clone()).unwrap_or_default();
        for (code, _) in codes {
            let code = code.to_string();
            let _ = self
                .requests
                .remove_label_values(&[l[0], l[1], code.as_str()]);
        }
    }
}

/// One Function's metric handles, resolved once so the hot path does no label hashing.
pub(crate) struct FunctionMetrics {
    requests: IntCounterVec,
    /// Counter per status code seen so far (a handful).
    codes: RwLock<Vec<(u16, IntCounter)>>,
    pub(crate) duration: Histogram,
    pub(crate) cold_starts: IntCounter,
    pub(crate) queue_depth: IntGauge,
    pub(crate) wake_to_ready: Histogram,
}

impl FunctionMetrics {
    pub(crate) fn count_response(&self, key: &FunctionKey, code: u16) {
        if let Ok(codes) = self.codes.read()
            && let Some((_, c)) = codes.iter().find(|(k, _)| *k == code)
        {
            c.inc();
            return;
        }
        let code_label = code.to_string();
        let counter = self.requests.with_label_values(&[
            key.namespace.as_str(),
            key.name.as_str(),
            code_label.as_str(),
        ]);
        counter.inc();
        if let Ok(mut codes) = self.codes.write()
            && !codes.iter().any(|(k, _)| *k == code)
        {
            codes.push((code, counter));
        }
    }
}

/// What the autoscaler reads: gauges and cumulative counters of one Function.
pub(crate) struct Counters {
    pub(crate) queued: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    requests_total: AtomicU64,
    /// Unix ms of the last arrival; 0 = none yet.
    last_request_ms: AtomicI64,
    /// Times below are nanoseconds since this instant: one clock subtraction per event,
    /// and integer arithmetic after it.
    base: Instant,
    integral: Mutex<Integral>,
}

/// The integral of (requests present) over time, advanced at every arrival and departure
/// so it is exact, not sampled.
struct Integral {
    level: u64,
    since: u64,
    /// Request-nanoseconds.
    total: u128,
    /// When `last_request_ms` was last read from the wall clock.
    wall_read_at: Option<u64>,
}

impl Integral {
    fn advance(&mut self, now: u64) {
        let dt = now.saturating_sub(self.since);
        self.total += u128::from(self.level) * u128::from(dt);
        self.since = self.since.max(now);
    }
}

/// The wall clock is read for `last_request_ms` at most this often (nanoseconds): a
/// millisecond value does not need it more, and a request needs no second clock read.
const WALL_CLOCK_EVERY: u64 = 1_000_000;

impl Counters {
    pub(crate) fn new() -> Self {
        Self {
            queued: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            requests_total: AtomicU64::new(0),
            last_request_ms: AtomicI64::new(0),
            base: Instant::now(),
            integral: Mutex::new(Integral {
                level: 0,
                since: 0,
                total: 0,
                wall_read_at: None,
            }),
        }
    }

    fn nanos(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// A request arrived (queued or not): counted, and present until [`Self::depart`].
    /// Returns its arrival time for [`Self::depart`].
    pub(crate) fn arrive(&self, now: Instant) -> u64 {
        let now = self.nanos(now);
        self.requests_total.fetch_add(1, Ordering::Relaxed);
        let read_wall = match self.integral.lock() {
            Ok(mut i) => {
                i.advance(now);
                i.level += 1;
                let stale = i
                    .wall_read_at
                    .is_none_or(|at| now.saturating_sub(at) >= WALL_CLOCK_EVERY);
                if stale {
                    i.wall_read_at = Some(now);
                }
                stale
            }
            Err(_) => true,
        };
        if read_wall {
            self.last_request_ms
                .store(jiff::Timestamp::now().as_millisecond(), Ordering::Relaxed);
        }
        now
    }

    /// An arrival that will be counted again (the fast lane handing a request over):
    /// it is taken back from the request count, its presence so far stays.
    pub(crate) fn recount(&self) {
        self.requests_total.fetch_sub(1, Ordering::Relaxed);
    }

    /// The request that arrived at `arrived` left: returns how long it was present.
    pub(crate) fn depart(&self, now: Instant, arrived: u64) -> Duration {
        let now = self.nanos(now);
        if let Ok(mut i) = self.integral.lock() {
            i.advance(now);
            i.level = i.level.saturating_sub(1);
        }
        Duration::from_nanos(now.saturating_sub(arrived))
    }

    pub(crate) fn read(&self, key: &FunctionKey, now: Instant) -> FunctionStats {
        let now = self.nanos(now);
        let concurrency_seconds_total = match self.integral.lock() {
            Ok(mut i) => {
                i.advance(now);
                i.total as f64 / 1e9
            }
            Err(_) => 0.0,
        };
        let last = self.last_request_ms.load(Ordering::Relaxed);
        FunctionStats {
            namespace: key.namespace.clone(),
            name: key.name.clone(),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            requests_total: self.requests_total.load(Ordering::Relaxed),
            concurrency_seconds_total,
            last_request_unix_ms: (last != 0).then_some(last),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn concurrency_integral_is_exact() {
        let key = FunctionKey::new("ns", "f");
        let c = Counters::new();
        let t0 = Instant::now();
        let a = c.arrive(t0);
        let b = c.arrive(t0);
        // 2 present for 1s
        assert_eq!(
            c.depart(t0 + Duration::from_secs(1), a),
            Duration::from_secs(1)
        );
        // 1 present for 2s
        assert_eq!(
            c.depart(t0 + Duration::from_secs(3), b),
            Duration::from_secs(3)
        );
        let s = c.read(&key, t0 + Duration::from_secs(10));
        assert!((s.concurrency_seconds_total - 4.0).abs() < 1e-9);
        assert_eq!(s.requests_total, 2);
        assert!(s.last_request_unix_ms.is_some());
    }
}
