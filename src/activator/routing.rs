//! The routing table: which Function answers at a Host, its resolved settings and its
//! ready replicas, kept current from the platform's watch events (never polled).
//!
//! Service names (`<name>.<namespace>[.svc[.<domain>]]`) are answered by parsing the
//! host and one map lookup, so they cost no per-host entries; only `spec.hosts` entries
//! are stored, decided by [`claim_hosts`] exactly as the operator decides them. Per
//! Function the table keeps a few hundred bytes; traffic state is created lazily.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock, Weak};
use std::time::Duration;

use kube::ResourceExt;
use tracing::{debug, warn};

use super::balancer::Replica;
use super::gate::Traffic;
use super::stats::Metrics;
use crate::api::hosts::claim_hosts;
use crate::api::{Defaults, Function, FunctionConfig, FunctionKey, FunctionSpec, PodTemplate};
use crate::platform::Endpoint;

/// The settings of a Function the data plane needs, resolved once per change.
#[derive(Debug, Clone)]
pub(crate) struct Conf {
    pub(crate) initial: u32,
    /// The container port replicas serve on.
    pub(crate) port: u16,
    pub(crate) container_concurrency: Option<u32>,
    pub(crate) activation: Duration,
    pub(crate) request: Duration,
    pub(crate) queue_capacity: usize,
    /// Why the spec is invalid (requests get 503 with this).
    pub(crate) invalid: Option<Arc<str>>,
    /// Why the replicas cannot start, from the status (503 while none is ready).
    pub(crate) startup_failure: Option<Arc<str>>,
}

impl Conf {
    pub(crate) fn resolve(f: &Function, defaults: &Defaults) -> Self {
        let startup_failure = f.startup_failure().map(Arc::from);
        match FunctionConfig::resolve(&f.spec, defaults) {
            Ok(c) => Self {
                initial: c.scale.initial,
                port: c.port,
                container_concurrency: c.scale.container_concurrency,
                activation: c.timeouts.activation,
                request: c.timeouts.request,
                queue_capacity: c.queue_capacity,
                invalid: None,
                startup_failure,
            },
            Err(e) => Self {
                initial: 1,
                port: 0,
                container_concurrency: None,
                activation: Duration::from_secs(1),
                request: Duration::from_secs(1),
                queue_capacity: 1,
                invalid: Some(Arc::from(e.to_string())),
                startup_failure,
            },
        }
    }
}

/// One Function as the data plane sees it. Shared by the table and by every request to
/// it; a change of spec or endpoints updates it in place.
pub(crate) struct FunctionState {
    pub(crate) key: FunctionKey,
    conf: RwLock<Arc<Conf>>,
    replicas: RwLock<Arc<[Arc<Replica>]>>,
    deleted: AtomicBool,
    traffic: OnceLock<Box<Traffic>>,
}

impl FunctionState {
    fn new(key: FunctionKey, conf: Conf) -> Arc<Self> {
        Arc::new(Self {
            key,
            conf: RwLock::new(Arc::new(conf)),
            replicas: RwLock::new(Arc::from(Vec::new())),
            deleted: AtomicBool::new(false),
            traffic: OnceLock::new(),
        })
    }

