//! The scaling decision, a pure function of (config, stats history, now), after
//! Knative's KPA: no clock reads, no I/O, so it is tested on synthetic traces with
//! simulated time and the scaler loop only feeds it and applies what it says.
//!
//! # The algorithm (one call to [`Decider::decide`] per tick, default every second)
//!
//! `per_replica = target x utilization` (with `containerConcurrency` set, `target` is
//! capped by it). The sample of a tick is the metric over the last interval: the average
//! of requests in flight *or queued* (`concurrency`, exact, from the activators'
//! integrated counters) or requests per second (`rps`).
//!
//! 1. **Windows.** `stable` = mean of the samples of the last `window` (60s);
//!    `panic` = the largest of the mean over the last `panic_window` (6s), the last
//!    sample and, for concurrency, the requests in flight and queued right now. The
//!    instantaneous terms make a step from idle to heavy load visible in one tick
//!    instead of only after a whole panic window (Knative needs the full window).
//! 2. **Pods.** `stable_pods = ceil(stable / per_replica)`, likewise `panic_pods`; both
//!    bounded by the rates relative to the ready replicas `r = max(ready, 1)`: at most
//!    `ceil(r x maxScaleUpRate)` (1000) and at least `floor(r / maxScaleDownRate)` (2).
//!    The bounds never push against the direction of travel: replicas still starting
//!    do not cause a scale-down through the up-rate bound. Outside panic the count
//!    follows `stable_pods` within the tolerance band (3.), but a scale-down stops at
//!    what the mean of the panic window needs, so a stable average that lags a rising
//!    load never removes capacity.
//! 3. **Hysteresis.** A load sitting at a replica boundary holds the count still; the
//!    three rules below each remove one way it could flap (issue 12: one client at
//!    `target: 1` went 1 -> 2 -> 1 every few seconds).
//!    - *Tolerance band.* Outside panic a scale-up needs, besides `stable_pods >
//!      current`, the stable or the panic window's demand more than [`TOLERANCE`]
//!      (10%, the HPA's default) over the current capacity: above `current x 1.1`
//!      replicas' worth. A scale-down needs the demand to fit the lower count, as
//!      before. A demand that stays in `(current - 1, current x 1.1]`, stable and
//!      recent, keeps `current`: a load exactly at the target that the activator
//!      measures a hair above it (it counts each request a few ms past the replica's
//!      answer), or one jittering ±5% around it, neither adds a replica for the hair
//!      nor sheds one for the dip. A rising load leaves the band in the panic window
//!      long before its stable mean crosses the boundary, so it scales up about as early
//!      as without the band, and then to `stable_pods` in full.
//!    - *Snapshot margin.* The requests in flight and queued right now enter panic
//!      (and keep it) only if one request fewer would still reach the threshold. A
//!      snapshot can catch a closed-loop client twice (its next request arrives while
//!      the activator still counts the previous one), so `c` clients exactly at the
//!      target can show `2c` in flight for a few ms: the 200% threshold of their `c`
//!      replicas. A real step still panics in the tick it starts (40 in flight is over
//!      with 39 just as well), and once in panic the full count sizes it.
//!    - *A rise holds for a stable window.* After the count rises (a decision, panic,
//!      a wake or anyone else's change) it does not decrease until a full `window`
//!      later, idle -> zero excepted: a scale-down is backed by a stable window of
//!      samples all taken after the rise, Knative's "scale down only when the whole
//!      window agrees". No scale-down undoes a scale-up the averages have not
//!      confirmed, and a Function goes up and back down at most once per window.
//! 4. **Panic.** Entered when `panic / per_replica >= panicThreshold x r` (200%; the
//!    snapshot with its margin of 3.): the load needs at least twice the ready
//!    capacity. In panic the count only grows (the largest `panic_pods` seen,
//!    starting from the current count); panic ends after a full stable window in which
//!    the threshold was not reached again.
//! 5. **Idle.** A Function is active at a tick when requests arrived since the last
//!    tick or any are in flight or queued. After `idleTimeout` (30s) without activity
//!    (counted from the last activity, from a wake 0 -> N by the activator, or from the
//!    first time the decider saw the Function) the count is 0 at once (no rate bound)
//!    and the windows and panic mode are cleared, so a wake after the silence starts
//!    from fresh load; before that the count is at least 1. At zero the Function stays
//!    at zero unless requests are in flight or queued, then it gets at least `initial`.
//! 6. **Scale-down delay.** The count is the largest one decided within the last
//!    `scaleDownDelay` (0s), so a scale-down happens only once the lower count has held
//!    that long (scale-ups are immediate).
//! 7. **Safety holds.** No decrease while the stats are partial (an activator is slow,
//!    failing or restarted: its load is unknown), and no decrease other than idle ->
//!    zero before the decider has a full stable window of history (a freshly started
//!    or failed-over operator does not act on a few seconds of data).
//! 8. **Clamp** to `[min, max]`.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::config::{Metric, ScaleConfig};

