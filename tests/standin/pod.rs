//! One pod bound to the stand-in node, from first sight to its end, as the kubelet's pod
//! worker runs it: network namespace and IP, volumes (retried until their ConfigMaps,
//! Secrets and tokens exist), init containers in order, then every container under its
//! supervisor; on `deletionTimestamp` a graceful stop within the deletion's grace period,
//! teardown and the final DELETE. A separate task writes the pod's status through the
//! `pods/status` subresource whenever the model changes (coalescing bursts, never on a
//! timer), so readiness reaches the EndpointSlice controller without delay.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Pod, PodCondition, PodStatus, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::Ctx;
use crate::container::{self, Control, Outcome, Which};
use crate::env::PodFacts;
use crate::logs::{Sink, log_path};
use crate::net::PodNetNames;
use crate::status::{ContainerRun, PodRun, pod_status};
use crate::volumes::{self, PlannedVolume, TokenFile, VolumeKind};

/// Grace given to containers when the stand-in itself shuts down.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);
/// Condition types the stand-in owns; others (readiness gates) belong to someone else.
const OWN_CONDITIONS: &[&str] = &["PodScheduled", "Initialized", "ContainersReady", "Ready"];

/// What the node's pod watch tells a pod worker.
#[derive(Debug, Clone)]
pub enum PodEvent {
    Update(Arc<Pod>),
    /// The pod object is gone (deleted by someone else, or missing from a re-list).
    Gone,
    /// The stand-in is shutting down.
    Shutdown,
}

/// What the pod's containers share.
pub struct PodSetup {
    pub ip: String,
    /// `None` for host-network pods.
    pub netns: Option<PathBuf>,
    pub hosts: Option<String>,
    pub volumes: Vec<PlannedVolume>,
}

/// The pod worker's state, shared with its container supervisors and status writer.
pub struct PodShared {
    pub ctx: Arc<Ctx>,
    pub uid: String,
    pub name: String,
    pub namespace: String,
    /// `name_namespace(uid)`, the kubelet's way of naming a pod in messages.
    pub display: String,
    /// The pod's state directory (volumes, container roots, helper specs).
    pub dir: PathBuf,
    pod: watch::Sender<Arc<Pod>>,
    run: Mutex<PodRun>,
    changed: Notify,
    /// The conditions last written: their transition times are ours to keep.
    written: Mutex<Vec<PodCondition>>,
    net: Mutex<Option<(PodNetNames, Ipv4Addr)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl PodShared {
    fn new(ctx: Arc<Ctx>, pod: Arc<Pod>) -> Self {
        let uid = pod.uid().unwrap_or_default();
        let name = pod.name_any();
        let namespace = pod.namespace().unwrap_or_default();
        let spec = pod.spec.clone().unwrap_or_default();
        let has_init = spec.init_containers.as_ref().is_some_and(|i| !i.is_empty());
        let main_waiting = if has_init {
            "PodInitializing"
        } else {
            "ContainerCreating"
        };
        let run = PodRun {
            pod_ips: vec![],
            host_ip: ctx.node_ip.to_string(),
            start_time: Timestamp::now(),
            init: spec
                .init_containers
                .iter()
                .flatten()
                .map(|c| {
                    ContainerRun::new(&c.name, c.image.as_deref().unwrap_or(""), "PodInitializing")
                })
                .collect(),
            containers: spec
                .containers
                .iter()
                .map(|c| ContainerRun::new(&c.name, c.image.as_deref().unwrap_or(""), main_waiting))
                .collect(),
            initialized: !has_init,
            final_phase: None,
        };
        let dir = ctx
            .state_dir
            .join("pods")
            .join(format!("{namespace}_{name}_{uid}"));
        Self {
            display: format!("{name}_{namespace}({uid})"),
            dir,
            uid,
            name,
            namespace,
            pod: watch::Sender::new(pod),
            run: Mutex::new(run),
            changed: Notify::new(),
            written: Mutex::new(Vec::new()),
            net: Mutex::new(None),
            ctx,
        }
    }

    /// The latest pod object.
    pub fn pod(&self) -> Arc<Pod> {
        self.pod.borrow().clone()
    }

    /// Changes the model and wakes the status writer.
    pub fn update(&self, f: impl FnOnce(&mut PodRun)) {
        f(&mut lock(&self.run));
        self.changed.notify_one();
    }

    pub fn update_container(&self, which: Which, f: &dyn Fn(&mut ContainerRun)) {
        self.update(|run| {
            let slot = match which {
                Which::Init(i) => run.init.get_mut(i),
                Which::Main(i) => run.containers.get_mut(i),
            };
            if let Some(c) = slot {
                f(c);
            }
        });
    }

    pub fn event(&self, type_: EventType, reason: &str, note: String) {
        self.ctx.event(&self.pod(), type_, reason, note);
    }

    pub fn container_dir(&self, name: &str) -> PathBuf {
        self.dir.join("containers").join(name)
    }

    pub fn log_sink(&self, container: &str) -> std::io::Result<Sink> {
        let path = log_path(&self.ctx.state_dir, &self.namespace, &self.name, container);
        let echo = self
            .ctx
            .echo_logs
            .then(|| format!("{}/{}/{container}", self.namespace, self.name));
        Sink::open(&path, echo)
    }

    /// The status to write now: the model, with our conditions' transition times taken
    /// from what we wrote last and other conditions from the latest pod object.
    fn build_status(&self) -> PodStatus {
        let mut pod = (*self.pod()).clone();
        let written = lock(&self.written).clone();
        if !written.is_empty() {
            let status = pod.status.get_or_insert_with(Default::default);
            let mut conditions: Vec<PodCondition> = status
                .conditions
                .take()
                .unwrap_or_default()
                .into_iter()
                .filter(|c| !OWN_CONDITIONS.contains(&c.type_.as_str()))
                .collect();
            conditions.extend(written);
            status.conditions = Some(conditions);
        }
        let run = lock(&self.run).clone();
        pod_status(&pod, &run, Timestamp::now())
    }

    fn grace(&self) -> Duration {
        let pod = self.pod();
        let secs = pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                pod.spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30);
        Duration::from_secs(u64::try_from(secs).unwrap_or(0))
    }
}

