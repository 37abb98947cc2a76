//! The Kubernetes platform: Functions and their ready replicas from watches, replica
//! changes through the Deployment scale subresource (optimistic concurrency on its
//! resourceVersion), and the autoscaler's status fields through server-side apply.
//!
//! A Function's replicas are the EndpointSlices of its private Service `<name>-private`,
//! found by the label the operator puts on that Service (the EndpointSlice controller
//! copies a Service's labels onto its slices).
//!
//! What to scale comes from the Function watch this platform serves ([`Workload::of`]):
//! a template Function's own Deployment `<name>`, or the Deployment or StatefulSet its
//! `scaleTargetRef` names, but only while its status says it holds that target (a
//! `selector` for the current generation, see `operator::target`). Until then (or when
//! another Function has the target) its scale is "not found" and nothing is changed.
//!
//! The candidates of a waking Function come from a watch of its pods (label
//! `zeroscale.dev/function=<name>`, or the selector of the target it holds, in its
//! namespace: the pods its private Service's slices list), opened only while it wakes:
//! ten thousand Functions at zero cost no pod watch at all, and no Pod object is kept,
//! only the few fields a [`Candidate`] needs.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v1::{Scale as KubeScale, ScaleSpec};
use k8s_openapi::api::core::v1::{Container, ObjectReference, Pod, PodSpec, Probe};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event, EventType, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{debug, warn};

use super::{
    AutoscalerStatus, Candidate, Endpoint, EndpointsEvent, FunctionEvent, Platform, PlatformError,
    ReadinessCheck, Scale, WakeOutcome,
};
use crate::api::{FUNCTION_LABEL, Function, FunctionKey, TargetKind};
use crate::operator::cache::{Packed, PackedStore};
use crate::operator::events::Events;

/// How many objects one request of a watch's list (at start, and at every relist) asks
/// for. The API server's answer is decoded whole, every object with all its fields,
/// before the caches trim it; with kube's default of 500 Deployments a page, that
/// transient was tens of megabytes at 2,000 Functions, and the allocator kept most of
/// the peak as resident memory after the list was gone: 22 KB per Function resident
/// against 15-18 KB with pages of 100 (issue 16, BENCHMARKS.md). More pages cost more
/// requests only while listing: 100 per kind at 10,000 objects.
pub const LIST_PAGE_SIZE: u32 = 100;

/// A watch whose lists come in pages of [`LIST_PAGE_SIZE`].
pub fn paged_watch() -> watcher::Config {
    watcher::Config::default().page_size(LIST_PAGE_SIZE)
}

/// The label (with value `private`) on a Function's private Service and so its slices.
pub const PRIVATE_SERVICE_SELECTOR: &str = "zeroscale.dev/service=private";
/// The field manager of the autoscaler's status fields.
pub const AUTOSCALER_FIELD_MANAGER: &str = "zeroscale-autoscaler";
/// The field manager of wakes (activator) and of autoscaler scale changes; recorded as
/// the owner of the Deployment's `spec.replicas`, which tells the reconciler to keep out.
pub const WAKE_FIELD_MANAGER: &str = "zeroscale-activator";
/// The port name of the private Service (and so of its slices).
const PORT_NAME: &str = "http";

/// The workload (Deployment or StatefulSet) `kind` in `namespace`, untyped: both have a
/// scale subresource, and the fields zeroscale reads have the same paths in both.
pub fn workload_api(
    client: &kube::Client,
    namespace: &str,
    kind: TargetKind,
) -> Api<kube::api::DynamicObject> {
    let resource = match kind {
        TargetKind::Deployment => kube::api::ApiResource::erase::<Deployment>(&()),
        TargetKind::StatefulSet => kube::api::ApiResource::erase::<StatefulSet>(&()),
    };
    Api::namespaced_with(client.clone(), namespace, &resource)
}

/// Where a Function's replicas are, as its object says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Workload {
    /// Its own Deployment `<name>`, pods labelled `zeroscale.dev/function=<name>`.
    Own,
    /// The target it holds, and the selector of the target's pods.
    Target {
        kind: TargetKind,
        name: String,
        selector: String,
    },
    /// A target it does not hold (yet, or any more), or is giving back: never scaled.
    Unheld,
}

impl Workload {
    pub fn of(f: &Function) -> Self {
        let Some(target) = &f.spec.scale_target_ref else {
            return Workload::Own;
        };
        let Some(kind) = TargetKind::parse(&target.kind).filter(|_| f.spec.template.is_none())
        else {
            return Workload::Unheld;
        };
        let status = f.status.as_ref();
        let current = status.and_then(|s| s.observed_generation) == f.metadata.generation;
        match status.and_then(|s| s.selector.clone()) {
            Some(selector)
                if current && !selector.is_empty() && f.metadata.deletion_timestamp.is_none() =>
            {
                Workload::Target {
                    kind,
                    name: target.name.clone(),
                    selector,
                }
            }
            _ => Workload::Unheld,
        }
    }
}

/// The Functions' workloads other than [`Workload::Own`], from the Function watch.
type Workloads = Arc<std::sync::RwLock<HashMap<FunctionKey, Workload>>>;

fn note_workloads(workloads: &Workloads, event: &FunctionEvent) {
    let mut map = workloads.write().unwrap_or_else(|p| p.into_inner());
    let mut put = |f: &Function| match Workload::of(f) {
        Workload::Own => {
            map.remove(&f.key());
        }
        other => {
            map.insert(f.key(), other);
        }
    };
    match event {
        FunctionEvent::Applied(f) => put(f),
        FunctionEvent::Deleted(key) => {
            map.remove(key);
        }
        FunctionEvent::Reset(all) => {
            let mut fresh = HashMap::new();
            for f in all {
                let w = Workload::of(f);
                if w != Workload::Own {
                    fresh.insert(f.key(), w);
                }
            }
            *map = fresh;
        }
    }
}

/// (namespace, name) -> resourceVersion of every object of one kind in scope, from a
/// metadata watch; `None` until listed.
type Versions = Arc<std::sync::RwLock<Option<HashMap<(String, String), String>>>>;

