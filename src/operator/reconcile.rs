//! The reconcile pipeline for one Function: read (caches) -> validate (pure) -> build
//! (pure) -> apply (server-side apply, only what differs) -> status (server-side apply
//! of the operator's status fields). A steady state makes no API calls at all: desired
//! objects are compared with the watch caches on every field the operator sets, plus a
//! hash of what it last applied so that a field removed from the spec is noticed too.
//!
//! A Function with a `scaleTargetRef` ([`super::target`]) also GETs its target on each
//! reconcile (the target is not in any cache: a metadata watch only says when it
//! changed), lists the target's pods while some replica is not ready (and re-checks
//! every few seconds then, the pods having no watch), and keeps a finalizer while it
//! holds the target.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, watch};
use tracing::{debug, info, instrument, warn};

use super::Error;
use super::build::{
    self, ActivatorEndpoints, BuildError, Desired, FIELD_MANAGER, Replicas, Routing, SERVICE_LABEL,
    activator_slice_name, private_service_name,
};
use super::cache::{Pack, PackedStore};
use super::metrics::Metrics;
use super::status::{self, Blocker, Unrunnable, WorkloadStatus};
use super::target::{self, Claim, FINALIZER, Record, TargetIndex, TargetKey, TargetObject};
use crate::api::config::ScaleTarget;
use crate::api::{
    CONDITION_READY, Defaults, FUNCTION_LABEL, Function, FunctionConfig, FunctionKey, TargetKind,
};

/// How long a reconciled Function waits before a periodic re-check (watches trigger
/// every real change; this only bounds the effect of a missed event).
const RESYNC: Duration = Duration::from_secs(10 * 60);
/// How long a reconcile waits for the caches to be listed after start-up.
const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a Function re-reads its target's pods while some replica is not ready
/// (startup failures come from the pods, which have no watch for a target).
const TARGET_POLL: Duration = Duration::from_secs(5);
/// How long a deleted Function waits after restoring its target's replicas before it lets
/// go: long enough for every autoscaler and activator to have seen the deletion, so none
/// overrides the restored count.
const SCALE_BACK_SETTLE: Duration = Duration::from_secs(3);

/// The reconciler's settings (parsed once from flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_domain: String,
    pub defaults: Defaults,
}

/// The caches the reconciler reads instead of the API server; the objects a Function
/// owns are kept packed (see `cache`).
#[derive(Clone)]
pub struct Stores {
    pub functions: Store<Function>,
    pub deployments: PackedStore<Deployment>,
    pub services: PackedStore<Service>,
    pub slices: PackedStore<EndpointSlice>,
    pub pods: Store<Pod>,
}

/// Spaces out writes of the activator EndpointSlices so an activator rollout, which
/// changes every Function's slice, does not flood the API server.
pub struct RateLimiter {
    interval: Mutex<tokio::time::Interval>,
}

impl RateLimiter {
    /// At most `per_second` acquisitions per second (at least one).
    pub fn new(per_second: u32) -> Self {
        let period = Duration::from_secs(1) / per_second.max(1);
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            interval: Mutex::new(interval),
        }
    }

    /// Waits for the next slot.
    pub async fn acquire(&self) {
        self.interval.lock().await.tick().await;
    }
}

/// Everything a reconcile needs.
pub struct Context {
    pub client: kube::Client,
    pub settings: Settings,
    pub stores: Stores,
    /// The ready activator pods; `None` until their slices have been listed once.
    pub activators: watch::Receiver<Option<ActivatorEndpoints>>,
    pub events: super::events::Events,
    pub metrics: Metrics,
    pub slice_limiter: RateLimiter,
    pub failures: Failures,
    /// Which Functions name which target (from the Function watch).
    pub targets: TargetIndex,
    /// The last replicas fight reported per Function, so it is reported once.
    pub fights: std::sync::Mutex<std::collections::HashMap<FunctionKey, String>>,
}

/// What the apply step changed, for Events.
#[derive(Debug, Default)]
struct Changes {
    created: Vec<String>,
    updated: Vec<String>,
}

/// Reconciles one Function.
#[instrument(skip(function, ctx), fields(function = %function.key()))]
pub async fn reconcile(function: Arc<Function>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_duration.start_timer();
    ctx.metrics.reconciles.inc();
    if function.metadata.deletion_timestamp.is_some() {
        ctx.failures.clear(&function.key());
        if let Ok(mut f) = ctx.fights.lock() {
            f.remove(&function.key());
        }
        if !has_finalizer(&function) {
            // The garbage collector removes what the Function owns.
            return Ok(Action::await_change());
        }
        // It holds a target: give it back first (the GC follows the finalizer). The record
        // is read from the cache: never decide "nothing to give back" before it is listed.
        caches_synced(&ctx.stores).await?;
        return scale_back(&function, &ctx).await;
    }
    let result = reconcile_inner(&function, &ctx).await;
    match &result {
        Ok(_) => ctx.failures.clear(&function.key()),
        Err(e) => ctx
            .metrics
            .reconcile_errors
            .with_label_values(&[e.metric_label()])
            .inc(),
    }
    result
}