    pub(crate) fn conf(&self) -> Arc<Conf> {
        match self.conf.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn replicas(&self) -> Arc<[Arc<Replica>]> {
        match self.replicas.read() {
            Ok(r) => r.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub(crate) fn has_replicas(&self) -> bool {
        !self.replicas().is_empty()
    }

    pub(crate) fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }

    /// The traffic state, created on the first request.
    pub(crate) fn traffic(&self, metrics: &Metrics) -> &Traffic {
        self.traffic
            .get_or_init(|| Box::new(Traffic::new(metrics.for_function(&self.key))))
    }

    /// The traffic state if the Function has seen a request.
    pub(crate) fn traffic_if_any(&self) -> Option<&Traffic> {
        self.traffic.get().map(|b| &**b)
    }

    fn set_conf(&self, conf: Conf) {
        match self.conf.write() {
            Ok(mut c) => *c = Arc::new(conf),
            Err(p) => *p.into_inner() = Arc::new(conf),
        }
        self.changed();
    }

    fn set_replicas(&self, replicas: Vec<Arc<Replica>>) {
        let replicas: Arc<[Arc<Replica>]> = Arc::from(replicas);
        // Routed before they are published: a request that picks one finds it routed.
        for r in replicas.iter() {
            r.set_routed(true);
        }
        let before = {
            let mut current = self
                .replicas
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            std::mem::replace(&mut *current, replicas.clone())
        };
        for r in before.iter() {
            r.set_routed(false);
        }
        self.changed();
    }

    /// Wakes every request waiting on this Function to look again.
    pub(crate) fn changed(&self) {
        if let Some(t) = self.traffic_if_any() {
            t.changed.notify_waiters();
        }
    }
}

/// One activator's part of a drain: which of the stopping replicas it still routes new
/// requests to, and how many of its requests are in flight to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct DrainStatus {
    pub(crate) routed: Vec<std::net::IpAddr>,
    pub(crate) in_flight: u64,
}

impl DrainStatus {
    pub(crate) fn done(&self) -> bool {
        self.routed.is_empty() && self.in_flight == 0
    }
}

/// Replicas (name and address) the platform listed ready that a Function remembers (oldest
/// forgotten first): enough for every replica of any Function in one wake cycle. The IP
/// address is part of it because a StatefulSet's new pod takes its predecessor's name.
const LISTED_READY_MEMORY: usize = 64;

/// What the table keeps per Function besides its shared state: what host claims need,
/// and which replicas the platform has listed ready (see `early`).
struct Entry {
    state: Arc<FunctionState>,
    created: Option<jiff::Timestamp>,
    hosts: Vec<String>,
    listed_ready: Vec<(Box<str>, SocketAddr)>,
}

impl Entry {
    fn remember_listed(&mut self, endpoints: &[Endpoint]) {
        for ep in endpoints {
            if !self
                .listed_ready
                .iter()
                .any(|(n, a)| **n == *ep.name && *a == ep.addr)
            {
                if self.listed_ready.len() >= LISTED_READY_MEMORY {
                    self.listed_ready.remove(0);
                }
                self.listed_ready.push((ep.name.as_str().into(), ep.addr));
            }
        }
    }
}

/// A map by host name. Every request looks its host up: foldhash hashes one in a few
/// dozen instructions where std's SipHash takes about two hundred. Flooding a map takes
/// colliding keys in it, and only the platform's names go in (a client's host is only
/// looked up); the seed is random per process all the same.
type HostMap<V> = HashMap<Box<str>, V, foldhash::fast::RandomState>;

/// Host -> Function, and Function -> replicas.
pub(crate) struct Table {
    /// `.svc.<cluster domain>`
    svc_domain_suffix: String,
    cluster_domain: String,
    /// By `<name>.<namespace>`, the shortest service host.
    functions: HostMap<Entry>,
    /// `spec.hosts` entries, each owned by one Function.
    extra_hosts: HostMap<Arc<FunctionState>>,
    /// Endpoints reported for Functions not (yet) known.
    pending_endpoints: HashMap<FunctionKey, Vec<Endpoint>>,
    /// Every replica alive (in a ready set or still serving requests), by address.
    replicas_by_addr: HashMap<SocketAddr, Weak<Replica>>,
    /// Data-plane threads using each replica's connections.
    threads: usize,
}

fn short_host(key: &FunctionKey) -> Box<str> {
    format!("{}.{}", key.name, key.namespace).into_boxed_str()
}

impl Table {
    pub(crate) fn new(cluster_domain: &str, threads: usize) -> Self {
        Self {
            threads,
            svc_domain_suffix: format!(".svc.{cluster_domain}"),
            cluster_domain: cluster_domain.to_string(),
            functions: HostMap::default(),
            extra_hosts: HostMap::default(),
            pending_endpoints: HashMap::new(),
            replicas_by_addr: HashMap::new(),
        }
    }

    /// The Function answering at a normalised host (see `api::hosts::normalize_host`).
    pub(crate) fn lookup(&self, host: &str) -> Option<Arc<FunctionState>> {
        let service = [
            Some(host),
            host.strip_suffix(self.svc_domain_suffix.as_str()),
            host.strip_suffix(".svc"),
        ];
        for base in service.into_iter().flatten() {
            if let Some(e) = self.functions.get(base) {
                return Some(e.state.clone());
            }
        }
        self.extra_hosts.get(host).cloned()
    }

    pub(crate) fn len(&self) -> usize {
        self.functions.len()
    }

    pub(crate) fn states(&self) -> impl Iterator<Item = &Arc<FunctionState>> {
        self.functions.values().map(|e| &e.state)
    }

    /// Of the replicas at `ips` (any port): those some Function still routes new requests
    /// to, and the requests in flight to any of them. A drain is done when both are none.
    pub(crate) fn drain_status(&self, ips: &[std::net::IpAddr]) -> DrainStatus {
        let mut status = DrainStatus::default();
        for (addr, replica) in &self.replicas_by_addr {
            if !ips.contains(&addr.ip()) {
                continue;
            }
            let Some(r) = replica.upgrade() else { continue };
            status.in_flight += r.in_flight();
            if r.is_routed() && !status.routed.contains(&addr.ip()) {
                status.routed.push(addr.ip());
            }
        }
        status
    }

