//! A stopping activator keeps serving until no Function's routing points at it.
//!
//! Clients reach an activator through the Functions' Services, whose EndpointSlices the
//! operator writes (one per Function, listing the ready activators). When an activator
//! pod stops, its readiness turns false at once; the operator then rewrites every
//! Function's slice without it, at a bounded rate, and kube-proxy on every node follows.
//! Until both have happened, new connections still arrive: an activator that stopped
//! accepting at SIGTERM would refuse them. So it keeps accepting (and serving) until no
//! slice written by the operator lists its address any more, plus a settle time for
//! kube-proxy to apply the last change; only then does it stop accepting and drain what
//! it holds. The condition is observed (a watch of the slices, started at SIGTERM), not
//! guessed, so a rollout with 10,000 Functions waits as long as the operator needs to
//! update them all and no longer. How long is too long is [`Patience`]: the time the
//! operator should need (`--lame-duck-timeout`), extended while the routing is still
//! seen to shrink, up to `--lame-duck-limit`.
//!
//! # Why a lame duck, and not fewer writes or another routing object (issue 16)
//!
//! One activator pod change is one slice write per Function; at the operator's
//! `--slice-writes-per-second` (50) that is 200 s at 10,000 Functions. Three ways out:
//!
//! - **An `ExternalName` Service** (`<name>` a DNS alias of the activator Service) has no
//!   per-Function routing at all: nothing to rewrite. But it has no ClusterIP and no
//!   port mapping, so clients must use the activator's port; Ingress controllers and
//!   meshes treat it differently (several refuse it or need per-controller settings,
//!   NetworkPolicies cannot select it), and `<name>` would change type under existing
//!   users. Rejected: "the Function is reachable at its Service" must hold for every
//!   client, not only for plain DNS.
//! - **Fewer writes per change**: a per-Function slice must list the activators' pod
//!   IPs (a slice cannot point at another Service's ClusterIP portably; kube-proxy does
//!   not translate twice), so every pod change reaches every slice. Batching changes
//!   (one write carries all changes since the last) is what the operator already does:
//!   a Function is rewritten once with the latest set however many changes queued up.
//! - **A lame duck** (this module): the fan-out stays, but nothing is lost while it
//!   runs, because the old activator keeps serving until the last slice has dropped it.
//!   Its cost is time: a rollout step lasts Functions / writes-per-second seconds, and
//!   the pod's termination grace period must cover it. The chart computes the timeout
//!   and the limit from `functions` and `operator.sliceWritesPerSecond` (1.5 and 2.5
//!   times the rewrite time, at least 30 and 50 s: 300 and 500 s for 10,000 Functions at
//!   50/s), so sizing for N Functions is one value. The write rate is a ceiling, not a
//!   promise: an API server too loaded to take it slows the operator down (measured at
//!   10,000 Functions: half the rate, 589 slices still to go at 300 s), so past the
//!   timeout the wait follows the operator's progress rather than the clock. When the
//!   operator cannot be seen to finish (it has stopped writing, or the slices cannot be
//!   watched for [`BLIND`]), the wait ends.
//!
//! Chosen: the lame duck. It keeps every client's view of a Function unchanged (a
//! ClusterIP Service with EndpointSlices), and the measured loss during an activator
//! change at 10,000 Functions is in BENCHMARKS.md (issue 16).

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::operator::build::SLICE_MANAGER;

/// How long kube-proxy may take to apply the last slice change on every node.
pub const SETTLE: Duration = Duration::from_secs(3);
/// How long the slices may stay unobservable (the API server unreachable, or the
/// activator's access removed by an uninstall) before the wait is given up: what cannot
/// be seen cannot be waited for.
pub const BLIND: Duration = Duration::from_secs(10);

/// The slices (`namespace/name`) of a list that route to `ip`.
#[derive(Debug, Default)]
pub struct Routing {
    slices: BTreeSet<String>,
}

impl Routing {
    fn key(slice: &EndpointSlice) -> String {
        format!(
            "{}/{}",
            slice.metadata.namespace.as_deref().unwrap_or_default(),
            slice.metadata.name.as_deref().unwrap_or_default()
        )
    }

