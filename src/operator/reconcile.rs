//! The reconcile pipeline for one Function: read (caches) -> validate (pure) -> build
//! (pure) -> apply (server-side apply, only what differs) -> status (server-side apply
//! of the operator's status fields). A steady state makes no API calls at all: desired
//! objects are compared with the watch caches on every field the operator sets, plus a
//! hash of what it last applied so that a field removed from the spec is noticed too.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, watch};
use tracing::{debug, info, instrument, warn};

use super::Error;
use super::build::{
    self, ActivatorEndpoints, BuildError, Desired, FIELD_MANAGER, Replicas, activator_slice_name,
    private_service_name,
};
use super::metrics::Metrics;
use super::status::{self, Blocker};
use crate::api::{
    CONDITION_READY, Defaults, FUNCTION_LABEL, Function, FunctionConfig, FunctionKey,
};

/// How long a reconciled Function waits before a periodic re-check (watches trigger
/// every real change; this only bounds the effect of a missed event).
const RESYNC: Duration = Duration::from_secs(10 * 60);
/// How long a reconcile waits for the caches to be listed after start-up.
const CACHE_SYNC_TIMEOUT: Duration = Duration::from_secs(30);

/// The reconciler's settings (parsed once from flags).
#[derive(Debug, Clone)]
pub struct Settings {
    pub cluster_domain: String,
    pub defaults: Defaults,
}

/// The caches the reconciler reads instead of the API server.
#[derive(Clone)]
pub struct Stores {
    pub functions: Store<Function>,
    pub deployments: Store<Deployment>,
    pub services: Store<Service>,
    pub slices: Store<EndpointSlice>,
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
    pub recorder: Recorder,
    pub metrics: Metrics,
    pub slice_limiter: RateLimiter,
    pub failures: Failures,
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
        // The garbage collector removes what the Function owns.
        return Ok(Action::await_change());
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
        stores.deployments.wait_until_ready().await?;
        stores.services.wait_until_ready().await?;
        stores.slices.wait_until_ready().await?;
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
    let active = status::active(deployment.as_ref(), &pod_refs, invalid_template.as_deref());
    if active.status
        && let Some(failure) = status::startup_failure(deployment.as_ref(), &pod_refs)
    {
        blockers.push(Blocker::RolloutFailing(failure));
    }
    let ready = status::ready(&blockers, &active);
    let want = status::operator_status(
        function,
        &ctx.settings.cluster_domain,
        deployment.as_ref(),
        &ready,
        &active,
        Time(jiff::Timestamp::now()),
    );
    if !status::status_up_to_date(function, &want) {
        write_status(ctx, &namespace, &name, &want).await?;
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
    store: &Store<K>,
    api: &Api<K>,
    function: &Function,
    namespace: &str,
    name: &str,
) -> Result<Found<K>, Error>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug,
{
    let cached = store
        .get(&ObjectRef::new(name).within(namespace))
        .map(|k| (*k).clone());
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
        ctx.slice_limiter.acquire().await;
        // Following the activator pods is routine: no Event per Function for it.
        let mut quiet = Changes::default();
        apply(slices, slice, live.slice.is_some(), &mut quiet).await?;
        changes.created.extend(quiet.created);
    }
    Ok(applied_deployment)
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
    if let Err(e) = ctx
        .recorder
        .publish(&event, &function.object_ref(&()))
        .await
    {
        debug!(error = %e, "recording an event failed");
    }
}