/// How far above the current count's capacity the stable demand may sit before a
/// scale-up, as a fraction (the hysteresis band of the module docs, 3.).
pub const TOLERANCE: f64 = 0.1;

/// One Function's load in one tick, summed over the activators.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    /// Average requests in flight or queued over the last interval.
    pub concurrency: f64,
    /// Requests received per second over the last interval.
    pub rps: f64,
    /// Requests forwarded to a replica and not finished, now.
    pub in_flight: u64,
    /// Requests waiting for a replica, now.
    pub queued: u64,
    /// Requests received since the previous tick.
    pub new_requests: u64,
    /// Some activator's stats are missing, late or just restarted: the true load may be
    /// higher than this one.
    pub partial: bool,
}

impl Load {
    /// Requests in flight or queued right now.
    pub fn live(&self) -> u64 {
        self.in_flight.saturating_add(self.queued)
    }
}

/// What the decider sees of a Function in one tick.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observation {
    /// Replicas asked for now (the Deployment's `spec.replicas`).
    pub current: u32,
    /// Replicas ready now.
    pub ready: u32,
    pub load: Load,
}

/// The outcome of one decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Replicas the Function should have.
    pub desired: u32,
    /// Whether the decider is in panic mode.
    pub panic: bool,
    /// Why, for a person (recorded with the scale change).
    pub reason: String,
}

#[derive(Debug, Clone)]
struct Panic {
    /// The last tick the panic threshold was reached.
    last_over: Instant,
    /// The most replicas asked for during this panic.
    max_pods: u32,
}

/// The state of one Function's autoscaling: its stats history and modes.
#[derive(Debug, Clone, Default)]
pub struct Decider {
    /// (tick, metric sample) for the last stable window.
    samples: VecDeque<(Instant, f64)>,
    first_seen: Option<Instant>,
    last_active: Option<Instant>,
    woken_at: Option<Instant>,
    previous_current: Option<u32>,
    panic: Option<Panic>,
    /// (tick, count before the delay) for the last `scale_down_delay`.
    recent: VecDeque<(Instant, u32)>,
    /// The last tick the count rose: no decrease for a stable window after it.
    raised_at: Option<Instant>,
    /// The count the last decision asked for, to tell its own rise from another's.
    last_desired: Option<u32>,
}

/// The room kept for samples while idle: one sample a tick, cleared each tick.
const IDLE_SAMPLES: usize = 4;

/// `ceil(x)` that does not turn 7.000000001 into 8.
fn ceil_pods(x: f64) -> u32 {
    if !x.is_finite() || x <= 0.0 {
        return 0;
    }
    let c = (x - 1e-9).ceil();
    if c >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        c as u32
    }
}

fn mean<'a>(values: impl Iterator<Item = &'a f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0u32), |(s, n), v| (s + v, n + 1));
    if n == 0 { 0.0 } else { sum / f64::from(n) }
}

fn since(now: Instant, then: Option<Instant>) -> Duration {
    then.map(|t| now.saturating_duration_since(t))
        .unwrap_or_default()
}