    /// Whether a slice lists `ip` as an endpoint that takes new connections.
    pub fn lists(slice: &EndpointSlice, ip: IpAddr) -> bool {
        slice.endpoints.iter().any(|e| {
            e.conditions.as_ref().and_then(|c| c.ready) != Some(false)
                && e.addresses
                    .iter()
                    .any(|a| a.parse::<IpAddr>().ok() == Some(ip))
        })
    }

    /// Records a slice as it is now.
    pub fn observe(&mut self, slice: &EndpointSlice, ip: IpAddr) {
        if Self::lists(slice, ip) {
            self.slices.insert(Self::key(slice));
        } else {
            self.slices.remove(&Self::key(slice));
        }
    }

    pub fn forget(&mut self, slice: &EndpointSlice) {
        self.slices.remove(&Self::key(slice));
    }

    pub fn count(&self) -> usize {
        self.slices.len()
    }
}

/// How recently the routing must have shrunk for a lame duck past its timeout to keep
/// waiting: the operator rewrites slices at one or more a second while it works.
pub const PROGRESS: Duration = Duration::from_secs(10);

/// When a lame duck stops waiting for its routing to drop it.
///
/// Until `timeout` (the time the operator should need, sized by the chart) it waits
/// whatever happens: an operator that is failing over makes no progress for a while and
/// then catches up. Past it, it waits only while the operator is seen to work: the
/// number of slices listing this activator fell within the last [`PROGRESS`]. A write
/// rate below the nominal one (an API server too loaded to take it) then lengthens the
/// wait instead of cutting it short, and an operator that has stopped ends it. `limit`
/// bounds it all; the pod's termination grace period covers `limit` plus the drain.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    started: Instant,
    timeout: Duration,
    limit: Duration,
    fewest: Option<usize>,
    shrank: Option<Instant>,
}

impl Patience {
    pub fn new(started: Instant, timeout: Duration, limit: Duration) -> Self {
        Self {
            started,
            timeout,
            limit: limit.max(timeout),
            fewest: None,
            shrank: None,
        }
    }

    /// Records how many slices list this activator at `now`.
    pub fn observe(&mut self, slices: usize, now: Instant) {
        match self.fewest {
            Some(fewest) if slices < fewest => {
                self.fewest = Some(slices);
                self.shrank = Some(now);
            }
            Some(_) => {}
            None => self.fewest = Some(slices),
        }
    }

    /// When to stop waiting, as things stand.
    pub fn until(&self) -> Instant {
        let nominal = self.started + self.timeout;
        let working = self.shrank.map_or(nominal, |t| nominal.max(t + PROGRESS));
        working.min(self.started + self.limit)
    }

    /// The hard bound.
    pub fn limit(&self) -> Instant {
        self.started + self.limit
    }
}

/// Waits until no EndpointSlice written by the operator (in `namespace`, or all) routes
/// to `ip`, then calls `unrouted` and waits for [`SETTLE`]; gives up as [`Patience`]
/// says, from `timeout` and `limit`.
///
/// `unrouted` is where the activator starts ending its keep-alive connections (one
/// `Connection: close` response each): the settle time is when clients reconnect, and a
/// reconnection now goes to another activator.
pub async fn wait_until_unrouted(
    client: kube::Client,
    namespace: Option<&str>,
    ip: IpAddr,
    timeout: Duration,
    limit: Duration,
    unrouted: impl FnOnce(),
) -> Outcome {
    let patience = Patience::new(Instant::now(), timeout, limit);
    let api: Api<EndpointSlice> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let config = crate::platform::kube::paged_watch().labels(&format!(
        "endpointslice.kubernetes.io/managed-by={SLICE_MANAGER}"
    ));
    let events = watcher(api, config).default_backoff();
    wait_on(events, ip, patience, unrouted).await
}

/// How a lame duck ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// No slice lists this activator any more.
    Unrouted,
    /// Slices still listed it when [`Patience`] ran out.
    GaveUp { slices: usize },
    /// The slices could not be watched for [`BLIND`], or the watch ended.
    Blind,
}

