//! What the operator keeps of each watched object, and nothing more.
//!
//! The operator holds every Function and every object it owns in watch caches, so at
//! 10,000 Functions the caches are its memory. The API server sends whole objects;
//! most of what it sends is never read. The largest part is `metadata.managedFields`:
//! a tree of JSON maps per field manager, each map a separate allocation of several
//! hundred bytes, which made up most of the 86 KB a Function cost (issue 16). So every
//! object is trimmed as it arrives, before it is cached, to what some code reads:
//!
//! | cache | kept | dropped |
//! |---|---|---|
//! | Functions | spec, status, identity | managed fields, `last-applied-configuration` |
//! | Deployments (shared by the reconciler and the autoscaler) | spec (the drift check compares the template), replicas, readiness, the `Progressing` condition, and which managers own `spec.replicas` | every other managed field, the `Available` condition, `last-applied-configuration` |
//! | Services, activator EndpointSlices | what the drift check and the target record read | managed fields, `last-applied-configuration` |
//! | Pods | labels, status (startup failures) | spec, managed fields, annotations |
//!
//! Trimmed, the objects are still large in memory: `k8s-openapi` structs are mostly
//! inline `Option`s (a `Container` alone is over a kilobyte), and every map is a separate
//! allocation. So the objects the reconciler owns (Deployments, Services, activator
//! EndpointSlices) are cached [`Packed`] in a [`PackedStore`]: keyed by namespace and
//! name, kept as compact JSON, decoded when a reconcile reads the object, which is a few
//! times per Function per change, never per tick. Only what the autoscaler reads every
//! second is typed: a Deployment's resourceVersion, replicas and ready replicas. The
//! watch hands the controller each object whole on its way into the store, so the
//! controller maps it to its Function by its owner reference as usual.
//!
//! Even as JSON, the four objects of a Function were 3.4 KB (heaptrack, 2,000
//! Functions), and they are nearly all alike: the same keys, the same server defaults,
//! the Function's name over again. So each body is LZ4-compressed against a dictionary,
//! the first body of its kind the operator packed (up to [`DICTIONARY_LEN`] bytes, kept
//! for the life of the process): what is the same as in that object costs a few bytes
//! of back-reference. Decompressing is a memory copy's work, a few microseconds per read.
//!
//! The Deployments are watched once and shared: the autoscaler reads the scale from the
//! reconciler's cache instead of a second watch. The pod slices of the private Services
//! are not cached by the reconciler at all (it never reads them; the autoscaler and the
//! activator follow them through their own compact endpoint tables).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, OnceLock, RwLock};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta};

use futures::{Stream, StreamExt};
use kube::Resource;
use kube::runtime::watcher;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::debug;

use crate::api::Function;

/// An object kept as compressed JSON, with the two things read without unpacking it
/// typed: its resourceVersion and, for workloads, its replicas.
#[derive(Clone, Debug)]
pub struct Packed<K> {
    body: Box<[u8]>,
    version: Option<Box<str>>,
    replicas: Replicas,
    kind: PhantomData<fn() -> K>,
}

/// A workload's replicas as the autoscaler reads them each tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replicas {
    /// `spec.replicas` (1 when unset, as the API server defaults it).
    pub desired: i32,
    /// `status.readyReplicas`.
    pub ready: i32,
}

/// The longest dictionary a kind's bodies are compressed against.
pub const DICTIONARY_LEN: usize = 16 * 1024;

/// An object that can be cached [`Packed`].
pub trait Pack:
    Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Serialize
    + DeserializeOwned
    + Clone
{
    /// Trims what no code reads (see the module docs).
    fn trim(&mut self);
    /// The replicas, for workloads.
    fn replicas(&self) -> Replicas {
        Replicas::default()
    }
    /// The dictionary this kind's bodies are compressed against, once set.
    fn dictionary() -> &'static OnceLock<Box<[u8]>>;
}

