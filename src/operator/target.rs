//! Functions that scale an existing workload (`spec.scaleTargetRef`) instead of running a
//! template: the pure parts of reconciling them. The reconciler's I/O for them is in
//! `reconcile`.
//!
//! # The contract
//!
//! The target (a Deployment or StatefulSet) is the user's: zeroscale reads it and sets
//! its replica count through the scale subresource, and nothing else. It never writes the
//! target's spec or metadata, so its pods get no drain hook (see "Draining" below). The
//! routing objects are the Function's own, as for a template Function: the selector-less
//! `<name>` Service with its activator EndpointSlice, and `<name>-private`, a headless
//! Service selecting the target's pods by the target's own `matchLabels` (what a Service
//! selector can express; anything more is refused as `TargetSelectorUnsupported`).
//!
//! # Holding a target
//!
//! A Function *holds* its target once it has recorded what the target had before
//! ([`Record`], an annotation on its `<name>-private` Service: the replica count to
//! restore, the target's uid, when it took it). Only then does its status publish the
//! pods' `selector`, and the autoscaler and the activators scale a target only for a
//! Function whose status has a selector for its current generation: a Function that does
//! not hold its target never changes its replicas. When several Functions name one
//! target the oldest keeps it (as for hosts); a younger one reports `TargetConflict`
//! and, if it held the target before, gives it back first.
//!
//! # Giving a target back: a finalizer
//!
//! Deleting the Function must leave the target as it was. The garbage collector alone
//! cannot do it (it deletes the Function's objects, record included, and never scales
//! anything), and the Function's deletion event alone is lost whenever the operator is
//! down at that moment (an idle target would then stay at zero replicas: an outage of a
//! service the user never asked zeroscale to stop). So a Function that holds a target
//! carries the finalizer [`FINALIZER`] (added before it takes the target, removed after it
//! gave it back): on deletion the operator restores the recorded replicas, waits a moment
//! so that no autoscaler or activator that had not yet seen the deletion overrides it,
//! drops the record and removes the finalizer. The same release runs when the Function
//! stops naming the target, loses it to an older Function, or the target disappears.
//! The finalizer is a JSON patch with a `test` of the list (so concurrent finalizers of
//! other controllers are kept), which needs only `patch` on Functions; template
//! Functions never get one. If zeroscale is uninstalled while such Functions exist,
//! their deletion waits for the finalizer (the README says how to remove it by hand).
//!
//! # Draining
//!
//! A template Function's pods get a `preStop` hook that waits until the activators have
//! no request on them (see `build`). The target's pods are the user's: they get no hook,
//! and a replica stopped by a scale-down relies on the app's own graceful shutdown
//! (finish what is in flight after SIGTERM), as behind any Service. The activators stop
//! sending it new requests as soon as its endpoint leaves the ready set. A user can add
//! the same hook to their own pod template; the activators' drain finds the Function's
//! stopping pods with the `selector` of its status.
//!
//! # Replicas fights
//!
//! A tool that applies the target with a `replicas` field (kubectl apply, Argo CD, Flux)
//! sets it back at every sync, as it would under an HPA. The reconciler sees who owns
//! `spec.replicas` in the target's managed fields; an owner that is not zeroscale and
//! wrote after the Function took the target is reported with a Warning Event
//! ([`REASON_REPLICAS_OVERRIDDEN`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::ResourceExt;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::status::WorkloadStatus;
use crate::api::config::ScaleTarget;
use crate::api::{
    Function, FunctionKey, REASON_TARGET_CONFLICT, REASON_TARGET_NOT_FOUND,
    REASON_TARGET_SELECTOR_UNSUPPORTED, TargetKind,
};

