//! Early routes: a cold start served by a replica the activator probed itself, before
//! the platform lists it ready (`--cold-start-probe`, on by default).
//!
//! # Why
//!
//! On Kubernetes most of a cold start after the container starts is propagation: the
//! kubelet probes on its own period, writes the pod status, the EndpointSlice controller
//! writes the slice, the watch brings it here. The pod's IP is known much earlier, from
//! its status, before the app is even up. So while a Function wakes, the activator
//! watches its pods ([`Platform::candidates`]), probes each new one directly with the
//! kubelet's own check (its `httpGet` or `tcpSocket` readiness probe; a TCP connect to
//! the port when it has none), every 2 ms doubling to 25 ms, and sends the waiting
//! requests the moment the check passes, as Knative's activator does with its
//! queue-proxy, but without a sidecar.
//!
//! # Why it is safe
//!
//! The platform's ready endpoints stay the truth; an early replica only fills the gap
//! before they arrive, under these rules:
//!
//! - **Only while the Function has no ready endpoint.** Routes are added only then, and
//!   all dropped (under the routing table's lock, in the same step) when the platform
//!   lists any ready endpoint: from then on only its view counts, so a pod it marks not
//!   ready, or terminating, is never used. A pod the platform has *ever* listed ready
//!   (its name and address are remembered per Function) is not probed again: once the
//!   platform has caught up with a pod, its verdict on that pod is final, so a replica
//!   that turned unready is not brought back by the activator's own probe.
//! - **Only pods whose readiness can be checked from outside.** The check is the
//!   kubelet's own: every `httpGet` (HTTP) and `tcpSocket` startup and readiness probe
//!   of the pod's containers, with their `successThreshold`. A pod with an `exec` or
//!   `grpc` probe, an HTTPS probe, readiness gates or sidecar init containers waits for
//!   the platform: a TCP connect would say less than its owner asked for.
//! - **Terminating or gone ends it at once.** The pod watch says so before the slice
//!   does; the route is dropped, its prober stopped, and it is never used again.
//! - **Watched while used.** An early replica is probed again every 100 ms; one failed
//!   check drops it for good (the platform decides from then on). So does a platform that
//!   has not listed it ready within its probes' delays and periods plus 30 s: the
//!   kubelet disagrees, and its verdict wins.
//! - **Only replayable requests, and replayed on any failure.** An early replica takes
//!   requests without a body and with an idempotent method (GET, HEAD, OPTIONS, TRACE,
//!   PUT, DELETE), which HTTP lets a client, and so a proxy, send again. A connection
//!   refused or reset, or a 5xx answer from an early replica, never reaches the client:
//!   the replica is dropped from the early routes and the same request goes back to
//!   the queue, for another early replica or the platform's ready endpoints. An app that
//!   listens before it is ready and answers 503 meanwhile costs one replay, not an error.
//!   Other requests wait for the platform, as before.
//! - **Counted like any replica.** An early replica is the same `Replica` (by address)
//!   the ready endpoints later give, so its requests in flight, and whether it is
//!   routed, count in drains (`drain`) exactly as for any other replica.
//!
//! # What it costs
//!
//! One pod watch per *waking* Function, opened by its first queued request and closed
//! when the platform lists a ready replica, or when nothing waits and nothing is routed
//! early: Functions at zero or warm cost nothing, and no Pod object is kept (only a few
//! fields per pod). Warm requests pay nothing: early routes are looked at only when a
//! Function has no ready endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use tokio::sync::mpsc;
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::Activator;
use super::balancer::Replica;
use super::gate::Traffic;
use super::routing::FunctionState;
use crate::platform::Candidate;

/// First pause between two checks of a new replica; it doubles up to [`FAST_PROBE_MAX`].
const FAST_PROBE_FIRST: Duration = Duration::from_millis(2);
/// Longest pause between checks during a replica's first [`FAST_PROBE_SPAN`].
const FAST_PROBE_MAX: Duration = Duration::from_millis(25);
/// How long a new replica is probed at the fast pace; then every [`SLOW_PROBE`].
const FAST_PROBE_SPAN: Duration = Duration::from_secs(2);
/// Pause between checks of a replica that starts slowly.
const SLOW_PROBE: Duration = Duration::from_millis(100);
/// Pause between checks of a replica in use, before the platform lists it.
const WATCH_PROBE: Duration = Duration::from_millis(100);
/// Longest wait for a connect while probing: a SYN into a pod network that is not set up
/// yet is dropped, and the next attempt should not wait a whole probe timeout for it.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);

