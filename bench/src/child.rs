//! Processes the orchestrator starts (backend, nginx, `zeroscale dev`): each one is
//! stopped when its guard drops (SIGTERM, then SIGKILL after a grace period), so a failed
//! run never leaves a proxy behind.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{Context, Result};

/// `program` as a command, run behind `launcher` (e.g. `valgrind --tool=callgrind ...`)
/// when that is not empty.
pub fn command(launcher: &[String], program: &Path) -> Command {
    match launcher.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

/// A started process, stopped on drop.
pub struct Proc {
    pub name: String,
    child: Child,
    grace: Duration,
}

impl Proc {
    /// Starts `cmd` with its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path, grace: Duration) -> Result<Self> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .context(format!("opening {}", log.display()))?;
        let err = out.try_clone().context("duplicating a log handle")?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err));
        let child = cmd.spawn().context(format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            grace,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails when the process has exited already (a proxy that could not start).
    pub fn check_running(&mut self) -> Result<()> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(crate::error::Error::msg(format!(
                "{} exited early: {status}",
                self.name
            ))),
            Err(e) => Err(crate::error::Error::msg(format!(
                "waiting for {}: {e}",
                self.name
            ))),
        }
    }

    /// SIGTERM, wait up to the grace period, then SIGKILL; reaps the process.
    pub fn stop(&mut self) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let pid = Pid::from_raw(self.child.id() as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}