/// A `fn dictionary` with its own static.
macro_rules! dictionary {
    () => {
        fn dictionary() -> &'static OnceLock<Box<[u8]>> {
            static DICTIONARY: OnceLock<Box<[u8]>> = OnceLock::new();
            &DICTIONARY
        }
    };
}

impl Pack for Deployment {
    dictionary!();
    fn trim(&mut self) {
        trim_deployment(self);
    }
    fn replicas(&self) -> Replicas {
        Replicas {
            desired: self.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1),
            ready: self
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0),
        }
    }
}

impl Pack for Service {
    dictionary!();
    fn trim(&mut self) {
        trim_service(self);
    }
}

impl Pack for EndpointSlice {
    dictionary!();
    fn trim(&mut self) {
        trim_slice(self);
    }
}

impl<K: Pack> Packed<K> {
    /// Trims and packs an object.
    pub fn pack(mut object: K) -> Self {
        object.trim();
        let replicas = object.replicas();
        let m = object.meta_mut();
        let version = m.resource_version.take().map(String::into_boxed_str);
        m.creation_timestamp = None;
        // Serializing a typed object that was just decoded cannot fail; an empty body
        // would not unpack, and the reconciler reads an object it cannot unpack from
        // the API server, never a wrong one.
        let mut body = serde_json::to_value(&object).unwrap_or_default();
        if let Some(o) = body.as_object_mut() {
            o.remove("apiVersion");
            o.remove("kind");
        }
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let dictionary =
            K::dictionary().get_or_init(|| json[..json.len().min(DICTIONARY_LEN)].into());
        let body = lz4_flex::block::compress_prepend_size_with_dict(&json, dictionary);
        Self {
            body: body.into_boxed_slice(),
            version,
            replicas,
            kind: PhantomData,
        }
    }

    /// The object as it was cached (trimmed; without its creation timestamp).
    pub fn unpack(&self) -> Result<K, serde_json::Error> {
        let dictionary = K::dictionary().get().map_or(&[][..], |d| &d[..]);
        let json = lz4_flex::block::decompress_size_prepended_with_dict(&self.body, dictionary)
            .map_err(<serde_json::Error as serde::de::Error>::custom)?;
        let mut object: K = serde_json::from_slice(&json)?;
        object.meta_mut().resource_version = self.version.as_deref().map(str::to_owned);
        Ok(object)
    }

    /// The object's resourceVersion.
    pub fn resource_version(&self) -> Option<&str> {
        self.version.as_deref()
    }

    /// The replicas of a workload.
    pub fn replicas(&self) -> Replicas {
        self.replicas
    }

    /// Bytes held by the packed (compressed) body (tests, benchmarks).
    pub fn body_len(&self) -> usize {
        self.body.len()
    }
}

/// The objects of one packed kind by namespace and name, filled by a [`PackedWriter`]
/// from a watch (see [`reflect`]).
///
/// kube's reflector store holds each object with its typed `ObjectMeta` (360 bytes
/// inline, and the name, namespace, uid, resourceVersion and owner references each a
/// separate allocation), keyed by an `ObjectRef` that copies four of those strings again:
/// about 1.1 KB per object before its body, 4.4 KB per Function, which was a third of the
/// operator at 10,000 Functions (issue 16). Here an object is its key (`namespace/name`,
/// one string), its compressed body, its resourceVersion and its replicas; the rest of
/// its metadata is in the body, read when a reconcile unpacks it.
pub struct PackedStore<K> {
    shared: Arc<Shared<K>>,
}

type Objects<K> = HashMap<Box<str>, Arc<Packed<K>>, foldhash::fast::RandomState>;

/// An object of a [`PackedStore`] with its key.
type Entry<K> = (Box<str>, Arc<Packed<K>>);

struct Shared<K> {
    objects: RwLock<Objects<K>>,
    /// Whether the first list has been stored.
    ready: tokio::sync::watch::Sender<bool>,
}

impl<K> Clone for PackedStore<K> {
    fn clone(&self) -> Self {
        Self {
            shared: self.shared.clone(),
        }
    }
}