/// Targets' scales without a GET per Function per tick: a metadata-only watch of each
/// target kind (started when the first target of that kind is read) says when an object
/// changed, and the last GET of a target stays good while its resourceVersion does. An
/// idle target costs no request at all; memory is a name and a version per object of
/// that kind in the watched namespaces.
#[derive(Default)]
struct TargetScales {
    versions: [std::sync::OnceLock<Versions>; 2],
    last: std::sync::Mutex<HashMap<(TargetKind, String, String), Scale>>,
}

/// Keeps `versions` current from a metadata-only watch of `api` (on its own task).
fn follow_versions<K>(api: Api<K>, versions: Versions, kind: TargetKind)
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K: Send + Sync + 'static,
{
    let mut relist: Option<HashMap<(String, String), String>> = None;
    let id = |m: &K| (m.namespace().unwrap_or_default(), m.name_any());
    let rv = |m: &K| m.resource_version().unwrap_or_default();
    let events = watcher(api, paged_watch())
        .default_backoff()
        .for_each(move |event| {
            let mut map = versions.write().unwrap_or_else(|p| p.into_inner());
            match event {
                Ok(watcher::Event::Init) => relist = Some(HashMap::new()),
                Ok(watcher::Event::InitApply(m)) => {
                    relist
                        .get_or_insert_with(HashMap::new)
                        .insert(id(&m), rv(&m));
                }
                Ok(watcher::Event::InitDone) => *map = Some(relist.take().unwrap_or_default()),
                Ok(watcher::Event::Apply(m)) => {
                    if let Some(map) = map.as_mut() {
                        map.insert(id(&m), rv(&m));
                    }
                }
                Ok(watcher::Event::Delete(m)) => {
                    if let Some(map) = map.as_mut() {
                        map.remove(&id(&m));
                    }
                }
                Err(e) => warn!(error = %e, %kind, "watching targets (retrying)"),
            }
            std::future::ready(())
        });
    tokio::spawn(events);
}

/// Functions, endpoints and scale through the Kubernetes API.
#[derive(Clone)]
pub struct KubePlatform {
    client: kube::Client,
    namespace: Option<String>,
    /// Scale Events, with their series bounded in memory (kube's `Recorder` keeps every
    /// Event it sent: see `operator::events`).
    recorder: Arc<Events>,
    /// Functions' Deployments from one watch, when enabled: the autoscaler reads every
    /// Function's scale each tick, and a GET per Function per second would load the API
    /// server with the Function count.
    deployment_cache: Option<Arc<std::sync::OnceLock<PackedStore<Deployment>>>>,
    /// Scales of targets, when the Deployment cache is enabled.
    target_scales: Option<Arc<TargetScales>>,
    workloads: Workloads,
}

impl KubePlatform {
    /// Watches Functions in `namespace` (all namespaces when `None`).
    pub fn new(client: kube::Client, namespace: Option<String>) -> Self {
        // The instance is the host name, which is the pod name in a cluster.
        let recorder = Arc::new(Events::new(
            client.clone(),
            Reporter::from("zeroscale-autoscaler"),
        ));
        Self {
            client,
            namespace,
            recorder,
            deployment_cache: None,
            target_scales: None,
            workloads: Workloads::default(),
        }
    }

    /// What to scale for a Function: its own Deployment unless the Function watch said
    /// it names a target (a Function this platform has not seen yet is a template one).
    pub fn workload(&self, key: &FunctionKey) -> Workload {
        self.workloads
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
            .unwrap_or(Workload::Own)
    }

    /// The kind and name whose scale subresource holds a Function's replicas.
    fn scaled(&self, key: &FunctionKey) -> Result<(TargetKind, String), PlatformError> {
        match self.workload(key) {
            Workload::Own => Ok((TargetKind::Deployment, key.name.clone())),
            Workload::Target { kind, name, .. } => Ok((kind, name)),
            Workload::Unheld => Err(PlatformError::NotFound(key.clone())),
        }
    }

    fn versions(&self, kind: TargetKind) -> Option<Versions> {
        let cache = self.target_scales.as_ref()?;
        let slot = match kind {
            TargetKind::Deployment => 0,
            TargetKind::StatefulSet => 1,
        };
        Some(
            cache.versions[slot]
                .get_or_init(|| {
                    let versions: Versions = Arc::default();
                    match kind {
                        TargetKind::Deployment => follow_versions(
                            self.all::<kube::core::PartialObjectMeta<Deployment>>(),
                            versions.clone(),
                            kind,
                        ),
                        TargetKind::StatefulSet => follow_versions(
                            self.all::<kube::core::PartialObjectMeta<StatefulSet>>(),
                            versions.clone(),
                            kind,
                        ),
                    }
                    versions
                })
                .clone(),
        )
    }