    pub(crate) fn endpoint_in_flight(&self, addr: SocketAddr) -> u64 {
        self.replicas_by_addr
            .get(&addr)
            .and_then(Weak::upgrade)
            .map_or(0, |r| r.in_flight())
    }

    /// A Function was created or changed.
    pub(crate) fn apply(&mut self, f: &Function, conf: Conf) {
        if self.apply_entry(f, conf) {
            self.rebuild_extra_hosts();
        }
    }

    /// Applies one Function; returns whether the claims of extra hosts need a rebuild.
    fn apply_entry(&mut self, f: &Function, conf: Conf) -> bool {
        let key = f.key();
        if let Some(reason) = &conf.invalid {
            warn!(function = %key, %reason, "invalid Function: requests get 503");
        }
        let created = f.creation_timestamp().map(|t| t.0);
        let hosts = f.spec.hosts.clone();
        let name = short_host(&key);
        match self.functions.get_mut(&name) {
            Some(e) => {
                e.state.set_conf(conf);
                let routing_changed = e.created != created || e.hosts != hosts;
                e.created = created;
                e.hosts = hosts;
                routing_changed
            }
            None => {
                let state = FunctionState::new(key.clone(), conf);
                let mut entry = Entry {
                    state,
                    created,
                    hosts,
                    listed_ready: Vec::new(),
                };
                if let Some(eps) = self.pending_endpoints.remove(&key) {
                    let replicas = self.replicas_for(&eps);
                    entry.state.set_replicas(replicas);
                    entry.remember_listed(&eps);
                }
                let rebuild = !entry.hosts.is_empty();
                self.functions.insert(name, entry);
                rebuild
            }
        }
    }

    /// A Function was deleted: its waiting requests fail and its state leaves the table.
    pub(crate) fn delete(&mut self, key: &FunctionKey) -> Option<Arc<FunctionState>> {
        let (state, had_hosts) = self.delete_entry(key)?;
        if had_hosts {
            self.rebuild_extra_hosts();
        }
        Some(state)
    }

    fn delete_entry(&mut self, key: &FunctionKey) -> Option<(Arc<FunctionState>, bool)> {
        let e = self.functions.remove(&short_host(key))?;
        e.state.deleted.store(true, Ordering::Release);
        if let Some(t) = e.state.traffic_if_any() {
            t.early.clear();
        }
        e.state.changed();
        for r in e.state.replicas().iter() {
            r.set_routed(false);
        }
        // Its endpoints are still the platform's truth until it says otherwise.
        let eps: Vec<Endpoint> = e
            .state
            .replicas()
            .iter()
            .map(|r| Endpoint {
                addr: r.addr,
                name: String::new(),
            })
            .collect();
        if !eps.is_empty() {
            self.pending_endpoints.insert(key.clone(), eps);
        }
        Some((e.state, !e.hosts.is_empty()))
    }

    /// The complete set of Functions (with their resolved settings) after a (re-)list.
    /// Returns the deleted ones.
    pub(crate) fn reset(
        &mut self,
        functions: Vec<(Arc<Function>, Conf)>,
    ) -> Vec<Arc<FunctionState>> {
        let keep: std::collections::HashSet<Box<str>> = functions
            .iter()
            .map(|(f, _)| short_host(&f.key()))
            .collect();
        let gone: Vec<FunctionKey> = self
            .functions
            .iter()
            .filter(|(name, _)| !keep.contains(*name))
            .map(|(_, e)| e.state.key.clone())
            .collect();
        let deleted = gone
            .iter()
            .filter_map(|k| self.delete_entry(k).map(|(state, _)| state))
            .collect();
        for (f, conf) in functions {
            self.apply_entry(&f, conf);
        }
        self.rebuild_extra_hosts();
        deleted
    }

    /// The ready endpoints of one Function, all of them.
    pub(crate) fn set_endpoints(&mut self, key: &FunctionKey, endpoints: &[Endpoint]) {
        self.set_endpoints_entry(key, endpoints);
        self.replicas_by_addr.retain(|_, w| w.strong_count() > 0);
    }