/// Consecutive failures per Function, for the error backoff.
#[derive(Default)]
pub struct Failures(std::sync::Mutex<std::collections::HashMap<FunctionKey, u32>>);

impl Failures {
    /// Counts a failure; returns how many in a row (1 for the first).
    fn record(&self, key: &FunctionKey) -> u32 {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.clone()).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    fn clear(&self, key: &FunctionKey) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).remove(key);
    }
}

/// The delay before retry `n` (1-based): 5s doubling to 5 minutes, with up to 20%
/// jitter so Functions that failed together do not retry together.
pub fn backoff(n: u32) -> Duration {
    let base = Duration::from_secs(5).saturating_mul(1 << n.saturating_sub(1).min(6));
    let capped = base.min(Duration::from_secs(300));
    capped.mul_f64(1.0 + rand::random::<f64>() * 0.2)
}

/// Requeues a failed reconcile with a backoff that grows with repeated failures (a
/// write conflict is retried at once: someone changed the object meanwhile).
pub fn error_policy(function: Arc<Function>, error: &Error, ctx: Arc<Context>) -> Action {
    warn!(function = %function.key(), error = %error, "reconcile failed");
    if let Error::Conflict { .. } = error {
        return Action::requeue(Duration::from_secs(1));
    }
    Action::requeue(backoff(ctx.failures.record(&function.key())))
}

/// Waits (bounded) until every cache has been listed once, so a reconcile right after
/// start-up never mistakes "not loaded yet" for "absent" (which would flip statuses).
async fn caches_synced(stores: &Stores) -> Result<(), Error> {
    let all = async {
        stores.functions.wait_until_ready().await?;
        stores.deployments.wait_until_ready().await;
        stores.services.wait_until_ready().await;
        stores.slices.wait_until_ready().await;
        stores.pods.wait_until_ready().await
    };
    match tokio::time::timeout(CACHE_SYNC_TIMEOUT, all).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) | Err(_) => Err(Error::NotSynced),
    }
}