/// A number for a person: no decimals when whole, one otherwise.
fn num(x: f64) -> String {
    if (x - x.round()).abs() < 0.05 {
        format!("{:.0}", x.round())
    } else {
        format!("{x:.1}")
    }
}

/// How the metric and its unit read in a reason.
fn unit(metric: Metric) -> &'static str {
    match metric {
        Metric::Concurrency => "concurrent requests",
        Metric::Rps => "requests/s",
    }
}

impl Decider {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether the decider is in panic mode.
    pub fn in_panic(&self) -> bool {
        self.panic.is_some()
    }

    /// The load each replica is aimed at.
    pub fn per_replica(cfg: &ScaleConfig) -> f64 {
        let target = match (cfg.metric, cfg.container_concurrency) {
            (Metric::Concurrency, Some(cc)) => cfg.target.min(f64::from(cc)),
            _ => cfg.target,
        };
        (target * cfg.utilization).max(f64::MIN_POSITIVE)
    }

    /// Records this tick's observation and decides the replica count. Call once per tick
    /// with a monotonic `now`.
    pub fn decide(&mut self, cfg: &ScaleConfig, obs: &Observation, now: Instant) -> Decision {
        let load = &obs.load;
        let per_replica = Self::per_replica(cfg);
        let sample = match cfg.metric {
            Metric::Concurrency => load.concurrency,
            Metric::Rps => load.rps,
        };
        let sample = if sample.is_finite() {
            sample.max(0.0)
        } else {
            0.0
        };

        // History and activity.
        let first_seen = *self.first_seen.get_or_insert(now);
        if self.previous_current == Some(0) && obs.current > 0 {
            self.woken_at = Some(now);
        }
        // Raised by someone else (a wake, a person): a rise like one of ours. Ours is
        // recorded when decided, not a tick later when the platform shows it.
        if self.previous_current.is_some_and(|p| obs.current > p)
            && self.last_desired != Some(obs.current)
        {
            self.raised_at = Some(now);
        }
        self.previous_current = Some(obs.current);
        if load.new_requests > 0 || load.live() > 0 {
            self.last_active = Some(now);
        }
        self.samples.push_back((now, sample));
        while let Some(&(t, _)) = self.samples.front() {
            if now.saturating_duration_since(t) >= cfg.window {
                self.samples.pop_front();
            } else {
                break;
            }
        }

        // 1. Windows.
        let stable = mean(self.samples.iter().map(|(_, v)| v));
        let panic_avg = mean(
            self.samples
                .iter()
                .filter(|(t, _)| now.saturating_duration_since(*t) < cfg.panic_window)
                .map(|(_, v)| v),
        );
        let instantaneous = match cfg.metric {
            Metric::Concurrency => load.live() as f64,
            Metric::Rps => 0.0,
        };
        let panic_load = panic_avg.max(sample).max(instantaneous);
        // The snapshot with one request to spare (3., snapshot margin).
        let panic_entry = panic_avg.max(sample).max(instantaneous - 1.0);

        // 2. Pods, rate-bounded relative to the ready replicas.
        let base = obs.ready.max(1);
        let max_up = ceil_pods(f64::from(base) * cfg.max_scale_up_rate).max(obs.current);
        let max_down =
            ((f64::from(base) / cfg.max_scale_down_rate).floor() as u32).min(obs.current);
        let bound = |pods: u32| pods.clamp(max_down, max_up.max(max_down));
        let stable_demand = stable / per_replica;
        let fit = ceil_pods(stable_demand);
        // 3. Hysteresis, tolerance band: no scale-up while the demand, stable and recent,
        // is within 10% over the current capacity.
        let band_top = f64::from(obs.current) * (1.0 + TOLERANCE);
        let in_band = fit > obs.current
            && obs.current > 0
            && stable_demand <= band_top
            && panic_avg / per_replica <= band_top;
        let stable_pods = bound(if in_band { obs.current } else { fit });
        let panic_pods = bound(ceil_pods(panic_load / per_replica));

        // 4. Panic.
        let over = panic_entry / per_replica >= cfg.panic_threshold * f64::from(base);
        let mut reason = String::new();
        if over {
            match &mut self.panic {
                Some(p) => p.last_over = now,
                None => {
                    self.panic = Some(Panic {
                        last_over: now,
                        max_pods: obs.current,
                    })
                }
            }
        } else if self
            .panic
            .as_ref()
            .is_some_and(|p| now.saturating_duration_since(p.last_over) >= cfg.window)
        {
            self.panic = None;
        }
        let mut desired = match &mut self.panic {
            Some(p) => {
                p.max_pods = p.max_pods.max(panic_pods);
                let _ = write!(
                    reason,
                    "panic: {} {} {} {}x the capacity of {} ready ({} each): {} replicas",
                    num(panic_load),
                    unit(cfg.metric),
                    if over { ">=" } else { "was >=" },
                    num(cfg.panic_threshold),
                    obs.ready,
                    num(per_replica),
                    p.max_pods
                );
                p.max_pods
            }
            None => {
                let _ = write!(
                    reason,
                    "{} {} averaged over {}s / {} per replica: {} replicas",
                    num(stable),
                    unit(cfg.metric),
                    cfg.window.as_secs(),
                    num(per_replica),
                    if in_band { fit } else { stable_pods }
                );
                if in_band {
                    let _ = write!(
                        reason,
                        "; kept at {}: within {:.0}% over their capacity",
                        obs.current,
                        TOLERANCE * 100.0
                    );
                }
                // A scale-down never goes below what the panic window still needs: the
                // stable average lags a rising load (after a panic on a ramp, say).
                let recent_pods = bound(ceil_pods(panic_avg / per_replica)).min(obs.current);
                if stable_pods < recent_pods {
                    let _ = write!(
                        reason,
                        "; not below the {recent_pods} the last {}s need",
                        cfg.panic_window.as_secs()
                    );
                    recent_pods
                } else {
                    stable_pods
                }
            }
        };

        // 5. Idle.
        let quiet_since = [self.last_active, self.woken_at, Some(first_seen)]
            .into_iter()
            .flatten()
            .max();
        let quiet = since(now, quiet_since);
        let idle = quiet >= cfg.idle_timeout && load.live() == 0;
        if idle {
            // Load from before the silence says nothing about the next wake: a single
            // request after a burst must not bring back the burst's replicas. The
            // window's room is given back too: most Functions of a big cluster are idle,
            // and a full window is 1.5 KB each (issue 16).
            self.samples.clear();
            self.samples.shrink_to(IDLE_SAMPLES);
            self.panic = None;
            desired = 0;
            reason = format!(
                "idle: no requests for {}s (idleTimeout {}s), none in flight or queued",
                quiet.as_secs(),
                cfg.idle_timeout.as_secs()
            );
        } else if desired == 0 {
            desired = 1;
            let _ = write!(
                reason,
                "; kept at 1 until idle for {}s",
                cfg.idle_timeout.as_secs()
            );
        }
        if obs.current == 0 && load.live() > 0 && desired < cfg.initial {
            desired = cfg.initial;
            reason = format!(
                "woken: {} in flight or queued at zero replicas; initial {}",
                load.live(),
                cfg.initial
            );
        }

        // 6. Scale-down delay.
        if cfg.scale_down_delay.is_zero() {
            self.recent.clear();
        } else {
            self.recent.push_back((now, desired));
            while let Some(&(t, _)) = self.recent.front() {
                // Kept at an age of exactly the delay: a lower count applies once it has
                // held for the whole delay.
                if now.saturating_duration_since(t) > cfg.scale_down_delay {
                    self.recent.pop_front();
                } else {
                    break;
                }
            }
            let held = self.recent.iter().map(|(_, d)| *d).max().unwrap_or(desired);
            if held > desired {
                let _ = write!(
                    reason,
                    "; held at {held} by scaleDownDelay {}s",
                    cfg.scale_down_delay.as_secs()
                );
                desired = held;
            }
        }
        if obs.current == 0 && load.live() == 0 && desired > 0 && cfg.min == 0 {
            // Waking is the activator's job (it holds the request): never from history.
            desired = 0;
            reason = "at zero with no request waiting".into();
        }

        // 7. Safety holds, and 3.: a rise holds for a stable window.
        if desired < obs.current {
            let raised = self
                .raised_at
                .map(|t| now.saturating_duration_since(t))
                .filter(|ago| *ago < cfg.window);
            if load.partial {
                desired = obs.current;
                let _ = write!(reason, "; scale-down held: stats of some activator missing");
            } else if !idle && now.saturating_duration_since(first_seen) < cfg.window {
                desired = obs.current;
                let _ = write!(
                    reason,
                    "; scale-down held: less than {}s of history",
                    cfg.window.as_secs()
                );
            } else if let (false, Some(ago)) = (idle, raised) {
                desired = obs.current;
                let _ = write!(
                    reason,
                    "; scale-down held: raised {}s ago, within the {}s window",
                    ago.as_secs(),
                    cfg.window.as_secs()
                );
            }
        }

        // 8. Clamp.
        if desired < cfg.min {
            desired = cfg.min;
            let _ = write!(reason, "; min {}", cfg.min);
        } else if desired > cfg.max {
            desired = cfg.max;
            let _ = write!(reason, "; max {}", cfg.max);
        }

        if desired > obs.current {
            self.raised_at = Some(now);
        }
        self.last_desired = Some(desired);
        Decision {
            desired,
            panic: self.panic.is_some(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The built-in defaults: target 10 x 70% = 7 per replica, window 60s, panic 6s,
    /// idle 30s, initial 1, max 10.
    fn cfg() -> ScaleConfig {
        crate::autoscaler::simulate::default_scale_config().expect("defaults resolve")
    }

    /// Drives a decider one second per step, feeding back its decisions as the
    /// platform's count (all replicas ready at once).
    struct Run {
        cfg: ScaleConfig,
        decider: Decider,
        start: Instant,
        second: u64,
        current: u32,
    }

    impl Run {
        fn new(cfg: ScaleConfig, current: u32) -> Self {
            Self {
                cfg,
                decider: Decider::new(),
                start: Instant::now(),
                second: 0,
                current,
            }
        }

        fn step(&mut self, load: Load) -> Decision {
            self.second += 1;
            let obs = Observation {
                current: self.current,
                ready: self.current,
                load,
            };
            let d = self.decider.decide(
                &self.cfg,
                &obs,
                self.start + Duration::from_secs(self.second),
            );
            self.current = d.desired;
            d
        }

        /// `n` seconds of a steady concurrency with requests arriving.
        fn steady(&mut self, concurrency: f64, n: u64) -> Decision {
            let mut last = None;
            for _ in 0..n {
                last = Some(self.step(busy(concurrency)));
            }
            last.expect("n > 0")
        }
    }

    fn busy(concurrency: f64) -> Load {
        Load {
            concurrency,
            rps: concurrency * 10.0,
            in_flight: concurrency.round() as u64,
            new_requests: (concurrency * 10.0).ceil() as u64,
            ..Load::default()
        }
    }

    fn quiet() -> Load {
        Load::default()
    }

    /// Issue 12's Function: target 1 at 100% (one request in flight is one replica's
    /// worth), window 6s, panic window 1s.
    fn boundary() -> ScaleConfig {
        crate::autoscaler::simulate::boundary_scale_config().expect("valid")
    }

    #[test]
    fn one_client_at_the_target_holds_one_replica_even_if_every_snapshot_sees_two() {
        // The activator's accounting at its worst: every tick measures a hair over one
        // request in flight, and every snapshot catches a request and its successor.
        let mut run = Run::new(boundary(), 1);
        for s in 0..600 {
            let d = run.step(Load {
                concurrency: 1.01,
                rps: 5.0,
                in_flight: 2,
                new_requests: 5,
                ..Load::default()
            });
            assert_eq!((d.desired, d.panic), (1, false), "second {s}: {}", d.reason);
        }
    }

    #[test]
    fn the_tolerance_band_keeps_the_count_until_the_demand_is_ten_percent_over() {
        // (current count, stable demand in replicas' worth, count after a window)
        let cases = [
            (1, 1.0, 1),
            (1, 1.05, 1),
            (1, 1.09, 1),
            (1, 1.15, 2),
            (4, 4.35, 4),
            (4, 4.5, 5),
            (4, 3.05, 4),
            (4, 3.0, 3),
            (10, 10.9, 10),
            (10, 11.2, 12),
            (10, 9.5, 10),
        ];
        let mut cfg = boundary();
        cfg.max = 20;
        for (current, demand, want) in cases {
            let mut run = Run::new(cfg.clone(), current);
            let d = run.steady(demand, 10);
            assert_eq!(d.desired, want, "{demand} at {current}: {}", d.reason);
            assert!(!d.panic, "{demand} at {current}: {}", d.reason);
        }
        // A rising load is past the band in the panic window (the last second here)
        // before its stable mean is: it gets the replica as soon as ceil says so.
        let mut run = Run::new(cfg.clone(), 4);
        run.steady(4.0, 10);
        let d = run.step(busy(5.2));
        assert_eq!(d.desired, 5, "stable 4.2, last second 5.2: {}", d.reason);

        let mut run = Run::new(boundary(), 1);
        let d = run.steady(1.05, 10);
        assert!(
            d.reason
                .ends_with("2 replicas; kept at 1: within 10% over their capacity"),
            "{}",
            d.reason
        );
    }

    #[test]
    fn the_requests_in_flight_now_enter_panic_only_with_one_to_spare() {
        // One ready replica of 1: the threshold is 2 in flight.
        // (in flight now, the last interval's average, panic expected)
        let cases = [(2, 1.0, false), (3, 1.0, true), (40, 0.5, true)];
        for (in_flight, concurrency, panic) in cases {
            let mut run = Run::new(boundary(), 1);
            run.steady(1.0, 10);
            let d = run.step(Load {
                concurrency,
                in_flight,
                new_requests: 5,
                ..Load::default()
            });
            assert_eq!(d.panic, panic, "{in_flight} in flight: {}", d.reason);
            let want = if panic { in_flight.min(10) as u32 } else { 1 };
            assert_eq!(d.desired, want, "{in_flight} in flight: {}", d.reason);
        }
    }

    #[test]
    fn a_count_raised_holds_for_a_stable_window() {
        // 2 replicas' worth, a 2s step to 3.9 (no panic at 2 ready), then 0.5: the
        // stable mean crosses 2.2 at once and is back under 2 after 4s.
        let mut run = Run::new(boundary(), 2);
        run.steady(2.0, 10);
        assert_eq!(run.steady(3.9, 1).desired, 3);
        let mut seen = vec![run.steady(3.9, 1).desired];
        seen.extend((0..8).map(|_| run.steady(0.5, 1).desired));
        assert_eq!(seen, vec![3, 3, 3, 3, 3, 2, 1, 1, 1], "the 3 hold for 6s");
    }

    #[test]
    fn idle_reaches_zero_exactly_at_idle_timeout() {
        let mut run = Run::new(cfg(), 1);
        run.steady(3.0, 60);
        for s in 1..30 {
            let d = run.step(quiet());
            assert_eq!(d.desired, 1, "{s}s after the last request: {}", d.reason);
        }
        let d = run.step(quiet());
        assert_eq!(d.desired, 0, "at idleTimeout");
        assert!(d.reason.starts_with("idle"), "{}", d.reason);
    }

    /// An idle Function keeps no window of samples: at 10,000 mostly idle Functions a
    /// full window each was 15 MB of the operator.
    #[test]
    fn an_idle_function_gives_back_its_window() {
        let mut run = Run::new(cfg(), 1);
        run.steady(3.0, 60);
        assert!(run.decider.samples.capacity() >= 60);
        for _ in 0..40 {
            run.step(quiet());
        }
        assert_eq!(run.current, 0);
        assert!(
            run.decider.samples.capacity() <= IDLE_SAMPLES,
            "{} samples of room kept while idle",
            run.decider.samples.capacity()
        );
        // And it still wakes and scales as before.
        assert_eq!(run.steady(3.0, 10).desired, 1);
    }

    #[test]
    fn a_request_in_flight_longer_than_idle_timeout_keeps_the_function_up() {
        let mut run = Run::new(cfg(), 1);
        run.steady(1.0, 5);
        // One long request: in flight for two minutes, no new arrivals.
        for s in 0..120 {
            let d = run.step(Load {
                concurrency: 1.0,
                in_flight: 1,
                ..Load::default()
            });
            assert_eq!(d.desired, 1, "second {s} of the long request");
        }
        // It ends: zero only a full idleTimeout later.
        for _ in 1..30 {
            assert_eq!(run.step(quiet()).desired, 1);
        }
        assert_eq!(run.step(quiet()).desired, 0);
    }

    #[test]
    fn a_queued_request_at_zero_gets_initial_replicas() {
        let mut c = cfg();
        c.initial = 3;
        let mut run = Run::new(c, 0);
        for _ in 0..100 {
            assert_eq!(run.step(quiet()).desired, 0, "no demand, stays at zero");
        }
        let d = run.step(Load {
            queued: 1,
            new_requests: 1,
            ..Load::default()
        });
        assert_eq!(d.desired, 3, "{}", d.reason);
    }

    #[test]
    fn at_zero_history_alone_never_wakes_the_function() {
        let mut run = Run::new(cfg(), 1);
        run.steady(30.0, 60);
        // Scaled to zero by someone while the windows still hold load.
        run.current = 0;
        let d = run.step(quiet());
        assert_eq!(d.desired, 0, "{}", d.reason);
    }

    #[test]
    fn a_function_woken_by_the_activator_stays_up_for_idle_timeout() {
        let mut run = Run::new(cfg(), 0);
        for _ in 0..100 {
            run.step(quiet());
        }
        // The activator woke it (0 -> 1), but its stats have not shown the request yet.
        run.current = 1;
        for s in 0..30 {
            let d = run.step(quiet());
            assert_eq!(d.desired, 1, "{s}s after the wake: {}", d.reason);
        }
        assert_eq!(run.step(quiet()).desired, 0, "idleTimeout after the wake");
    }

    #[test]
    fn partial_stats_never_scale_down() {
        let mut run = Run::new(cfg(), 1);
        run.steady(35.0, 60);
        assert_eq!(run.current, 5);
        let partial = Load {
            partial: true,
            ..Load::default()
        };
        for _ in 0..120 {
            let d = run.step(partial.clone());
            assert_eq!(d.desired, 5, "{}", d.reason);
        }
        // Complete again: the quiet is real, the Function has long been idle.
        assert_eq!(run.step(quiet()).desired, 0);
    }

    #[test]
    fn panic_enters_on_twice_the_capacity_scales_only_up_and_exits_after_a_window() {
        let mut run = Run::new(cfg(), 1);
        let d = run.steady(10.0, 60);
        assert_eq!((d.desired, d.panic), (2, false));
        // 46 in flight against 2 ready x 7: 3.3x capacity.
        let d = run.step(busy(46.0));
        assert!(d.panic, "{}", d.reason);
        assert_eq!(d.desired, 7, "ceil(46 / 7)");
        assert!(
            d.reason.starts_with(
                "panic: 46 concurrent requests >= 2x the capacity of 2 ready (7 each): 7 replicas"
            ),
            "{}",
            d.reason
        );
        // Back to 10 at once: in panic, never down, for a full stable window.
        for s in 1..60 {
            let d = run.step(busy(10.0));
            assert!(d.panic, "still in panic {s}s after");
            assert_eq!(d.desired, 7, "{s}s after the burst");
        }
        let d = run.step(busy(10.0));
        assert!(!d.panic, "a full window below the threshold ends panic");
        assert!(d.desired < 7);
    }

    #[test]
    fn a_wake_after_idle_starts_from_fresh_load_not_the_last_burst() {
        let mut c = cfg();
        c.max = 50;
        let mut run = Run::new(c, 1);
        run.steady(10.0, 60);
        assert_eq!(run.step(busy(100.0)).desired, 15);
        run.steady(100.0, 10);
        while run.current > 0 {
            run.step(quiet());
        }
        // Ten seconds after reaching zero, one request wakes it (activator: 0 -> 1).
        for _ in 0..10 {
            run.step(quiet());
        }
        run.current = 1;
        let d = run.step(Load {
            concurrency: 0.5,
            in_flight: 1,
            new_requests: 1,
            ..Load::default()
        });
        assert_eq!((d.desired, d.panic), (1, false), "{}", d.reason);
    }

    #[test]
    fn rates_bound_each_step_relative_to_ready() {
        let mut c = cfg();
        c.max = 100;
        c.max_scale_up_rate = 2.0;
        let mut run = Run::new(c, 1);
        run.steady(5.0, 60);
        assert_eq!(run.current, 1);
        // 280 in flight needs 40: up at most x2 per decision.
        let seen: Vec<u32> = (0..7).map(|_| run.step(busy(280.0)).desired).collect();
        assert_eq!(seen, vec![2, 4, 8, 16, 32, 40, 40]);
    }

    #[test]
    fn scale_down_delay_holds_the_highest_recent_count() {
        let mut c = cfg();
        c.window = Duration::from_secs(6);
        c.panic_window = Duration::from_secs(1);
        c.scale_down_delay = Duration::from_secs(20);
        let mut run = Run::new(c, 1);
        assert_eq!(run.steady(35.0, 30).desired, 5);
        // The load drops to 7 (1 replica): nothing changes for 20s.
        for s in 0..19 {
            let d = run.step(busy(7.0));
            assert_eq!(d.desired, 5, "{s}s into the delay: {}", d.reason);
        }
        // Then down, each lower count only once it held for the delay.
        let later: Vec<u32> = (0..40).map(|_| run.step(busy(7.0)).desired).collect();
        assert!(later[2] < 5, "{later:?}");
        assert!(later.windows(2).all(|w| w[1] <= w[0]), "{later:?}");
        assert_eq!(*later.last().expect("not empty"), 1, "{later:?}");
    }

    #[test]
    fn min_and_max_clamp_the_count() {
        let mut c = cfg();
        c.min = 2;
        c.max = 4;
        let mut run = Run::new(c, 2);
        assert_eq!(run.steady(100.0, 10).desired, 4);
        for _ in 0..120 {
            run.step(quiet());
        }
        assert_eq!(run.current, 2, "idle goes to min, not zero");
    }

    #[test]
    fn rps_metric_divides_requests_per_second_by_the_target() {
        let mut c = cfg();
        c.metric = Metric::Rps;
        c.target = 100.0;
        let mut run = Run::new(c, 1);
        let d = (0..60)
            .map(|_| {
                run.step(Load {
                    rps: 500.0,
                    concurrency: 2.0,
                    in_flight: 2,
                    new_requests: 500,
                    ..Load::default()
                })
            })
            .last()
            .expect("ran");
        assert_eq!(d.desired, 8, "ceil(500 / 70): {}", d.reason);
        assert!(d.reason.contains("requests/s"));
    }

    #[test]
    fn container_concurrency_caps_the_target() {
        let mut c = cfg();
        c.container_concurrency = Some(2);
        let mut run = Run::new(c, 1);
        // 7 concurrent at 2 x 70% = 1.4 per replica: 5.
        assert_eq!(run.steady(7.0, 60).desired, 5);
    }

    #[test]
    fn a_fresh_decider_does_not_scale_down_before_a_full_window() {
        // An operator restart finds the Function at 6 replicas with light load.
        let mut run = Run::new(cfg(), 6);
        for s in 0..60 {
            assert_eq!(run.step(busy(3.0)).desired, 6, "second {s}");
        }
        let d = run.step(busy(3.0));
        assert!(d.desired < 6, "{}", d.reason);
    }
}