/// The finalizer of a Function that holds a target: it is removed once the target has
/// its replicas back.
pub const FINALIZER: &str = "zeroscale.dev/scale-back";
/// The annotation on a Function's `<name>-private` Service that records the target it
/// holds ([`Record`], JSON).
pub const RECORD_ANNOTATION: &str = "zeroscale.dev/scale-target";
/// The Event reason when someone else set the target's replicas.
pub const REASON_REPLICAS_OVERRIDDEN: &str = "ReplicasOverridden";
/// Field managers of zeroscale's own scale writes (reconciler, activator, autoscaler).
pub const OWN_MANAGERS: &[&str] = &[
    super::build::FIELD_MANAGER,
    crate::platform::kube::WAKE_FIELD_MANAGER,
    crate::platform::kube::AUTOSCALER_FIELD_MANAGER,
];

/// A target as read from the API server.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetObject {
    Deployment(Deployment),
    StatefulSet(StatefulSet),
}

impl TargetObject {
    pub fn kind(&self) -> TargetKind {
        match self {
            TargetObject::Deployment(_) => TargetKind::Deployment,
            TargetObject::StatefulSet(_) => TargetKind::StatefulSet,
        }
    }

    pub fn meta(&self) -> &ObjectMeta {
        match self {
            TargetObject::Deployment(d) => &d.metadata,
            TargetObject::StatefulSet(s) => &s.metadata,
        }
    }

    pub fn name(&self) -> String {
        self.meta().name.clone().unwrap_or_default()
    }

    pub fn uid(&self) -> String {
        self.meta().uid.clone().unwrap_or_default()
    }

    /// `spec.replicas` (1 when unset, as the API server defaults it).
    pub fn replicas(&self) -> i32 {
        match self {
            TargetObject::Deployment(d) => d.spec.as_ref().and_then(|s| s.replicas),
            TargetObject::StatefulSet(s) => s.spec.as_ref().and_then(|s| s.replicas),
        }
        .unwrap_or(1)
    }

    pub fn status(&self) -> WorkloadStatus {
        match self {
            TargetObject::Deployment(d) => WorkloadStatus::from(d),
            TargetObject::StatefulSet(s) => WorkloadStatus::from(s),
        }
    }

    /// The pods' labels as a Service selector, or why the target's selector is more than
    /// a Service can express.
    pub fn selector(&self) -> Result<BTreeMap<String, String>, String> {
        let selector = match self {
            TargetObject::Deployment(d) => d.spec.as_ref().map(|s| &s.selector),
            TargetObject::StatefulSet(s) => s.spec.as_ref().map(|s| &s.selector),
        };
        service_selector(selector).map_err(|why| {
            format!(
                "{} {} {why}; a Service selector (and so zeroscale) needs labels that equal \
                 values (matchLabels)",
                self.kind(),
                self.name()
            )
        })
    }
}