async fn reconcile_inner(function: &Function, ctx: &Context) -> Result<Action, Error> {
    caches_synced(&ctx.stores).await?;
    let namespace = function
        .namespace()
        .ok_or(Error::Build(BuildError::NotStored))?;
    let name = function.name_any();
    let mut blockers = Vec::new();
    let mut invalid_template = None;

    // --- validate (pure)
    let mut config = match FunctionConfig::resolve(&function.spec, &ctx.settings.defaults) {
        Ok(c) => Some(c),
        Err(errors) => {
            if errors.mentions("spec.template") {
                invalid_template = Some(errors.to_string());
            }
            blockers.push(Blocker::InvalidSpec(errors.to_string()));
            None
        }
    };
    if let Some(problem) = build::check_name(&name) {
        blockers.push(Blocker::InvalidSpec(problem));
        config = None;
    }
    if let Some(target) = config.as_ref().and_then(|c| c.target()).cloned()
        && let Some(config) = config.as_ref()
    {
        return reconcile_target(function, ctx, config, &target).await;
    }

    // --- read (caches, with a GET where an object of that name may not be ours)
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), &namespace);
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let live_deployment = live(
        &ctx.stores.deployments,
        &deployments,
        function,
        &namespace,
        &name,
    )
    .await?;
    let live_private = live(
        &ctx.stores.services,
        &services,
        function,
        &namespace,
        &private_service_name(&name),
    )
    .await?;
    let live_public = live(&ctx.stores.services, &services, function, &namespace, &name).await?;
    let live_slice = live(
        &ctx.stores.slices,
        &slices,
        function,
        &namespace,
        &activator_slice_name(&name),
    )
    .await?;
    for (kind, object_name, l) in [
        ("Deployment", name.clone(), live_deployment.foreign()),
        (
            "Service",
            private_service_name(&name),
            live_private.foreign(),
        ),
        ("Service", name.clone(), live_public.foreign()),
        (
            "EndpointSlice",
            activator_slice_name(&name),
            live_slice.foreign(),
        ),
    ] {
        if l {
            blockers.push(Blocker::AlreadyExists(format!(
                "{kind} {namespace}/{object_name} exists and is not owned by this Function; \
                 delete or rename it"
            )));
        }
    }

    let activators = ctx.activators.borrow().clone();
    let mut deployment = live_deployment.ours().cloned();
    let mut changes = Changes::default();

    // --- build (pure) and apply
    if let (Some(config), true) = (&config, blockers.is_empty()) {
        // It scaled a target before it had a template: the target gets its replicas
        // back, and the apply below drops the record.
        if let Some(record) = live_private.ours().and_then(Record::of) {
            release(ctx, &namespace, &record).await?;
        }
        let replicas = Replicas::decide(deployment.as_ref(), config.scale.min);
        let desired = build::build(function, config, replicas, activators.as_ref())?;
        match apply_all(
            ctx,
            &desired,
            replicas,
            &Live {
                deployment: deployment.as_ref(),
                private: live_private.ours(),
                public: live_public.ours(),
                slice: live_slice.ours(),
            },
            (&deployments, &services, &slices),
            &mut changes,
        )
        .await
        {
            Ok(applied) => {
                if applied.is_some() {
                    deployment = applied;
                }
                // A target it scaled before it had a template is given back: nothing
                // left for the finalizer to guard.
                if has_finalizer(function) {
                    remove_finalizer(ctx, function).await?;
                }
            }
            Err(Error::Apply { source, kind, .. }) if is_invalid(&source) => {
                let message = format!(
                    "the API server refused the {kind}: {}",
                    api_message(&source)
                );
                invalid_template = Some(message.clone());
                blockers.push(Blocker::InvalidSpec(message));
            }
            // A conflict is routine (someone scaled meanwhile) and retried at once.
            Err(e @ Error::Conflict { .. }) => return Err(e),
            Err(e) => {
                publish(
                    ctx,
                    function,
                    EventType::Warning,
                    "ReconcileFailed",
                    e.to_string(),
                )
                .await;
                return Err(e);
            }
        }
    }

    // --- status
    if let Some(conflicts) = build_host_conflicts(function, ctx) {
        blockers.push(Blocker::HostConflict(conflicts));
    }
    if activators.as_ref().is_some_and(|a| a.endpoints.is_empty()) {
        blockers.push(Blocker::NoActivator);
    }
    let pods: Vec<Arc<Pod>> = ctx
        .stores
        .pods
        .state()
        .into_iter()
        .filter(|p| {
            p.metadata.namespace.as_deref() == Some(namespace.as_str())
                && p.labels().get(FUNCTION_LABEL) == Some(&name)
        })
        .collect();
    let pod_refs: Vec<&Pod> = pods.iter().map(|p| p.as_ref()).collect();
    let workload = deployment.as_ref().map(WorkloadStatus::from);
    let unrunnable = invalid_template
        .as_deref()
        .map(|m| Unrunnable::new("InvalidTemplate", m));
    let active = status::active(workload.as_ref(), &pod_refs, unrunnable.as_ref());
    if active.status
        && let Some(failure) = status::startup_failure(workload.as_ref(), &pod_refs)
    {
        blockers.push(Blocker::RolloutFailing(failure));
    }
    let ready = status::ready(&blockers, &active);
    let want = status::operator_status(
        function,
        &ctx.settings.cluster_domain,
        workload.as_ref(),
        // Only a valid template Function serves from its own pods.
        config.as_ref().map(|_| format!("{FUNCTION_LABEL}={name}")),
        &ready,
        &active,
        Time(jiff::Timestamp::now()),
    );
    finish(ctx, function, &want, &ready, &changes).await?;
    if blockers
        .iter()
        .any(|b| matches!(b, Blocker::InvalidSpec(_)))
        && invalid_template.is_some()
        && config.is_some()
    {
        // Refused by the API server: may depend on cluster state (admission, quota).
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    Ok(Action::requeue(RESYNC))
}

/// Writes the status when it changed, and the Events of a reconcile.
async fn finish(
    ctx: &Context,
    function: &Function,
    want: &status::OperatorStatus,
    ready: &status::Want,
    changes: &Changes,
) -> Result<(), Error> {
    let key = function.key();
    if !status::status_up_to_date(function, want) {
        write_status(ctx, &key.namespace, &key.name, want).await?;
        let was = function.condition(CONDITION_READY);
        let changed = was.is_none_or(|c| c.reason != ready.reason || c.message != ready.message);
        if !ready.status && changed {
            publish(
                ctx,
                function,
                EventType::Warning,
                &ready.reason,
                ready.message.clone(),
            )
            .await;
        }
    }
    if !changes.created.is_empty() {
        let note = format!("created {}", changes.created.join(", "));
        info!(%note);
        publish(ctx, function, EventType::Normal, "Created", note).await;
    }
    if !changes.updated.is_empty() {
        let note = format!("updated {}", changes.updated.join(", "));
        info!(%note);
        publish(ctx, function, EventType::Normal, "Updated", note).await;
    }
    Ok(())
}

