//! One container of a pod, supervised as the kubelet does it: "pull" its image (map it to
//! an entrypoint, or fail with ErrImagePull / ImagePullBackOff), build its environment,
//! mounts and user, start it through the sandbox helper, probe it, restart it per the
//! pod's restartPolicy with the CrashLoopBackOff back-off, and stop it on request
//! (preStop, SIGTERM to its process group, SIGKILL at the deadline). Every change goes
//! into the pod's [`PodRun`](crate::status::PodRun) model and wakes the status writer.
//! Lifecycle hooks: postStart before probing begins, preStop before SIGTERM.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Container, Pod};
use kube::runtime::events::EventType;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep_until, timeout};
use tracing::{debug, info, warn};

use crate::backoff::{Backoff, MAX_BACKOFF, go_duration};
use crate::env::{PodFacts, command_line, container_env};
use crate::images::Resolved;
use crate::pod::{PodSetup, PodShared};
use crate::probe::{self, Action, Exec, Kind, ProbeSpec, Report, Target};
use crate::sandbox::{
    self, Bind, DEFAULT_PATH, ENTER_MODE, EnterSpec, Failure, Identity, Process, SANDBOX_MODE,
    SandboxSpec,
};
use crate::status::{ContainerRun, Exit, RunState};
use crate::volumes::{
    AUTO_TOKEN_VOLUME, PlannedVolume, SERVICE_ACCOUNT_DIR, VolumeKind, volume_dir,
};

/// The kubelet's floor for the time between SIGTERM and SIGKILL after a preStop hook.
const MIN_GRACE: Duration = Duration::from_secs(2);
/// How long ErrImagePull shows before ImagePullBackOff (the kubelet's next pod sync).
const PULL_ERROR_SHOWN: Duration = Duration::from_secs(1);
/// Longest a postStart hook may run.
const HOOK_TIMEOUT: Duration = Duration::from_secs(600);
/// Longest wait for the sandbox helper to exec the container's command.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// Which container of the pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    Init(usize),
    Main(usize),
}

/// What the pod worker asks of a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Run,
    /// preStop, SIGTERM, SIGKILL at `deadline`.
    Stop {
        deadline: Instant,
    },
    /// SIGKILL now.
    Kill,
}

/// How a supervisor ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The container ran to an end that its restart policy does not restart.
    Completed { exit_code: i32 },
    /// It was stopped by the pod worker.
    Stopped,
}

/// The "image" of a container: where its entrypoint comes from.
struct Image {
    /// (host path, path inside the container) of the entrypoint binary.
    entrypoint: Option<(PathBuf, String)>,
}

/// Everything needed to start one run of the container.
struct Prepared {
    sandbox: SandboxSpec,
    /// The process (env, user, working dir) exec probes and hooks run with.
    process: Process,
}

fn container_of(pod: &Pod, which: Which) -> Option<Container> {
    let spec = pod.spec.as_ref()?;
    match which {
        Which::Init(i) => spec.init_containers.as_ref()?.get(i).cloned(),
        Which::Main(i) => spec.containers.get(i).cloned(),
    }
}

/// The container's user, groups and privilege flags (container settings over the pod's).
pub fn identity(pod: &Pod, container: &Container) -> Result<Identity, String> {
    let pod_sc = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let sc = container.security_context.as_ref();
    let id = |v: Option<i64>| v.and_then(|v| u32::try_from(v).ok());
    let uid = id(sc.and_then(|s| s.run_as_user))
        .or_else(|| id(pod_sc.and_then(|s| s.run_as_user)))
        .unwrap_or(0);
    let gid = id(sc.and_then(|s| s.run_as_group))
        .or_else(|| id(pod_sc.and_then(|s| s.run_as_group)))
        .unwrap_or(0);
    let non_root = sc
        .and_then(|s| s.run_as_non_root)
        .or_else(|| pod_sc.and_then(|s| s.run_as_non_root))
        .unwrap_or(false);
    if non_root && uid == 0 {
        return Err("container has runAsNonRoot and image will run as root".into());
    }
    let mut groups: Vec<u32> = pod_sc
        .and_then(|s| s.supplemental_groups.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|g| u32::try_from(*g).ok())
        .collect();
    if let Some(fs_group) = id(pod_sc.and_then(|s| s.fs_group)) {
        groups.push(fs_group);
    }
    groups.sort_unstable();
    groups.dedup();
    Ok(Identity {
        uid,
        gid,
        groups,
        no_new_privs: sc.and_then(|s| s.allow_privilege_escalation) == Some(false),
    })
}