/// A label selector as a Service selector (label = value terms): `matchLabels`, plus any
/// `matchExpressions` of the form `key In [value]`.
pub fn service_selector(
    selector: Option<&LabelSelector>,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = selector
        .and_then(|s| s.match_labels.clone())
        .unwrap_or_default();
    for e in selector
        .and_then(|s| s.match_expressions.as_ref())
        .into_iter()
        .flatten()
    {
        match (e.operator.as_str(), e.values.as_deref()) {
            ("In", Some([value])) if out.get(&e.key).is_none_or(|v| v == value) => {
                out.insert(e.key.clone(), value.clone());
            }
            _ => {
                return Err(format!(
                    "selects its pods with the expression `{} {}{}`",
                    e.key,
                    e.operator,
                    e.values
                        .as_ref()
                        .map(|v| format!(" [{}]", v.join(", ")))
                        .unwrap_or_default()
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("has an empty selector".into());
    }
    Ok(out)
}

/// A selector in `kubectl get pods -l` form: `a=b,c=d`.
pub fn selector_string(selector: &BTreeMap<String, String>) -> String {
    let terms: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
    terms.join(",")
}

/// What a Function remembers of the target it holds, on its private Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub kind: String,
    pub name: String,
    /// The target's uid: a target deleted and created again is a new target.
    pub uid: String,
    /// `spec.replicas` when the Function took the target: what it gets back.
    pub original_replicas: i32,
    /// When the Function took the target (RFC 3339, seconds): a `replicas` write by
    /// another manager after this is a fight with the autoscaler.
    pub claimed_at: String,
}

impl Record {
    /// A fresh record of `target` taken now.
    pub fn take(target: &TargetObject, now: jiff::Timestamp) -> Self {
        Self {
            kind: target.kind().to_string(),
            name: target.name(),
            uid: target.uid(),
            original_replicas: target.replicas(),
            claimed_at: now.round(jiff::Unit::Second).unwrap_or(now).to_string(),
        }
    }

    /// The record on a private Service, if any.
    pub fn of(service: &Service) -> Option<Self> {
        let text = service.annotations().get(RECORD_ANNOTATION)?;
        serde_json::from_str(text).ok()
    }

    pub fn to_annotation(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Whether this records `target` (same kind, name and uid).
    pub fn is_of(&self, target: &TargetObject) -> bool {
        self.kind == target.kind().as_str()
            && self.name == target.name()
            && self.uid == target.uid()
    }

    /// The target recorded, if its kind is one zeroscale knows.
    pub fn target(&self) -> Option<ScaleTarget> {
        Some(ScaleTarget {
            kind: TargetKind::parse(&self.kind)?,
            name: self.name.clone(),
        })
    }

    fn claimed_at(&self) -> Option<jiff::Timestamp> {
        self.claimed_at.parse().ok()
    }
}

/// Whether a Function may hold its target, and if not why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// It holds (or now takes) the target.
    Hold,
    /// It may not: reason for the `Active` condition, and a message.
    Refused {
        reason: &'static str,
        message: String,
    },
}

/// Decides whether `me` holds `target` (pure).
///
/// - `found`: the target as read (`None`: it does not exist);
/// - `claimants`: every Function that names the same target, `me` included;
/// - `holders`: the other Functions whose record says they hold it now.
pub fn decide_claim(
    me: &Function,
    target: &ScaleTarget,
    found: Option<&TargetObject>,
    claimants: &[&Function],
    holders: &[FunctionKey],
) -> Claim {
    let Some(found) = found else {
        return Claim::Refused {
            reason: REASON_TARGET_NOT_FOUND,
            message: format!(
                "{target} does not exist in namespace {}; the Function serves once it does",
                me.key().namespace
            ),
        };
    };
    if let Err(why) = found.selector() {
        return Claim::Refused {
            reason: REASON_TARGET_SELECTOR_UNSUPPORTED,
            message: why,
        };
    }
    let oldest = claimants
        .iter()
        .filter(|f| f.metadata.deletion_timestamp.is_none())
        .min_by(|a, b| age_order(a, b));
    if let Some(owner) = oldest.filter(|o| o.key() != me.key()) {
        return Claim::Refused {
            reason: REASON_TARGET_CONFLICT,
            message: format!(
                "{target} is scaled by Function {}, which is older; a workload has one Function",
                owner.key()
            ),
        };
    }
    if let Some(holder) = holders.iter().find(|h| **h != me.key()) {
        return Claim::Refused {
            reason: REASON_TARGET_CONFLICT,
            message: format!(
                "{target} is still held by Function {holder}; this Function takes it once that \
                 one has given it back"
            ),
        };
    }
    Claim::Hold
}

/// Oldest first; the name breaks ties (creation timestamps have one-second precision).
fn age_order(a: &Function, b: &Function) -> std::cmp::Ordering {
    let t = |f: &Function| f.metadata.creation_timestamp.as_ref().map(|t| t.0);
    match (t(a), t(b)) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => std::cmp::Ordering::Equal,
    }
    .then_with(|| a.key().cmp(&b.key()))
}

/// Who else wrote the target's `spec.replicas` after the Function took it: the field
/// manager and when, from the target's managed fields. `None` when only zeroscale did,
/// or the owner wrote before the claim (the manifest the target was created from).
pub fn replicas_overridden(target: &ObjectMeta, record: &Record) -> Option<(String, String)> {
    let claimed = record.claimed_at()?;
    target
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| {
            e.fields_v1
                .as_ref()
                .and_then(|f| f.0.get("f:spec"))
                .and_then(|s| s.get("f:replicas"))
                .is_some()
        })
        .filter(|e| !OWN_MANAGERS.contains(&e.manager.as_deref().unwrap_or_default()))
        .filter_map(|e| Some((e.manager.clone()?, e.time.as_ref()?.0)))
        .filter(|(_, time)| *time > claimed)
        .max_by_key(|(_, time)| *time)
        .map(|(manager, time)| (manager, time.to_string()))
}

/// A target by kind, namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetKey {
    pub kind: TargetKind,
    pub namespace: String,
    pub name: String,
}