/// Reconciles a Function with a `scaleTargetRef`: claims (or gives back) the target,
/// applies the routing objects, and reports the target's state (see `target`).
async fn reconcile_target(
    function: &Function,
    ctx: &Context,
    config: &FunctionConfig,
    target: &ScaleTarget,
) -> Result<Action, Error> {
    let key = function.key();
    let (namespace, name) = (key.namespace.clone(), key.name.clone());
    let mut blockers = Vec::new();
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), &namespace);
    let slices: Api<EndpointSlice> = Api::namespaced(ctx.client.clone(), &namespace);
    let live_private = live(
        &ctx.stores.services,
        &services,
        function,
        &namespace,
        &private_service_name(&name),
    )
    .await?;
    let live_public = live(&ctx.stores.services, &services, function, &namespace, &name).await?;
    let live_slice = live(
        &ctx.stores.slices,
        &slices,
        function,
        &namespace,
        &activator_slice_name(&name),
    )
    .await?;
    for (kind, object_name, l) in [
        (
            "Service",
            private_service_name(&name),
            live_private.foreign(),
        ),
        ("Service", name.clone(), live_public.foreign()),
        (
            "EndpointSlice",
            activator_slice_name(&name),
            live_slice.foreign(),
        ),
    ] {
        if l {
            blockers.push(Blocker::AlreadyExists(format!(
                "{kind} {namespace}/{object_name} exists and is not owned by this Function; \
                 delete or rename it"
            )));
        }
    }
    let found = read_target(ctx, &namespace, target).await?;
    let record = live_private.ours().and_then(Record::of);

    // --- claim, and give back what is held but no longer wanted
    let target_key = TargetKey {
        kind: target.kind,
        namespace: namespace.clone(),
        name: target.name.clone(),
    };
    let claim = if blockers.is_empty() {
        let claimants = claimants(ctx, function, &target_key);
        let claimant_refs: Vec<&Function> = claimants.iter().map(|f| f.as_ref()).collect();
        let holders = holders(ctx, function, &target_key);
        Some(target::decide_claim(
            function,
            target,
            found.as_ref(),
            &claimant_refs,
            &holders,
        ))
    } else {
        None
    };
    let holding = match (&claim, &found) {
        (Some(Claim::Hold), Some(t)) => Some(t),
        _ => None,
    };
    if let Some(r) = &record
        && claim.is_some()
        && !holding.is_some_and(|t| r.is_of(t))
    {
        release(ctx, &namespace, r).await?;
    }
    let hold = match holding {
        Some(t) => {
            add_finalizer(ctx, function).await?;
            let kept = record.clone().filter(|r| r.is_of(t));
            let record = kept.unwrap_or_else(|| Record::take(t, jiff::Timestamp::now()));
            let selector = t.selector().unwrap_or_default();
            Some((selector, record))
        }
        None => None,
    };

    // --- build (pure) and apply
    let activators = ctx.activators.borrow().clone();
    let mut changes = Changes::default();
    if claim.is_some() {
        scale_down_own_deployment(ctx, function, &namespace, &name).await?;
        let desired = build::build_target(
            function,
            config,
            hold.as_ref().map(|(s, r)| (s, r)),
            activators.as_ref(),
        )?;
        let live = Live {
            deployment: None,
            private: live_private.ours(),
            public: live_public.ours(),
            slice: live_slice.ours(),
        };
        if let Err(e) =
            apply_routing(ctx, &desired, &live, (&services, &slices), &mut changes).await
        {
            if !matches!(e, Error::Conflict { .. }) {
                publish(
                    ctx,
                    function,
                    EventType::Warning,
                    "ReconcileFailed",
                    e.to_string(),
                )
                .await;
            }
            return Err(e);
        }
        if hold.is_none() && has_finalizer(function) {
            remove_finalizer(ctx, function).await?;
        }
    }

    // --- status
    if let Some(conflicts) = build_host_conflicts(function, ctx) {
        blockers.push(Blocker::HostConflict(conflicts));
    }
    if activators.as_ref().is_some_and(|a| a.endpoints.is_empty()) {
        blockers.push(Blocker::NoActivator);
    }
    let workload = holding.map(TargetObject::status);
    let pods = match (&hold, &workload) {
        (Some((selector, _)), Some(w)) if !w.settled() => {
            target_pods(ctx, &namespace, &target::selector_string(selector)).await?
        }
        _ => Vec::new(),
    };
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    let unrunnable = match &claim {
        Some(Claim::Refused { reason, message }) => Some(Unrunnable::new(reason, message.clone())),
        _ => None,
    };
    let active = status::active(workload.as_ref(), &pod_refs, unrunnable.as_ref());
    if active.status
        && let Some(failure) = status::startup_failure(workload.as_ref(), &pod_refs)
    {
        blockers.push(Blocker::RolloutFailing(failure));
    }
    let ready = status::ready(&blockers, &active);
    let want = status::operator_status(
        function,
        &ctx.settings.cluster_domain,
        workload.as_ref(),
        hold.as_ref().map(|(s, _)| target::selector_string(s)),
        &ready,
        &active,
        Time(jiff::Timestamp::now()),
    );
    finish(ctx, function, &want, &ready, &changes).await?;
    if let (Some(t), Some((_, record))) = (holding, &hold) {
        report_fight(ctx, function, t, record).await;
    }
    let waiting = matches!(&claim, Some(Claim::Refused { reason, .. })
        if *reason == crate::api::REASON_TARGET_CONFLICT);
    if workload.as_ref().is_some_and(|w| !w.settled()) || waiting {
        return Ok(Action::requeue(TARGET_POLL));
    }
    Ok(Action::requeue(RESYNC))
}

