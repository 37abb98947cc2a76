//! Where the activators are: the `admin` address of every ready pod behind the activator
//! Service, from a watch of its EndpointSlices. The autoscaler reads `/stats` from each
//! of them; an activator asks its peers whether they still have requests in flight to a
//! replica that is being drained.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};
use tokio_util::sync::{CancellationToken, DropGuard};
use tracing::{info, warn};

/// The port name of the activators' admin endpoint.
pub const ADMIN_PORT_NAME: &str = "admin";

/// The ready `admin` addresses of each EndpointSlice, by slice name.
type SliceAddresses = BTreeMap<String, Vec<SocketAddr>>;

/// The activators behind one Service, kept current by a watch started on first use and
/// stopped when the directory is dropped.
pub struct ActivatorDirectory {
    client: kube::Client,
    namespace: String,
    service: String,
    /// `None` until the first complete list.
    endpoints: Arc<Mutex<Option<SliceAddresses>>>,
    watch: Mutex<Option<DropGuard>>,
}

impl ActivatorDirectory {
    pub fn new(client: kube::Client, namespace: String, service: String) -> Self {
        Self {
            client,
            namespace,
            service,
            endpoints: Arc::default(),
            watch: Mutex::new(None),
        }
    }

    /// `namespace/name` of the Service.
    pub fn service(&self) -> String {
        format!("{}/{}", self.namespace, self.service)
    }

    /// The ready activators' admin addresses; `None` until they have been listed once.
    pub fn addresses(&self) -> Option<BTreeSet<SocketAddr>> {
        self.ensure_watching();
        let guard = self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        guard
            .as_ref()
            .map(|m| m.values().flatten().copied().collect())
    }

    /// Replaces what the watch found (and stops it): for tests and fixed setups.
    /// `None` reads as "not listed yet".
    pub fn set_addresses(&self, addresses: Option<Vec<SocketAddr>>) {
        *self.watch.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(CancellationToken::new().drop_guard());
        *self
            .endpoints
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            addresses.map(|a| BTreeMap::from([("fixed".to_string(), a)]));
    }

    fn ensure_watching(&self) {
        let mut watch = self.watch.lock().unwrap_or_else(PoisonError::into_inner);
        if watch.is_some() {
            return;
        }
        let stop = CancellationToken::new();
        *watch = Some(stop.clone().drop_guard());
        let api: Api<EndpointSlice> = Api::namespaced(self.client.clone(), &self.namespace);
        let config = watcher::Config::default()
            .labels(&format!("kubernetes.io/service-name={}", self.service));
        let endpoints = self.endpoints.clone();
        let service = self.service();
        tokio::spawn(async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            let mut relist: Option<SliceAddresses> = None;
            loop {
                let event = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = events.try_next() => e,
                };
                let set = |name: String, addrs: Option<Vec<SocketAddr>>| {
                    let mut guard = endpoints.lock().unwrap_or_else(PoisonError::into_inner);
                    let map = guard.get_or_insert_with(BTreeMap::new);
                    match addrs {
                        Some(a) => map.insert(name, a),
                        None => map.remove(&name),
                    };
                };
                match event {
                    Ok(Some(watcher::Event::Init)) => relist = Some(BTreeMap::new()),
                    Ok(Some(watcher::Event::InitApply(slice))) => {
                        if let Some(r) = relist.as_mut() {
                            r.insert(slice_name(&slice), admin_addresses(&slice));
                        }
                    }
                    Ok(Some(watcher::Event::InitDone)) => {
                        let fresh = relist.take().unwrap_or_default();
                        let count: usize = fresh.values().map(Vec::len).sum();
                        info!(%service, activators = count, "activator endpoints listed");
                        *endpoints.lock().unwrap_or_else(PoisonError::into_inner) = Some(fresh);
                    }
                    Ok(Some(watcher::Event::Apply(slice))) => {
                        set(slice_name(&slice), Some(admin_addresses(&slice)))
                    }
                    Ok(Some(watcher::Event::Delete(slice))) => set(slice_name(&slice), None),
                    Ok(None) => return,
                    Err(e) => warn!(%service, error = %e, "watching activator EndpointSlices"),
                }
            }
        });
    }
}

fn slice_name(slice: &EndpointSlice) -> String {
    slice.metadata.name.clone().unwrap_or_default()
}

/// The `admin` address of every ready endpoint of a slice.
pub fn admin_addresses(slice: &EndpointSlice) -> Vec<SocketAddr> {
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(ADMIN_PORT_NAME))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    slice
        .endpoints
        .iter()
        // `ready` unset means ready (the API's documented reading of an unknown state).
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
        .filter_map(|e| e.addresses.first())
        .filter_map(|a| a.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, port))
        .collect()
}