impl TargetKey {
    /// The target `function` names, if it names one of a known kind.
    pub fn of(function: &Function) -> Option<Self> {
        let (kind, name) = function.scale_target()?;
        Some(Self {
            kind,
            namespace: function.key().namespace,
            name: name.to_string(),
        })
    }
}

#[derive(Default)]
struct IndexState {
    by_function: HashMap<ObjectRef<Function>, TargetKey>,
    by_target: HashMap<TargetKey, HashSet<ObjectRef<Function>>>,
    /// Entries of a re-list in progress.
    relist: Option<HashMap<ObjectRef<Function>, TargetKey>>,
}

impl IndexState {
    fn rebuild(&mut self, by_function: HashMap<ObjectRef<Function>, TargetKey>) {
        self.by_target.clear();
        for (f, t) in &by_function {
            self.by_target
                .entry(t.clone())
                .or_default()
                .insert(f.clone());
        }
        self.by_function = by_function;
    }

    fn remove(&mut self, f: &ObjectRef<Function>) -> Option<TargetKey> {
        let old = self.by_function.remove(f)?;
        if let Some(set) = self.by_target.get_mut(&old) {
            set.remove(f);
            if set.is_empty() {
                self.by_target.remove(&old);
            }
        }
        Some(old)
    }

    fn others(&self, target: &TargetKey, me: &ObjectRef<Function>) -> Vec<ObjectRef<Function>> {
        let mut others: Vec<ObjectRef<Function>> = self
            .by_target
            .get(target)
            .into_iter()
            .flatten()
            .filter(|f| *f != me)
            .cloned()
            .collect();
        sort_refs(&mut others);
        others
    }
}

fn sort_refs(refs: &mut [ObjectRef<Function>]) {
    refs.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
}

/// Which Functions name which target, kept from the Function watch: the reconciler asks
/// it for the other claimants of a target, and target watch events are mapped through
/// it to the Functions to reconcile. It also tells when the first target of a kind
/// appears, so a cluster without such Functions watches no Deployments or StatefulSets
/// beyond zeroscale's own.
#[derive(Clone)]
pub struct TargetIndex {
    state: Arc<RwLock<IndexState>>,
    wanted: Arc<[watch::Sender<bool>; 2]>,
}

impl Default for TargetIndex {
    fn default() -> Self {
        Self {
            state: Arc::default(),
            wanted: Arc::new([watch::Sender::new(false), watch::Sender::new(false)]),
        }
    }
}

fn kind_slot(kind: TargetKind) -> usize {
    match kind {
        TargetKind::Deployment => 0,
        TargetKind::StatefulSet => 1,
    }
}

impl TargetIndex {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, IndexState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, IndexState> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn note(&self, target: &TargetKey) {
        self.wanted[kind_slot(target.kind)].send_if_modified(|w| !std::mem::replace(w, true));
    }