/// Fills a [`PackedStore`] from watch events, as kube's reflector writer does: a relist
/// is gathered aside and replaces the objects when it is complete, so readers never see
/// half a list.
pub struct PackedWriter<K> {
    shared: Arc<Shared<K>>,
    relist: Option<Objects<K>>,
}

/// An empty store and its writer.
pub fn packed_store<K: Pack>() -> (PackedStore<K>, PackedWriter<K>) {
    let shared = Arc::new(Shared {
        objects: RwLock::new(Objects::default()),
        ready: tokio::sync::watch::Sender::new(false),
    });
    (
        PackedStore {
            shared: shared.clone(),
        },
        PackedWriter {
            shared,
            relist: None,
        },
    )
}

/// The key of an object in a [`PackedStore`].
fn key(namespace: &str, name: &str) -> Box<str> {
    let mut key = String::with_capacity(namespace.len() + 1 + name.len());
    key.push_str(namespace);
    key.push('/');
    key.push_str(name);
    key.into_boxed_str()
}

fn key_of<K: Resource>(object: &K) -> Box<str> {
    let m = object.meta();
    key(
        m.namespace.as_deref().unwrap_or_default(),
        m.name.as_deref().unwrap_or_default(),
    )
}

impl<K: Pack> PackedStore<K> {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Objects<K>> {
        // A writer that panicked mid-insert leaves a map that is still whole.
        self.shared
            .objects
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The object `namespace/name`, if cached.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<Packed<K>>> {
        self.read().get(&key(namespace, name)).cloned()
    }