fn terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// How a pod's life on this node ended.
enum End {
    /// It was deleted (graceful): the stand-in deletes the object for good.
    Deleted,
    Gone,
    Shutdown,
    /// Its containers finished for good (restartPolicy Never / OnFailure).
    Finished,
}

/// What the latest event asks for.
enum Step {
    Continue,
    Delete,
    Gone,
    Shutdown,
}

fn observe(shared: &PodShared, events: &mut watch::Receiver<PodEvent>) -> Step {
    let event = events.borrow_and_update().clone();
    match event {
        PodEvent::Update(pod) => {
            let deleting = pod.metadata.deletion_timestamp.is_some();
            shared.pod.send_replace(pod);
            if deleting {
                Step::Delete
            } else {
                Step::Continue
            }
        }
        PodEvent::Gone => Step::Gone,
        PodEvent::Shutdown => Step::Shutdown,
    }
}

/// Runs the pod until it ends on this node.
pub async fn run(ctx: Arc<Ctx>, first: Arc<Pod>, mut events: watch::Receiver<PodEvent>) {
    let shared = Arc::new(PodShared::new(ctx, first));
    let pod = shared.pod();
    events.borrow_and_update();
    if terminal(&pod) {
        wait_for_deletion(&shared, &mut events).await;
        return;
    }
    if pod.metadata.deletion_timestamp.is_some() {
        delete_for_good(&shared).await;
        return;
    }
    info!(pod = %shared.display, "starting pod");
    let writer_stop = CancellationToken::new();
    let writer = tokio::spawn(status_writer(shared.clone(), writer_stop.clone()));
    shared.changed.notify_one();

    let end = lifecycle(&shared, &mut events).await;
    match end {
        End::Deleted | End::Finished => {
            writer_stop.cancel();
            let _ = writer.await;
        }
        End::Gone | End::Shutdown => writer.abort(),
    }
    teardown(&shared).await;
    match end {
        End::Deleted => delete_for_good(&shared).await,
        End::Finished => wait_for_deletion(&shared, &mut events).await,
        End::Gone | End::Shutdown => {}
    }
    info!(pod = %shared.display, "pod done on this node");
}