/// The early routes of one Function (part of its traffic state).
#[derive(Default)]
pub(crate) struct EarlyRoutes {
    inner: Mutex<Inner>,
    /// A task follows the Function's candidates now.
    running: AtomicBool,
}

#[derive(Default)]
struct Inner {
    replicas: Option<Arc<[Arc<Replica>]>>,
    /// Taken out after a failure: not routed early again while this task runs.
    demoted: Vec<SocketAddr>,
}

impl EarlyRoutes {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The replicas routed early now.
    pub(crate) fn replicas(&self) -> Arc<[Arc<Replica>]> {
        self.lock()
            .replicas
            .clone()
            .unwrap_or_else(|| Arc::from(Vec::new()))
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lock().replicas.as_ref().is_none_or(|r| r.is_empty())
    }

    /// Routes `replica` early unless it was demoted or is routed already.
    pub(crate) fn add(&self, replica: Arc<Replica>) -> bool {
        let mut inner = self.lock();
        if inner.demoted.contains(&replica.addr) {
            return false;
        }
        let mut all: Vec<Arc<Replica>> = inner.replicas.as_deref().unwrap_or_default().to_vec();
        if all.iter().any(|r| r.addr == replica.addr) {
            return false;
        }
        replica.set_routed(true);
        all.push(replica);
        inner.replicas = Some(Arc::from(all));
        true
    }

    /// Takes the replica at `addr` out for good (while this task runs); whether it was in.
    pub(crate) fn demote(&self, addr: SocketAddr) -> bool {
        let mut inner = self.lock();
        if !inner.demoted.contains(&addr) {
            inner.demoted.push(addr);
        }
        let Some(all) = inner.replicas.as_ref() else {
            return false;
        };
        let Some(gone) = all.iter().find(|r| r.addr == addr).cloned() else {
            return false;
        };
        gone.set_routed(false);
        let rest: Vec<Arc<Replica>> = all.iter().filter(|r| r.addr != addr).cloned().collect();
        inner.replicas = (!rest.is_empty()).then(|| Arc::from(rest));
        true
    }

    /// Drops every early route (the platform caught up, or the task ended).
    pub(crate) fn clear(&self) {
        let mut inner = self.lock();
        for r in inner.replicas.take().iter().flat_map(|r| r.iter()) {
            r.set_routed(false);
        }
        inner.demoted.clear();
    }
}

/// Starts following the candidates of a waking Function, unless that is off, already
/// under way, or the platform has none to offer.
pub(crate) fn start(act: &Arc<Activator>, fs: &Arc<FunctionState>, traffic: &Traffic) {
    if !act.settings.cold_start_probe || traffic.early.running.swap(true, Ordering::SeqCst) {
        return;
    }
    let Some(candidates) = act.platform.candidates(&fs.key, fs.conf().port) else {
        traffic.early.running.store(false, Ordering::SeqCst);
        return;
    };
    let span = info_span!("early", function = %fs.key);
    tokio::spawn(follow(Arc::downgrade(act), fs.clone(), candidates).instrument(span));
}

/// What a prober found.
enum Verdict {
    /// Every check passed (`success_threshold` times in a row).
    Ready(String),
    /// A check failed after the replica was ready.
    Failed(String, String),
}

/// What the task knows of one candidate.
enum Tracked {
    Probing {
        addr: SocketAddr,
        prober: AbortHandle,
    },
    Routed {
        addr: SocketAddr,
        prober: AbortHandle,
        /// The platform should have listed it by then.
        until: Instant,
    },
    /// Terminating, failed, demoted, or listed ready by the platform before: never again.
    Done,
}