    /// Every object in `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<Packed<K>>> {
        self.read()
            .iter()
            .filter(|(k, _)| {
                k.strip_prefix(namespace)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// How many objects are cached.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether the store is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the first list has been stored.
    pub fn is_ready(&self) -> bool {
        *self.shared.ready.borrow()
    }

    /// Waits until the first list has been stored.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.shared.ready.subscribe();
        // The sender lives as long as this store: the wait cannot fail.
        let _ = ready.wait_for(|r| *r).await;
    }

    fn entries(&self) -> Vec<Entry<K>> {
        self.read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn contains(&self, key: &str) -> bool {
        self.read().contains_key(key)
    }
}

impl<K: Pack> PackedWriter<K> {
    /// A reader of this writer's store.
    pub fn as_reader(&self) -> PackedStore<K> {
        PackedStore {
            shared: self.shared.clone(),
        }
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Objects<K>> {
        self.shared
            .objects
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies one watch event.
    pub fn apply_watcher_event(&mut self, event: &watcher::Event<K>) {
        match event {
            watcher::Event::Apply(k) => {
                let packed = Arc::new(Packed::pack(k.clone()));
                self.write().insert(key_of(k), packed);
            }
            watcher::Event::Delete(k) => {
                self.write().remove(&key_of(k));
            }
            watcher::Event::Init => self.relist = Some(Objects::default()),
            watcher::Event::InitApply(k) => {
                let packed = Arc::new(Packed::pack(k.clone()));
                self.relist
                    .get_or_insert_with(Objects::default)
                    .insert(key_of(k), packed);
            }
            watcher::Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                *self.write() = listed;
                self.shared.ready.send_replace(true);
            }
        }
    }
}

/// Stores each event of `events` with `writer` and passes it on.
pub fn reflect<K, S>(
    mut writer: PackedWriter<K>,
    events: S,
) -> impl Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static
where
    K: Pack + Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    events.inspect(move |event| {
        if let Ok(event) = event {
            writer.apply_watcher_event(event);
        }
    })
}

/// The objects a cached watch touched, and, when a relist ends, every object the cache
/// held before it that the new list lacks.
///
/// A watch that is cut (a dropped connection, an expired resourceVersion, an API server
/// restart) resumes with a full list, and an object deleted meanwhile is simply absent
/// from it: no watch event says it was deleted, the store just forgets it. For the
/// objects a Function owns that matters: a Function whose Service or activator slice was
/// deleted during the gap would stay unroutable until its periodic requeue, minutes
/// later (seen at 10,000 Functions, where relists under load are common). So the
/// objects that vanished are given to the controller like deletions, and their owners
/// are reconciled at once. `store` is the store `events` are reflected into.
pub fn touched_or_vanished<K, S>(
    events: S,
    store: PackedStore<K>,
) -> impl Stream<Item = Result<K, watcher::Error>> + Send + 'static
where
    K: Pack + Send + Sync + 'static,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    // What the store held when the current relist began.
    let mut before: Option<Vec<Entry<K>>> = None;
    events.flat_map(move |event| {
        let out: Vec<Result<K, watcher::Error>> = match event {
            // The writer gathers a relist aside and swaps it in at the end: at `Init`
            // the store still holds the old list, at `InitDone` the new one.
            Ok(watcher::Event::Init) => {
                before = Some(store.entries());
                Vec::new()
            }
            Ok(watcher::Event::InitDone) => {
                let vanished: Vec<Result<K, watcher::Error>> = before
                    .take()
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|(key, _)| !store.contains(key))
                    // The owner references are in the body.
                    .filter_map(|(_, o)| o.unpack().ok())
                    .map(Ok)
                    .collect();
                if !vanished.is_empty() {
                    debug!(
                        kind = %K::kind(&()),
                        objects = vanished.len(),
                        "deleted while the watch was down"
                    );
                }
                vanished
            }
            Ok(
                watcher::Event::Apply(o) | watcher::Event::InitApply(o) | watcher::Event::Delete(o),
            ) => vec![Ok(o)],
            Err(e) => vec![Err(e)],
        };
        futures::stream::iter(out)
    })
}

/// The annotation client-side `kubectl apply` keeps the whole object in.
pub const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops what no code reads from any object's metadata: managed fields and the copy of
/// the object client-side `kubectl apply` keeps.
pub fn trim_metadata(meta: &mut ObjectMeta) {
    meta.managed_fields = None;
    drop_last_applied(meta);
}

fn drop_last_applied(meta: &mut ObjectMeta) {
    if let Some(a) = meta.annotations.as_mut() {
        a.remove(LAST_APPLIED);
        if a.is_empty() {
            meta.annotations = None;
        }
    }
}

/// A Function as the reconciler reads it (the activator and the autoscaler keep less:
/// [`crate::platform::kube::trim_for_routing_and_scaling`]).
pub fn trim_function(f: &mut Function) {
    trim_metadata(&mut f.metadata);
}

/// A Function's Deployment as the reconciler (drift check, replicas ownership, status)
/// and the autoscaler (scale) read it.
pub fn trim_deployment(d: &mut Deployment) {
    keep_replicas_owners(&mut d.metadata);
    drop_last_applied(&mut d.metadata);
    if let Some(conditions) = d.status.as_mut().and_then(|s| s.conditions.as_mut()) {
        conditions.retain(|c| c.type_ == "Progressing");
        for c in conditions.iter_mut() {
            c.last_update_time = None;
            c.last_transition_time = None;
        }
    }
}

/// A Service (public or private) as the reconciler reads it.
pub fn trim_service(s: &mut Service) {
    trim_metadata(&mut s.metadata);
}

/// An activator EndpointSlice as the reconciler reads it.
pub fn trim_slice(s: &mut EndpointSlice) {
    trim_metadata(&mut s.metadata);
}

/// A Function's pod as the reconciler reads it: labels and status.
pub fn trim_pod(p: &mut Pod) {
    trim_metadata(&mut p.metadata);
    p.metadata.annotations = None;
    p.spec = None;
}

/// Whether a managed-fields entry owns `spec.replicas`.
pub fn owns_replicas(entry: &ManagedFieldsEntry) -> bool {
    entry
        .fields_v1
        .as_ref()
        .and_then(|f| f.0.get("f:spec"))
        .and_then(|s| s.get("f:replicas"))
        .is_some()
}

/// Keeps of the managed fields only the entries that own `spec.replicas`, each reduced
/// to its manager, operation and that one field: who owns the replicas decides whether
/// the reconciler sends them (`build::Replicas::decide`).
fn keep_replicas_owners(meta: &mut ObjectMeta) {
    let Some(entries) = meta.managed_fields.take() else {
        return;
    };
    let kept: Vec<ManagedFieldsEntry> = entries
        .into_iter()
        .filter(owns_replicas)
        .map(|e| ManagedFieldsEntry {
            manager: e.manager,
            operation: e.operation,
            fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}}))),
            ..ManagedFieldsEntry::default()
        })
        .collect();
    meta.managed_fields = (!kept.is_empty()).then_some(kept);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deployment() -> Deployment {
        serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "hello", "namespace": "default",
                "annotations": {
                    "deployment.kubernetes.io/revision": "1",
                    "zeroscale.dev/applied-hash": "0123456789abcdef",
                    LAST_APPLIED: "{\"big\": true}",
                },
                "managedFields": [
                    {"manager": "zeroscale-operator", "operation": "Apply",
                     "apiVersion": "apps/v1", "time": "2026-01-01T00:00:00Z",
                     "fieldsType": "FieldsV1", "fieldsV1": {
                        "f:metadata": {"f:labels": {"f:zeroscale.dev/function": {}}},
                        "f:spec": {"f:replicas": {}, "f:template": {"f:spec": {
                            "f:containers": {"k:{\"name\":\"app\"}": {".": {}, "f:image": {}}}}}}}},
                    {"manager": "zeroscale-autoscaler", "operation": "Update",
                     "subresource": "scale", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:spec": {"f:replicas": {}}}},
                    {"manager": "kube-controller-manager", "operation": "Update",
                     "subresource": "status", "fieldsType": "FieldsV1",
                     "fieldsV1": {"f:status": {"f:conditions": {}, "f:replicas": {}}}},
                ],
            },
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"zeroscale.dev/function": "hello"}},
                "template": {"metadata": {"labels": {"zeroscale.dev/function": "hello"}},
                             "spec": {"containers": [{"name": "app", "image": "x"}]}},
            },
            "status": {"replicas": 2, "readyReplicas": 1, "conditions": [
                {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
                 "message": "Deployment has minimum availability."},
                {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded",
                 "message": "ReplicaSet \"hello-1\" has timed out progressing.",
                 "lastUpdateTime": "2026-01-01T00:00:00Z"},
            ]},
        }))
        .expect("a Deployment")
    }

    /// The trimmed Deployment answers every question the reconciler and the autoscaler
    /// ask of it the same way, and holds nothing else of the managed fields.
    #[test]
    fn a_trimmed_deployment_keeps_what_is_read_and_only_that() {
        let full = deployment();
        let mut d = full.clone();
        trim_deployment(&mut d);

        // Who owns the replicas: only the two owners, each with that one field.
        let entries = d.metadata.managed_fields.clone().unwrap_or_default();
        let managers: Vec<_> = entries.iter().map(|e| e.manager.clone()).collect();
        assert_eq!(
            managers,
            [
                Some("zeroscale-operator".to_string()),
                Some("zeroscale-autoscaler".to_string())
            ]
        );
        for e in &entries {
            assert_eq!(
                e.fields_v1.as_ref().map(|f| f.0.clone()),
                Some(serde_json::json!({"f:spec": {"f:replicas": {}}}))
            );
            assert!(e.time.is_none() && e.api_version.is_none());
        }
        assert_eq!(
            crate::operator::build::Replicas::decide(Some(&d), 0),
            crate::operator::build::Replicas::decide(Some(&full), 0)
        );

        // The drift check sees the same spec and the same applied hash.
        assert_eq!(d.spec, full.spec);
        let annotations = d.metadata.annotations.clone().unwrap_or_default();
        assert!(!annotations.contains_key(LAST_APPLIED));
        assert_eq!(
            annotations.get(crate::operator::build::HASH_ANNOTATION),
            Some(&"0123456789abcdef".to_string())
        );

        // The status reads the same.
        let status = |d: &Deployment| {
            let w = crate::operator::status::WorkloadStatus::from(d);
            (w.desired, w.replicas, w.ready, w.stalled)
        };
        assert_eq!(status(&d), status(&full));
        let conditions = d
            .status
            .as_ref()
            .and_then(|s| s.conditions.clone())
            .unwrap_or_default();
        assert_eq!(conditions.len(), 1);
    }

    /// What the reconciler reads back from the cache is the trimmed object, whole, with
    /// its identity and owner; what the autoscaler reads each tick is there without
    /// unpacking.
    #[test]
    fn a_packed_object_unpacks_to_the_trimmed_object() {
        let mut full = deployment();
        full.metadata.owner_references = Some(vec![Default::default()]);
        full.metadata.uid = Some("u-1".into());
        full.metadata.resource_version = Some("42".into());
        let packed = Packed::pack(full.clone());
        let mut trimmed = full.clone();
        trim_deployment(&mut trimmed);
        trimmed.metadata.creation_timestamp = None;
        let unpacked = packed.unpack().unwrap();
        assert_eq!(unpacked, trimmed);
        assert_eq!(unpacked.metadata.name.as_deref(), Some("hello"));
        assert_eq!(unpacked.metadata.uid.as_deref(), Some("u-1"));
        assert_eq!(
            unpacked.metadata.owner_references.as_ref().map(Vec::len),
            Some(1)
        );
        assert_eq!(packed.resource_version(), Some("42"));
        assert_eq!(
            packed.replicas(),
            Replicas {
                desired: 2,
                ready: 1
            }
        );
    }

    fn service(namespace: &str, name: &str, version: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": version}
        }))
        .unwrap()
    }

    /// The store answers by namespace and name, shows a relist only once it is whole,
    /// and is ready from the end of its first list on.
    #[test]
    fn the_packed_store_swaps_in_a_relist_when_it_is_complete() {
        use watcher::Event;
        let (store, mut writer) = packed_store::<Service>();
        assert!(!store.is_ready());
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(service("a", "x", "1")));
        assert!(
            store.is_empty() && !store.is_ready(),
            "half a list is not shown"
        );
        writer.apply_watcher_event(&Event::InitApply(service("b", "x", "2")));
        writer.apply_watcher_event(&Event::InitDone);
        assert!(store.is_ready());
        assert_eq!(store.len(), 2);
        let version = |ns: &str, name: &str| {
            store
                .get(ns, name)
                .and_then(|s| s.resource_version().map(str::to_owned))
        };
        assert_eq!(version("a", "x").as_deref(), Some("1"));
        assert_eq!(version("b", "x").as_deref(), Some("2"));
        assert_eq!(version("a", "y"), None);
        // "a" is not a prefix match for "ab".
        writer.apply_watcher_event(&Event::Apply(service("ab", "x", "3")));
        assert_eq!(store.in_namespace("a").len(), 1);
        assert_eq!(store.in_namespace("ab").len(), 1);

        writer.apply_watcher_event(&Event::Apply(service("a", "x", "4")));
        assert_eq!(version("a", "x").as_deref(), Some("4"));
        writer.apply_watcher_event(&Event::Delete(service("b", "x", "5")));
        assert_eq!(version("b", "x"), None);

        // A relist: the old objects stay visible until it ends.
        writer.apply_watcher_event(&Event::Init);
        writer.apply_watcher_event(&Event::InitApply(service("c", "x", "6")));
        assert_eq!(version("a", "x").as_deref(), Some("4"));
        writer.apply_watcher_event(&Event::InitDone);
        assert_eq!(version("a", "x"), None);
        assert_eq!(version("c", "x").as_deref(), Some("6"));
        assert_eq!(store.len(), 1);
        let unpacked = store.get("c", "x").unwrap().unpack().unwrap();
        assert_eq!(unpacked.metadata.namespace.as_deref(), Some("c"));
    }

    /// The bodies of a kind are compressed against the first one packed: a Function's
    /// objects cost a fraction of their JSON (issue 16), and read back whole.
    #[test]
    fn packed_bodies_are_compressed_against_the_first_of_their_kind() {
        let first = Packed::pack(deployment());
        let mut other = deployment();
        other.metadata.name = Some("fn-00042".into());
        other.metadata.uid = Some("1f0c7c2e-5b7e-4c59-9d0e-3a3d8e0f4b21".into());
        let mut trimmed = other.clone();
        trim_deployment(&mut trimmed);
        trimmed.metadata.creation_timestamp = None;
        let json_len = serde_json::to_vec(&trimmed).unwrap().len();
        let packed = Packed::pack(other);
        assert!(
            packed.body_len() * 4 < json_len,
            "{} bytes packed for {json_len} of JSON",
            packed.body_len()
        );
        assert_eq!(packed.unpack().unwrap(), trimmed);
        assert!(first.unpack().is_ok());
    }

    #[test]
    fn replicas_owned_by_nobody_leave_no_managed_fields() {
        let mut d = deployment();
        if let Some(entries) = d.metadata.managed_fields.as_mut() {
            entries.retain(|e| !owns_replicas(e));
        }
        trim_deployment(&mut d);
        assert!(d.metadata.managed_fields.is_none());
    }

    #[test]
    fn functions_services_slices_and_pods_lose_managed_fields_and_last_applied() {
        let meta = || ObjectMeta {
            name: Some("hello".into()),
            annotations: Some([(LAST_APPLIED.to_string(), "{}".to_string())].into()),
            managed_fields: Some(vec![ManagedFieldsEntry {
                manager: Some("kubectl".into()),
                fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {}}))),
                ..ManagedFieldsEntry::default()
            }]),
            ..ObjectMeta::default()
        };
        let mut f = Function::new("hello", crate::api::FunctionSpec::default());
        f.metadata = meta();
        trim_function(&mut f);
        assert_eq!(f.metadata.managed_fields, None);
        assert_eq!(f.metadata.annotations, None);

        let mut s = Service {
            metadata: meta(),
            ..Service::default()
        };
        trim_service(&mut s);
        assert_eq!(
            (s.metadata.managed_fields, s.metadata.annotations),
            (None, None)
        );

        let mut s = EndpointSlice {
            metadata: meta(),
            ..EndpointSlice::default()
        };
        trim_slice(&mut s);
        assert_eq!(
            (s.metadata.managed_fields, s.metadata.annotations),
            (None, None)
        );

        let mut p = Pod {
            metadata: meta(),
            spec: Some(Default::default()),
            ..Pod::default()
        };
        trim_pod(&mut p);
        assert!(p.spec.is_none() && p.metadata.managed_fields.is_none());
    }

    fn named(name: &str) -> Service {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns"}
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn an_object_deleted_while_the_watch_was_down_reaches_its_owner() {
        use futures::StreamExt;
        use kube::ResourceExt;
        use watcher::Event;

        let (store, writer) = packed_store::<Service>();
        let events = futures::stream::iter(vec![
            Ok(Event::Init),
            Ok(Event::InitApply(named("a"))),
            Ok(Event::InitApply(named("b"))),
            Ok(Event::InitApply(named("c"))),
            Ok(Event::InitDone),
            Ok(Event::Delete(named("c"))),
            // The watch is cut; "b" is deleted before it lists again.
            Ok(Event::Init),
            Ok(Event::InitApply(named("a"))),
            Ok(Event::InitDone),
            Ok(Event::Apply(named("d"))),
        ]);
        let touched: Vec<String> = touched_or_vanished(reflect(writer, events), store.clone())
            .map(|o| o.expect("no errors").name_any())
            .collect()
            .await;
        assert_eq!(touched, ["a", "b", "c", "c", "a", "b", "d"]);
        assert_eq!(store.len(), 2, "a and d are cached");
    }
}