async fn wait_for_deletion(shared: &PodShared, events: &mut watch::Receiver<PodEvent>) {
    loop {
        match observe(shared, events) {
            Step::Delete => return delete_for_good(shared).await,
            Step::Gone | Step::Shutdown => return,
            Step::Continue => {}
        }
        if events.changed().await.is_err() {
            return;
        }
    }
}

/// Sleeps `d` while watching the pod; returns the step that cut it short.
async fn pause(
    shared: &PodShared,
    events: &mut watch::Receiver<PodEvent>,
    d: Duration,
) -> Option<Step> {
    let deadline = Instant::now() + d;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return None,
            changed = events.changed() => {
                if changed.is_err() {
                    return Some(Step::Shutdown);
                }
                match observe(shared, events) {
                    Step::Continue => {}
                    other => return Some(other),
                }
            }
        }
    }
}

fn end_before_start(step: Step) -> End {
    match step {
        Step::Delete | Step::Continue => End::Deleted,
        Step::Gone => End::Gone,
        Step::Shutdown => End::Shutdown,
    }
}

async fn lifecycle(shared: &Arc<PodShared>, events: &mut watch::Receiver<PodEvent>) -> End {
    let pod = shared.pod();
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);

    // The sandbox: network namespace and IP.
    let mut retry = Duration::from_secs(1);
    let ip = loop {
        match setup_network(shared, host_network).await {
            Ok(ip) => break ip,
            Err(e) => {
                warn!(pod = %shared.display, error = %e, "pod network setup failed");
                shared.event(
                    EventType::Warning,
                    "FailedCreatePodSandBox",
                    format!("Failed to create pod sandbox: {e}"),
                );
                if let Some(step) = pause(shared, events, retry).await {
                    return end_before_start(step);
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    };
    shared.update(|r| r.pod_ips = vec![ip.to_string()]);

    // Volumes, then the tokens' refreshers (ended when this function returns).
    let mut refreshers = JoinSet::new();
    let mut retry = Duration::from_secs(1);
    let planned = loop {
        match setup_volumes(shared, ip, &mut refreshers).await {
            Ok(planned) => break planned,
            Err(e) => {
                shared.event(
                    EventType::Warning,
                    "FailedMount",
                    format!("MountVolume.SetUp failed: {e}"),
                );
                debug!(pod = %shared.display, error = %e, "volumes not ready");
                if let Some(step) = pause(shared, events, retry).await {
                    return end_before_start(step);
                }
                retry = (retry * 2).min(Duration::from_secs(30));
            }
        }
    };
    let netns = shared.ctx.network.names(&shared.uid).netns_path();
    let setup = Arc::new(PodSetup {
        ip: ip.to_string(),
        netns: (!host_network).then_some(netns),
        hosts: (!host_network).then(|| container::hosts_file(&pod, &ip.to_string())),
        volumes: planned,
    });

    // Init containers, one at a time.
    let init_count = pod
        .spec
        .as_ref()
        .and_then(|s| s.init_containers.as_ref())
        .map_or(0, Vec::len);
    for i in 0..init_count {
        let (control, rx) = watch::channel(Control::Run);
        let mut set = JoinSet::new();
        set.spawn(container::supervise(
            shared.clone(),
            setup.clone(),
            Which::Init(i),
            rx,
        ));
        match drive(shared, events, &[control], &mut set).await {
            Driven::AllDone(outcomes) => {
                if !matches!(outcomes.first(), Some(Outcome::Completed { exit_code: 0 })) {
                    shared.update(|r| r.final_phase = Some("Failed"));
                    return End::Finished;
                }
            }
            Driven::Ended(end) => return end,
        }
    }
    shared.update(|r| {
        r.initialized = true;
        for c in &mut r.containers {
            c.state = crate::status::RunState::waiting("ContainerCreating", None);
        }
    });

    // The containers, all at once.
    let count = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    let mut controls = Vec::new();
    let mut set = JoinSet::new();
    for i in 0..count {
        let (control, rx) = watch::channel(Control::Run);
        controls.push(control);
        set.spawn(container::supervise(
            shared.clone(),
            setup.clone(),
            Which::Main(i),
            rx,
        ));
    }
    match drive(shared, events, &controls, &mut set).await {
        Driven::AllDone(_) => End::Finished,
        Driven::Ended(end) => end,
    }
}

enum Driven {
    AllDone(Vec<Outcome>),
    Ended(End),
}

/// Waits for the supervisors in `set` while following the pod: a deletion stops them
/// within the grace period, a vanished pod kills them, a shutdown stops them quickly.
async fn drive(
    shared: &PodShared,
    events: &mut watch::Receiver<PodEvent>,
    controls: &[watch::Sender<Control>],
    set: &mut JoinSet<Outcome>,
) -> Driven {
    let mut outcomes = Vec::new();
    loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(outcome)) => outcomes.push(outcome),
                Some(Err(e)) => {
                    warn!(pod = %shared.display, error = %e, "container supervisor failed");
                    outcomes.push(Outcome::Stopped);
                }
                None => return Driven::AllDone(outcomes),
            },
            changed = events.changed() => {
                let step = if changed.is_err() { Step::Shutdown } else { observe(shared, events) };
                let (control, end) = match step {
                    Step::Continue => continue,
                    Step::Delete => {
                        let grace = shared.grace();
                        info!(pod = %shared.display, grace = ?grace, "stopping pod: deleted");
                        (Control::Stop { deadline: Instant::now() + grace }, End::Deleted)
                    }
                    Step::Gone => (Control::Kill, End::Gone),
                    Step::Shutdown => (
                        Control::Stop { deadline: Instant::now() + SHUTDOWN_GRACE.min(shared.grace()) },
                        End::Shutdown,
                    ),
                };
                for c in controls {
                    c.send_replace(control);
                }
                while set.join_next().await.is_some() {}
                return Driven::Ended(end);
            }
        }
    }
}