/// The Functions naming `target` with a valid spec (one that never could hold it does
/// not keep it from the others), from the cache, and `function` itself (which the cache
/// may not hold yet).
fn claimants(ctx: &Context, function: &Function, target: &TargetKey) -> Vec<Arc<Function>> {
    let mut all: Vec<Arc<Function>> = ctx
        .targets
        .functions(target)
        .iter()
        .filter_map(|r| ctx.stores.functions.get(r))
        .filter(|f| f.key() != function.key())
        .filter(|f| {
            FunctionConfig::resolve(&f.spec, &ctx.settings.defaults).is_ok()
                && build::check_name(&f.name_any()).is_none()
        })
        .collect();
    all.push(Arc::new(function.clone()));
    all
}

/// The other Functions whose private Service records that they hold `target`, and which
/// have not let go of it yet (a deleted Function that removed its finalizer has).
fn holders(ctx: &Context, function: &Function, target: &TargetKey) -> Vec<FunctionKey> {
    ctx.stores
        .services
        .in_namespace(&target.namespace)
        .iter()
        .filter_map(|s| s.unpack().ok())
        .filter(|s| s.labels().get(SERVICE_LABEL).map(String::as_str) == Some("private"))
        .filter_map(|s| {
            let record = Record::of(&s)?;
            let holder = s.labels().get(FUNCTION_LABEL)?;
            (record.kind == target.kind.as_str()
                && record.name == target.name
                && *holder != function.key().name)
                .then(|| FunctionKey::new(&target.namespace, holder))
        })
        .filter(|holder| {
            let f = ctx
                .stores
                .functions
                .get(&ObjectRef::new(&holder.name).within(&holder.namespace));
            f.is_some_and(|f| f.metadata.deletion_timestamp.is_none() || has_finalizer(&f))
        })
        .collect()
}

/// GETs the target (`None` when it does not exist).
async fn read_target(
    ctx: &Context,
    namespace: &str,
    target: &ScaleTarget,
) -> Result<Option<TargetObject>, Error> {
    let read_error = |source| Error::Read {
        kind: target.kind.to_string(),
        name: target.name.clone(),
        source,
    };
    Ok(match target.kind {
        TargetKind::Deployment => Api::<Deployment>::namespaced(ctx.client.clone(), namespace)
            .get_opt(&target.name)
            .await
            .map_err(read_error)?
            .map(TargetObject::Deployment),
        TargetKind::StatefulSet => Api::<StatefulSet>::namespaced(ctx.client.clone(), namespace)
            .get_opt(&target.name)
            .await
            .map_err(read_error)?
            .map(TargetObject::StatefulSet),
    })
}

/// The target's pods (a fresh list: they are in no cache), with only their status.
async fn target_pods(ctx: &Context, namespace: &str, selector: &str) -> Result<Vec<Pod>, Error> {
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), namespace);
    let list = pods
        .list(&kube::api::ListParams::default().labels(selector))
        .await
        .map_err(|source| Error::Read {
            kind: "Pod".into(),
            name: selector.to_string(),
            source,
        })?;
    Ok(list.items)
}