    /// Follows one event of the Function watch; returns the other Functions that named
    /// (or now name) the same targets, which must re-check their claims.
    pub fn handle(&self, event: &watcher::Event<Function>) -> Vec<ObjectRef<Function>> {
        let mut state = self.write();
        match event {
            watcher::Event::Init => {
                state.relist = Some(HashMap::new());
                Vec::new()
            }
            watcher::Event::InitApply(f) => {
                if let Some(t) = TargetKey::of(f) {
                    self.note(&t);
                    state
                        .relist
                        .get_or_insert_with(HashMap::new)
                        .insert(ObjectRef::from_obj(f), t);
                }
                Vec::new()
            }
            watcher::Event::InitDone => {
                let fresh = state.relist.take().unwrap_or_default();
                state.rebuild(fresh);
                Vec::new()
            }
            watcher::Event::Apply(f) => {
                let me = ObjectRef::from_obj(f);
                let old = state.remove(&me);
                let new = TargetKey::of(f);
                let mut recheck = Vec::new();
                for t in old.iter().chain(new.iter()) {
                    recheck.extend(state.others(t, &me));
                }
                if let Some(t) = new {
                    self.note(&t);
                    state
                        .by_target
                        .entry(t.clone())
                        .or_default()
                        .insert(me.clone());
                    state.by_function.insert(me, t);
                }
                sort_refs(&mut recheck);
                recheck.dedup();
                recheck
            }
            watcher::Event::Delete(f) => {
                let me = ObjectRef::from_obj(f);
                match state.remove(&me) {
                    Some(t) => state.others(&t, &me),
                    None => Vec::new(),
                }
            }
        }
    }

    /// The Functions naming `target`.
    pub fn functions(&self, target: &TargetKey) -> Vec<ObjectRef<Function>> {
        let mut refs: Vec<ObjectRef<Function>> = self
            .read()
            .by_target
            .get(target)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default();
        sort_refs(&mut refs);
        refs
    }

    /// Resolves once a Function names a target of `kind`.
    pub async fn wanted(&self, kind: TargetKind) {
        let mut rx = self.wanted[kind_slot(kind)].subscribe();
        let _ = rx.wait_for(|w| *w).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
        FieldsV1, LabelSelectorRequirement, ManagedFieldsEntry, Time,
    };

    fn function(name: &str, created: i64, target: &str) -> Function {
        let mut f: Function = serde_json::from_value(serde_json::json!({
            "apiVersion": "zeroscale.dev/v1alpha1", "kind": "Function",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": target}, "port": 8080}
        }))
        .unwrap();
        f.metadata.creation_timestamp = Some(Time(jiff::Timestamp::from_second(created).unwrap()));
        f
    }