    /// A target's scale: the last read while its resourceVersion is unchanged, else a GET.
    async fn target_scale(
        &self,
        key: &FunctionKey,
        kind: TargetKind,
        name: &str,
    ) -> Result<Scale, PlatformError> {
        let id = (kind, key.namespace.clone(), name.to_string());
        let known = self.versions(kind).and_then(|v| {
            let map = v.read().unwrap_or_else(|p| p.into_inner());
            map.as_ref()
                .map(|m| m.get(&(key.namespace.clone(), name.to_string())).cloned())
        });
        let cache = self.target_scales.as_ref();
        match (&known, cache) {
            // Listed and absent: it does not exist.
            (Some(None), _) => return Err(PlatformError::NotFound(key.clone())),
            (Some(Some(version)), Some(cache)) => {
                let last = cache.last.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = last
                    .get(&id)
                    .filter(|s| s.version.as_ref() == Some(version))
                {
                    return Ok(s.clone());
                }
            }
            _ => {}
        }
        let object = workload_api(&self.client, &key.namespace, kind)
            .get(name)
            .await
            .map_err(|e| map_err(key, e))?;
        let count = |v: &serde_json::Value| {
            u32::try_from(v.as_i64().unwrap_or(0).max(0)).unwrap_or(u32::MAX)
        };
        let scale = Scale {
            desired: object.data["spec"]["replicas"]
                .as_i64()
                .map_or(1, |_| count(&object.data["spec"]["replicas"])),
            ready: count(&object.data["status"]["readyReplicas"]),
            version: object.metadata.resource_version.clone(),
        };
        if let Some(cache) = cache {
            cache
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id, scale.clone());
        }
        Ok(scale)
    }

    /// Answers [`Platform::scale`] from a watch of the Functions' Deployments (started on
    /// first use) instead of a GET per call; a miss still falls back to a GET. A stale
    /// entry costs nothing worse than a Conflict on the next `set_scale`, which carries
    /// the resourceVersion it read.
    pub fn with_deployment_cache(mut self) -> Self {
        self.deployment_cache = Some(Arc::new(std::sync::OnceLock::new()));
        self.target_scales = Some(Arc::default());
        self
    }

    /// Like [`Self::with_deployment_cache`], but reads the Deployments from a cache that
    /// is filled elsewhere: the operator's reconciler watches the same Deployments, and
    /// one cache of them is half the memory of two.
    pub fn with_deployment_store(mut self, store: PackedStore<Deployment>) -> Self {
        let cell = std::sync::OnceLock::new();
        let _ = cell.set(store);
        self.deployment_cache = Some(Arc::new(cell));
        self.target_scales = Some(Arc::default());
        self
    }

    /// The cached Deployment of a Function: `Some(None)` when the cache has been listed
    /// and holds none (it does not exist: no GET needed), `None` without a cache or
    /// before its first list.
    fn cached_deployment(&self, key: &FunctionKey) -> Option<Option<Arc<Packed<Deployment>>>> {
        let cache = self.deployment_cache.as_ref()?;
        let store = cache.get_or_init(|| {
            let (reader, writer) = crate::operator::cache::packed_store();
            let events = crate::operator::cache::reflect(
                writer,
                watcher(
                    self.all::<Deployment>(),
                    paged_watch().labels(FUNCTION_LABEL),
                )
                .default_backoff(),
            );
            tokio::spawn(events.for_each(|_| async {}));
            reader
        });
        let found = store.get(&key.namespace, &key.name);
        if found.is_some() {
            return Some(found);
        }
        store.is_ready().then_some(None)
    }

    fn all<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match &self.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn deployments(&self, key: &FunctionKey) -> Api<Deployment> {
        Api::namespaced(self.client.clone(), &key.namespace)
    }
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn map_err(key: &FunctionKey, e: kube::Error) -> PlatformError {
    if not_found(&e) {
        PlatformError::NotFound(key.clone())
    } else if conflict(&e) {
        PlatformError::Conflict(key.clone())
    } else {
        PlatformError::Kube(e)
    }
}

fn post_params(manager: &str) -> PostParams {
    PostParams {
        field_manager: Some(manager.into()),
        ..PostParams::default()
    }
}

fn scale_object(namespace: &str, name: &str, replicas: u32, version: Option<&str>) -> KubeScale {
    KubeScale {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            resource_version: version.map(str::to_string),
            ..ObjectMeta::default()
        },
        spec: Some(ScaleSpec {
            replicas: Some(i32::try_from(replicas).unwrap_or(i32::MAX)),
        }),
        status: None,
    }
}

/// A Function as this platform's readers (the activator's routing table, the autoscaler
/// and [`Workload::of`]) read it: its spec, name, namespace, creation time, generation
/// and deletion mark, and of its status the generation, the selector and the `Active`
/// condition (a startup failure the activator answers with). The rest (labels,
/// annotations, the `Ready` condition, the autoscaler's own status) is dropped as it
/// arrives: a relist holds every Function twice until it is done (in the one 10,000
/// Function run where this watch expired and relisted, the operator held 10.6 KB per
/// Function against 7.5-7.9 KB in the others; issue 16, BENCHMARKS.md).
pub fn trim_for_routing_and_scaling(f: &mut Function) {
    let meta = std::mem::take(&mut f.metadata);
    f.metadata = kube::api::ObjectMeta {
        name: meta.name,
        namespace: meta.namespace,
        creation_timestamp: meta.creation_timestamp,
        generation: meta.generation,
        deletion_timestamp: meta.deletion_timestamp,
        ..Default::default()
    };
    if let Some(status) = f.status.take() {
        let mut conditions = status.conditions;
        conditions.retain(|c| c.type_ == crate::api::CONDITION_ACTIVE);
        f.status = Some(crate::api::FunctionStatus {
            observed_generation: status.observed_generation,
            selector: status.selector,
            conditions,
            ..Default::default()
        });
    }
}

/// Turns the raw watcher events of Functions into [`FunctionEvent`]s: a (re-)list is
/// buffered and emitted whole as a `Reset`.
#[derive(Default)]
struct FunctionRelist {
    buffer: Option<Vec<Arc<Function>>>,
}

impl FunctionRelist {
    fn handle(&mut self, event: watcher::Event<Function>) -> Option<FunctionEvent> {
        match event {
            watcher::Event::Init => {
                self.buffer = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(f) => {
                self.buffer.get_or_insert_with(Vec::new).push(Arc::new(f));
                None
            }
            watcher::Event::InitDone => {
                Some(FunctionEvent::Reset(self.buffer.take().unwrap_or_default()))
            }
            watcher::Event::Apply(f) => Some(FunctionEvent::Applied(Arc::new(f))),
            watcher::Event::Delete(f) => Some(FunctionEvent::Deleted(f.key())),
        }
    }
}

/// The ready endpoints of one slice: addresses whose `ready` is not false and which are
/// not terminating, on the slice's `http` port.
pub fn slice_endpoints(slice: &EndpointSlice) -> Vec<Endpoint> {
    let Some(port) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(PORT_NAME))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
    else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for e in &slice.endpoints {
        let c = e.conditions.as_ref();
        if c.and_then(|c| c.ready) == Some(false) || c.and_then(|c| c.terminating) == Some(true) {
            continue;
        }
        for address in &e.addresses {
            let Ok(ip) = address.parse::<IpAddr>() else {
                continue;
            };
            let name = e
                .target_ref
                .as_ref()
                .and_then(|t| t.name.clone())
                .unwrap_or_else(|| ip.to_string());
            out.push(Endpoint {
                addr: SocketAddr::new(ip, port),
                name,
            });
        }
    }
    out
}

/// (namespace, slice name) of an EndpointSlice.
type SliceId = (String, String);
/// The Function a slice belongs to and its ready endpoints in that slice.
type SliceEntry = (FunctionKey, Vec<Endpoint>);

/// Keeps every private slice and aggregates them per Function; a (re-)list replaces all.
#[derive(Default)]
struct EndpointsState {
    slices: HashMap<SliceId, SliceEntry>,
    relist: Option<HashMap<SliceId, SliceEntry>>,
}