/// Sets the replicas of a target through its scale subresource, if they differ, with
/// the read resourceVersion as a precondition; only while it is still the object of
/// `uid` (one deleted and created again is the user's anew). Returns whether it wrote.
async fn scale_target(
    ctx: &Context,
    namespace: &str,
    kind: TargetKind,
    name: &str,
    uid: &str,
    replicas: i32,
) -> Result<bool, Error> {
    let api = crate::platform::kube::workload_api(&ctx.client, namespace, kind);
    let read_error = |source| Error::Read {
        kind: kind.to_string(),
        name: name.to_string(),
        source,
    };
    let Some(mut scale) = (match api.get_scale(name).await {
        Ok(s) => Some(s),
        Err(kube::Error::Api(s)) if s.code == 404 => None,
        Err(e) => return Err(read_error(e)),
    }) else {
        return Ok(false);
    };
    if scale.metadata.uid.as_deref().is_some_and(|u| u != uid)
        || scale.spec.as_ref().and_then(|s| s.replicas) == Some(replicas)
    {
        return Ok(false);
    }
    scale.spec.get_or_insert_with(Default::default).replicas = Some(replicas);
    scale.status = None;
    let params = kube::api::PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match api.replace_scale(name, &params, &scale).await {
        Ok(_) => {
            info!(target = %format!("{kind} {namespace}/{name}"), replicas, "scaled the target back");
            Ok(true)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict {
            kind: format!("{kind}/scale"),
            name: name.to_string(),
        }),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(source) => Err(Error::Apply {
            kind: format!("{kind}/scale"),
            name: name.to_string(),
            source,
        }),
    }
}

/// Gives a held target its recorded replicas back. Returns whether it wrote.
async fn release(ctx: &Context, namespace: &str, record: &Record) -> Result<bool, Error> {
    let Some(target) = record.target() else {
        return Ok(false);
    };
    scale_target(
        ctx,
        namespace,
        target.kind,
        &target.name,
        &record.uid,
        record.original_replicas,
    )
    .await
}

/// The deleted Function's part before the garbage collector's: the target it holds gets
/// its replicas back, then the finalizer goes.
async fn scale_back(function: &Function, ctx: &Context) -> Result<Action, Error> {
    let key = function.key();
    let private = ctx
        .stores
        .services
        .get(&key.namespace, &private_service_name(&key.name))
        .and_then(|s| s.unpack().ok())
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == function.metadata.uid.as_ref())
        });
    if let Some(record) = private.as_ref().and_then(Record::of) {
        let wrote = match release(ctx, &key.namespace, &record).await {
            Ok(w) => w,
            Err(e) => {
                publish(
                    ctx,
                    function,
                    EventType::Warning,
                    "ScaleBackFailed",
                    format!(
                        "giving {} {} its replicas back: {e}",
                        record.kind, record.name
                    ),
                )
                .await;
                return Err(e);
            }
        };
        // Wait until the deletion has been seen everywhere, then check once more that
        // the count held.
        let since = function
            .metadata
            .deletion_timestamp
            .as_ref()
            .map(|t| jiff::Timestamp::now().duration_since(t.0))
            .and_then(|d| Duration::try_from(d).ok())
            .unwrap_or(SCALE_BACK_SETTLE);
        if wrote || since < SCALE_BACK_SETTLE {
            if wrote {
                publish(
                    ctx,
                    function,
                    EventType::Normal,
                    "ScaledBack",
                    format!(
                        "{} {} scaled back to {} replicas",
                        record.kind, record.name, record.original_replicas
                    ),
                )
                .await;
            }
            let wait = SCALE_BACK_SETTLE.saturating_sub(since);
            return Ok(Action::requeue(wait.max(Duration::from_secs(1))));
        }
    }
    remove_finalizer(ctx, function).await?;
    Ok(Action::await_change())
}

/// A Function that had a template owns a Deployment `<name>`: once it scales a target
/// instead, that Deployment's pods serve nothing, so it goes to zero (it stays until the
/// Function is deleted, as everything the Function owns).
async fn scale_down_own_deployment(
    ctx: &Context,
    function: &Function,
    namespace: &str,
    name: &str,
) -> Result<(), Error> {
    let Some(d) = ctx
        .stores
        .deployments
        .get(namespace, name)
        .and_then(|d| d.unpack().ok())
    else {
        return Ok(());
    };
    let ours = d
        .owner_references()
        .iter()
        .any(|o| Some(&o.uid) == function.metadata.uid.as_ref());
    let replicas = d.replicas().desired;
    if !ours || replicas == 0 {
        return Ok(());
    }
    let uid = d.meta().uid.clone().unwrap_or_default();
    scale_target(ctx, namespace, TargetKind::Deployment, name, &uid, 0).await?;
    Ok(())
}

fn has_finalizer(function: &Function) -> bool {
    function.finalizers().iter().any(|f| f == FINALIZER)
}

