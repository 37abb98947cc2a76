//! Replays a synthetic load trace through the [`Decider`] in simulated time, with a
//! model of the activator (wakes 0 -> `initial` on the first request) and of replicas
//! that become ready after a startup delay, and returns the replica timeline. Tests
//! assert on it; the benchmark prints its [`Summary`] for the [`standard_traces`] and
//! the [`boundary_trace`].

use std::time::Duration;

use tokio::time::Instant;

use super::decider::{Decider, Load, Observation};
use crate::api::config::{Defaults, FunctionConfig, Metric, ScaleConfig, ValidationErrors};
use crate::api::{FunctionSpec, PodTemplate, ScaleSpec};

/// The scale settings of a Function that sets none: the built-in defaults (target 10
/// at 70%, window 60s, panic 10% / 200%, idle 30s, max 10).
pub fn default_scale_config() -> Result<ScaleConfig, ValidationErrors> {
    resolve(None)
}

/// The scale settings of issue 12's flapping Function: `target: 1, utilization: 100,
/// window: 6s` (so one request in flight is exactly one replica's worth), the rest
/// the built-in defaults.
pub fn boundary_scale_config() -> Result<ScaleConfig, ValidationErrors> {
    resolve(Some(ScaleSpec {
        target: Some(1),
        utilization: Some(100),
        window: Some("6s".into()),
        ..ScaleSpec::default()
    }))
}

/// The settings a Function with `scale` and the built-in defaults resolves to.
fn resolve(scale: Option<ScaleSpec>) -> Result<ScaleConfig, ValidationErrors> {
    let spec = FunctionSpec {
        template: Some(PodTemplate::from_value(
            serde_json::json!({"spec": {"containers": [{"name": "app"}]}}),
        )),
        scale,
        ..FunctionSpec::default()
    };
    FunctionConfig::resolve(&spec, &Defaults::default()).map(|c| c.scale)
}

/// The boundary load the benchmark reports on with [`boundary_scale_config`]: one
/// closed-loop client ([`Trace::one_client`]) for five minutes.
pub fn boundary_trace() -> Trace {
    Trace::one_client("boundary", 300)
}

/// A load trace: the demand of each simulated second.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub name: String,
    /// What `demand` measures: requests in flight (concurrency) or requests per second.
    pub unit: Metric,
    /// The demand during second `i`.
    pub demand: Vec<f64>,
    /// Time from asking for a replica until it is ready.
    pub startup: Duration,
    /// Time a request takes, to convert between concurrency and rps (Little's law).
    pub latency: Duration,
    /// How long the activator keeps counting a request after the replica answered, while
    /// the closed-loop client's next one is already in flight (zero: no overlap). Each
    /// such request adds `overlap` of concurrency to its second's measurement, a hair
    /// above the true demand, and a snapshot of the requests in flight taken during an
    /// overlap counts a request twice.
    pub overlap: Duration,
    /// The fraction of requests that overlap their successor that way (1: every one,
    /// the activator then measures `demand x (1 + overlap / latency)`).
    pub overlapping: f64,
}

impl Trace {
    /// A concurrency trace with a 2s startup and 100ms requests.
    pub fn concurrency(name: &str, demand: Vec<f64>) -> Self {
        Self {
            name: name.into(),
            unit: Metric::Concurrency,
            demand,
            startup: Duration::from_secs(2),
            latency: Duration::from_millis(100),
            overlap: Duration::ZERO,
            overlapping: 1.0,
        }
    }

    /// One closed-loop client sending 200 ms requests back to back, `seconds` long after
    /// 5 s of quiet, as the activator's counters report it: exactly one request in
    /// flight, sometimes a hair over. One request in 50 is still counted 5 ms after the
    /// replica answered when the client's next one arrives: 1.005 in flight in about
    /// one second in ten, 1.0 in the others, and 2 in flight for a tick's snapshot that
    /// falls into such an overlap. Sits exactly at the target of
    /// [`boundary_scale_config`]; the previous decider flapped on it (issue 12).
    pub fn one_client(name: &str, seconds: usize) -> Self {
        Self {
            latency: Duration::from_millis(200),
            overlap: Duration::from_millis(5),
            overlapping: 0.02,
            ..Self::concurrency(
                name,
                [Self::constant(0.0, 5), Self::constant(1.0, seconds)].concat(),
            )
        }
    }

    /// A requests-per-second trace with a 2s startup and 100ms requests.
    pub fn rps(name: &str, demand: Vec<f64>) -> Self {
        Self {
            unit: Metric::Rps,
            ..Self::concurrency(name, demand)
        }
    }

    /// The same trace with another overlap of consecutive requests at the activator,
    /// and the fraction of requests that overlap.
    pub fn with_overlap(mut self, overlap: Duration, overlapping: f64) -> Self {
        self.overlap = overlap;
        self.overlapping = overlapping;
        self
    }

