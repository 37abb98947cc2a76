//! One local replica: a process in its own process group, restarted with exponential
//! back-off when it exits (like a container in CrashLoopBackOff), probed for readiness,
//! and stopped the way the kubelet stops a pod: drain, SIGTERM, SIGKILL after the grace
//! period.
//!
//! Replicas are started with `PR_SET_PDEATHSIG=SIGKILL`, so they die with `zeroscale dev`
//! even when it is SIGKILLed. The signal follows the thread that forked; tokio spawns
//! children from its worker threads, which live as long as the runtime.

use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};
use tracing::{debug, info, warn};

use super::output::{Output, Stream};
use super::probe;
use super::template::{Launch, ReplicaTemplate};

/// Requests in flight to an endpoint, as the data plane counts them.
pub type InFlight = Arc<dyn Fn(SocketAddr) -> u64 + Send + Sync>;

/// Stderr lines kept for the crash-loop message.
const TAIL_LINES: usize = 5;
/// Longest output line passed through as one line.
const MAX_LINE: u64 = 16 * 1024;
/// Time for the data plane to see an endpoint removal before in-flight requests are
/// counted: a request may have picked the replica just before it left the endpoints.
const ENDPOINT_PROPAGATION: Duration = Duration::from_millis(100);
/// A process that ran this long before exiting starts a fresh back-off sequence.
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(10);
/// Readiness polling before the first success when the probe sets no period: starts at
/// `FIRST_PROBE` and doubles up to `FAST_PROBE`, so a replica that binds its port within
/// milliseconds is routed within milliseconds (a cold start waits on this).
const FIRST_PROBE: Duration = Duration::from_millis(2);
const FAST_PROBE: Duration = Duration::from_millis(50);
/// A replica not ready after this long gets a warning with the last probe error.
const SLOW_START_WARNING: Duration = Duration::from_secs(10);

/// What the supervisor asks of a replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Run,
    /// Wait for in-flight requests, then SIGTERM, then SIGKILL after the grace period.
    Drain,
    /// SIGKILL now.
    Kill,
}

/// What a replica reports to its supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaEvent {
    Started {
        pid: u32,
        port: u16,
    },
    Ready(SocketAddr),
    NotReady,
    /// The process could not start or exited; it is restarted after a back-off.
    Failed {
        reason: &'static str,
        message: String,
        /// Consecutive failures, this one included.
        failures: u32,
    },
}

/// Everything a replica task needs.
pub struct ReplicaCtx {
    /// `<namespace>/<name>-<n>`, the prefix of its output lines.
    pub display: String,
    /// `<name>-<n>`: its `HOSTNAME` and endpoint name.
    pub name: String,
    pub id: u64,
    pub template: Arc<ReplicaTemplate>,
    pub events: mpsc::UnboundedSender<(u64, ReplicaEvent)>,
    pub in_flight: InFlight,
    pub output: Output,
}

impl ReplicaCtx {
    fn send(&self, event: ReplicaEvent) {
        let _ = self.events.send((self.id, event));
    }
}

/// Back-off before restart number `failures` (1-based): 0.5s doubling up to 30s.
pub fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    Duration::from_millis(500)
        .saturating_mul(1 << exp)
        .min(Duration::from_secs(30))
}

/// Runs the replica until `stop` asks it to end; returns its id.
#[tracing::instrument(name = "replica", skip_all, fields(replica = %ctx.display))]
pub async fn run(ctx: ReplicaCtx, mut stop: watch::Receiver<Stop>) -> u64 {
    let mut failures = 0u32;
    loop {
        if *stop.borrow() != Stop::Run {
            return ctx.id;
        }
        let port = match free_port() {
            Ok(p) => p,
            Err(e) => {
                failures += 1;
                ctx.send(ReplicaEvent::Failed {
                    reason: "CreateContainerError",
                    message: format!("no free local port: {e}"),
                    failures,
                });
                if wait_or_stop(backoff(failures), &mut stop).await {
                    return ctx.id;
                }
                continue;
            }
        };
        let launch = ctx.template.launch(&ctx.name, port);
        let mut process = match Process::spawn(&launch, &ctx).await {
            Ok(p) => p,
            Err(message) => {
                failures += 1;
                warn!(%message, "cannot start the replica");
                ctx.send(ReplicaEvent::Failed {
                    reason: "CreateContainerError",
                    message,
                    failures,
                });
                if wait_or_stop(backoff(failures), &mut stop).await {
                    return ctx.id;
                }
                continue;
            }
        };
        info!(pid = process.pid, port, command = %launch.program, "replica started");
        ctx.send(ReplicaEvent::Started {
            pid: process.pid,
            port,
        });
        let started = Instant::now();
        let exited = tokio::select! {
            status = process.child.wait() => Some(status),
            _ = stop.wait_for(|s| *s != Stop::Run) => None,
            () = probe_loop(&ctx, port, &launch) => None,
        };
        let Some(status) = exited else {
            process
                .terminate(
                    &ctx,
                    SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
                    &mut stop,
                )
                .await;
            return ctx.id;
        };
        // Stragglers of the group (children of the process) go with it.
        process.kill_group(Signal::SIGKILL);
        let tail = process.stderr_tail().await;
        if started.elapsed() >= BACKOFF_RESET_AFTER {
            failures = 0;
        }
        failures += 1;
        let status = match status {
            Ok(s) => describe(s),
            Err(e) => format!("could not be waited for: {e}"),
        };
        let mut message = format!("{} {status}", ctx.name);
        if !tail.is_empty() {
            message.push_str("; last output:\n");
            message.push_str(&tail.join("\n"));
        }
        let delay = backoff(failures);
        warn!(%status, restarts = failures, ?delay, "replica exited; restarting after back-off");
        ctx.send(ReplicaEvent::Failed {
            reason: "CrashLoop",
            message,
            failures,
        });
        if wait_or_stop(delay, &mut stop).await {
            return ctx.id;
        }
    }
}

