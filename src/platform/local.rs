//! The local-process platform of `zeroscale dev`: each replica of a Function is a process
//! on this machine, started from the first container of its pod template.
//!
//! Functions come from [`LocalPlatform::apply`] / [`LocalPlatform::delete`] (the manifest
//! watcher of `dev`); one supervisor task per Function keeps its processes at the desired
//! count. Scale and status live in memory with the same semantics as on Kubernetes: a
//! version for optimistic concurrency, kstatus-style conditions, and the `Active`
//! condition turned to `CrashLoop` / `CreateContainerError` / `InvalidTemplate` when the
//! replicas cannot start, so the activator fails requests fast with the reason.

mod output;
mod probe;
mod replica;
mod supervisor;
pub mod template;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use async_trait::async_trait;
use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use output::{Captured, Output, Stream};
use supervisor::Target;
pub use template::{ReplicaTemplate, TemplateError};

use super::{
    AutoscalerStatus, Endpoint, EndpointsEvent, FunctionEvent, Platform, PlatformError, Scale,
    WakeOutcome,
};
use crate::api::config::ValidationErrors;
use crate::api::{
    CONDITION_ACTIVE, CONDITION_READY, Defaults, Function, FunctionConfig, FunctionKey,
    FunctionStatus,
};

const EVENT_BUFFER: usize = 1024;

/// How the local platform is set up.
#[derive(Debug, Clone)]
pub struct LocalSettings {
    pub defaults: Defaults,
    pub cluster_domain: String,
    /// Where replica output goes.
    pub output: Output,
}

/// Why a manifest was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
    /// Valid, but not something a local platform can run (one line, for the user).
    #[error("{0}")]
    Unsupported(String),
}

/// What [`LocalPlatform::apply`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Created,
    /// The spec or metadata changed; `restart` when replicas are replaced.
    Updated {
        restart: bool,
    },
    Unchanged,
}

/// One replica process, for `/functions` and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProcessView {
    pub name: String,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    pub state: &'static str,
    pub revision: u64,
}

/// What a supervisor reports about a Function's replicas.
#[derive(Debug, Clone, Default)]
pub(crate) struct ReplicaSetView {
    pub endpoints: Vec<Endpoint>,
    /// Replicas not being stopped.
    pub replicas: u32,
    /// Reason and message when no replica is ready because they cannot start.
    pub failure: Option<(String, String)>,
    pub processes: Vec<ProcessView>,
}

/// A Function as dev mode sees it, for `/functions` and tests.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FunctionView {
    pub namespace: String,
    pub name: String,
    pub desired: u32,
    pub ready: u32,
    pub replicas: u32,
    pub scale_version: u64,
    pub status: Option<FunctionStatus>,
    pub processes: Vec<ProcessView>,
}

struct Entry {
    function: Arc<Function>,
    config: FunctionConfig,
    template: Result<Arc<ReplicaTemplate>, TemplateError>,
    revision: u64,
    desired: u32,
    version: u64,
    target: watch::Sender<Target>,
    gone: CancellationToken,
    view: ReplicaSetView,
    autoscaler: Option<AutoscalerStatus>,
}

impl Entry {
    fn target(&self) -> Target {
        Target {
            replicas: self.desired,
            revision: self.revision,
            template: self.template.clone(),
        }
    }
}

#[derive(Default)]
struct State {
    functions: BTreeMap<FunctionKey, Entry>,
}

pub(crate) struct Inner {
    settings: LocalSettings,
    output: Output,
    state: Mutex<State>,
    functions_tx: broadcast::Sender<FunctionEvent>,
    endpoints_tx: broadcast::Sender<EndpointsEvent>,
    in_flight: OnceLock<replica::InFlight>,
    shutdown: CancellationToken,
    kill: CancellationToken,
    supervisors: Mutex<Vec<JoinHandle<()>>>,
}

/// Functions as local processes. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct LocalPlatform {
    inner: Arc<Inner>,
}

impl LocalPlatform {
    pub fn new(settings: LocalSettings) -> Self {
        let (functions_tx, _) = broadcast::channel(EVENT_BUFFER);
        let (endpoints_tx, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            inner: Arc::new(Inner {
                output: settings.output.clone(),
                settings,
                state: Mutex::default(),
                functions_tx,
                endpoints_tx,
                in_flight: OnceLock::new(),
                shutdown: CancellationToken::new(),
                kill: CancellationToken::new(),
                supervisors: Mutex::default(),
            }),
        }
    }

