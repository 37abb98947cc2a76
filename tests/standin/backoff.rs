//! The kubelet's back-off (`k8s.io/client-go/util/flowcontrol.Backoff`), for container
//! restarts (CrashLoopBackOff) and image pulls (ImagePullBackOff), and Go's way of
//! printing the durations it puts in status messages. Pure code on `tokio::time::Instant`.

use std::time::Duration;

use tokio::time::Instant;

/// The kubelet's cap on both back-offs.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// One back-off entry (the kubelet keeps one per container and one per image).
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    entry: Option<Entry>,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    backoff: Duration,
    last_update: Instant,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Self {
        Self {
            base,
            max: max.max(base),
            entry: None,
        }
    }

    /// An entry not updated for twice the maximum starts over (flowcontrol's `hasExpired`):
    /// a container that ran for ten minutes before crashing restarts at once.
    fn live(&self, at: Instant) -> Option<Entry> {
        self.entry
            .filter(|e| at.saturating_duration_since(e.last_update) <= self.max * 2)
    }

    /// A container exited at `finished`: how long to wait before starting it again. The
    /// first exit restarts at once; each later one waits the current back-off (`base`,
    /// doubling up to `max`), which is what the CrashLoopBackOff message shows.
    pub fn restart_delay(&mut self, finished: Instant) -> Duration {
        match self.live(finished) {
            Some(e) => {
                self.entry = Some(Entry {
                    backoff: (e.backoff * 2).min(self.max),
                    last_update: finished,
                });
                e.backoff
            }
            None => {
                self.entry = Some(Entry {
                    backoff: self.base,
                    last_update: finished,
                });
                Duration::ZERO
            }
        }
    }

    /// An attempt (an image pull) failed at `at`: how long to wait before the next one
    /// (`base` after the first failure, doubling up to `max`).
    pub fn failure_delay(&mut self, at: Instant) -> Duration {
        let backoff = match self.live(at) {
            Some(e) => (e.backoff * 2).min(self.max),
            None => self.base,
        };
        self.entry = Some(Entry {
            backoff,
            last_update: at,
        });
        backoff
    }
}

/// A duration the way Go's `time.Duration.String` prints whole seconds: `10s`, `1m20s`,
/// `5m0s`, `1h0m0s`. Sub-second parts are printed as Go does for them (`500ms`, `1.5s`).
pub fn go_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".into();
    }
    if d < Duration::from_secs(1) {
        let ms = d.as_secs_f64() * 1000.0;
        return format!("{}ms", trim_float(ms));
    }
    let secs = d.as_secs();
    let frac = d.subsec_nanos();
    let (h, m, s) = (secs / 3600, (secs / 60) % 60, secs % 60);
    let seconds = if frac == 0 {
        s.to_string()
    } else {
        trim_float(s as f64 + f64::from(frac) / 1e9)
    };
    match (h, m) {
        (0, 0) => format!("{seconds}s"),
        (0, m) => format!("{m}m{seconds}s"),
        (h, m) => format!("{h}h{m}m{seconds}s"),
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.9}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn restarts_at_once_then_10s_doubling_to_the_cap() {
        let mut b = Backoff::new(10 * S, MAX_BACKOFF);
        let mut delays = Vec::new();
        for _ in 0..8 {
            let d = b.restart_delay(Instant::now());
            delays.push(d.as_secs());
            tokio::time::advance(d + S).await;
        }
        assert_eq!(delays, [0, 10, 20, 40, 80, 160, 300, 300]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_run_resets_the_restart_backoff() {
        let mut b = Backoff::new(10 * S, MAX_BACKOFF);
        assert_eq!(b.restart_delay(Instant::now()), Duration::ZERO);
        assert_eq!(b.restart_delay(Instant::now()), 10 * S);
        tokio::time::advance(601 * S).await;
        assert_eq!(b.restart_delay(Instant::now()), Duration::ZERO);
        assert_eq!(b.restart_delay(Instant::now()), 10 * S);
    }

    #[tokio::test(start_paused = true)]
    async fn pull_failures_wait_from_the_first() {
        let mut b = Backoff::new(10 * S, MAX_BACKOFF);
        let delays: Vec<u64> = (0..7)
            .map(|_| b.failure_delay(Instant::now()).as_secs())
            .collect();
        assert_eq!(delays, [10, 20, 40, 80, 160, 300, 300]);
    }

    #[test]
    fn base_is_configurable() {
        let mut b = Backoff::new(S, MAX_BACKOFF);
        let now = Instant::now();
        assert_eq!(b.restart_delay(now), Duration::ZERO);
        assert_eq!(b.restart_delay(now), S);
        assert_eq!(b.restart_delay(now), 2 * S);
    }

    #[test]
    fn durations_print_like_go() {
        assert_eq!(go_duration(10 * S), "10s");
        assert_eq!(go_duration(80 * S), "1m20s");
        assert_eq!(go_duration(300 * S), "5m0s");
        assert_eq!(go_duration(3600 * S), "1h0m0s");
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::ZERO), "0s");
    }
}