/// Sleeps `delay`; true when a stop was asked for meanwhile.
async fn wait_or_stop(delay: Duration, stop: &mut watch::Receiver<Stop>) -> bool {
    tokio::select! {
        () = sleep(delay) => false,
        _ = stop.wait_for(|s| *s != Stop::Run) => true,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(sig)) => match Signal::try_from(sig) {
            Ok(s) => format!("was killed by signal {sig} ({s})"),
            Err(_) => format!("was killed by signal {sig}"),
        },
        _ => format!("exited ({status})"),
    }
}

/// Probes the replica for its whole life: reports `Ready` once the probe passes
/// `successThreshold` times, `NotReady` after `failureThreshold` failures. Never returns.
async fn probe_loop(ctx: &ReplicaCtx, port: u16, launch: &Launch) {
    let spec = &ctx.template.probe;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let started = Instant::now();
    sleep(spec.initial_delay).await;
    let (mut ready, mut warned) = (false, false);
    let (mut successes, mut failures) = (0u32, 0u32);
    let mut fast_probe = FIRST_PROBE;
    loop {
        match probe::check(spec, port, launch).await {
            Ok(()) => {
                failures = 0;
                successes += 1;
                if !ready && successes >= spec.success_threshold {
                    ready = true;
                    info!(%addr, after = ?started.elapsed(), "replica ready");
                    ctx.send(ReplicaEvent::Ready(addr));
                }
            }
            Err(error) => {
                successes = 0;
                failures += 1;
                if ready && failures >= spec.failure_threshold {
                    ready = false;
                    warn!(%error, "readiness probe failing; replica taken out of the endpoints");
                    ctx.send(ReplicaEvent::NotReady);
                } else if !ready && !warned && started.elapsed() >= SLOW_START_WARNING {
                    warned = true;
                    warn!(%error, "replica still not ready");
                } else {
                    debug!(%error, "readiness probe failed");
                }
            }
        }
        let interval = match spec.period {
            Some(p) => p,
            None if ready => Duration::from_secs(1),
            None => {
                let now = fast_probe;
                fast_probe = (fast_probe * 2).min(FAST_PROBE);
                now
            }
        };
        sleep(interval).await;
    }
}

/// A free port on the loopback interface. The replica binds it right after; another
/// process could take it in between, which shows as a failed start and a restart.
fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// A running process with its output pumps.
struct Process {
    child: Child,
    pid: u32,
    stdout: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<()>>,
    tail: Arc<Mutex<Vec<String>>>,
}