/// The container's mounts: its volumeMounts (ConfigMap, Secret, downward API and
/// projected volumes always read-only, as the kubelet mounts them), the ServiceAccount
/// volume the stand-in added, and the image's entrypoint binary.
pub fn binds(
    container: &Container,
    volumes: &[PlannedVolume],
    volumes_dir: &Path,
    env: &[(String, String)],
    entrypoint: Option<&(PathBuf, String)>,
) -> Result<Vec<Bind>, String> {
    let mut out = Vec::new();
    for m in container.volume_mounts.iter().flatten() {
        let v = volumes.iter().find(|v| v.name == m.name).ok_or_else(|| {
            format!(
                "cannot find volume \"{}\" to mount into container \"{}\"",
                m.name, container.name
            )
        })?;
        let mut source = match &v.kind {
            VolumeKind::Host(p) => p.clone(),
            _ => volume_dir(volumes_dir, &v.name),
        };
        let sub = match (&m.sub_path, &m.sub_path_expr) {
            (Some(p), _) if !p.is_empty() => Some(p.clone()),
            (_, Some(expr)) if !expr.is_empty() => {
                let lookup = |name: &str| {
                    env.iter()
                        .rev()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                Some(zeroscale::platform::local::template::expand(expr, lookup))
            }
            _ => None,
        };
        if let Some(sub) = sub {
            let p = Path::new(&sub);
            if p.is_absolute() || p.components().any(|c| c == std::path::Component::ParentDir) {
                return Err(format!("invalid subPath {sub:?}"));
            }
            source = source.join(p);
        }
        out.push(Bind {
            source,
            target: m.mount_path.clone(),
            read_only: m.read_only == Some(true) || matches!(v.kind, VolumeKind::Files { .. }),
        });
    }
    if volumes.iter().any(|v| v.name == AUTO_TOKEN_VOLUME) {
        out.push(Bind {
            source: volume_dir(volumes_dir, AUTO_TOKEN_VOLUME),
            target: SERVICE_ACCOUNT_DIR.into(),
            read_only: true,
        });
    }
    if let Some((host, image_path)) = entrypoint {
        out.push(Bind {
            source: host.clone(),
            target: image_path.clone(),
            read_only: true,
        });
    }
    Ok(out)
}

/// The process environment: a clean base (`PATH`, `HOSTNAME`, `HOME`) under the
/// container's own variables.
pub fn process_env(
    base_hostname: &str,
    uid: u32,
    env: &[(String, String)],
) -> Vec<(String, String)> {
    let home = if uid == 0 { "/root" } else { "/" };
    let mut out: Vec<(String, String)> = [
        ("PATH", DEFAULT_PATH),
        ("HOSTNAME", base_hostname),
        ("HOME", home),
    ]
    .into_iter()
    .filter(|(k, _)| !env.iter().any(|(e, _)| e == k))
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    out.extend(env.iter().cloned());
    out
}

/// `/etc/hosts` of a pod with its own network: localhost, the pod's own name and its
/// `hostAliases`, as the kubelet writes it.
pub fn hosts_file(pod: &Pod, pod_ip: &str) -> String {
    let mut s = String::from(
        "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
    );
    let name = pod.metadata.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    let hostname = spec.and_then(|s| s.hostname.clone()).unwrap_or(name);
    s.push_str(&format!("{pod_ip}\t{hostname}\n"));
    for alias in spec
        .and_then(|s| s.host_aliases.as_ref())
        .into_iter()
        .flatten()
    {
        s.push_str(&format!(
            "\n# Entries added by HostAliases.\n{}\t{}\n",
            alias.ip,
            alias.hostnames.clone().unwrap_or_default().join("\t")
        ));
    }
    s
}

/// The command line as a runtime builds it from the image and the container: `command`
/// replaces the image's ENTRYPOINT and CMD, `args` replaces CMD. A mapped image's
/// ENTRYPOINT is its binary; the available images (python, busybox, alpine) have none and
/// the CMD of their real images.
pub fn argv(
    image: &str,
    entrypoint: Option<&(PathBuf, String)>,
    command: Vec<String>,
    args: Vec<String>,
) -> Result<Vec<String>, String> {
    if !command.is_empty() {
        return Ok(command.into_iter().chain(args).collect());
    }
    if let Some((_, image_path)) = entrypoint {
        return Ok(std::iter::once(image_path.clone()).chain(args).collect());
    }
    if !args.is_empty() {
        return Ok(args);
    }
    crate::images::default_cmd(image).ok_or_else(|| {
        format!(
            "image \"{image}\" has no entrypoint or command the stand-in node knows: set \
             `command` (or map the image with --image)"
        )
    })
}

/// Supervises the container until its restart policy lets it end or the pod stops it.
pub async fn supervise(
    shared: Arc<PodShared>,
    setup: Arc<PodSetup>,
    which: Which,
    mut control: watch::Receiver<Control>,
) -> Outcome {
    let pod = shared.pod();
    let Some(container) = container_of(&pod, which) else {
        return Outcome::Completed { exit_code: 0 };
    };
    let restart_policy = pod
        .spec
        .as_ref()
        .and_then(|s| s.restart_policy.clone())
        .unwrap_or_else(|| "Always".into());
    let base = shared.ctx.restart_backoff;
    let mut restarts = Backoff::new(base, MAX_BACKOFF);
    let mut pulls = Backoff::new(base, MAX_BACKOFF);
    let name = container.name.clone();
    let image_name = container.image.clone().unwrap_or_default();
    let set = |f: &dyn Fn(&mut ContainerRun)| shared.update_container(which, f);
    let mut instances = 0;

    loop {
        if *control.borrow() != Control::Run {
            return Outcome::Stopped;
        }

        // The image: mapped to an entrypoint, merely "present", or not pullable.
        let image = match shared.ctx.images.resolve(&image_name) {
            Resolved::Unavailable => {
                let message = format!(
                    "failed to pull and unpack image \"{image_name}\": the stand-in node has no \
                     such image (map it with --image or list it with --available-image)"
                );
                set(&|c| c.state = RunState::waiting("ErrImagePull", Some(message.clone())));
                shared.event(
                    EventType::Warning,
                    "Failed",
                    format!("Failed to pull image \"{image_name}\": {message}"),
                );
                let delay = pulls.failure_delay(Instant::now());
                if wait_or_stop(&mut control, PULL_ERROR_SHOWN.min(delay)).await {
                    return Outcome::Stopped;
                }
                let message = format!("Back-off pulling image \"{image_name}\"");
                set(&|c| c.state = RunState::waiting("ImagePullBackOff", Some(message.clone())));
                shared.event(EventType::Normal, "BackOff", message);
                if wait_or_stop(&mut control, delay.saturating_sub(PULL_ERROR_SHOWN)).await {
                    return Outcome::Stopped;
                }
                continue;
            }
            Resolved::Entrypoint { host, image_path } => Image {
                entrypoint: Some((host, image_path)),
            },
            Resolved::Present => Image { entrypoint: None },
        };

        let prepared = match prepare(&shared, &setup, &container, &image).await {
            Ok(p) => p,
            Err(message) => {
                set(&|c| {
                    c.state = RunState::waiting("CreateContainerConfigError", Some(message.clone()))
                });
                shared.event(EventType::Warning, "Failed", format!("Error: {message}"));
                if wait_or_stop(&mut control, base).await {
                    return Outcome::Stopped;
                }
                continue;
            }
        };

        shared.event(
            EventType::Normal,
            "Pulled",
            format!("Container image \"{image_name}\" already present on machine"),
        );
        // The kubelet's restartCount is the number of earlier instances of the container,
        // recorded when a new one is created: a crash-looping container shows the count of
        // the instance that just exited until the next one starts.
        instances += 1;
        set(&|c| c.restart_count = instances - 1);
        let container_id = format!(
            "standin://{}-{name}-{}",
            shared.uid,
            CONTAINER_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let started_at = Timestamp::now();
        let child = match start(&shared, &name, &prepared).await {
            Ok(child) => child,
            Err(failure) => {
                let exit = Exit {
                    exit_code: 128,
                    signal: None,
                    reason: "StartError".into(),
                    message: Some(failure.message.clone()),
                    started_at: Some(started_at),
                    finished_at: Timestamp::now(),
                    container_id: Some(container_id.clone()),
                };
                shared.event(
                    EventType::Warning,
                    "Failed",
                    format!("Error: {}", failure.message),
                );
                if !restarts_after(&restart_policy, which, 128) {
                    set(&|c| c.state = RunState::Terminated(exit.clone()));
                    return Outcome::Completed { exit_code: 128 };
                }
                let delay = restarts.restart_delay(Instant::now());
                set(&|c| {
                    c.last = Some(exit.clone());
                    c.state = RunState::waiting(&failure.reason, Some(failure.message.clone()));
                    c.container_id = Some(container_id.clone());
                });
                if wait_or_stop(&mut control, delay).await {
                    return Outcome::Stopped;
                }
                continue;
            }
        };
        shared.event(
            EventType::Normal,
            "Created",
            format!("Created container {name}"),
        );
        shared.event(
            EventType::Normal,
            "Started",
            format!("Started container {name}"),
        );
        info!(pod = %shared.display, container = %name, pid = child.id(), "container started");

        let (exit, stopped) = run_until_exit(
            &shared,
            &setup,
            which,
            &container,
            child,
            &prepared,
            started_at,
            container_id.clone(),
            &mut control,
        )
        .await;
        debug!(pod = %shared.display, container = %name, code = exit.exit_code, "container exited");

        if stopped || !restarts_after(&restart_policy, which, exit.exit_code) {
            let code = exit.exit_code;
            set(&|c| {
                c.state = RunState::Terminated(exit.clone());
                c.ready = false;
            });
            return if stopped {
                Outcome::Stopped
            } else {
                Outcome::Completed { exit_code: code }
            };
        }
        let delay = restarts.restart_delay(Instant::now());
        let message = format!(
            "back-off {} restarting failed container={name} pod={}",
            go_duration(delay),
            shared.display
        );
        set(&|c| {
            c.last = Some(exit.clone());
            c.ready = false;
            c.started = false;
            c.state = if delay.is_zero() {
                RunState::Terminated(exit.clone())
            } else {
                RunState::waiting("CrashLoopBackOff", Some(message.clone()))
            };
        });
        if !delay.is_zero() {
            shared.event(
                EventType::Warning,
                "BackOff",
                format!(
                    "Back-off restarting failed container {name} in pod {}",
                    shared.display
                ),
            );
        }
        if wait_or_stop(&mut control, delay).await {
            return Outcome::Stopped;
        }
    }
}

static CONTAINER_SEQ: AtomicU64 = AtomicU64::new(0);

/// Whether an exit with `code` is followed by a restart.
fn restarts_after(policy: &str, which: Which, code: i32) -> bool {
    match (policy, which) {
        // Init containers must succeed; only Never gives up on them.
        ("Never", _) => false,
        (_, Which::Init(_)) => code != 0,
        ("OnFailure", _) => code != 0,
        _ => true,
    }
}

/// Sleeps `d` unless the pod worker asks to stop first; true when it did.
async fn wait_or_stop(control: &mut watch::Receiver<Control>, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if *control.borrow_and_update() != Control::Run {
            return true;
        }
        tokio::select! {
            _ = sleep_until(deadline) => return false,
            changed = control.changed() => if changed.is_err() { return true },
        }
    }
}

async fn prepare(
    shared: &PodShared,
    setup: &PodSetup,
    container: &Container,
    image: &Image,
) -> Result<Prepared, String> {
    let ctx = &shared.ctx;
    let pod = shared.pod();
    let identity = identity(&pod, container)?;
    let (cms, secrets) = crate::volumes::references(&pod, false);
    let sources = crate::volumes::fetch_sources(&ctx.client, &shared.namespace, &cms, &secrets)
        .await
        .map_err(|e| format!("fetching ConfigMaps and Secrets: {e}"))?;
    let services = ctx.services.state();
    let services: Vec<_> = services.iter().map(|s| s.as_ref()).collect();
    let ips = vec![setup.ip.clone()];
    let facts = PodFacts {
        pod: &pod,
        pod_ips: &ips,
        host_ip: &ctx.node_ip.to_string(),
        node_cpu_millis: crate::node::CPU_CORES as f64 * 1000.0,
        node_memory_bytes: crate::node::MEMORY_BYTES as f64,
    };
    let env = container_env(container, &facts, &sources, &services).map_err(|e| e.0)?;
    let (command, args) = command_line(container, &env);
    let image_name = container.image.clone().unwrap_or_default();
    let argv = argv(&image_name, image.entrypoint.as_ref(), command, args)?;
    let binds = binds(
        container,
        &setup.volumes,
        &shared.dir.join("volumes"),
        &env,
        image.entrypoint.as_ref(),
    )?;
    for b in &binds {
        // A subPath that does not exist yet is created in the volume, as the kubelet does.
        if b.source.starts_with(&shared.dir)
            && !tokio::fs::try_exists(&b.source).await.unwrap_or(false)
        {
            tokio::fs::create_dir_all(&b.source)
                .await
                .map_err(|e| format!("subPath {}: {e}", b.source.display()))?;
        }
    }
    // The pod's `hostname` field, else its name; host-network pods keep the node's.
    let hostname = if setup.netns.is_some() {
        pod.spec
            .as_ref()
            .and_then(|s| s.hostname.clone())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| shared.name.clone())
    } else {
        nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| shared.name.clone())
    };
    let process = Process {
        argv,
        env: process_env(&hostname, identity.uid, &env),
        working_dir: container.working_dir.clone().filter(|w| !w.is_empty()),
        identity,
    };
    let read_only_root = container
        .security_context
        .as_ref()
        .and_then(|s| s.read_only_root_filesystem)
        == Some(true);
    let fs_dir = shared.container_dir(&container.name).join("fs");
    Ok(Prepared {
        sandbox: SandboxSpec {
            netns: setup.netns.clone(),
            fs_dir,
            hostname: setup.netns.as_ref().map(|_| hostname.clone()),
            hosts: setup.hosts.clone(),
            binds,
            read_only_root,
            process: process.clone(),
            parent: ctx.parent_pid,
        },
        process,
    })
}