impl EndpointsState {
    fn entry(slice: &EndpointSlice) -> Option<(SliceId, SliceEntry)> {
        let ns = slice.namespace()?;
        let function = slice.labels().get(FUNCTION_LABEL)?.clone();
        Some((
            (ns.clone(), slice.name_any()),
            (FunctionKey::new(ns, function), slice_endpoints(slice)),
        ))
    }

    fn of(&self, key: &FunctionKey) -> Vec<Endpoint> {
        let mut all: Vec<Endpoint> = self
            .slices
            .values()
            .filter(|(k, _)| k == key)
            .flat_map(|(_, e)| e.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }

    fn handle(&mut self, event: watcher::Event<EndpointSlice>) -> Option<EndpointsEvent> {
        match event {
            watcher::Event::Init => {
                self.relist = Some(HashMap::new());
                None
            }
            watcher::Event::InitApply(s) => {
                if let Some((k, v)) = Self::entry(&s) {
                    self.relist.get_or_insert_with(HashMap::new).insert(k, v);
                }
                None
            }
            watcher::Event::InitDone => {
                self.slices = self.relist.take().unwrap_or_default();
                let keys: std::collections::BTreeSet<FunctionKey> =
                    self.slices.values().map(|(k, _)| k.clone()).collect();
                Some(EndpointsEvent::Reset(
                    keys.into_iter()
                        .map(|k| {
                            let e = self.of(&k);
                            (k, e)
                        })
                        .collect(),
                ))
            }
            watcher::Event::Apply(s) => {
                let (k, v) = Self::entry(&s)?;
                let key = v.0.clone();
                let before = self.of(&key);
                self.slices.insert(k, v);
                let after = self.of(&key);
                (before != after).then_some(EndpointsEvent::Updated(key, after))
            }
            watcher::Event::Delete(s) => {
                let ns = s.namespace()?;
                let (key, _) = self.slices.remove(&(ns, s.name_any()))?;
                Some(EndpointsEvent::Updated(key.clone(), self.of(&key)))
            }
        }
    }
}

/// Time the platform gets, beyond its probes' own delays and periods, to list a replica
/// ready once they pass: the kubelet's status write, the EndpointSlice controller and the
/// watch that brings the slice.
const PROPAGATION_MARGIN: Duration = Duration::from_secs(30);

/// What the kubelet's readiness of a pod needs, as checks from outside: every startup and
/// readiness probe of its containers (`httpGet` over HTTP, `tcpSocket`), and a TCP connect
/// to the serving port when the serving container has no readiness probe (the kubelet
/// would call it ready as soon as it runs; a connect is stricter). `None` when some part
/// of it cannot be checked from outside: `exec` and `grpc` probes, HTTPS, a probe of
/// another host, readiness gates, sidecar init containers, or another container that is
/// not running yet.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodChecks {
    checks: Option<Vec<ReadinessCheck>>,
    timeout: Duration,
    success_threshold: u32,
    agree_within: Duration,
}

fn probe_secs(v: Option<i32>, default: u64) -> Duration {
    Duration::from_secs(v.and_then(|v| u64::try_from(v).ok()).unwrap_or(default))
}

/// A port of a probe: a number, or the name of one of the container's ports.
fn probe_port(port: &IntOrString, container: &Container) -> Option<u16> {
    match port {
        IntOrString::Int(n) => u16::try_from(*n).ok().filter(|p| *p > 0),
        IntOrString::String(s) => s.parse::<u16>().ok().or_else(|| {
            container
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(s.as_str()))
                .and_then(|p| u16::try_from(p.container_port).ok())
        }),
    }
}

/// One probe as a check from outside; `None` when it cannot be one.
fn probe_check(probe: &Probe, container: &Container) -> Option<ReadinessCheck> {
    if let Some(http) = &probe.http_get {
        let other_host = http.host.as_deref().is_some_and(|h| !h.is_empty());
        if other_host || http.scheme.as_deref().is_some_and(|s| s != "HTTP") {
            return None;
        }
        let mut path = http.path.clone().unwrap_or_default();
        if !path.starts_with('/') {
            path.insert(0, '/');
        }
        return Some(ReadinessCheck::Http {
            port: probe_port(&http.port, container)?,
            path,
            headers: http
                .http_headers
                .iter()
                .flatten()
                .map(|h| (h.name.clone(), h.value.clone()))
                .collect(),
        });
    }
    if let Some(tcp) = &probe.tcp_socket {
        if tcp.host.as_deref().is_some_and(|h| !h.is_empty()) {
            return None;
        }
        return Some(ReadinessCheck::Tcp {
            port: probe_port(&tcp.port, container)?,
        });
    }
    // exec and grpc (and a probe without a handler, which the API server refuses).
    None
}

fn pod_checks(pod: &Pod, port: u16) -> PodChecks {
    let mut out = PodChecks {
        checks: None,
        timeout: Duration::from_secs(1),
        success_threshold: 1,
        agree_within: PROPAGATION_MARGIN,
    };
    let Some(spec) = pod.spec.as_ref() else {
        return out;
    };
    let sidecars = spec
        .init_containers
        .iter()
        .flatten()
        .any(|c| c.restart_policy.as_deref() == Some("Always"));
    if sidecars || spec.readiness_gates.as_ref().is_some_and(|g| !g.is_empty()) {
        return out;
    }
    out.checks = containers_checks(spec, pod, port, &mut out);
    out
}

fn containers_checks(
    spec: &PodSpec,
    pod: &Pod,
    port: u16,
    out: &mut PodChecks,
) -> Option<Vec<ReadinessCheck>> {
    let serving = spec
        .containers
        .iter()
        .position(|c| {
            c.ports
                .iter()
                .flatten()
                .any(|p| p.container_port == i32::from(port))
        })
        .unwrap_or(0);
    let running = |name: &str| {
        pod.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .into_iter()
            .flatten()
            .any(|s| s.name == name && s.state.as_ref().is_some_and(|st| st.running.is_some()))
    };
    let mut checks = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        for probe in [c.startup_probe.as_ref(), c.readiness_probe.as_ref()]
            .into_iter()
            .flatten()
        {
            checks.push(probe_check(probe, c)?);
            let threshold = probe
                .success_threshold
                .and_then(|t| u32::try_from(t).ok())
                .filter(|t| *t > 0)
                .unwrap_or(1);
            out.success_threshold = out.success_threshold.max(threshold);
            out.timeout = out
                .timeout
                .max(probe_secs(probe.timeout_seconds, 1).max(Duration::from_secs(1)));
            out.agree_within += probe_secs(probe.initial_delay_seconds, 0)
                + probe_secs(probe.period_seconds, 10).max(Duration::from_secs(1)) * threshold;
        }
        if c.readiness_probe.is_none() {
            if i == serving {
                checks.push(ReadinessCheck::Tcp { port });
            } else if !running(&c.name) {
                // Ready to the kubelet once it runs; nothing to check from outside.
                return None;
            }
        }
    }
    Some(checks)
}