/// Follows the candidates of one waking Function until the platform lists a ready
/// replica, the Function is deleted, or nothing waits and nothing is routed early.
async fn follow(
    act: Weak<Activator>,
    fs: Arc<FunctionState>,
    mut candidates: BoxStream<'static, Vec<Candidate>>,
) {
    let Some(t) = fs.traffic_if_any() else { return };
    let (tx, mut verdicts) = mpsc::unbounded_channel();
    let mut probers = JoinSet::new();
    let mut tracked: HashMap<String, Tracked> = HashMap::new();
    let mut known: HashMap<String, Candidate> = HashMap::new();
    debug!("following the candidates");
    loop {
        let changed = t.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        if fs.is_deleted() || fs.has_replicas() {
            break;
        }
        if t.early.is_empty() && t.counters.queued.load(Ordering::SeqCst) == 0 {
            break;
        }
        let Some(act) = act.upgrade() else { break };
        let next_deadline = tracked
            .values()
            .filter_map(|s| match s {
                Tracked::Routed { until, .. } => Some(*until),
                _ => None,
            })
            .min();
        tokio::select! {
            set = candidates.next() => {
                let Some(set) = set else {
                    warn!("the candidates stream ended");
                    break;
                };
                on_candidates(&act, &fs, set, &mut tracked, &mut known, &mut probers, &tx);
            }
            Some(verdict) = verdicts.recv() => {
                on_verdict(&act, &fs, verdict, &mut tracked, &known);
            }
            Some(_) = probers.join_next(), if !probers.is_empty() => {}
            _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)),
                if next_deadline.is_some() => {
                let now = Instant::now();
                for (name, state) in tracked.iter_mut() {
                    if let Tracked::Routed { addr, prober, until } = state
                        && *until <= now
                    {
                        warn!(replica = %name, "the platform has not listed the replica ready in time; leaving it to the platform");
                        prober.abort();
                        act.demote_early(&fs, *addr, "expired");
                        *state = Tracked::Done;
                    }
                }
            }
            _ = &mut changed => {}
        }
    }
    probers.abort_all();
    match act.upgrade() {
        Some(act) => act.clear_early(&fs),
        None => t.early.clear(),
    }
    t.early.running.store(false, Ordering::SeqCst);
    // A request that queued meanwhile looks again (and starts another task if needed).
    t.changed.notify_waiters();
    debug!("stopped following the candidates");
}

fn on_candidates(
    act: &Arc<Activator>,
    fs: &Arc<FunctionState>,
    set: Vec<Candidate>,
    tracked: &mut HashMap<String, Tracked>,
    known: &mut HashMap<String, Candidate>,
    probers: &mut JoinSet<()>,
    tx: &mpsc::UnboundedSender<Verdict>,
) {
    let present: std::collections::HashSet<&str> = set.iter().map(|c| c.name.as_str()).collect();
    let gone: Vec<String> = tracked
        .keys()
        .filter(|n| !present.contains(n.as_str()))
        .cloned()
        .collect();
    for name in gone {
        if let Some(state) = tracked.remove(&name) {
            drop_candidate(act, fs, &name, state, "deleted");
        }
        known.remove(&name);
    }
    for c in set {
        let usable = !c.terminating && c.checks.is_some();
        match tracked.get(&c.name) {
            Some(Tracked::Done) => {}
            Some(_) if !usable => {
                if let Some(state) = tracked.insert(c.name.clone(), Tracked::Done) {
                    let why = if c.terminating {
                        "terminating"
                    } else {
                        "unchecked"
                    };
                    drop_candidate(act, fs, &c.name, state, why);
                }
            }
            Some(_) => {}
            None if c.terminating => {
                tracked.insert(c.name.clone(), Tracked::Done);
            }
            // Not checkable yet (a sidecar not running): it may become so.
            None if c.checks.is_none() => {}
            None if act.was_listed_ready(&fs.key, &c.name, c.addr) => {
                debug!(replica = %c.name, "listed ready by the platform before: its verdict holds");
                tracked.insert(c.name.clone(), Tracked::Done);
            }
            None => {
                debug!(replica = %c.name, addr = %c.addr, "probing a new replica");
                let prober = probers.spawn(probe(c.clone(), tx.clone()));
                tracked.insert(
                    c.name.clone(),
                    Tracked::Probing {
                        addr: c.addr,
                        prober,
                    },
                );
            }
        }
        known.insert(c.name.clone(), c);
    }
}