impl Process {
    async fn spawn(launch: &Launch, ctx: &ReplicaCtx) -> Result<Self, String> {
        match tokio::fs::metadata(&launch.cwd).await {
            Ok(m) if m.is_dir() => {}
            _ => {
                return Err(format!(
                    "working directory {} does not exist on this machine",
                    launch.cwd.display()
                ));
            }
        }
        let mut command = Command::new(&launch.program);
        command
            .args(&launch.args)
            .envs(launch.env.iter().map(|(k, v)| (k, v)))
            .current_dir(&launch.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let parent = nix::unistd::getpid();
        // SAFETY: runs in the forked child before exec; prctl and getppid are
        // async-signal-safe system calls and nothing here allocates or locks.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
                // The parent may have died before the prctl: then nothing would kill us.
                if nix::unistd::getppid() != parent {
                    return Err(std::io::Error::other("zeroscale dev exited"));
                }
                Ok(())
            });
        }
        let mut child = command.spawn().map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => format!(
                "command {:?} not found (looked in PATH and {})",
                launch.program,
                launch.cwd.display()
            ),
            std::io::ErrorKind::PermissionDenied => {
                format!("command {:?} is not executable: {e}", launch.program)
            }
            _ => format!("starting {:?}: {e}", launch.program),
        })?;
        let pid = child
            .id()
            .ok_or_else(|| "the process exited before it was tracked".to_string())?;
        let tail: Arc<Mutex<Vec<String>>> = Arc::default();
        let stdout = child.stdout.take().map(|out| {
            tokio::spawn(pump(
                out,
                Stream::Stdout,
                ctx.display.clone(),
                ctx.output.clone(),
                None,
            ))
        });
        let stderr = child.stderr.take().map(|err| {
            tokio::spawn(pump(
                err,
                Stream::Stderr,
                ctx.display.clone(),
                ctx.output.clone(),
                Some(tail.clone()),
            ))
        });
        Ok(Self {
            child,
            pid,
            stdout,
            stderr,
            tail,
        })
    }

    fn kill_group(&self, signal: Signal) {
        let Ok(pid) = i32::try_from(self.pid) else {
            return;
        };
        match killpg(Pid::from_raw(pid), signal) {
            Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
            Err(e) => warn!(pid, %signal, error = %e, "signalling the replica's process group"),
        }
    }

    /// The last stderr lines, once the pipes are closed (bounded wait: a detached
    /// grandchild could hold them open).
    async fn stderr_tail(&mut self) -> Vec<String> {
        for pump in [self.stderr.take(), self.stdout.take()]
            .into_iter()
            .flatten()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), pump).await;
        }
        self.tail.lock().map(|t| t.clone()).unwrap_or_default()
    }

    /// Stops the process as the kubelet stops a pod.
    async fn terminate(
        &mut self,
        ctx: &ReplicaCtx,
        addr: SocketAddr,
        stop: &mut watch::Receiver<Stop>,
    ) {
        let grace = ctx.template.grace;
        let killed = |stop: &watch::Receiver<Stop>| *stop.borrow() == Stop::Kill;
        if !killed(stop) {
            let deadline = Instant::now() + grace;
            let _ = tokio::time::timeout(ENDPOINT_PROPAGATION, stop.wait_for(|s| *s == Stop::Kill))
                .await;
            let mut logged = false;
            loop {
                let in_flight = (ctx.in_flight)(addr);
                if in_flight == 0 || killed(stop) {
                    break;
                }
                if Instant::now() >= deadline {
                    warn!(
                        in_flight,
                        ?grace,
                        "grace period over with requests in flight"
                    );
                    break;
                }
                if !logged {
                    info!(in_flight, "waiting for in-flight requests before stopping");
                    logged = true;
                }
                let _ = tokio::time::timeout(
                    Duration::from_millis(50),
                    stop.wait_for(|s| *s == Stop::Kill),
                )
                .await;
            }
        }
        if !killed(stop) {
            self.kill_group(Signal::SIGTERM);
            tokio::select! {
                _ = self.child.wait() => {}
                () = sleep(grace) => warn!(?grace, "replica ignored SIGTERM for the grace period; killing it"),
                _ = stop.wait_for(|s| *s == Stop::Kill) => {}
            }
        }
        self.kill_group(Signal::SIGKILL);
        match self.child.wait().await {
            Ok(status) => info!(status = %describe(status), "replica stopped"),
            Err(e) => warn!(error = %e, "waiting for the replica"),
        }
        let _ = self.stderr_tail().await;
    }
}

/// Copies a replica's output line by line with its prefix; keeps the last stderr lines.
async fn pump(
    pipe: impl AsyncRead + Unpin,
    stream: Stream,
    prefix: String,
    output: Output,
    tail: Option<Arc<Mutex<Vec<String>>>>,
) {
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        match (&mut reader)
            .take(MAX_LINE)
            .read_until(b'\n', &mut buf)
            .await
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some(tail) = &tail
            && let Ok(mut t) = tail.lock()
        {
            if t.len() == TAIL_LINES {
                t.remove(0);
            }
            t.push(line.to_string());
        }
        output.line(stream, format!("[{prefix}] {line}")).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let b: Vec<_> = (1..=8).map(backoff).collect();
        assert_eq!(b[0], Duration::from_millis(500));
        assert_eq!(b[1], Duration::from_secs(1));
        assert_eq!(b[2], Duration::from_secs(2));
        assert_eq!(b[7], Duration::from_secs(30));
        assert_eq!(backoff(1000), Duration::from_secs(30));
    }

    #[test]
    fn exit_statuses_read_well() {
        assert_eq!(describe(ExitStatus::from_raw(1 << 8)), "exited with code 1");
        assert_eq!(
            describe(ExitStatus::from_raw(9)),
            "was killed by signal 9 (SIGKILL)"
        );
    }
}