    /// Tells the platform how many requests are in flight to an endpoint, so a
    /// scale-down waits for them (the activator's `endpoint_in_flight`). Set once.
    pub fn set_in_flight(&self, f: impl Fn(SocketAddr) -> u64 + Send + Sync + 'static) {
        if self.inner.in_flight.set(Arc::new(f)).is_err() {
            warn!("in-flight counter already set; keeping the first");
        }
    }

    /// The output handle replicas write to.
    pub fn output(&self) -> &Output {
        &self.inner.output
    }

    /// Creates or updates a Function. `base_dir` is where its replicas run when the
    /// container sets no `workingDir` (the manifest's directory). A spec that fails
    /// validation is refused and the running version, if any, is kept. A template that
    /// validates but cannot run locally (no `command`) is accepted and reported on the
    /// status (`InvalidTemplate`), so requests get the reason.
    pub fn apply(&self, mut function: Function, base_dir: &Path) -> Result<Applied, ApplyError> {
        let key = function.key();
        let config = FunctionConfig::resolve(&function.spec, &self.inner.settings.defaults)?;
        if let Some(target) = config.target() {
            return Err(ApplyError::Unsupported(format!(
                "unsupported in dev: spec.scaleTargetRef names {target}, whose pods only a \
                 cluster runs (dev runs a Function's own template)"
            )));
        }
        let template = match ReplicaTemplate::from_config(&key, &config, base_dir) {
            Ok((t, warnings)) => {
                for w in warnings {
                    warn!(function = %key, "{w}");
                }
                Ok(Arc::new(t))
            }
            Err(e) => {
                warn!(function = %key, error = %e, "template cannot run locally");
                Err(e)
            }
        };
        function.metadata.namespace = Some(key.namespace.clone());
        function.status = None;
        let inner = &self.inner;
        let mut state = inner.lock();
        if let Some(entry) = state.functions.get_mut(&key) {
            let old = &entry.function;
            let spec_changed = old.spec != function.spec;
            if !spec_changed
                && old.metadata.labels == function.metadata.labels
                && old.metadata.annotations == function.metadata.annotations
            {
                return Ok(Applied::Unchanged);
            }
            let generation = old.metadata.generation.unwrap_or(1) + i64::from(spec_changed);
            function.metadata.generation = Some(generation);
            function.metadata.creation_timestamp = old.metadata.creation_timestamp.clone();
            function.metadata.uid = old.metadata.uid.clone();
            function.status = old.status.clone();
            let restart = entry.template != template;
            if restart {
                entry.revision += 1;
            }
            let clamped = entry.desired.clamp(config.scale.min, config.scale.max);
            if clamped != entry.desired {
                info!(function = %key, from = entry.desired, to = clamped, "replicas clamped to the new scale bounds");
                entry.desired = clamped;
                entry.version += 1;
            }
            entry.function = Arc::new(function);
            entry.config = config;
            entry.template = template;
            let _ = entry.target.send(entry.target());
            inner.emit_status(&key, entry, true);
            Ok(Applied::Updated { restart })
        } else {
            function.metadata.generation = Some(1);
            function.metadata.creation_timestamp = Some(Time(jiff::Timestamp::now()));
            function.metadata.uid = Some(format!("local-{}-{}", key.namespace, key.name));
            let desired = config.scale.min;
            let gone = inner.shutdown.child_token();
            let (target, target_rx) = watch::channel(Target {
                replicas: desired,
                revision: 1,
                template: template.clone(),
            });
            let entry = Entry {
                function: Arc::new(function),
                config,
                template,
                revision: 1,
                desired,
                version: 1,
                target,
                gone: gone.clone(),
                view: ReplicaSetView::default(),
                autoscaler: None,
            };
            let handle = tokio::spawn(supervisor::supervise(
                key.clone(),
                inner.clone(),
                target_rx,
                gone,
                inner.kill.clone(),
            ));
            if let Ok(mut s) = inner.supervisors.lock() {
                s.retain(|h| !h.is_finished());
                s.push(handle);
            }
            let entry = state.functions.entry(key.clone()).or_insert(entry);
            inner.emit_status(&key, entry, true);
            let _ = inner
                .endpoints_tx
                .send(EndpointsEvent::Updated(key.clone(), Vec::new()));
            Ok(Applied::Created)
        }
    }