/// [`wait_until_unrouted`] on a stream of the slices' watch events.
pub async fn wait_on(
    events: impl futures::Stream<Item = Result<watcher::Event<EndpointSlice>, watcher::Error>>,
    ip: IpAddr,
    mut patience: Patience,
    unrouted: impl FnOnce(),
) -> Outcome {
    let started = Instant::now();
    let mut events = std::pin::pin!(events);
    let mut routing = Routing::default();
    let mut relist: Option<Routing> = None;
    let mut listed = false;
    let mut failing_since: Option<Instant> = None;
    info!(%ip, "lame duck: serving until no Function routes here");
    loop {
        if listed && routing.count() == 0 {
            info!(waited = ?started.elapsed(), "lame duck: no Function routes here any more");
            unrouted();
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = tokio::time::sleep_until(patience.limit()) => {}
            }
            return Outcome::Unrouted;
        }
        let event = tokio::select! {
            _ = tokio::time::sleep_until(patience.until()) => {
                warn!(
                    slices = routing.count(),
                    waited = ?started.elapsed(),
                    "lame duck: still routed to, and {}; stopping anyway",
                    if Instant::now() >= patience.limit() {
                        "the limit is reached"
                    } else {
                        "the routing stopped shrinking"
                    }
                );
                return Outcome::GaveUp { slices: routing.count() };
            }
            // The watcher backs off between failed attempts: look at the clock meanwhile.
            _ = tokio::time::sleep(Duration::from_secs(1)), if failing_since.is_some() => {
                if failing_since.is_some_and(|t| t.elapsed() >= BLIND) {
                    warn!("lame duck: the Functions' slices cannot be watched; stopping");
                    return Outcome::Blind;
                }
                continue;
            }
            e = events.next() => e,
        };
        // Only data ends a failure: a retried list starts with `Init` again.
        if matches!(
            event,
            Some(Ok(watcher::Event::InitDone
                | watcher::Event::Apply(_)
                | watcher::Event::Delete(_)))
        ) {
            failing_since = None;
        }
        match event {
            None => return Outcome::Blind,
            Some(Err(e)) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= BLIND {
                    warn!(error = %e, "lame duck: the Functions' slices cannot be watched; stopping");
                    return Outcome::Blind;
                }
                warn!(error = %e, "lame duck: watching the Functions' slices");
            }
            Some(Ok(watcher::Event::Init)) => relist = Some(Routing::default()),
            Some(Ok(watcher::Event::InitApply(s))) => {
                relist.get_or_insert_with(Routing::default).observe(&s, ip)
            }
            Some(Ok(watcher::Event::InitDone)) => {
                routing = relist.take().unwrap_or_default();
                listed = true;
                info!(
                    slices = routing.count(),
                    "lame duck: Functions still routing here"
                );
            }
            Some(Ok(watcher::Event::Apply(s))) => routing.observe(&s, ip),
            Some(Ok(watcher::Event::Delete(s))) => routing.forget(&s),
        }
        if listed {
            patience.observe(routing.count(), Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(name: &str, ips: &[(&str, Option<bool>)]) -> EndpointSlice {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"},
            "addressType": "IPv4",
            "endpoints": ips.iter().map(|(ip, ready)| serde_json::json!({
                "addresses": [ip], "conditions": {"ready": ready}
            })).collect::<Vec<_>>(),
        }))
        .expect("a slice")
    }

    #[test]
    fn a_slice_routes_here_while_it_lists_this_address_as_ready() {
        let me: IpAddr = "10.1.0.7".parse().unwrap();
        let mut r = Routing::default();
        r.observe(
            &slice("a", &[("10.1.0.7", Some(true)), ("10.1.0.8", None)]),
            me,
        );
        r.observe(&slice("b", &[("10.1.0.7", None)]), me);
        r.observe(&slice("c", &[("10.1.0.8", Some(true))]), me);
        assert_eq!(r.count(), 2);
        // Rewritten without this activator, or marked not ready: no longer routes here.
        r.observe(&slice("a", &[("10.1.0.8", Some(true))]), me);
        r.observe(&slice("b", &[("10.1.0.7", Some(false))]), me);
        assert_eq!(r.count(), 0);
        r.observe(&slice("d", &[("10.1.0.7", Some(true))]), me);
        r.forget(&slice("d", &[]));
        assert_eq!(r.count(), 0);
    }

    /// The watch as the lame duck sees it: a list of `listed` slices naming this
    /// activator, then one rewritten without it at each of `drops` (seconds from the
    /// start), then nothing more (the watch stays open).
    fn watch(
        listed: usize,
        drops: &[u64],
    ) -> impl futures::Stream<Item = Result<watcher::Event<EndpointSlice>, watcher::Error>> {
        let name = |i: usize| format!("f{i}");
        let mut events: Vec<(u64, watcher::Event<EndpointSlice>)> = vec![(0, watcher::Event::Init)];
        for i in 0..listed {
            let s = slice(&name(i), &[("10.1.0.7", Some(true))]);
            events.push((0, watcher::Event::InitApply(s)));
        }
        events.push((0, watcher::Event::InitDone));
        for (i, at) in drops.iter().enumerate() {
            let s = slice(&name(i), &[("10.1.0.8", Some(true))]);
            events.push((*at, watcher::Event::Apply(s)));
        }
        let start = Instant::now();
        futures::stream::iter(events)
            .then(move |(at, e)| async move {
                tokio::time::sleep_until(start + Duration::from_secs(at)).await;
                Ok(e)
            })
            .chain(futures::stream::pending())
    }

    async fn lame_duck(
        listed: usize,
        drops: &[u64],
        timeout: u64,
        limit: u64,
    ) -> (Outcome, Duration, bool) {
        let start = Instant::now();
        let mut unrouted = false;
        let patience = Patience::new(
            start,
            Duration::from_secs(timeout),
            Duration::from_secs(limit),
        );
        let me: IpAddr = "10.1.0.7".parse().unwrap();
        let outcome = wait_on(watch(listed, drops), me, patience, || unrouted = true).await;
        (outcome, start.elapsed(), unrouted)
    }

    #[tokio::test(start_paused = true)]
    async fn a_lame_duck_ends_once_the_last_slice_has_dropped_it_and_kube_proxy_settled() {
        let (outcome, took, unrouted) = lame_duck(3, &[1, 2, 4], 20, 50).await;
        assert_eq!(outcome, Outcome::Unrouted);
        assert!(unrouted);
        assert_eq!(took, Duration::from_secs(4) + SETTLE);
    }

    /// The operator writes slower than the chart assumed (a loaded API server): the
    /// lame duck outlives its timeout as long as slices keep dropping it, so no client
    /// is sent to an activator that stopped accepting.
    #[tokio::test(start_paused = true)]
    async fn past_its_timeout_a_lame_duck_waits_while_the_routing_still_shrinks() {
        let drops: Vec<u64> = (1..=8).map(|i| i * 5).collect(); // the last at 40 s
        let (outcome, took, unrouted) = lame_duck(8, &drops, 20, 50).await;
        assert_eq!(outcome, Outcome::Unrouted);
        assert!(unrouted);
        assert_eq!(took, Duration::from_secs(40) + SETTLE);
    }

    /// An operator that stopped writing ends the wait: at the timeout, or
    /// [`PROGRESS`] after the last slice dropped this activator, whichever is later.
    #[tokio::test(start_paused = true)]
    async fn a_lame_duck_whose_routing_stops_shrinking_gives_up() {
        let (outcome, took, unrouted) = lame_duck(5, &[3], 20, 50).await;
        assert_eq!(outcome, Outcome::GaveUp { slices: 4 });
        assert!(!unrouted);
        assert_eq!(took, Duration::from_secs(20));

        let (outcome, took, _) = lame_duck(5, &[3, 18], 20, 50).await;
        assert_eq!(outcome, Outcome::GaveUp { slices: 3 });
        assert_eq!(took, Duration::from_secs(18) + PROGRESS);
    }

    /// The limit holds even while the routing shrinks: the grace period covers it.
    #[tokio::test(start_paused = true)]
    async fn a_lame_duck_stops_at_its_limit() {
        let drops: Vec<u64> = (1..=30).map(|i| i * 3).collect();
        let (outcome, took, _) = lame_duck(30, &drops, 20, 50).await;
        // Dropped at 3, 6, ..., 48 s: 16 of 30.
        assert_eq!(outcome, Outcome::GaveUp { slices: 14 });
        assert_eq!(took, Duration::from_secs(50));
    }
}