    /// The same trace with another replica startup time.
    pub fn with_startup(mut self, startup: Duration) -> Self {
        self.startup = startup;
        self
    }

    /// `seconds` of constant `level`.
    pub fn constant(level: f64, seconds: usize) -> Vec<f64> {
        vec![level; seconds]
    }

    /// `seconds` going linearly from `from` to `to`.
    pub fn linear(from: f64, to: f64, seconds: usize) -> Vec<f64> {
        (0..seconds)
            .map(|i| from + (to - from) * (i as f64 + 1.0) / seconds as f64)
            .collect()
    }
}

/// The standard traces the benchmark reports on (demand in concurrent requests, sized
/// for the default target of 10 at 70%: 7 per replica).
pub fn standard_traces() -> Vec<Trace> {
    let cat = |parts: Vec<Vec<f64>>| parts.concat();
    vec![
        // Idle, then 60 in flight at once (9 replicas), then idle again.
        Trace::concurrency(
            "step",
            cat(vec![
                Trace::constant(0.0, 10),
                Trace::constant(60.0, 120),
                Trace::constant(0.0, 90),
            ]),
        ),
        // 0 -> 60 over two minutes, 60 -> 0 over two minutes.
        Trace::concurrency(
            "ramp",
            cat(vec![
                Trace::constant(0.0, 10),
                Trace::linear(0.0, 60.0, 120),
                Trace::linear(60.0, 0.0, 120),
                Trace::constant(0.0, 60),
            ]),
        ),
        // A steady 10 with a 10s burst to 60.
        Trace::concurrency(
            "burst",
            cat(vec![
                Trace::constant(10.0, 70),
                Trace::constant(60.0, 10),
                Trace::constant(10.0, 120),
            ]),
        ),
        // A few seconds of light traffic, then nothing.
        Trace::concurrency(
            "idle",
            cat(vec![Trace::constant(2.0, 10), Trace::constant(0.0, 120)]),
        ),
    ]
}

/// The state of one simulated second, at the tick that ends it.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Seconds since the start of the trace (the tick at the end of second `at - 1`).
    pub at: u32,
    /// The demand of the second that just ended.
    pub demand: f64,
    /// Replicas the demand needs at the target utilization, within [min, max].
    pub needed: u32,
    /// Replicas asked for after this tick's decision.
    pub desired: u32,
    /// Replicas ready at this tick.
    pub ready: u32,
    pub panic: bool,
    pub reason: String,
}

/// What a benchmark reports about a run.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Most replicas the trace needs.
    pub peak_needed: u32,
    /// Most replicas asked for.
    pub peak_desired: u32,
    /// `peak_desired - peak_needed` (0 when never above).
    pub overshoot: u32,
    /// From the first second that needs `peak_needed` until they are asked for.
    pub time_to_peak_desired: Option<Duration>,
    /// From the first second that needs `peak_needed` until they are ready.
    pub time_to_peak_ready: Option<Duration>,
    /// Seconds with fewer ready replicas than needed.
    pub under_provisioned_seconds: u32,
    /// Sum of replicas asked for over all seconds (the cost).
    pub replica_seconds: u64,
    /// Number of changes of the asked-for count.
    pub scale_changes: u32,
    /// Wakes from zero (0 -> N), by the activator or the autoscaler.
    pub wakes: u32,
    /// From the end of the last demand until zero replicas are asked for.
    pub time_to_zero: Option<Duration>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |d: Option<Duration>| match d {
            Some(d) => format!("{}s", d.as_secs()),
            None => "never".into(),
        };
        write!(
            f,
            "needed {} peak, asked {} (overshoot {}), asked in {}, ready in {}, \
             under-provisioned {}s, {} replica-seconds, {} changes, {} wakes, zero after {}",
            self.peak_needed,
            self.peak_desired,
            self.overshoot,
            secs(self.time_to_peak_desired),
            secs(self.time_to_peak_ready),
            self.under_provisioned_seconds,
            self.replica_seconds,
            self.scale_changes,
            self.wakes,
            secs(self.time_to_zero)
        )
    }
}

/// The replica timeline of a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeline {
    pub points: Vec<Point>,
    pub summary: Summary,
}

impl Timeline {
    /// The point at `at` seconds.
    pub fn at(&self, at: u32) -> Option<&Point> {
        self.points.iter().find(|p| p.at == at)
    }
}

/// Spreads the overlapping requests evenly over the run, without randomness.
const GOLDEN_RATIO: f64 = 1.618_033_988_749_895;
/// Likewise the ticks whose snapshot falls into an overlap, independent of the above.
const SILVER_RATIO: f64 = 2.414_213_562_373_095;