    /// Deletes a Function; its replicas are drained and stopped. False when unknown.
    pub fn delete(&self, key: &FunctionKey) -> bool {
        let mut state = self.inner.lock();
        let Some(entry) = state.functions.remove(key) else {
            return false;
        };
        entry.gone.cancel();
        let _ = self
            .inner
            .functions_tx
            .send(FunctionEvent::Deleted(key.clone()));
        let _ = self
            .inner
            .endpoints_tx
            .send(EndpointsEvent::Updated(key.clone(), Vec::new()));
        info!(function = %key, "Function deleted; stopping its replicas");
        true
    }

    /// The Functions known, with their current state.
    pub fn view(&self) -> Vec<FunctionView> {
        let state = self.inner.lock();
        state
            .functions
            .iter()
            .map(|(key, e)| FunctionView {
                namespace: key.namespace.clone(),
                name: key.name.clone(),
                desired: e.desired,
                ready: e.view.endpoints.len() as u32,
                replicas: e.view.replicas,
                scale_version: e.version,
                status: e.function.status.clone(),
                processes: e.view.processes.clone(),
            })
            .collect()
    }

    /// One Function as applied (with its status).
    pub fn function(&self, key: &FunctionKey) -> Option<Arc<Function>> {
        self.inner
            .lock()
            .functions
            .get(key)
            .map(|e| e.function.clone())
    }

    /// Stops every replica (drain, SIGTERM, SIGKILL after the grace period) and waits
    /// until they are gone.
    pub async fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let handles = match self.inner.supervisors.lock() {
            Ok(mut s) => std::mem::take(&mut *s),
            Err(_) => Vec::new(),
        };
        for h in handles {
            let _ = h.await;
        }
        self.inner.output.flush().await;
    }

    /// Makes a running [`shutdown`](Self::shutdown) SIGKILL every replica at once.
    pub fn kill_now(&self) {
        self.inner.shutdown.cancel();
        self.inner.kill.cancel();
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent data (every update is a
        // single assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn in_flight_fn(self: &Arc<Self>) -> replica::InFlight {
        let inner = Arc::downgrade(self);
        Arc::new(move |addr| {
            inner
                .upgrade()
                .and_then(|i| i.in_flight.get().map(|f| f(addr)))
                .unwrap_or(0)
        })
    }

    /// Takes a supervisor's report: new endpoints and status are published when changed.
    pub(crate) fn publish(&self, key: &FunctionKey, view: ReplicaSetView) {
        let mut state = self.lock();
        let Some(entry) = state.functions.get_mut(key) else {
            return;
        };
        if entry.view.endpoints != view.endpoints {
            let _ = self
                .endpoints_tx
                .send(EndpointsEvent::Updated(key.clone(), view.endpoints.clone()));
        }
        if entry.view.failure != view.failure {
            match &view.failure {
                Some((reason, message)) => {
                    warn!(function = %key, %reason, "replicas cannot start: {message}");
                }
                None if !view.endpoints.is_empty() => {
                    info!(function = %key, "a replica is ready again; start-up failure cleared");
                }
                None => {}
            }
        }
        entry.view = view;
        self.refresh_status(key, entry);
    }

    /// Recomputes the status; emits `Applied` when it changed.
    fn refresh_status(&self, key: &FunctionKey, entry: &mut Entry) {
        self.emit_status(key, entry, false);
    }

    /// Recomputes the status; emits `Applied` when it changed, or always with `force`
    /// (the object itself changed).
    fn emit_status(&self, key: &FunctionKey, entry: &mut Entry, force: bool) {
        let url = entry.function.url(&self.settings.cluster_domain);
        let status = compute_status(entry, url);
        if !force && entry.function.status.as_ref() == Some(&status) {
            return;
        }
        let mut f = (*entry.function).clone();
        f.status = Some(status);
        entry.function = Arc::new(f);
        let _ = self
            .functions_tx
            .send(FunctionEvent::Applied(entry.function.clone()));
        tracing::debug!(function = %key, "status updated");
    }

    fn functions_reset(&self) -> (FunctionEvent, broadcast::Receiver<FunctionEvent>) {
        let state = self.lock();
        let all = state
            .functions
            .values()
            .map(|e| e.function.clone())
            .collect();
        (FunctionEvent::Reset(all), self.functions_tx.subscribe())
    }

    fn endpoints_reset(&self) -> (EndpointsEvent, broadcast::Receiver<EndpointsEvent>) {
        let state = self.lock();
        let all = state
            .functions
            .iter()
            .map(|(k, e)| (k.clone(), e.view.endpoints.clone()))
            .collect();
        (EndpointsEvent::Reset(all), self.endpoints_tx.subscribe())
    }
}

