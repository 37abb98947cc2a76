//! Follows the activator Service and its EndpointSlices: the ready activator pods every
//! Function's selector-less Service must point at, and the Service's ClusterIP that
//! replicas' drain hooks call. Published through a `watch` channel; a change triggers a
//! reconcile of every Function, whose slice writes are rate-limited.

use std::net::IpAddr;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::build::{ActivatorEndpoint, ActivatorEndpoints, DrainHook, PORT_NAME};

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

/// The drain hook address of the activator Service: its ClusterIP (the first, in the
/// endpoints' family where it has several) and its `http` port. None for a headless
/// Service, which has no address a kubelet could call.
pub fn drain_hook(service: &Service, address_type: &str) -> Option<DrainHook> {
    let spec = service.spec.as_ref()?;
    let port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(PORT_NAME))?
        .port;
    let ips = spec
        .cluster_ips
        .clone()
        .or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]))?;
    let family_v6 = address_type == "IPv6";
    let ip = ips
        .iter()
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .find(|ip| ip.is_ipv6() == family_v6)
        .or_else(|| ips.iter().find_map(|ip| ip.parse::<IpAddr>().ok()))?;
    Some(DrainHook {
        host: ip.to_string(),
        port,
    })
}

/// Watches the activator Service `namespace/service` and its slices until `shutdown`,
/// sending each new set of ready activators (after the first complete list of both)
/// on `tx`.
pub async fn follow(
    client: kube::Client,
    namespace: String,
    service: String,
    tx: watch::Sender<Option<ActivatorEndpoints>>,
    shutdown: CancellationToken,
) {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
    let config =
        watcher::Config::default().labels(&format!("kubernetes.io/service-name={service}"));
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api, config).default_backoff()).boxed();
    let services: Api<Service> = Api::namespaced(client, &namespace);
    let (service_reader, service_writer) = reflector::store();
    let mut service_events = reflector(
        service_writer,
        watcher(
            services,
            watcher::Config::default().fields(&format!("metadata.name={service}")),
        )
        .default_backoff(),
    )
    .boxed();
    // Publish only once both are listed: a first reconcile without the drain hook would
    // otherwise roll every running Function twice at each start.
    let (mut slices_listed, mut service_listed) = (false, false);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            e = events.next() => match e {
                None => return,
                Some(Err(e)) => warn!(error = %e, "watching the activator EndpointSlices"),
                Some(Ok(watcher::Event::InitDone)) => slices_listed = true,
                Some(Ok(_)) => {}
            },
            e = service_events.next() => match e {
                None => return,
                Some(Err(e)) => warn!(error = %e, "watching the activator Service"),
                Some(Ok(watcher::Event::InitDone)) => service_listed = true,
                Some(Ok(_)) => {}
            },
        }
        if !(slices_listed && service_listed) {
            continue;
        }
        let state = reader.state();
        let mut next = aggregate(state.iter().map(|s| s.as_ref()));
        next.drain = service_reader
            .state()
            .first()
            .and_then(|s| drain_hook(s, &next.address_type));
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
