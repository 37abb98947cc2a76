//! The gate in front of a Function's replicas: a bounded queue of waiting requests and
//! the wake of a cold Function (one wake per cold episode, retried with backoff while
//! requests wait). Requests pass as soon as a replica has room; the queue's notification
//! is driven by endpoint changes, freed capacity and status changes.
//!
//! While the platform lists no ready replica, a request that may be replayed can also
//! pass to a replica the activator probed itself (`early`); the wake starts that too.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{Instrument, info, info_span, warn};

use super::Activator;
use super::balancer::{self, Lease, NoReplica};
use super::early::{self, EarlyRoutes};
use super::error::ProxyError;
use super::routing::{Conf, FunctionState};
use super::stats::{Counters, FunctionMetrics};
use crate::platform::Platform;

/// First and longest pause between failed wake attempts.
const WAKE_BACKOFF: (Duration, Duration) = (Duration::from_millis(100), Duration::from_secs(5));

/// A Function's traffic state, created on its first request.
pub(crate) struct Traffic {
    pub(crate) counters: Counters,
    pub(crate) metrics: FunctionMetrics,
    /// Notified when replicas, settings or capacity change.
    pub(crate) changed: Notify,
    /// A wake episode is running.
    waking: AtomicBool,
    /// Replicas probed ready by this activator before the platform lists them.
    pub(crate) early: EarlyRoutes,
}

impl Traffic {
    pub(crate) fn new(metrics: FunctionMetrics) -> Self {
        Self {
            counters: Counters::new(),
            metrics,
            changed: Notify::new(),
            waking: AtomicBool::new(false),
            early: EarlyRoutes::default(),
        }
    }
}

/// A request admitted to a replica.
pub(crate) struct Admitted {
    pub(crate) lease: Lease,
    /// It waited for a wake from zero.
    pub(crate) cold: bool,
    /// It waited in the queue (for a wake or for capacity).
    pub(crate) queued: bool,
    /// The replica is one the activator probed itself, not yet listed ready by the
    /// platform: a failure or a 5xx answer must be replayed, not passed on.
    pub(crate) early: bool,
}

/// A request's place in the queue; leaving (served, timed out, or the client went away
/// and the request future was dropped) frees it.
struct QueueSlot<'a> {
    traffic: &'a Traffic,
}

impl<'a> QueueSlot<'a> {
    fn enter(traffic: &'a Traffic, conf: &Conf, fs: &FunctionState) -> Result<Self, ProxyError> {
        let before = traffic.counters.queued.fetch_add(1, Ordering::SeqCst);
        if before >= conf.queue_capacity as u64 {
            traffic.counters.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(ProxyError::QueueFull {
                key: fs.key.clone(),
                capacity: conf.queue_capacity,
            });
        }
        traffic.metrics.queue_depth.inc();
        Ok(Self { traffic })
    }
}

impl Drop for QueueSlot<'_> {
    fn drop(&mut self) {
        self.traffic.metrics.queue_depth.dec();
        if self.traffic.counters.queued.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The queue emptied: a wake episode waiting for it may end.
            self.traffic.changed.notify_waiters();
        }
    }
}