/// Runs `cfg` against `trace`, one decision per simulated second, starting at zero
/// replicas (or `min`).
pub fn run(cfg: &ScaleConfig, trace: &Trace) -> Timeline {
    let per_replica = Decider::per_replica(cfg);
    let latency = trace.latency.as_secs_f64().max(1e-3);
    let overlap = trace.overlap.as_secs_f64();
    // Requests started so far (fractional), to number them.
    let mut started = 0.0_f64;
    let startup = trace.startup.as_secs().min(u64::from(u32::MAX)) as u32;
    // Base instant only anchors the arithmetic; no clock is read after this.
    let base = Instant::now();
    let mut decider = Decider::new();
    let mut desired = cfg.min;
    // ready_at second of every replica asked for.
    let mut pods: Vec<u32> = vec![0; desired as usize];
    let mut points = Vec::with_capacity(trace.demand.len());
    for (second, &demand) in trace.demand.iter().enumerate() {
        let second = second as u32;
        let demand = demand.max(0.0);
        let (concurrency, rps) = match trace.unit {
            Metric::Concurrency => (demand, demand / latency),
            Metric::Rps => (demand * latency, demand),
        };
        // The activator wakes the Function on the first request.
        if desired == 0 && demand > 0.0 {
            desired = cfg.initial;
            resize(&mut pods, desired, second + startup);
        }
        let at = second + 1;
        let ready = pods.iter().filter(|r| **r <= at).count() as u32;
        // The activator's view: the overlapping requests of this second (every one
        // whose number n has frac(n x golden ratio) < overlapping) each add `overlap`
        // to its concurrency, and a snapshot that falls into one of them (that share
        // of the ticks) sees one request twice.
        let first = started.floor() as u64;
        started += rps;
        let overlapping = (first..started.floor() as u64)
            .filter(|n| (*n as f64 * GOLDEN_RATIO).fract() < trace.overlapping)
            .count();
        let share = overlapping as f64 * overlap;
        let measured = concurrency + share;
        let caught = (f64::from(at) * SILVER_RATIO).fract() < share;
        let live = concurrency.round() as u64 + u64::from(caught);
        let (in_flight, queued) = if ready == 0 { (0, live) } else { (live, 0) };
        let obs = Observation {
            current: desired,
            ready,
            load: Load {
                concurrency: measured,
                rps,
                in_flight,
                queued,
                new_requests: if demand > 0.0 {
                    rps.ceil().max(1.0) as u64
                } else {
                    0
                },
                partial: false,
            },
        };
        let decision = decider.decide(cfg, &obs, base + Duration::from_secs(u64::from(at)));
        if decision.desired != desired {
            desired = decision.desired;
            resize(&mut pods, desired, at + startup);
        }
        let metric_demand = match cfg.metric {
            Metric::Concurrency => concurrency,
            Metric::Rps => rps,
        };
        let mut needed = (metric_demand / per_replica - 1e-9).ceil().max(0.0) as u32;
        if demand > 0.0 {
            needed = needed.max(1);
        }
        points.push(Point {
            at,
            demand,
            needed: needed.clamp(cfg.min, cfg.max),
            desired,
            ready,
            panic: decision.panic,
            reason: decision.reason,
        });
    }
    let summary = summarize(&points);
    Timeline { points, summary }
}

/// Adds replicas (ready at `ready_at`) or removes them, those not ready first.
fn resize(pods: &mut Vec<u32>, to: u32, ready_at: u32) {
    let to = to as usize;
    if pods.len() < to {
        pods.resize(to, ready_at);
    } else {
        pods.sort_unstable();
        pods.truncate(to);
    }
}

fn summarize(points: &[Point]) -> Summary {
    let mut s = Summary {
        peak_needed: points.iter().map(|p| p.needed).max().unwrap_or(0),
        peak_desired: points.iter().map(|p| p.desired).max().unwrap_or(0),
        ..Summary::default()
    };
    s.overshoot = s.peak_desired.saturating_sub(s.peak_needed);
    if let Some(start) = points
        .iter()
        .find(|p| p.needed == s.peak_needed && s.peak_needed > 0)
    {
        let after = || points.iter().filter(|p| p.at >= start.at);
        s.time_to_peak_desired = after()
            .find(|p| p.desired >= s.peak_needed)
            .map(|p| Duration::from_secs(u64::from(p.at - start.at)));
        s.time_to_peak_ready = after()
            .find(|p| p.ready >= s.peak_needed)
            .map(|p| Duration::from_secs(u64::from(p.at - start.at)));
    }
    let mut previous = 0;
    for p in points {
        if p.ready < p.needed {
            s.under_provisioned_seconds += 1;
        }
        s.replica_seconds += u64::from(p.desired);
        if p.desired != previous {
            s.scale_changes += 1;
            if previous == 0 {
                s.wakes += 1;
            }
        }
        previous = p.desired;
    }
    if let Some(last) = points.iter().rposition(|p| p.demand > 0.0) {
        let end = points[last].at;
        s.time_to_zero = points[last..]
            .iter()
            .find(|p| p.desired == 0)
            .map(|p| Duration::from_secs(u64::from(p.at - end)));
    }
    s
}