/// The status of a Function from what the platform knows. Conditions keep their
/// `lastTransitionTime` while their status stays the same.
fn compute_status(entry: &Entry, url: String) -> FunctionStatus {
    let old = entry.function.status.clone().unwrap_or_default();
    let generation = entry.function.metadata.generation;
    let ready = entry.view.endpoints.len() as u32;
    let (active, reason, message) = match (&entry.template, &entry.view.failure) {
        (Err(e), _) => (false, "InvalidTemplate".to_string(), e.to_string()),
        (Ok(_), _) if ready > 0 => (
            true,
            "ReplicasReady".to_string(),
            format!("{ready} of {} replicas ready", entry.desired),
        ),
        (Ok(_), Some((reason, message))) => (false, reason.clone(), message.clone()),
        (Ok(_), None) if entry.desired == 0 && entry.view.replicas == 0 => (
            false,
            "ScaledToZero".to_string(),
            "no replicas; the next request starts one".to_string(),
        ),
        (Ok(_), None) => (
            false,
            "Activating".to_string(),
            "waiting for a replica to become ready".to_string(),
        ),
    };
    let condition = |type_: &str, ok: bool, reason: String, message: String| {
        let status = if ok { "True" } else { "False" }.to_string();
        let since = old
            .conditions
            .iter()
            .find(|c| c.type_ == type_ && c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or_else(|| Time(jiff::Timestamp::now()));
        Condition {
            type_: type_.to_string(),
            status,
            reason,
            message,
            observed_generation: generation,
            last_transition_time: since,
        }
    };
    FunctionStatus {
        observed_generation: generation,
        url: Some(url),
        selector: None,
        replicas: Some(entry.view.replicas as i32),
        ready_replicas: Some(ready as i32),
        desired_replicas: Some(
            entry
                .autoscaler
                .as_ref()
                .map(|a| a.desired_replicas)
                .unwrap_or(entry.desired) as i32,
        ),
        last_request_time: entry
            .autoscaler
            .as_ref()
            .and_then(|a| a.last_request_time)
            .map(Time),
        conditions: vec![
            condition(
                CONDITION_READY,
                true,
                "Serving".into(),
                "routable through the zeroscale dev activator".into(),
            ),
            condition(CONDITION_ACTIVE, active, reason, message),
        ],
    }
}

/// A stream of broadcast events that starts with a full `Reset` and re-lists (another
/// `Reset`, subscribed atomically with it) when it falls behind.
fn resettable<E: Clone + Send + 'static>(
    inner: Arc<Inner>,
    reset: fn(&Inner) -> (E, broadcast::Receiver<E>),
) -> BoxStream<'static, E> {
    let (first, rx) = reset(&inner);
    stream::once(async move { first })
        .chain(stream::unfold(
            (rx, inner),
            move |(mut rx, inner)| async move {
                match rx.recv().await {
                    Ok(event) => Some((event, (rx, inner))),
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        warn!(missed, "event consumer fell behind; re-listing");
                        let (event, rx) = reset(&inner);
                        Some((event, (rx, inner)))
                    }
                    Err(broadcast::error::RecvError::Closed) => None,
                }
            },
        ))
        .boxed()
}

