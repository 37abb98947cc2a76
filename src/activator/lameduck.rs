//! A stopping activator keeps serving until no Function's routing points at it.
//!
//! Clients reach an activator through the Functions' Services, whose EndpointSlices the
//! operator writes (one per Function, listing the ready activators). When an activator
//! pod stops, its readiness turns false at once; the operator then rewrites every
//! Function's slice without it, at a bounded rate, and kube-proxy on every node follows.
//! Until both have happened, new connections still arrive: an activator that stopped
//! accepting at SIGTERM would refuse them. So it keeps accepting (and serving) until no
//! slice written by the operator lists its address any more, plus a settle time for
//! kube-proxy to apply the last change, bounded by `--lame-duck-timeout`; only then does
//! it stop accepting and drain what it holds. The condition is observed (a watch of the
//! slices, started at SIGTERM), not guessed, so a rollout with 10,000 Functions waits as
//! long as the operator needs to update them all and no longer.
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
//!   the pod's termination grace period must cover it. The chart computes both from
//!   `functions` and `operator.sliceWritesPerSecond` (1.5 times the rewrite time, at
//!   least 30 s: 300 s for 10,000 Functions at 50/s), so sizing for N Functions is one
//!   value. When the operator cannot be seen to finish (it is down, or the slices cannot
//!   be watched for [`BLIND`]), the timeout bounds the wait.
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

/// Waits until no EndpointSlice written by the operator (in `namespace`, or all) routes
/// to `ip`, then calls `unrouted` and waits for [`SETTLE`]; gives up after `limit`.
///
/// `unrouted` is where the activator starts ending its keep-alive connections (one
/// `Connection: close` response each): the settle time is when clients reconnect, and a
/// reconnection now goes to another activator.
pub async fn wait_until_unrouted(
    client: kube::Client,
    namespace: Option<&str>,
    ip: IpAddr,
    limit: Duration,
    unrouted: impl FnOnce(),
) {
    let started = Instant::now();
    let api: Api<EndpointSlice> = match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    };
    let config = crate::platform::kube::paged_watch().labels(&format!(
        "endpointslice.kubernetes.io/managed-by={SLICE_MANAGER}"
    ));
    let mut events = watcher(api, config).default_backoff().boxed();
    let mut routing = Routing::default();
    let mut relist: Option<Routing> = None;
    let mut listed = false;
    let mut failing_since: Option<Instant> = None;
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    info!(%ip, "lame duck: serving until no Function routes here");
    loop {
        if listed && routing.count() == 0 {
            info!(waited = ?started.elapsed(), "lame duck: no Function routes here any more");
            unrouted();
            tokio::select! {
                _ = tokio::time::sleep(SETTLE) => {}
                _ = &mut deadline => {}
            }
            return;
        }
        let event = tokio::select! {
            _ = &mut deadline => {
                warn!(
                    slices = routing.count(),
                    "lame duck: still routed to after {limit:?}; stopping anyway"
                );
                return;
            }
            // The watcher backs off between failed attempts: look at the clock meanwhile.
            _ = tokio::time::sleep(Duration::from_secs(1)), if failing_since.is_some() => {
                if failing_since.is_some_and(|t| t.elapsed() >= BLIND) {
                    warn!("lame duck: the Functions' slices cannot be watched; stopping");
                    return;
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
            None => return,
            Some(Err(e)) => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= BLIND {
                    warn!(error = %e, "lame duck: the Functions' slices cannot be watched; stopping");
                    return;
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
}