/// Spawns this binary in a helper mode, in its own process group and with the
/// parent-death signal, and waits until it has exec'd the target (or failed to).
async fn spawn_helper(
    parent: i32,
    args: Vec<OsString>,
    stdout: Stdio,
    stderr: Stdio,
) -> Result<Child, Failure> {
    let failure = |e: std::io::Error| Failure {
        reason: "CreateContainerError".into(),
        message: e.to_string(),
    };
    let (read, write) = sandbox::status_pipe().map_err(failure)?;
    let mut cmd = Command::new("/proc/self/exe");
    cmd.args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(false);
    let write_fd = write.as_raw_fd();
    // SAFETY: runs in the forked child before exec: prctl, getppid, fcntl and dup2 are
    // async-signal-safe and touch only this process.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != parent {
                return Err(std::io::Error::other("the stand-in exited"));
            }
            sandbox::install_status_fd(write_fd)
        });
    }
    let mut child = cmd.spawn().map_err(failure)?;
    drop(write);
    let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(read).map_err(failure)?;
    let mut report = Vec::new();
    match timeout(START_TIMEOUT, pipe.read_to_end(&mut report)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(failure(e)),
        Err(_) => {
            kill_group(child.id(), Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(Failure {
                reason: "CreateContainerError".into(),
                message: "timed out setting up the container".into(),
            });
        }
    }
    if report.is_empty() {
        return Ok(child);
    }
    let _ = child.wait().await;
    Err(serde_json::from_slice(&report).unwrap_or_else(|_| Failure {
        reason: "CreateContainerError".into(),
        message: String::from_utf8_lossy(&report).into_owned(),
    }))
}