/// Adds the finalizer (a JSON patch whose `test` keeps other controllers' finalizers).
async fn add_finalizer(ctx: &Context, function: &Function) -> Result<(), Error> {
    if has_finalizer(function) {
        return Ok(());
    }
    let current = function.finalizers();
    let ops = if current.is_empty() {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": [FINALIZER]},
        ])
    } else {
        serde_json::json!([
            {"op": "test", "path": "/metadata/finalizers", "value": current},
            {"op": "add", "path": "/metadata/finalizers/-", "value": FINALIZER},
        ])
    };
    patch_finalizers(ctx, function, ops).await
}

async fn remove_finalizer(ctx: &Context, function: &Function) -> Result<(), Error> {
    let Some(i) = function.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let ops = serde_json::json!([
        {"op": "test", "path": format!("/metadata/finalizers/{i}"), "value": FINALIZER},
        {"op": "remove", "path": format!("/metadata/finalizers/{i}")},
    ]);
    patch_finalizers(ctx, function, ops).await
}

async fn patch_finalizers(
    ctx: &Context,
    function: &Function,
    ops: serde_json::Value,
) -> Result<(), Error> {
    let key = function.key();
    let api: Api<Function> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let patch: json_patch::Patch = serde_json::from_value(ops)
        .map_err(|e| Error::Build(BuildError::Patch(format!("the finalizer patch: {e}"))))?;
    match api
        .patch(
            &key.name,
            &PatchParams::default(),
            &Patch::Json::<()>(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        // A failed `test`: the list changed meanwhile; the next reconcile sees the new one.
        Err(kube::Error::Api(s)) if s.code == 409 || s.code == 422 => Err(Error::Conflict {
            kind: "Function".into(),
            name: key.name,
        }),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(source) => Err(Error::Apply {
            kind: "Function".into(),
            name: key.name,
            source,
        }),
    }
}

/// Reports, once per write, that someone else set the target's replicas after the
/// Function took it (a GitOps tool applying a `replicas` field, `kubectl scale`).
async fn report_fight(ctx: &Context, function: &Function, target: &TargetObject, record: &Record) {
    let Some((manager, time)) = target::replicas_overridden(target.meta(), record) else {
        return;
    };
    let seen = format!("{manager}@{time}");
    {
        let Ok(mut fights) = ctx.fights.lock() else {
            return;
        };
        if fights.get(&function.key()) == Some(&seen) {
            return;
        }
        fights.insert(function.key(), seen);
    }
    let note = format!(
        "{} {}: spec.replicas was set by field manager {manager:?} at {time}, after this Function \
         took the target; it fights the autoscaler. Leave replicas out of that manifest, or have \
         the tool ignore the field (README: \"Scaling an existing Deployment\")",
        target.kind(),
        target.name()
    );
    warn!(function = %function.key(), %manager, "replicas set by another field manager");
    publish(
        ctx,
        function,
        EventType::Warning,
        target::REASON_REPLICAS_OVERRIDDEN,
        note,
    )
    .await;
}

/// An object of a name a Function wants, as found.
enum Found<K> {
    Absent,
    /// Controlled by this Function.
    Ours(K),
    /// Someone else's: never taken over.
    Foreign,
}

impl<K> Found<K> {
    fn ours(&self) -> Option<&K> {
        match self {
            Found::Ours(k) => Some(k),
            _ => None,
        }
    }
    fn foreign(&self) -> bool {
        matches!(self, Found::Foreign)
    }
}

/// Reads an object from the cache; when the cache has none (it only holds labelled
/// objects), asks the API server, so a pre-existing object of that name is detected
/// instead of being taken over by a server-side apply.
async fn live<K>(
    store: &PackedStore<K>,
    api: &Api<K>,
    function: &Function,
    namespace: &str,
    name: &str,
) -> Result<Found<K>, Error>
where
    K: Pack + std::fmt::Debug,
{
    let cached = store.get(namespace, name).and_then(|k| k.unpack().ok());
    let object = match cached {
        Some(k) => Some(k),
        None => api.get_opt(name).await.map_err(|source| Error::Read {
            kind: K::kind(&()).into_owned(),
            name: name.to_string(),
            source,
        })?,
    };
    let Some(object) = object else {
        return Ok(Found::Absent);
    };
    let controlled = object
        .owner_references()
        .iter()
        .any(|o| o.controller == Some(true) && Some(&o.uid) == function.metadata.uid.as_ref());
    Ok(if controlled {
        Found::Ours(object)
    } else {
        Found::Foreign
    })
}

struct Live<'a> {
    deployment: Option<&'a Deployment>,
    private: Option<&'a Service>,
    public: Option<&'a Service>,
    slice: Option<&'a EndpointSlice>,
}