    fn set_endpoints_entry(&mut self, key: &FunctionKey, endpoints: &[Endpoint]) {
        let replicas = self.replicas_for(endpoints);
        match self.functions.get_mut(&short_host(key)) {
            Some(e) => {
                debug!(function = %key, ready = replicas.len(), "endpoints changed");
                let listed = !replicas.is_empty();
                e.state.set_replicas(replicas);
                e.remember_listed(endpoints);
                // The platform caught up: from now on only its view routes.
                if listed && let Some(t) = e.state.traffic_if_any() {
                    t.early.clear();
                }
            }
            None if endpoints.is_empty() => {
                self.pending_endpoints.remove(key);
            }
            None => {
                self.pending_endpoints
                    .insert(key.clone(), endpoints.to_vec());
            }
        }
        self.replicas_by_addr.retain(|_, w| w.strong_count() > 0);
    }

    /// Every Function's ready endpoints after a (re-)list.
    pub(crate) fn reset_endpoints(&mut self, all: &[(FunctionKey, Vec<Endpoint>)]) {
        let listed: std::collections::HashSet<&FunctionKey> = all.iter().map(|(k, _)| k).collect();
        let unlisted: Vec<FunctionKey> = self
            .functions
            .values()
            .map(|e| &e.state.key)
            .filter(|k| !listed.contains(k))
            .cloned()
            .collect();
        self.pending_endpoints.clear();
        for k in unlisted {
            self.set_endpoints_entry(&k, &[]);
        }
        for (k, eps) in all {
            self.set_endpoints_entry(k, eps);
        }
        self.replicas_by_addr.retain(|_, w| w.strong_count() > 0);
    }

    /// Routes the replica at `addr` early for `fs`, unless the platform lists a ready
    /// replica already (then only its view counts) or that address was demoted.
    pub(crate) fn add_early(&mut self, fs: &FunctionState, addr: SocketAddr) -> bool {
        if fs.is_deleted() || fs.has_replicas() {
            return false;
        }
        let Some(t) = fs.traffic_if_any() else {
            return false;
        };
        let replica = self.replica_at(addr);
        let added = t.early.add(replica);
        if added {
            fs.changed();
        }
        added
    }

    /// Drops every early route of `fs`.
    pub(crate) fn clear_early(&mut self, fs: &FunctionState) {
        if let Some(t) = fs.traffic_if_any() {
            t.early.clear();
        }
        self.replicas_by_addr.retain(|_, w| w.strong_count() > 0);
    }

    /// Whether the platform has listed replica `name` at `addr` of Function `key` ready
    /// (as far as this activator remembers).
    pub(crate) fn was_listed_ready(&self, key: &FunctionKey, name: &str, addr: SocketAddr) -> bool {
        self.functions.get(&short_host(key)).is_some_and(|e| {
            e.listed_ready
                .iter()
                .any(|(n, a)| **n == *name && *a == addr)
        })
    }

    /// The live replica at `addr`, or a new one: one `Replica` per address, whichever
    /// routes to it, so its in-flight count is one count.
    fn replica_at(&mut self, addr: SocketAddr) -> Arc<Replica> {
        match self.replicas_by_addr.get(&addr).and_then(Weak::upgrade) {
            Some(r) => r,
            None => {
                let r = Replica::new(addr, self.threads);
                self.replicas_by_addr.insert(addr, Arc::downgrade(&r));
                r
            }
        }
    }

    /// Replicas for endpoints, reusing the live one of an address so its in-flight count
    /// carries over.
    fn replicas_for(&mut self, endpoints: &[Endpoint]) -> Vec<Arc<Replica>> {
        let mut out: Vec<Arc<Replica>> = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            if out.iter().any(|r| r.addr == ep.addr) {
                continue;
            }
            out.push(self.replica_at(ep.addr));
        }
        out
    }

    /// Re-decides the owners of `spec.hosts` entries with [`claim_hosts`].
    fn rebuild_extra_hosts(&mut self) {
        let claimants: Vec<Function> = self
            .functions
            .values()
            .filter(|e| !e.hosts.is_empty())
            .map(|e| claim_view(&e.state.key, e.created, &e.hosts))
            .collect();
        let claims = claim_hosts(claimants.iter(), &self.cluster_domain);
        let mut extra = HostMap::default();
        for (host, owner) in claims.owners {
            if let Some(e) = self.functions.get(&short_host(&owner))
                && e.hosts
                    .iter()
                    .any(|h| crate::api::hosts::normalize_host(h).as_deref() == Some(host.as_str()))
            {
                extra.insert(host.into_boxed_str(), e.state.clone());
            }
        }
        for (loser, lost) in &claims.conflicts {
            for (host, owner) in lost {
                debug!(function = %loser, %host, %owner, "host claimed by an older Function");
            }
        }
        self.extra_hosts = extra;
    }
}