async fn setup_network(shared: &PodShared, host_network: bool) -> Result<Ipv4Addr, String> {
    let ctx = &shared.ctx;
    if host_network {
        return Ok(ctx.node_ip);
    }
    let ip = lock(&ctx.ipam)
        .allocate()
        .ok_or_else(|| "no free pod IP in the pod CIDR".to_string())?;
    let names = ctx.network.names(&shared.uid);
    // A half-made sandbox from a failed attempt goes first.
    ctx.network.delete(&names).await;
    match ctx.network.create(&names, ip).await {
        Ok(()) => {
            *lock(&shared.net) = Some((names, ip));
            Ok(ip)
        }
        Err(e) => {
            ctx.network.delete(&names).await;
            lock(&ctx.ipam).release(ip);
            Err(e.to_string())
        }
    }
}

async fn setup_volumes(
    shared: &Arc<PodShared>,
    ip: Ipv4Addr,
    refreshers: &mut JoinSet<()>,
) -> Result<Vec<PlannedVolume>, String> {
    let ctx = &shared.ctx;
    let pod = shared.pod();
    let mut auto = volumes::needs_auto_token(&pod, None);
    if auto
        && pod
            .spec
            .as_ref()
            .and_then(|s| s.automount_service_account_token)
            .is_none()
    {
        let sa_name = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &shared.namespace);
        let sa = api.get_opt(&sa_name).await.map_err(|e| e.to_string())?;
        auto = volumes::needs_auto_token(&pod, sa.as_ref());
    }
    let (cms, secrets) = volumes::references(&pod, auto);
    let sources = volumes::fetch_sources(&ctx.client, &shared.namespace, &cms, &secrets)
        .await
        .map_err(|e| e.to_string())?;
    let ips = vec![ip.to_string()];
    let host_ip = ctx.node_ip.to_string();
    let facts = PodFacts {
        pod: &pod,
        pod_ips: &ips,
        host_ip: &host_ip,
        node_cpu_millis: crate::node::CPU_CORES as f64 * 1000.0,
        node_memory_bytes: crate::node::MEMORY_BYTES as f64,
    };
    let planned = volumes::plan(&facts, &sources, auto).map_err(|e| e.to_string())?;
    let fs_group = pod
        .spec
        .as_ref()
        .and_then(|s| s.security_context.as_ref())
        .and_then(|s| s.fs_group)
        .and_then(|g| u32::try_from(g).ok());
    let dir = shared.dir.join("volumes");
    {
        let (dir, planned) = (dir.clone(), planned.clone());
        tokio::task::spawn_blocking(move || volumes::write(&dir, &planned, fs_group))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("writing volumes: {e}"))?;
    }
    let tokens: Vec<TokenFile> = planned
        .iter()
        .flat_map(|v| match &v.kind {
            VolumeKind::Files { tokens, .. } => tokens.clone(),
            _ => vec![],
        })
        .collect();
    let mut fresh = Vec::new();
    for file in tokens {
        let (token, expiry) = volumes::request_token(&ctx.client, &pod, &file)
            .await
            .map_err(|e| format!("requesting a ServiceAccount token: {e}"))?;
        volumes::write_token(
            volumes::volume_dir(&dir, &file.volume),
            &file,
            token,
            fs_group,
        )
        .await
        .map_err(|e| format!("writing the token: {e}"))?;
        fresh.push((file, expiry));
    }
    for (file, expiry) in fresh {
        refreshers.spawn(refresh_token(
            shared.clone(),
            file,
            expiry,
            dir.clone(),
            fs_group,
        ));
    }
    Ok(planned)
}