async fn start(shared: &PodShared, name: &str, prepared: &Prepared) -> Result<Child, Failure> {
    let create = |e: std::io::Error| Failure {
        reason: "CreateContainerError".into(),
        message: e.to_string(),
    };
    let dir = shared.container_dir(name);
    tokio::fs::create_dir_all(dir.join("fs"))
        .await
        .map_err(create)?;
    let spec_path = dir.join("sandbox.json");
    let json =
        serde_json::to_vec(&prepared.sandbox).map_err(|e| create(std::io::Error::other(e)))?;
    tokio::fs::write(&spec_path, json).await.map_err(create)?;
    let mut child = spawn_helper(
        shared.ctx.parent_pid,
        vec![SANDBOX_MODE.into(), spec_path.into_os_string()],
        Stdio::piped(),
        Stdio::piped(),
    )
    .await?;
    let sink = shared.log_sink(name).map_err(create)?;
    if let Some(out) = child.stdout.take() {
        tokio::spawn(sink.clone().pump(out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(sink.pump(err));
    }
    Ok(child)
}

fn kill_group(pid: Option<u32>, signal: Signal) {
    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
        let _ = killpg(Pid::from_raw(pid), signal);
    }
}

/// Runs commands inside a running container through the `enter` helper.
struct ContainerExec {
    pid: i32,
    parent: i32,
    process: Process,
    dir: PathBuf,
}

static EXEC_SEQ: AtomicU64 = AtomicU64::new(0);

impl Exec for ContainerExec {
    fn exec(&self, argv: Vec<String>, limit: Duration) -> BoxFuture<'static, Result<i32, String>> {
        let spec = EnterSpec {
            process: Process {
                argv,
                ..self.process.clone()
            },
            parent: self.parent,
        };
        let path = self.dir.join(format!(
            "exec-{}.json",
            EXEC_SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let (pid, parent) = (self.pid, self.parent);
        Box::pin(async move {
            let json = serde_json::to_vec(&spec).map_err(|e| e.to_string())?;
            tokio::fs::write(&path, json)
                .await
                .map_err(|e| e.to_string())?;
            let spawned = spawn_helper(
                parent,
                vec![
                    ENTER_MODE.into(),
                    pid.to_string().into(),
                    path.clone().into_os_string(),
                ],
                Stdio::null(),
                Stdio::null(),
            )
            .await;
            let _ = tokio::fs::remove_file(&path).await;
            let mut child = spawned.map_err(|f| f.message)?;
            match timeout(limit, child.wait()).await {
                Ok(Ok(status)) => Ok(status.code().unwrap_or(128)),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => {
                    kill_group(child.id(), Signal::SIGKILL);
                    let _ = child.wait().await;
                    Err(format!("command timed out after {}", go_duration(limit)))
                }
            }
        })
    }
}

/// SIGTERM (after the preStop hook) then SIGKILL at `deadline`, as the kubelet's
/// `killContainer` does; the preStop hook's time counts against the grace period but the
/// process always gets at least [`MIN_GRACE`] after it.
async fn kill_container(
    pid: Option<u32>,
    pre_stop: Option<Action>,
    target: Target,
    deadline: Instant,
    shared: Arc<PodShared>,
    name: String,
) {
    let mut deadline = deadline;
    if let Some(action) = pre_stop {
        let budget = deadline.saturating_duration_since(Instant::now());
        if let Err(e) = probe::run_action(&action, &target, budget).await {
            shared.event(
                EventType::Warning,
                "FailedPreStopHook",
                format!("PreStopHook failed for container {name}: {e}"),
            );
        }
        deadline = deadline.max(Instant::now() + MIN_GRACE);
    }
    kill_group(pid, Signal::SIGTERM);
    sleep_until(deadline).await;
    kill_group(pid, Signal::SIGKILL);
}

/// The container from start to exit: probes, liveness kills, the pod worker's stop.
/// Returns the exit and whether the pod worker stopped it.
#[allow(clippy::too_many_arguments)]
async fn run_until_exit(
    shared: &Arc<PodShared>,
    setup: &PodSetup,
    which: Which,
    container: &Container,
    mut child: Child,
    prepared: &Prepared,
    started_at: Timestamp,
    container_id: String,
    control: &mut watch::Receiver<Control>,
) -> (Exit, bool) {
    let name = container.name.clone();
    let pid = child.id();
    let target = Target {
        ip: setup.ip.clone(),
        exec: Arc::new(ContainerExec {
            pid: pid.and_then(|p| i32::try_from(p).ok()).unwrap_or(0),
            parent: shared.ctx.parent_pid,
            process: prepared.process.clone(),
            dir: shared.container_dir(&name),
        }),
        version: shared.ctx.version.clone(),
    };
    let parse = |p: Option<&k8s_openapi::api::core::v1::Probe>| -> Option<ProbeSpec> {
        let p = p?;
        match probe::parse_probe(p, container) {
            Ok(spec) => Some(spec),
            Err(e) => {
                warn!(pod = %shared.display, container = %name, error = %e, "unusable probe");
                None
            }
        }
    };
    // Init containers are not probed.
    let probed = matches!(which, Which::Main(_));
    let startup = parse(container.startup_probe.as_ref()).filter(|_| probed);
    let readiness = parse(container.readiness_probe.as_ref()).filter(|_| probed);
    let liveness = parse(container.liveness_probe.as_ref()).filter(|_| probed);
    let pre_stop = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|h| probe::parse_handler(h, container).ok());
    let post_start = container
        .lifecycle
        .as_ref()
        .and_then(|l| l.post_start.as_ref())
        .and_then(|h| probe::parse_handler(h, container).ok());
    let pod_grace = Duration::from_secs(
        shared
            .pod()
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(30),
    );

    let begun = Instant::now();
    let (tx, mut reports) = mpsc::unbounded_channel::<Report>();
    let mut probes = JoinSet::new();
    let spawn_probe = |probes: &mut JoinSet<()>, kind: Kind, spec: &ProbeSpec| {
        let first = (begun + spec.initial_delay).max(Instant::now());
        probes.spawn(probe::probe_task(
            kind,
            spec.clone(),
            first,
            target.clone(),
            tx.clone(),
        ));
    };
    let start_main_probes = |probes: &mut JoinSet<()>| {
        if let Some(spec) = &readiness {
            spawn_probe(probes, Kind::Readiness, spec);
        }
        if let Some(spec) = &liveness {
            spawn_probe(probes, Kind::Liveness, spec);
        }
    };
    let no_readiness = readiness.is_none();
    let begin_probes = |probes: &mut JoinSet<()>| match &startup {
        Some(spec) => spawn_probe(probes, Kind::Startup, spec),
        None => start_main_probes(probes),
    };
    // A postStart hook runs first; probing starts when it succeeded, and its failure kills
    // the container (the kubelet's FailedPostStartHook).
    let (hook_tx, mut hook_done) = mpsc::unbounded_channel::<Result<(), String>>();
    let has_hook = post_start.is_some();
    match post_start {
        Some(action) => {
            let target = target.clone();
            probes.spawn(async move {
                let result = probe::run_action(&action, &target, HOOK_TIMEOUT).await;
                let _ = hook_tx.send(result);
            });
        }
        None => begin_probes(&mut probes),
    }
    let started = startup.is_none() && !has_hook;
    shared.update_container(which, &|c| {
        c.state = RunState::Running { started_at };
        c.container_id = Some(container_id.clone());
        c.started = started;
        c.ready = started && no_readiness;
    });

    let mut killer: Option<tokio::task::JoinHandle<()>> = None;
    let mut stopped = false;
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(hook) = hook_done.recv() => match hook {
                Ok(()) => {
                    if startup.is_none() {
                        shared.update_container(which, &|c| {
                            c.started = true;
                            c.ready = no_readiness;
                        });
                    }
                    begin_probes(&mut probes);
                }
                Err(e) if killer.is_none() => {
                    shared.event(
                        EventType::Warning,
                        "FailedPostStartHook",
                        format!("PostStartHook failed for container {name}: {e}"),
                    );
                    killer = Some(tokio::spawn(kill_container(
                        pid, None, target.clone(), Instant::now() + pod_grace,
                        shared.clone(), name.clone(),
                    )));
                }
                Err(_) => {}
            },
            Some(report) = reports.recv() => {
                if let Some(failure) = &report.failure {
                    shared.event(
                        EventType::Warning,
                        "Unhealthy",
                        format!("{} probe failed: {failure}", report.kind.label()),
                    );
                }
                match (report.kind, report.verdict) {
                    (Kind::Startup, Some(true)) => {
                        shared.update_container(which, &|c| {
                            c.started = true;
                            c.ready = no_readiness;
                        });
                        start_main_probes(&mut probes);
                    }
                    (Kind::Readiness, Some(ready)) => {
                        shared.update_container(which, &|c| c.ready = ready);
                    }
                    (Kind::Startup | Kind::Liveness, Some(false)) if killer.is_none() => {
                        let spec = if report.kind == Kind::Startup { &startup } else { &liveness };
                        let grace = spec.as_ref().and_then(|s| s.termination_grace).unwrap_or(pod_grace);
                        shared.event(
                            EventType::Normal,
                            "Killing",
                            format!("Container {name} failed {} probe, will be restarted",
                                report.kind.label().to_lowercase()),
                        );
                        killer = Some(tokio::spawn(kill_container(
                            pid, pre_stop.clone(), target.clone(), Instant::now() + grace,
                            shared.clone(), name.clone(),
                        )));
                    }
                    _ => {}
                }
            }
            changed = control.changed() => {
                let now = *control.borrow_and_update();
                match (changed, now) {
                    (Err(_), _) | (Ok(()), Control::Kill) => {
                        stopped = true;
                        kill_group(pid, Signal::SIGKILL);
                    }
                    (Ok(()), Control::Stop { deadline }) if !stopped => {
                        stopped = true;
                        shared.event(EventType::Normal, "Killing", format!("Stopping container {name}"));
                        if let Some(k) = killer.take() {
                            k.abort();
                        }
                        killer = Some(tokio::spawn(kill_container(
                            pid, pre_stop.clone(), target.clone(), deadline,
                            shared.clone(), name.clone(),
                        )));
                    }
                    _ => {}
                }
            }
        }
    };
    if let Some(k) = killer {
        k.abort();
    }
    probes.abort_all();
    // Whatever the main process left behind in its group goes with it.
    kill_group(pid, Signal::SIGKILL);
    let exit = match status {
        Ok(s) => {
            use std::os::unix::process::ExitStatusExt;
            Exit::of_process(s.code(), s.signal(), started_at, container_id)
        }
        Err(e) => Exit {
            exit_code: 128,
            signal: None,
            reason: "Error".into(),
            message: Some(e.to_string()),
            started_at: Some(started_at),
            finished_at: Timestamp::now(),
            container_id: Some(container_id),
        },
    };
    (exit, stopped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(spec: serde_json::Value) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": spec}))
            .unwrap()
    }

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn identity_takes_the_container_over_the_pod() {
        let p = pod(
            json!({"containers": [], "securityContext": {"runAsUser": 1000, "runAsGroup": 2000,
            "fsGroup": 3000, "supplementalGroups": [4000]}}),
        );
        let c = container(json!({"name": "c", "securityContext": {"runAsUser": 65532,
            "allowPrivilegeEscalation": false}}));
        assert_eq!(
            identity(&p, &c).unwrap(),
            Identity {
                uid: 65532,
                gid: 2000,
                groups: vec![3000, 4000],
                no_new_privs: true
            }
        );
        let root = container(json!({"name": "c", "securityContext": {"runAsNonRoot": true}}));
        assert!(identity(&pod(json!({"containers": []})), &root).is_err());
    }

    #[test]
    fn mounts_are_read_only_for_generated_volumes() {
        let planned = vec![
            PlannedVolume {
                name: "cfg".into(),
                kind: VolumeKind::Files {
                    files: vec![],
                    tokens: vec![],
                },
            },
            PlannedVolume {
                name: "scratch".into(),
                kind: VolumeKind::Empty,
            },
        ];
        let c = container(json!({"name": "c", "volumeMounts": [
            {"name": "cfg", "mountPath": "/etc/zeroscale"},
            {"name": "scratch", "mountPath": "/work", "subPathExpr": "$(POD)"},
        ]}));
        let env = vec![("POD".to_string(), "p-1".to_string())];
        let entry = (PathBuf::from("/host/zeroscale"), "/zeroscale".to_string());
        let b = binds(&c, &planned, Path::new("/state/v"), &env, Some(&entry)).unwrap();
        assert_eq!(
            b,
            vec![
                Bind {
                    source: "/state/v/cfg".into(),
                    target: "/etc/zeroscale".into(),
                    read_only: true
                },
                Bind {
                    source: "/state/v/scratch/p-1".into(),
                    target: "/work".into(),
                    read_only: false
                },
                Bind {
                    source: "/host/zeroscale".into(),
                    target: "/zeroscale".into(),
                    read_only: true
                },
            ]
        );
        let bad =
            container(json!({"name": "c", "volumeMounts": [{"name": "nope", "mountPath": "/x"}]}));
        assert!(binds(&bad, &planned, Path::new("/s"), &[], None).is_err());
    }

    #[test]
    fn the_environment_is_clean_with_container_values_winning() {
        let env = process_env(
            "web-1",
            0,
            &[("PATH".into(), "/opt/bin".into()), ("A".into(), "1".into())],
        );
        assert_eq!(
            env,
            vec![
                ("HOSTNAME".to_string(), "web-1".to_string()),
                ("HOME".to_string(), "/root".to_string()),
                ("PATH".to_string(), "/opt/bin".to_string()),
                ("A".to_string(), "1".to_string()),
            ]
        );
        let env = process_env("web-1", 65532, &[]);
        assert!(env.contains(&("HOME".to_string(), "/".to_string())));
        assert!(env.contains(&("PATH".to_string(), DEFAULT_PATH.to_string())));
    }

    #[test]
    fn command_lines_follow_entrypoint_and_cmd_rules() {
        let v = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let entry = (PathBuf::from("/b/zeroscale"), "/zeroscale".to_string());
        assert_eq!(
            argv(
                "ghcr.io/zeroscale/zeroscale:1",
                Some(&entry),
                vec![],
                v(&["operator"])
            )
            .unwrap(),
            v(&["/zeroscale", "operator"])
        );
        assert_eq!(
            argv("x", Some(&entry), v(&["sh", "-c"]), v(&["echo"])).unwrap(),
            v(&["sh", "-c", "echo"])
        );
        assert_eq!(
            argv("busybox", None, vec![], v(&["echo", "hi"])).unwrap(),
            v(&["echo", "hi"])
        );
        assert_eq!(
            argv("busybox:1.36", None, vec![], vec![]).unwrap(),
            v(&["sh"])
        );
        assert_eq!(
            argv("python:3.12-alpine", None, vec![], vec![]).unwrap(),
            v(&["python3"])
        );
        assert!(argv("example/unknown", None, vec![], vec![]).is_err());
    }

    #[test]
    fn restart_policies() {
        assert!(restarts_after("Always", Which::Main(0), 0));
        assert!(restarts_after("Always", Which::Main(0), 1));
        assert!(!restarts_after("OnFailure", Which::Main(0), 0));
        assert!(restarts_after("OnFailure", Which::Main(0), 1));
        assert!(!restarts_after("Never", Which::Main(0), 1));
        assert!(!restarts_after("Always", Which::Init(0), 0));
        assert!(restarts_after("Always", Which::Init(0), 1));
        assert!(!restarts_after("Never", Which::Init(0), 1));
    }

    #[test]
    fn hosts_files_name_the_pod() {
        let p: Pod = serde_json::from_value(
            json!({"metadata": {"name": "web-1"}, "spec": {"containers": [],
            "hostAliases": [{"ip": "10.0.0.9", "hostnames": ["db", "db.local"]}]}}),
        )
        .unwrap();
        let h = hosts_file(&p, "10.244.0.7");
        assert!(h.contains("127.0.0.1\tlocalhost\n"));
        assert!(h.contains("10.244.0.7\tweb-1\n"));
        assert!(h.contains("10.0.0.9\tdb\tdb.local\n"));
    }
}