fn drop_candidate(
    act: &Arc<Activator>,
    fs: &Arc<FunctionState>,
    name: &str,
    state: Tracked,
    why: &'static str,
) {
    match state {
        Tracked::Probing { addr, prober } => {
            prober.abort();
            act.demote_early(fs, addr, why);
            debug!(replica = %name, why, "stopped probing");
        }
        Tracked::Routed { addr, prober, .. } => {
            prober.abort();
            act.demote_early(fs, addr, why);
            info!(replica = %name, why, "early route dropped");
        }
        Tracked::Done => {}
    }
}

fn on_verdict(
    act: &Arc<Activator>,
    fs: &Arc<FunctionState>,
    verdict: Verdict,
    tracked: &mut HashMap<String, Tracked>,
    known: &HashMap<String, Candidate>,
) {
    match verdict {
        Verdict::Ready(name) => {
            let Some(Tracked::Probing { addr, prober }) = tracked.remove(&name) else {
                return;
            };
            let agree = known
                .get(&name)
                .map_or(Duration::from_secs(30), |c| c.agree_within);
            if act.add_early(fs, addr) {
                info!(replica = %name, %addr, "ready by its own check; routing early");
                tracked.insert(
                    name,
                    Tracked::Routed {
                        addr,
                        prober,
                        until: Instant::now() + agree,
                    },
                );
            } else {
                prober.abort();
                tracked.insert(name, Tracked::Done);
            }
        }
        Verdict::Failed(name, why) => {
            if let Some(Tracked::Routed { addr, prober, .. }) = tracked.remove(&name) {
                prober.abort();
                warn!(replica = %name, error = %why, "check failed after passing; early route dropped");
                act.demote_early(fs, addr, "check_failed");
            }
            tracked.insert(name, Tracked::Done);
        }
    }
}

/// Checks a candidate until it passes `success_threshold` times in a row (then says so),
/// and keeps checking it while it is used (saying when a check fails, then ending).
async fn probe(c: Candidate, tx: mpsc::UnboundedSender<Verdict>) {
    let checks = c.checks.clone().unwrap_or_default();
    let ip = c.addr.ip();
    let connect_timeout = c.timeout.min(PROBE_CONNECT_TIMEOUT);
    let check_all = || async {
        for check in &checks {
            check.run(ip, connect_timeout, c.timeout).await?;
        }
        Ok::<(), String>(())
    };
    let started = Instant::now();
    let mut pause = FAST_PROBE_FIRST;
    let mut passes = 0;
    loop {
        if check_all().await.is_ok() {
            passes += 1;
            if passes >= c.success_threshold {
                break;
            }
        } else {
            passes = 0;
        }
        tokio::time::sleep(pause).await;
        let max = if started.elapsed() < FAST_PROBE_SPAN {
            FAST_PROBE_MAX
        } else {
            SLOW_PROBE
        };
        pause = (pause * 2).min(max);
    }
    if tx.send(Verdict::Ready(c.name.clone())).is_err() {
        return;
    }
    loop {
        tokio::time::sleep(WATCH_PROBE).await;
        if let Err(why) = check_all().await {
            let _ = tx.send(Verdict::Failed(c.name.clone(), why));
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(port: u16) -> Arc<Replica> {
        Replica::new(SocketAddr::from(([10, 0, 0, 1], port)), 1)
    }

    #[test]
    fn routes_count_as_routed_and_a_demoted_replica_stays_out() {
        let routes = EarlyRoutes::default();
        let a = replica(1);
        assert!(routes.add(a.clone()));
        assert!(!routes.add(a.clone()), "no duplicates");
        assert!(a.is_routed());
        assert_eq!(routes.replicas().len(), 1);
        assert!(routes.demote(a.addr));
        assert!(!a.is_routed());
        assert!(routes.is_empty());
        assert!(!routes.add(a.clone()), "demoted stays out");
        routes.clear();
        assert!(routes.add(a.clone()), "a new task starts afresh");
        routes.clear();
        assert!(!a.is_routed());
        assert!(routes.is_empty());
    }
}