#[async_trait]
impl Platform for LocalPlatform {
    fn functions(&self) -> BoxStream<'static, FunctionEvent> {
        resettable(self.inner.clone(), Inner::functions_reset)
    }

    fn endpoints(&self) -> BoxStream<'static, EndpointsEvent> {
        resettable(self.inner.clone(), Inner::endpoints_reset)
    }

    async fn wake(&self, key: &FunctionKey, replicas: u32) -> Result<WakeOutcome, PlatformError> {
        let mut state = self.inner.lock();
        let entry = state
            .functions
            .get_mut(key)
            .ok_or_else(|| PlatformError::NotFound(key.clone()))?;
        if entry.desired != 0 {
            return Ok(WakeOutcome::AlreadyAwake);
        }
        let replicas = replicas.clamp(1, entry.config.scale.max.max(1));
        entry.desired = replicas;
        entry.version += 1;
        let _ = entry.target.send(entry.target());
        info!(function = %key, replicas, "waking from zero");
        self.inner.refresh_status(key, entry);
        Ok(WakeOutcome::Woken)
    }

    async fn scale(&self, key: &FunctionKey) -> Result<Scale, PlatformError> {
        let state = self.inner.lock();
        let entry = state
            .functions
            .get(key)
            .ok_or_else(|| PlatformError::NotFound(key.clone()))?;
        Ok(Scale {
            desired: entry.desired,
            ready: entry.view.endpoints.len() as u32,
            version: Some(entry.version.to_string()),
        })
    }

    async fn set_scale(
        &self,
        key: &FunctionKey,
        replicas: u32,
        expected_version: Option<&str>,
        reason: &str,
    ) -> Result<(), PlatformError> {
        let mut state = self.inner.lock();
        let entry = state
            .functions
            .get_mut(key)
            .ok_or_else(|| PlatformError::NotFound(key.clone()))?;
        if let Some(expected) = expected_version
            && expected != entry.version.to_string()
        {
            return Err(PlatformError::Conflict(key.clone()));
        }
        if entry.desired == replicas {
            return Ok(());
        }
        info!(function = %key, from = entry.desired, to = replicas, %reason, "scaling");
        entry.desired = replicas;
        entry.version += 1;
        let _ = entry.target.send(entry.target());
        self.inner.refresh_status(key, entry);
        Ok(())
    }

    async fn publish_autoscaler_status(
        &self,
        key: &FunctionKey,
        status: &AutoscalerStatus,
    ) -> Result<(), PlatformError> {
        let mut state = self.inner.lock();
        let entry = state
            .functions
            .get_mut(key)
            .ok_or_else(|| PlatformError::NotFound(key.clone()))?;
        let changed =
            entry.autoscaler.as_ref().map(|a| a.desired_replicas) != Some(status.desired_replicas);
        if changed {
            tracing::debug!(function = %key, desired = status.desired_replicas, "autoscaler status");
        }
        entry.autoscaler = Some(status.clone());
        // Only a new desired count is worth an event; the request time is carried along.
        if changed {
            self.inner.refresh_status(key, entry);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform() -> LocalPlatform {
        let (output, _) = Output::capture();
        LocalPlatform::new(LocalSettings {
            defaults: Defaults::default(),
            cluster_domain: "cluster.local".into(),
            output,
        })
    }

    fn function(name: &str, label: usize) -> Function {
        serde_yaml::from_str(&format!(
            "apiVersion: zeroscale.dev/v1alpha1\nkind: Function\nmetadata: {{name: {name}, labels: {{v: \"{label}\"}}}}\nspec:\n  template: {{spec: {{containers: [{{name: app, command: [x]}}]}}}}\n"
        ))
        .unwrap()
    }

    #[tokio::test]
    async fn a_consumer_that_falls_behind_gets_a_fresh_reset() {
        let p = platform();
        p.apply(function("a", 0), Path::new("/")).unwrap();
        let mut events = p.functions();
        assert!(matches!(events.next().await, Some(FunctionEvent::Reset(all)) if all.len() == 1));
        for i in 1..=EVENT_BUFFER + 10 {
            p.apply(function("a", i), Path::new("/")).unwrap();
        }
        p.apply(function("b", 0), Path::new("/")).unwrap();
        match events.next().await {
            Some(FunctionEvent::Reset(all)) => {
                assert_eq!(all.len(), 2, "the re-list is the current truth");
            }
            other => panic!("expected a Reset after falling behind, got {other:?}"),
        }
        p.shutdown().await;
    }

    #[tokio::test]
    async fn metadata_only_edits_keep_the_generation() {
        let p = platform();
        assert_eq!(
            p.apply(function("a", 0), Path::new("/")).unwrap(),
            Applied::Created
        );
        assert_eq!(
            p.apply(function("a", 0), Path::new("/")).unwrap(),
            Applied::Unchanged
        );
        assert_eq!(
            p.apply(function("a", 1), Path::new("/")).unwrap(),
            Applied::Updated { restart: false }
        );
        let f = p.function(&FunctionKey::new("default", "a")).unwrap();
        assert_eq!(f.metadata.generation, Some(1));
        assert_eq!(f.status.as_ref().unwrap().observed_generation, Some(1));
        p.shutdown().await;
    }
}