/// The parts of a Function that host claims look at.
fn claim_view(key: &FunctionKey, created: Option<jiff::Timestamp>, hosts: &[String]) -> Function {
    let mut f = Function::new(
        &key.name,
        FunctionSpec {
            template: Some(PodTemplate::default()),
            hosts: hosts.to_vec(),
            ..FunctionSpec::default()
        },
    );
    f.metadata.namespace = Some(key.namespace.clone());
    f.metadata.creation_timestamp =
        created.map(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn function(ns: &str, name: &str, age_secs: i64, hosts: &[&str]) -> Function {
        let spec: FunctionSpec = serde_json::from_value(serde_json::json!({
            "template": {"spec": {"containers": [{"name": "app"}]}},
            "hosts": hosts,
        }))
        .unwrap();
        let mut f = Function::new(name, spec);
        f.metadata.namespace = Some(ns.into());
        f.metadata.creation_timestamp = Some(Time(
            jiff::Timestamp::from_second(1_700_000_000 - age_secs).unwrap(),
        ));
        f
    }

    fn apply(t: &mut Table, f: &Function) {
        t.apply(f, Conf::resolve(f, &Defaults::default()));
    }

    fn routed(t: &Table, host: &str) -> Option<String> {
        t.lookup(host).map(|s| s.key.to_string())
    }

    #[test]
    fn service_names_and_extra_hosts_route() {
        let mut t = Table::new("cluster.local", 1);
        apply(
            &mut t,
            &function("default", "hello", 10, &["hello.example.com"]),
        );
        for h in [
            "hello.default",
            "hello.default.svc",
            "hello.default.svc.cluster.local",
            "hello.example.com",
        ] {
            assert_eq!(routed(&t, h).as_deref(), Some("default/hello"), "{h}");
        }
        assert_eq!(routed(&t, "hello.other"), None);
        assert_eq!(routed(&t, "hello.default.svc.svc"), None);
        // A namespace may be called `svc`.
        apply(&mut t, &function("svc", "a", 1, &[]));
        assert_eq!(routed(&t, "a.svc").as_deref(), Some("svc/a"));
        assert_eq!(
            routed(&t, "a.svc.svc.cluster.local").as_deref(),
            Some("svc/a")
        );
        assert_eq!(routed(&t, "hello.default.svc.other.domain"), None);
    }

    #[test]
    fn older_function_keeps_a_contested_host_and_deletion_hands_it_over() {
        let mut t = Table::new("cluster.local", 1);
        apply(&mut t, &function("b", "new", 5, &["api.example.com"]));
        apply(&mut t, &function("a", "old", 100, &["api.example.com"]));
        assert_eq!(routed(&t, "api.example.com").as_deref(), Some("a/old"));
        t.delete(&FunctionKey::new("a", "old"));
        assert_eq!(routed(&t, "api.example.com").as_deref(), Some("b/new"));
    }

    #[test]
    fn reset_replaces_everything() {
        let mut t = Table::new("cluster.local", 1);
        let d = Defaults::default();
        apply(&mut t, &function("ns", "a", 5, &["a.example.com"]));
        let b = function("ns", "b", 5, &[]);
        let conf = Conf::resolve(&b, &d);
        let gone = t.reset(vec![(Arc::new(b), conf)]);
        assert_eq!(gone.len(), 1);
        assert!(gone[0].is_deleted());
        assert_eq!(routed(&t, "a.ns"), None);
        assert_eq!(routed(&t, "a.example.com"), None);
        assert_eq!(routed(&t, "b.ns").as_deref(), Some("ns/b"));
    }

    #[test]
    fn endpoints_before_the_function_are_kept() {
        let mut t = Table::new("cluster.local", 1);
        let key = FunctionKey::new("ns", "f");
        let ep = Endpoint {
            addr: "10.0.0.1:8080".parse().unwrap(),
            name: "f-1".into(),
        };
        t.set_endpoints(&key, std::slice::from_ref(&ep));
        apply(&mut t, &function("ns", "f", 1, &[]));
        let s = t.lookup("f.ns").unwrap();
        assert_eq!(s.replicas().len(), 1);
        t.reset_endpoints(&[]);
        assert!(!s.has_replicas());
    }

    #[test]
    fn invalid_function_is_routed_with_its_reason() {
        let mut t = Table::new("cluster.local", 1);
        let mut f = function("ns", "bad", 1, &[]);
        f.spec.scale =
            Some(serde_json::from_value(serde_json::json!({"min": 5, "max": 2})).unwrap());
        apply(&mut t, &f);
        let s = t.lookup("bad.ns").unwrap();
        assert!(
            s.conf()
                .invalid
                .as_deref()
                .unwrap()
                .contains("spec.scale.min")
        );
    }
}