    fn deployment(selector: serde_json::Value) -> TargetObject {
        TargetObject::Deployment(
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
                "spec": {"replicas": 3, "selector": selector,
                         "template": {"metadata": {"labels": {"app": "web"}}}}
            }))
            .unwrap(),
        )
    }

    fn web() -> ScaleTarget {
        ScaleTarget {
            kind: TargetKind::Deployment,
            name: "web".into(),
        }
    }

    #[test]
    fn only_what_a_service_selector_can_say_is_accepted() {
        let ok = deployment(serde_json::json!({"matchLabels": {"app": "web"}}));
        assert_eq!(
            ok.selector().unwrap(),
            BTreeMap::from([("app".to_string(), "web".to_string())])
        );
        let single_in = deployment(serde_json::json!({"matchExpressions": [
            {"key": "app", "operator": "In", "values": ["web"]}]}));
        assert_eq!(selector_string(&single_in.selector().unwrap()), "app=web");
        for bad in [
            serde_json::json!({"matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a", "b"]}]}),
            serde_json::json!({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}),
            serde_json::json!({"matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "app", "operator": "In", "values": ["other"]}]}),
            serde_json::json!({}),
        ] {
            let why = deployment(bad.clone()).selector().unwrap_err();
            assert!(why.starts_with("Deployment web "), "{why}");
            assert!(why.contains("matchLabels"), "{why}");
        }
        let _ = LabelSelectorRequirement::default();
    }

    #[test]
    fn the_oldest_claimant_holds_and_waits_for_the_previous_holder() {
        let old = function("old", 100, "web");
        let young = function("young", 200, "web");
        let target = deployment(serde_json::json!({"matchLabels": {"app": "web"}}));
        let both = [&old, &young];
        assert_eq!(
            decide_claim(&old, &web(), Some(&target), &both, &[]),
            Claim::Hold
        );
        match decide_claim(&young, &web(), Some(&target), &both, &[old.key()]) {
            Claim::Refused { reason, message } => {
                assert_eq!(reason, REASON_TARGET_CONFLICT);
                assert!(message.contains("default/old"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        // The older one came later: it waits until the younger gave the target back.
        match decide_claim(&old, &web(), Some(&target), &both, &[young.key()]) {
            Claim::Refused { reason, message } => {
                assert_eq!(reason, REASON_TARGET_CONFLICT);
                assert!(message.contains("still held by Function default/young"));
            }
            other => panic!("{other:?}"),
        }
        // A Function being deleted no longer claims.
        let mut leaving = function("old", 100, "web");
        leaving.metadata.deletion_timestamp = Some(Time(jiff::Timestamp::now()));
        assert_eq!(
            decide_claim(&young, &web(), Some(&target), &[&leaving, &young], &[]),
            Claim::Hold
        );
        match decide_claim(&old, &web(), None, &both, &[]) {
            Claim::Refused { reason, .. } => assert_eq!(reason, REASON_TARGET_NOT_FOUND),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_replicas_write_by_another_manager_after_the_claim_is_a_fight() {
        let entry = |manager: &str, second: i64| ManagedFieldsEntry {
            manager: Some(manager.into()),
            operation: Some("Update".into()),
            time: Some(Time(jiff::Timestamp::from_second(second).unwrap())),
            fields_v1: Some(FieldsV1(serde_json::json!({"f:spec": {"f:replicas": {}}}))),
            ..Default::default()
        };
        let record = Record {
            kind: "Deployment".into(),
            name: "web".into(),
            uid: "u1".into(),
            original_replicas: 3,
            claimed_at: jiff::Timestamp::from_second(1000).unwrap().to_string(),
        };
        let meta = |entries: Vec<ManagedFieldsEntry>| ObjectMeta {
            managed_fields: Some(entries),
            ..ObjectMeta::default()
        };
        // The manifest the Deployment was created from, before the claim: no fight.
        assert_eq!(
            replicas_overridden(
                &meta(vec![entry("kubectl-client-side-apply", 900)]),
                &record
            ),
            None
        );
        assert_eq!(
            replicas_overridden(&meta(vec![entry("zeroscale-autoscaler", 1100)]), &record),
            None
        );
        let (manager, _) = replicas_overridden(
            &meta(vec![
                entry("zeroscale-autoscaler", 1100),
                entry("argocd-controller", 1200),
            ]),
            &record,
        )
        .unwrap();
        assert_eq!(manager, "argocd-controller");
    }

    #[test]
    fn a_record_round_trips_through_its_annotation() {
        let target = deployment(serde_json::json!({"matchLabels": {"app": "web"}}));
        let r = Record::take(&target, jiff::Timestamp::from_second(1000).unwrap());
        assert_eq!(r.original_replicas, 3);
        assert!(r.is_of(&target));
        let mut svc = Service::default();
        svc.metadata.annotations = Some(BTreeMap::from([(
            RECORD_ANNOTATION.to_string(),
            r.to_annotation(),
        )]));
        assert_eq!(Record::of(&svc), Some(r));
    }

    #[test]
    fn the_index_follows_functions_and_names_the_other_claimants() {
        let index = TargetIndex::default();
        let a = function("a", 1, "web");
        let b = function("b", 2, "web");
        let c = function("c", 3, "api");
        index.handle(&watcher::Event::Init);
        for f in [&a, &b, &c] {
            index.handle(&watcher::Event::InitApply(f.clone()));
        }
        index.handle(&watcher::Event::InitDone);
        let web_key = TargetKey::of(&a).unwrap();
        assert_eq!(index.functions(&web_key).len(), 2);
        // b moves to api: a (web) and c (api) re-check.
        let moved = function("b", 2, "api");
        let recheck: Vec<String> = index
            .handle(&watcher::Event::Apply(moved.clone()))
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(recheck, vec!["a", "c"]);
        assert_eq!(index.functions(&web_key).len(), 1);
        let deleted: Vec<String> = index
            .handle(&watcher::Event::Delete(moved))
            .into_iter()
            .map(|r| r.name)
            .collect();
        assert_eq!(deleted, vec!["c"]);
    }
}