/// A pod as a [`Candidate`] of its Function serving on `port`; `None` until it has an IP.
pub fn pod_candidate(pod: &Pod, port: u16) -> Option<Candidate> {
    let status = pod.status.as_ref()?;
    let ip: IpAddr = status.pod_ip.as_deref()?.parse().ok()?;
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let checks = pod_checks(pod, port);
    Some(Candidate {
        name: pod.metadata.name.clone()?,
        addr: SocketAddr::new(ip, port),
        checks: checks.checks,
        timeout: checks.timeout,
        success_threshold: checks.success_threshold,
        agree_within: checks.agree_within,
        terminating: pod.metadata.deletion_timestamp.is_some() || finished,
    })
}

/// The candidates of one Function from the raw watcher events of its pods: a (re-)list
/// replaces the set; only a change of the set is passed on.
struct CandidateSet {
    port: u16,
    pods: BTreeMap<String, Candidate>,
    relist: Option<BTreeMap<String, Candidate>>,
    sent: Option<Vec<Candidate>>,
}

impl CandidateSet {
    fn new(port: u16) -> Self {
        Self {
            port,
            pods: BTreeMap::new(),
            relist: None,
            sent: None,
        }
    }

    fn handle(&mut self, event: watcher::Event<Pod>) -> Option<Vec<Candidate>> {
        match event {
            watcher::Event::Init => {
                self.relist = Some(BTreeMap::new());
                return None;
            }
            watcher::Event::InitApply(p) => {
                if let Some(c) = pod_candidate(&p, self.port) {
                    self.relist
                        .get_or_insert_with(BTreeMap::new)
                        .insert(p.name_any(), c);
                }
                return None;
            }
            watcher::Event::InitDone => self.pods = self.relist.take().unwrap_or_default(),
            watcher::Event::Apply(p) => match pod_candidate(&p, self.port) {
                Some(c) => {
                    self.pods.insert(p.name_any(), c);
                }
                None => {
                    self.pods.remove(&p.name_any());
                }
            },
            watcher::Event::Delete(p) => {
                self.pods.remove(&p.name_any());
            }
        }
        let now: Vec<Candidate> = self.pods.values().cloned().collect();
        if self.sent.as_ref() == Some(&now) {
            return None;
        }
        self.sent = Some(now.clone());
        Some(now)
    }
}