/// Admits a request to a replica of `fs`: at once when one has room, else after waiting
/// in the queue until one does, `deadline` passes, or the Function is known not to start.
/// `early_ok`: the request may go to a replica the platform does not list yet (it can be
/// replayed; see `early`).
pub(crate) async fn admit(
    act: &Arc<Activator>,
    fs: &Arc<FunctionState>,
    conf: &Conf,
    traffic: &Traffic,
    deadline: Instant,
    tried: &[SocketAddr],
    early_ok: bool,
) -> Result<Admitted, ProxyError> {
    // Fast path. With a concurrency cap, queued requests go first.
    if conf.container_concurrency.is_none() || traffic.counters.queued.load(Ordering::SeqCst) == 0 {
        match balancer::pick(&fs.replicas(), conf.container_concurrency, tried) {
            Ok(lease) => {
                return Ok(Admitted {
                    lease,
                    cold: false,
                    queued: false,
                    early: false,
                });
            }
            Err(NoReplica::AllTried) => return Err(unreachable(fs, tried)),
            Err(NoReplica::Empty) => {
                if early_ok
                    && let Ok(lease) =
                        balancer::pick(&traffic.early.replicas(), conf.container_concurrency, &[])
                {
                    return Ok(Admitted {
                        lease,
                        cold: false,
                        queued: false,
                        early: true,
                    });
                }
                if let Some(reason) = &conf.startup_failure {
                    return Err(ProxyError::StartupFailure {
                        key: fs.key.clone(),
                        reason: reason.clone(),
                    });
                }
            }
            Err(NoReplica::Busy) => {}
        }
    }

    let _slot = QueueSlot::enter(traffic, conf, fs)?;
    let mut cold = false;
    let timeout = tokio::time::sleep_until(deadline);
    tokio::pin!(timeout);
    loop {
        let notified = traffic.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        if fs.is_deleted() {
            return Err(ProxyError::FunctionDeleted {
                key: fs.key.clone(),
            });
        }
        let conf = fs.conf();
        match balancer::pick(&fs.replicas(), conf.container_concurrency, tried) {
            Ok(lease) => {
                return Ok(Admitted {
                    lease,
                    cold,
                    queued: true,
                    early: false,
                });
            }
            Err(NoReplica::AllTried) => return Err(unreachable(fs, tried)),
            Err(NoReplica::Empty) => {
                // Early replicas at their cap: wait until one has room again.
                if early_ok
                    && let Ok(lease) =
                        balancer::pick(&traffic.early.replicas(), conf.container_concurrency, &[])
                {
                    return Ok(Admitted {
                        lease,
                        cold,
                        queued: true,
                        early: true,
                    });
                }
                if traffic.early.is_empty()
                    && let Some(reason) = &conf.startup_failure
                {
                    return Err(ProxyError::StartupFailure {
                        key: fs.key.clone(),
                        reason: reason.clone(),
                    });
                }
                cold = true;
                ensure_waking(act, fs, traffic, conf.initial);
                early::start(act, fs, traffic);
            }
            Err(NoReplica::Busy) => {}
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = &mut timeout => {
                return Err(ProxyError::ActivationTimeout {
                    key: fs.key.clone(),
                    timeout: conf.activation,
                });
            }
        }
    }
}

fn unreachable(fs: &FunctionState, tried: &[SocketAddr]) -> ProxyError {
    ProxyError::Unreachable {
        key: fs.key.clone(),
        attempts: tried.len(),
    }
}

/// Starts a wake episode unless one is running.
fn ensure_waking(act: &Arc<Activator>, fs: &Arc<FunctionState>, traffic: &Traffic, initial: u32) {
    if traffic.waking.swap(true, Ordering::SeqCst) {
        return;
    }
    traffic.metrics.cold_starts.inc();
    let fs = fs.clone();
    let platform = act.platform.clone();
    let span = info_span!("wake", function = %fs.key);
    tokio::spawn(
        async move {
            loop {
                wake_episode(&fs, &platform, initial).await;
                let Some(t) = fs.traffic_if_any() else { return };
                t.waking.store(false, Ordering::SeqCst);
                // A request may have queued between the end of the episode and the flag
                // going down; it saw the flag up and relies on us.
                let still_cold = t.counters.queued.load(Ordering::SeqCst) > 0
                    && !fs.has_replicas()
                    && t.early.is_empty()
                    && !fs.is_deleted();
                if !still_cold || t.waking.swap(true, Ordering::SeqCst) {
                    return;
                }
            }
        }
        .instrument(span),
    );
}

/// Wakes the Function and waits until it has a replica (listed by the platform, or probed
/// early), or nobody waits any more.
async fn wake_episode(fs: &Arc<FunctionState>, platform: &Arc<dyn Platform>, initial: u32) {
    let Some(t) = fs.traffic_if_any() else { return };
    let started = Instant::now();
    let mut backoff = WAKE_BACKOFF.0;
    let mut woken = false;
    loop {
        let notified = t.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let listed = fs.has_replicas();
        if listed || !t.early.is_empty() {
            let secs = started.elapsed().as_secs_f64();
            t.metrics.wake_to_ready.observe(secs);
            info!(seconds = secs, early = !listed, "ready after wake");
            return;
        }
        if t.counters.queued.load(Ordering::SeqCst) == 0 || fs.is_deleted() {
            info!("nobody waits any more; wake episode ends");
            return;
        }
        if !woken {
            match platform.wake(&fs.key, initial).await {
                Ok(outcome) => {
                    info!(?outcome, replicas = initial, "woke Function");
                    woken = true;
                    continue;
                }
                Err(e) => {
                    warn!(error = %e, retry_in = ?backoff, "wake failed");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = &mut notified => {}
                    }
                    backoff = (backoff * 2).min(WAKE_BACKOFF.1);
                    continue;
                }
            }
        }
        notified.await;
    }
}
