//! Follows the activator Service's EndpointSlices: the ready activator pods every
//! Function's selector-less Service must point at. Published through a `watch` channel;
//! a change triggers a reconcile of every Function, whose slice writes are rate-limited.

use std::net::IpAddr;

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::build::{ActivatorEndpoint, ActivatorEndpoints, PORT_NAME};

/// Whether a slice endpoint can take traffic: `ready` not false (unset means ready) and
/// not terminating.
pub fn endpoint_ready(e: &k8s_openapi::api::discovery::v1::Endpoint) -> bool {
    let c = e.conditions.as_ref();
    c.and_then(|c| c.ready) != Some(false) && c.and_then(|c| c.terminating) != Some(true)
}

/// The ready activator endpoints of a Service's slices and their `http` port, in one
/// address family: IPv4 when the Service has IPv4 slices (single-stack or dual-stack
/// clusters), else IPv6. Loopback, link-local and unspecified addresses are dropped: the
/// API server refuses them in the slices the operator writes.
pub fn aggregate<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> ActivatorEndpoints {
    let slices: Vec<&EndpointSlice> = slices.into_iter().collect();
    let family = if slices.iter().any(|s| s.address_type == "IPv4") || slices.is_empty() {
        "IPv4"
    } else if slices.iter().any(|s| s.address_type == "IPv6") {
        "IPv6"
    } else {
        "IPv4"
    };
    let mut out = ActivatorEndpoints {
        address_type: family.to_string(),
        ..ActivatorEndpoints::default()
    };
    for slice in slices.into_iter().filter(|s| s.address_type == family) {
        let Some(port) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(PORT_NAME))
            .and_then(|p| p.port)
        else {
            continue;
        };
        out.port = port;
        for e in slice.endpoints.iter().filter(|e| endpoint_ready(e)) {
            for address in &e.addresses {
                let Ok(ip) = address.parse::<IpAddr>() else {
                    continue;
                };
                if !routable(ip) {
                    continue;
                }
                out.endpoints.push(ActivatorEndpoint {
                    ip: ip.to_string(),
                    node_name: e.node_name.clone(),
                    zone: e.zone.clone(),
                    target_ref: e.target_ref.clone(),
                });
            }
        }
    }
    out.endpoints.sort_by(|a, b| a.ip.cmp(&b.ip));
    out.endpoints.dedup_by(|a, b| a.ip == b.ip);
    if out.endpoints.is_empty() {
        out.port = 0;
    }
    out
}

/// Whether an address may appear in an EndpointSlice.
fn routable(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !(v4.is_loopback() || v4.is_link_local() || v4.is_unspecified()),
        IpAddr::V6(v6) => {
            let link_local = (v6.segments()[0] & 0xffc0) == 0xfe80;
            !(v6.is_loopback() || v6.is_unspecified() || link_local)
        }
    }
}

/// Watches the activator Service `namespace/service` until `shutdown`, sending each new
/// set of ready activators (after the first complete list) on `tx`.
pub async fn follow(
    client: kube::Client,
    namespace: String,
    service: String,
    tx: watch::Sender<Option<ActivatorEndpoints>>,
    shutdown: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client, &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api, config).default_backoff()).boxed();
    let mut listed = false;
    loop {
        let event = tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Err(e)) => warn!(error = %e, "watching the activator EndpointSlices"),
            Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
            Some(Ok(watcher::Event::InitDone)) => listed = true,
            Some(Ok(_)) => {}
        }
        if !listed {
            continue;
        }
        let state = reader.state();
        let next = aggregate(state.iter().map(|s| s.as_ref()));
        tx.send_if_modified(|current| {
            if current.as_ref() == Some(&next) {
                return false;
            }
            info!(
                service = %format!("{namespace}/{service}"),
                ready = next.endpoints.len(),
                port = next.port,
                "activator endpoints changed"
            );
            *current = Some(next);
            true
        });
    }
}