/// Renews a token when 80% of its lifetime has passed, as the kubelet does.
async fn refresh_token(
    shared: Arc<PodShared>,
    file: TokenFile,
    mut expiry: Timestamp,
    dir: PathBuf,
    fs_group: Option<u32>,
) {
    let ttl = file.expiration_seconds;
    loop {
        let remaining = expiry.as_second() - Timestamp::now().as_second();
        let wait = (remaining - ttl / 5).max(0);
        sleep(Duration::from_secs(u64::try_from(wait).unwrap_or(0))).await;
        let pod = shared.pod();
        match volumes::request_token(&shared.ctx.client, &pod, &file).await {
            Ok((token, new_expiry)) => {
                let target = volumes::volume_dir(&dir, &file.volume);
                if let Err(e) = volumes::write_token(target, &file, token, fs_group).await {
                    warn!(pod = %shared.display, error = %e, "writing a refreshed token");
                }
                expiry = new_expiry;
            }
            Err(e) => {
                warn!(pod = %shared.display, error = %e, "refreshing a ServiceAccount token");
                sleep(Duration::from_secs(10)).await;
            }
        }
    }
}

/// Writes the status whenever the model changed, until `stop` (then once more).
async fn status_writer(shared: Arc<PodShared>, stop: CancellationToken) {
    let api: Api<Pod> = Api::namespaced(shared.ctx.client.clone(), &shared.namespace);
    let mut last: Option<PodStatus> = None;
    loop {
        let stopping = tokio::select! {
            _ = shared.changed.notified() => false,
            _ = stop.cancelled() => true,
        };
        loop {
            let status = shared.build_status();
            if last.as_ref() == Some(&status) {
                break;
            }
            let patch = serde_json::json!({ "status": &status });
            match api
                .patch_status(&shared.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    *lock(&shared.written) = status
                        .conditions
                        .clone()
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|c| OWN_CONDITIONS.contains(&c.type_.as_str()))
                        .collect();
                    last = Some(status);
                }
                Err(kube::Error::Api(e)) if e.code == 404 => return,
                Err(e) => {
                    warn!(pod = %shared.display, error = %e, "writing pod status");
                    if stopping {
                        return;
                    }
                    tokio::select! {
                        _ = sleep(Duration::from_secs(1)) => {}
                        _ = stop.cancelled() => {}
                    }
                }
            }
        }
        if stopping {
            return;
        }
    }
}

async fn teardown(shared: &PodShared) {
    let net = lock(&shared.net).take();
    if let Some((names, ip)) = net {
        shared.ctx.network.delete(&names).await;
        lock(&shared.ctx.ipam).release(ip);
    }
    let dir = shared.dir.clone();
    let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
}

/// Deletes the pod object for good (grace 0, only this incarnation of it).
async fn delete_for_good(shared: &PodShared) {
    let api: Api<Pod> = Api::namespaced(shared.ctx.client.clone(), &shared.namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(shared.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&shared.name, &params).await {
        Ok(_) => info!(pod = %shared.display, "pod deleted"),
        Err(kube::Error::Api(e)) if e.code == 404 || e.code == 409 => {}
        Err(e) => warn!(pod = %shared.display, error = %e, "deleting pod"),
    }
}

/// The object reference of a pod, for Events.
pub fn reference(pod: &Pod) -> k8s_openapi::api::core::v1::ObjectReference {
    pod.object_ref(&())
}