/// Applies what differs; returns the Deployment as applied (with its status) if it was.
async fn apply_all(
    ctx: &Context,
    desired: &Desired,
    replicas: Replicas,
    live: &Live<'_>,
    (deployments, services, slices): (&Api<Deployment>, &Api<Service>, &Api<EndpointSlice>),
    changes: &mut Changes,
) -> Result<Option<Deployment>, Error> {
    let mut applied_deployment = None;
    if !build::up_to_date(&desired.deployment, live.deployment) {
        let mut object = desired.deployment.clone();
        if let (Replicas::Keep(_), Some(l)) = (replicas, live.deployment) {
            // We send the live replica count: make sure it still is the live one.
            object.metadata.resource_version = l.metadata.resource_version.clone();
        }
        applied_deployment =
            Some(apply(deployments, &object, live.deployment.is_some(), changes).await?);
    }
    let routing = Routing {
        private_service: desired.private_service.clone(),
        public_service: desired.public_service.clone(),
        activator_slice: desired.activator_slice.clone(),
    };
    apply_routing(ctx, &routing, live, (services, slices), changes).await?;
    Ok(applied_deployment)
}

/// Applies the routing objects that differ.
async fn apply_routing(
    ctx: &Context,
    desired: &Routing,
    live: &Live<'_>,
    (services, slices): (&Api<Service>, &Api<EndpointSlice>),
    changes: &mut Changes,
) -> Result<(), Error> {
    if !build::up_to_date(&desired.private_service, live.private) {
        apply(
            services,
            &desired.private_service,
            live.private.is_some(),
            changes,
        )
        .await?;
    }
    if !build::up_to_date(&desired.public_service, live.public) {
        apply(
            services,
            &desired.public_service,
            live.public.is_some(),
            changes,
        )
        .await?;
    }
    if let Some(slice) = &desired.activator_slice
        && !build::up_to_date(slice, live.slice)
    {
        // Only rewrites are paced: they are the fan-out of one activator pod change to
        // every Function. A new Function's first slice is one write of its five.
        if live.slice.is_some() {
            ctx.slice_limiter.acquire().await;
        }
        // Following the activator pods is routine: no Event per Function for it.
        let mut quiet = Changes::default();
        apply(slices, slice, live.slice.is_some(), &mut quiet).await?;
        changes.created.extend(quiet.created);
    }
    Ok(())
}

async fn apply<K>(
    api: &Api<K>,
    object: &K,
    existed: bool,
    changes: &mut Changes,
) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = object.name_any();
    let kind = K::kind(&()).into_owned();
    debug!(%kind, %name, "applying");
    let params = PatchParams::apply(FIELD_MANAGER).force();
    match api.patch(&name, &params, &Patch::Apply(object)).await {
        Ok(applied) => {
            let label = format!("{kind} {name}");
            if existed {
                changes.updated.push(label);
            } else {
                changes.created.push(label);
            }
            Ok(applied)
        }
        Err(kube::Error::Api(s)) if s.code == 409 => Err(Error::Conflict { kind, name }),
        Err(source) => Err(Error::Apply { kind, name, source }),
    }
}

async fn write_status(
    ctx: &Context,
    namespace: &str,
    name: &str,
    status: &status::OperatorStatus,
) -> Result<(), Error> {
    let api: Api<Function> = Api::namespaced(ctx.client.clone(), namespace);
    let body = serde_json::json!({
        "apiVersion": Function::api_version(&()),
        "kind": Function::kind(&()),
        "metadata": {"name": name},
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &params, &Patch::Apply(&body))
        .await
        .map_err(Error::Status)?;
    Ok(())
}

/// Hosts this Function asked for that an older Function has.
fn build_host_conflicts(
    function: &Function,
    ctx: &Context,
) -> Option<Vec<(String, crate::api::FunctionKey)>> {
    if function.spec.hosts.is_empty() {
        return None;
    }
    let all = ctx.stores.functions.state();
    let mut claims = crate::api::hosts::claim_hosts(
        all.iter()
            .map(|f| f.as_ref())
            .filter(|f| f.key() != function.key())
            .chain(std::iter::once(function)),
        &ctx.settings.cluster_domain,
    );
    claims.conflicts.remove(&function.key())
}

fn is_invalid(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 422 || s.code == 400)
}

fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => s.message.clone(),
        other => other.to_string(),
    }
}

/// Records an Event on the Function; a failure to record is logged, never fatal.
async fn publish(ctx: &Context, function: &Function, type_: EventType, reason: &str, note: String) {
    let event = Event {
        type_,
        reason: reason.to_string(),
        // The Events API caps notes at 1 kB.
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.events.publish(&event, &function.object_ref(&())).await {
        debug!(error = %e, "recording an event failed");
    }
}