#[async_trait]
impl Platform for KubePlatform {
    fn functions(&self) -> BoxStream<'static, FunctionEvent> {
        let mut state = FunctionRelist::default();
        let workloads = self.workloads.clone();
        watcher(self.all::<Function>(), paged_watch())
            .default_backoff()
            .modify(trim_for_routing_and_scaling)
            .filter_map(move |event| {
                let out = match event {
                    Ok(e) => state.handle(e),
                    Err(e) => {
                        warn!(error = %e, "watching Functions (retrying)");
                        None
                    }
                };
                if let Some(event) = &out {
                    note_workloads(&workloads, event);
                }
                std::future::ready(out)
            })
            .boxed()
    }

    fn endpoints(&self) -> BoxStream<'static, EndpointsEvent> {
        let mut state = EndpointsState::default();
        let config = paged_watch().labels(PRIVATE_SERVICE_SELECTOR);
        watcher(self.all::<EndpointSlice>(), config)
            .default_backoff()
            .filter_map(move |event| {
                let out = match event {
                    Ok(e) => state.handle(e),
                    Err(e) => {
                        warn!(error = %e, "watching EndpointSlices (retrying)");
                        None
                    }
                };
                std::future::ready(out)
            })
            .boxed()
    }

    fn candidates(
        &self,
        key: &FunctionKey,
        port: u16,
    ) -> Option<BoxStream<'static, Vec<Candidate>>> {
        // The same pods as its private Service's slices and `stopping_replicas`.
        let selector = match self.workload(key) {
            Workload::Own => format!("{FUNCTION_LABEL}={}", key.name),
            Workload::Target { selector, .. } => selector,
            Workload::Unheld => return None,
        };
        let api: Api<Pod> = Api::namespaced(self.client.clone(), &key.namespace);
        let config = paged_watch().labels(&selector);
        let mut state = CandidateSet::new(port);
        let function = key.clone();
        Some(
            watcher(api, config)
                .default_backoff()
                .filter_map(move |event| {
                    let out = match event {
                        Ok(e) => state.handle(e),
                        Err(e) => {
                            warn!(%function, error = %e, "watching a waking Function's pods (retrying)");
                            None
                        }
                    };
                    std::future::ready(out)
                })
                .boxed(),
        )
    }

    async fn wake(&self, key: &FunctionKey, replicas: u32) -> Result<WakeOutcome, PlatformError> {
        let (kind, name) = self.scaled(key)?;
        let api = workload_api(&self.client, &key.namespace, kind);
        // A conflict means someone else changed the scale between our read and write:
        // read again; it is almost always a concurrent wake.
        for _ in 0..3 {
            let current = api.get_scale(&name).await.map_err(|e| map_err(key, e))?;
            if current.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0) > 0 {
                return Ok(WakeOutcome::AlreadyAwake);
            }
            let version = current.metadata.resource_version.as_deref();
            match api
                .replace_scale(
                    &name,
                    &post_params(WAKE_FIELD_MANAGER),
                    &scale_object(&key.namespace, &name, replicas, version),
                )
                .await
            {
                Ok(_) => return Ok(WakeOutcome::Woken),
                Err(e) if conflict(&e) => {
                    debug!(function = %key, "wake raced another writer, re-reading");
                    continue;
                }
                Err(e) => return Err(map_err(key, e)),
            }
        }
        Err(PlatformError::Conflict(key.clone()))
    }

    async fn scale(&self, key: &FunctionKey) -> Result<Scale, PlatformError> {
        let (kind, name) = self.scaled(key)?;
        if kind != TargetKind::Deployment || name != key.name {
            return self.target_scale(key, kind, &name).await;
        }
        let d = match self.cached_deployment(key) {
            Some(Some(d)) => d,
            Some(None) => return Err(PlatformError::NotFound(key.clone())),
            None => Arc::new(Packed::pack(
                self.deployments(key)
                    .get(&key.name)
                    .await
                    .map_err(|e| map_err(key, e))?,
            )),
        };
        let count = |v: i32| u32::try_from(v).unwrap_or(0);
        let replicas = d.replicas();
        Ok(Scale {
            desired: count(replicas.desired),
            ready: count(replicas.ready),
            version: d.resource_version().map(str::to_owned),
        })
    }

    async fn set_scale(
        &self,
        key: &FunctionKey,
        replicas: u32,
        expected_version: Option<&str>,
        reason: &str,
    ) -> Result<(), PlatformError> {
        let (kind, name) = self.scaled(key)?;
        let api = workload_api(&self.client, &key.namespace, kind);
        let result = match expected_version {
            Some(version) => api
                .replace_scale(
                    &name,
                    &post_params(AUTOSCALER_FIELD_MANAGER),
                    &scale_object(&key.namespace, &name, replicas, Some(version)),
                )
                .await
                .map(|_| ()),
            None => api
                .patch_scale(
                    &name,
                    &PatchParams {
                        field_manager: Some(AUTOSCALER_FIELD_MANAGER.into()),
                        ..PatchParams::default()
                    },
                    &Patch::Merge(serde_json::json!({"spec": {"replicas": replicas}})),
                )
                .await
                .map(|_| ()),
        };
        if let (Err(e), Some(cache)) = (&result, &self.target_scales)
            && conflict(e)
        {
            // What was read is stale: read it again next time.
            cache
                .last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(kind, key.namespace.clone(), name.clone()));
        }
        result.map_err(|e| map_err(key, e))?;
        let event = Event {
            type_: EventType::Normal,
            reason: "Scaled".into(),
            note: Some(
                format!("scaled to {replicas}: {reason}")
                    .chars()
                    .take(1000)
                    .collect(),
            ),
            action: "Scale".into(),
            secondary: None,
        };
        let reference = ObjectReference {
            api_version: Some(Function::api_version(&()).into_owned()),
            kind: Some(Function::kind(&()).into_owned()),
            name: Some(key.name.clone()),
            namespace: Some(key.namespace.clone()),
            ..ObjectReference::default()
        };
        if let Err(e) = self.recorder.publish(&event, &reference).await {
            debug!(function = %key, error = %e, "recording the scale event failed");
        }
        Ok(())
    }

    async fn stopping_replicas(&self, key: &FunctionKey) -> Result<Vec<IpAddr>, PlatformError> {
        let selector = match self.workload(key) {
            Workload::Own => format!("{FUNCTION_LABEL}={}", key.name),
            Workload::Target { selector, .. } => selector,
            Workload::Unheld => return Ok(Vec::new()),
        };
        let pods: Api<k8s_openapi::api::core::v1::Pod> =
            Api::namespaced(self.client.clone(), &key.namespace);
        let list = pods
            .list(&kube::api::ListParams::default().labels(&selector))
            .await
            .map_err(|e| map_err(key, e))?;
        Ok(list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_some())
            .filter_map(|p| p.status.as_ref())
            .flat_map(|s| {
                let ips: Vec<&str> = match &s.pod_ips {
                    Some(ips) if !ips.is_empty() => ips.iter().map(|i| i.ip.as_str()).collect(),
                    _ => s.pod_ip.as_deref().into_iter().collect(),
                };
                ips.into_iter()
                    .filter_map(|ip| ip.parse::<IpAddr>().ok())
                    .collect::<Vec<_>>()
            })
            .collect())
    }

    async fn publish_autoscaler_status(
        &self,
        key: &FunctionKey,
        status: &AutoscalerStatus,
    ) -> Result<(), PlatformError> {
        let api: Api<Function> = Api::namespaced(self.client.clone(), &key.namespace);
        let mut fields = BTreeMap::new();
        fields.insert(
            "desiredReplicas",
            serde_json::json!(i32::try_from(status.desired_replicas).unwrap_or(i32::MAX)),
        );
        if let Some(t) = status.last_request_time {
            fields.insert("lastRequestTime", serde_json::json!(Time(t)));
        }
        let body = serde_json::json!({
            "apiVersion": Function::api_version(&()),
            "kind": Function::kind(&()),
            "metadata": {"name": key.name},
            "status": fields,
        });
        api.patch_status(
            &key.name,
            &PatchParams::apply(AUTOSCALER_FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map_err(|e| map_err(key, e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::discovery::v1::{
        Endpoint as SliceEndpoint, EndpointConditions, EndpointPort,
    };

    fn slice(
        name: &str,
        function: &str,
        endpoints: Vec<(&str, Option<bool>, Option<bool>)>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("default".into()),
                labels: Some(BTreeMap::from([
                    (FUNCTION_LABEL.to_string(), function.to_string()),
                    ("zeroscale.dev/service".to_string(), "private".to_string()),
                ])),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints
                .into_iter()
                .map(|(ip, ready, terminating)| SliceEndpoint {
                    addresses: vec![ip.into()],
                    conditions: Some(EndpointConditions {
                        ready,
                        serving: None,
                        terminating,
                    }),
                    target_ref: Some(ObjectReference {
                        name: Some(format!("pod-{ip}")),
                        ..ObjectReference::default()
                    }),
                    ..SliceEndpoint::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..EndpointPort::default()
            }]),
        }
    }

    #[test]
    fn only_ready_and_not_terminating_endpoints_count() {
        let s = slice(
            "hello-private-abc",
            "hello",
            vec![
                ("10.0.0.1", Some(true), None),
                ("10.0.0.2", None, None),
                ("10.0.0.3", Some(false), None),
                ("10.0.0.4", Some(true), Some(true)),
            ],
        );
        let got: Vec<String> = slice_endpoints(&s)
            .iter()
            .map(|e| e.addr.to_string())
            .collect();
        assert_eq!(got, vec!["10.0.0.1:8080", "10.0.0.2:8080"]);
        assert_eq!(slice_endpoints(&s)[0].name, "pod-10.0.0.1");
    }

    #[test]
    fn slices_aggregate_per_function_and_relist_is_the_truth() {
        let mut state = EndpointsState::default();
        let key = FunctionKey::new("default", "hello");
        assert!(state.handle(watcher::Event::Init).is_none());
        state.handle(watcher::Event::InitApply(slice(
            "a",
            "hello",
            vec![("10.0.0.1", None, None)],
        )));
        match state.handle(watcher::Event::InitDone) {
            Some(EndpointsEvent::Reset(all)) => {
                assert_eq!(all.len(), 1);
                assert_eq!(all[0].0, key);
                assert_eq!(all[0].1.len(), 1);
            }
            other => panic!("expected a reset, got {other:?}"),
        }
        // A second slice of the same Function adds to the set.
        match state.handle(watcher::Event::Apply(slice(
            "b",
            "hello",
            vec![("10.0.0.2", None, None)],
        ))) {
            Some(EndpointsEvent::Updated(k, e)) => {
                assert_eq!(k, key);
                assert_eq!(e.len(), 2);
            }
            other => panic!("expected an update, got {other:?}"),
        }
        // Deleting one slice leaves the other's endpoints.
        match state.handle(watcher::Event::Delete(slice("a", "hello", vec![]))) {
            Some(EndpointsEvent::Updated(_, e)) => {
                assert_eq!(e.len(), 1);
                assert_eq!(e[0].addr.to_string(), "10.0.0.2:8080");
            }
            other => panic!("expected an update, got {other:?}"),
        }
        // A re-list without any slice resets to nothing.
        state.handle(watcher::Event::Init);
        match state.handle(watcher::Event::InitDone) {
            Some(EndpointsEvent::Reset(all)) => assert!(all.is_empty()),
            other => panic!("expected a reset, got {other:?}"),
        }
    }

    fn pod(name: &str, ip: Option<&str>, spec: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {FUNCTION_LABEL: "hello"}},
            "spec": spec,
            "status": {"podIP": ip},
        }))
        .unwrap()
    }

    fn app(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({"name": "app", "image": "python",
            "ports": [{"name": "http", "containerPort": 8080}]});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        serde_json::json!({"containers": [c]})
    }

    #[test]
    fn a_pod_becomes_a_candidate_once_it_has_an_ip() {
        assert!(pod_candidate(&pod("p", None, app(serde_json::json!({}))), 8080).is_none());
        let c = pod_candidate(
            &pod("p", Some("10.1.0.7"), app(serde_json::json!({}))),
            8080,
        )
        .unwrap();
        assert_eq!(c.name, "p");
        assert_eq!(c.addr.to_string(), "10.1.0.7:8080");
        // No readiness probe: a TCP connect to the port (stricter than the kubelet).
        assert_eq!(c.checks, Some(vec![ReadinessCheck::Tcp { port: 8080 }]));
        assert_eq!(c.agree_within, PROPAGATION_MARGIN);
        assert!(!c.terminating);
    }

    #[test]
    fn the_kubelets_http_and_tcp_probes_become_the_checks() {
        let spec = app(serde_json::json!({
            "startupProbe": {"tcpSocket": {"port": 9000}},
            "readinessProbe": {"httpGet": {"port": "http", "path": "healthz",
                "httpHeaders": [{"name": "X-Probe", "value": "1"}]},
                "periodSeconds": 2, "successThreshold": 2, "timeoutSeconds": 3},
        }));
        let c = pod_candidate(&pod("p", Some("10.1.0.7"), spec), 8080).unwrap();
        assert_eq!(
            c.checks,
            Some(vec![
                ReadinessCheck::Tcp { port: 9000 },
                ReadinessCheck::Http {
                    port: 8080,
                    path: "/healthz".into(),
                    headers: vec![("X-Probe".into(), "1".into())],
                },
            ])
        );
        assert_eq!(c.success_threshold, 2);
        assert_eq!(c.timeout, Duration::from_secs(3));
        // startup: 10 s period x 1; readiness: 2 s x 2; plus the propagation margin.
        assert_eq!(c.agree_within, PROPAGATION_MARGIN + Duration::from_secs(14));
    }

    #[test]
    fn what_cannot_be_checked_from_outside_waits_for_the_slice() {
        let unchecked = [
            app(serde_json::json!({"readinessProbe": {"exec": {"command": ["true"]}}})),
            app(serde_json::json!({"readinessProbe": {"grpc": {"port": 9000}}})),
            app(
                serde_json::json!({"readinessProbe": {"httpGet": {"port": 8080, "scheme": "HTTPS"}}}),
            ),
            app(
                serde_json::json!({"readinessProbe": {"httpGet": {"port": 8080, "host": "example.com"}}}),
            ),
            app(serde_json::json!({"readinessProbe": {"httpGet": {"port": "nope"}}})),
            app(serde_json::json!({"startupProbe": {"exec": {"command": ["true"]}}})),
            {
                let mut s = app(serde_json::json!({}));
                s["readinessGates"] = serde_json::json!([{"conditionType": "example.com/lb"}]);
                s
            },
            {
                let mut s = app(serde_json::json!({}));
                s["initContainers"] =
                    serde_json::json!([{"name": "proxy", "image": "p", "restartPolicy": "Always"}]);
                s
            },
        ];
        for spec in unchecked {
            let c = pod_candidate(&pod("p", Some("10.1.0.7"), spec.clone()), 8080).unwrap();
            assert_eq!(c.checks, None, "{spec}");
        }
    }

    #[test]
    fn a_sidecar_without_a_probe_must_be_running() {
        let mut spec = app(serde_json::json!({}));
        spec["containers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"name": "logs", "image": "l"}));
        let mut p = pod("p", Some("10.1.0.7"), spec);
        assert_eq!(pod_candidate(&p, 8080).unwrap().checks, None);
        p.status.as_mut().unwrap().container_statuses = Some(vec![
            serde_json::from_value(serde_json::json!({"name": "logs", "image": "l",
                "imageID": "", "ready": true, "restartCount": 0,
                "state": {"running": {}}}))
            .unwrap(),
        ]);
        assert_eq!(
            pod_candidate(&p, 8080).unwrap().checks,
            Some(vec![ReadinessCheck::Tcp { port: 8080 }])
        );
    }

    #[test]
    fn a_deleted_or_finished_pod_is_terminating() {
        let mut p = pod("p", Some("10.1.0.7"), app(serde_json::json!({})));
        p.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert!(pod_candidate(&p, 8080).unwrap().terminating);
        let mut p = pod("p", Some("10.1.0.7"), app(serde_json::json!({})));
        p.status.as_mut().unwrap().phase = Some("Failed".into());
        assert!(pod_candidate(&p, 8080).unwrap().terminating);
    }

    #[test]
    fn candidates_change_as_pods_do_and_a_relist_is_the_truth() {
        let mut set = CandidateSet::new(8080);
        let spec = app(serde_json::json!({}));
        assert!(set.handle(watcher::Event::Init).is_none());
        assert!(
            set.handle(watcher::Event::InitApply(pod("a", None, spec.clone())))
                .is_none()
        );
        assert_eq!(set.handle(watcher::Event::InitDone), Some(vec![]));
        // The IP arrives: a candidate; the same again: nothing new.
        let with_ip = pod("a", Some("10.1.0.7"), spec.clone());
        let got = set.handle(watcher::Event::Apply(with_ip.clone())).unwrap();
        assert_eq!(got.len(), 1);
        assert!(set.handle(watcher::Event::Apply(with_ip.clone())).is_none());
        // A re-list without it: gone.
        set.handle(watcher::Event::Init);
        assert_eq!(set.handle(watcher::Event::InitDone), Some(vec![]));
        set.handle(watcher::Event::Apply(with_ip.clone()));
        assert_eq!(set.handle(watcher::Event::Delete(with_ip)), Some(vec![]));
    }

    /// What the activator and the autoscaler read survives the trim; the rest is gone.
    #[test]
    fn the_platforms_functions_keep_what_routing_and_scaling_read() {
        let mut f: Function = serde_json::from_value(serde_json::json!({
            "apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
            "metadata": {
                "name": "api", "namespace": "ns", "generation": 3,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"team": "a"}, "annotations": {"note": "x".repeat(2000)},
                "uid": "u", "resourceVersion": "7", "finalizers": ["zeroscale.dev/target"],
            },
            "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": "legacy"},
                "hosts": ["api.example.com"],
            },
            "status": {
                "observedGeneration": 3, "selector": "app=legacy", "replicas": 2,
                "lastRequestTime": "2026-01-01T00:00:00Z",
                "conditions": [
                    {"type": "Ready", "status": "True", "reason": "Serving",
                        "message": "y".repeat(500), "lastTransitionTime": "2026-01-01T00:00:00Z"},
                    {"type": "Active", "status": "False", "reason": "ImagePullFailure",
                        "message": "no such image", "observedGeneration": 3,
                        "lastTransitionTime": "2026-01-01T00:00:00Z"},
                ],
            },
        }))
        .unwrap();
        let read = |f: &Function| {
            (
                Workload::of(f),
                f.key(),
                f.spec.clone(),
                f.creation_timestamp(),
                f.startup_failure(),
            )
        };
        let before = read(&f);
        trim_for_routing_and_scaling(&mut f);
        assert_eq!(before, read(&f));
        assert!(matches!(Workload::of(&f), Workload::Target { .. }));
        assert!(f.startup_failure().is_some());
        let kept = serde_json::to_value(&f).unwrap();
        assert_eq!(kept["metadata"].get("labels"), None);
        assert_eq!(kept["metadata"].get("annotations"), None);
        assert_eq!(
            kept["status"]["conditions"].as_array().map(Vec::len),
            Some(1)
        );
        assert!(serde_json::to_string(&f).unwrap().len() < 700, "{kept}");
    }

    #[test]
    fn a_function_relist_becomes_one_reset() {
        let mut state = FunctionRelist::default();
        let f = Function::new(
            "hello",
            crate::api::FunctionSpec {
                template: Some(crate::api::PodTemplate::default()),
                ..crate::api::FunctionSpec::default()
            },
        );
        assert!(state.handle(watcher::Event::Init).is_none());
        assert!(state.handle(watcher::Event::InitApply(f.clone())).is_none());
        match state.handle(watcher::Event::InitDone) {
            Some(FunctionEvent::Reset(all)) => assert_eq!(all.len(), 1),
            other => panic!("expected a reset, got {other:?}"),
        }
        assert!(matches!(
            state.handle(watcher::Event::Delete(f)),
            Some(FunctionEvent::Deleted(_))
        ));
    }

    #[test]
    fn a_target_is_scaled_only_while_the_status_says_the_function_holds_it() {
        let function = |spec: serde_json::Value, status: serde_json::Value| -> Function {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
                "metadata": {"name": "f", "namespace": "default", "generation": 2},
                "spec": spec, "status": status,
            }))
            .unwrap()
        };
        let target = serde_json::json!({"scaleTargetRef": {"kind": "Deployment", "name": "web"},
                                         "port": 8080});
        let held = serde_json::json!({"observedGeneration": 2, "selector": "app=web"});
        assert_eq!(
            Workload::of(&function(
                serde_json::json!({"template": {"spec": {"containers": [{"name": "a"}]}}}),
                serde_json::json!({})
            )),
            Workload::Own
        );
        assert_eq!(
            Workload::of(&function(target.clone(), held.clone())),
            Workload::Target {
                kind: TargetKind::Deployment,
                name: "web".into(),
                selector: "app=web".into()
            }
        );
        // Not (yet) held, or held for an older spec (which may have named another target).
        for status in [
            serde_json::json!({}),
            serde_json::json!({"observedGeneration": 2}),
            serde_json::json!({"observedGeneration": 1, "selector": "app=web"}),
        ] {
            assert_eq!(
                Workload::of(&function(target.clone(), status)),
                Workload::Unheld
            );
        }
        // Being deleted: the operator is giving it back.
        let mut leaving = function(target.clone(), held.clone());
        leaving.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert_eq!(Workload::of(&leaving), Workload::Unheld);
        // An invalid spec with both never scales the target.
        let mut both = target.clone();
        both["template"] = serde_json::json!({"spec": {"containers": [{"name": "a"}]}});
        assert_eq!(Workload::of(&function(both, held)), Workload::Unheld);
    }
}
