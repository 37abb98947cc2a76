//! HAProxy from the distribution, as the second reference proxy: the configuration is
//! `bench/haproxy.cfg.template` (keep-alive on both sides, backend connections reused,
//! one thread per CPU), run in the foreground (`-db`) as one process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::child::Proc;
use crate::error::{Context, Error, Result};

const TEMPLATE: &str = include_str!("../haproxy.cfg.template");

/// The haproxy binary: on PATH, or where Debian puts it.
pub fn binary() -> Option<PathBuf> {
    if let Ok(path) = std::env::var("PATH") {
        for dir in path.split(':') {
            let p = Path::new(dir).join("haproxy");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    ["/usr/sbin/haproxy", "/usr/local/sbin/haproxy"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// `haproxy -v`'s first line, shortened: e.g. "HAProxy 2.6.12-1+deb12u4".
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            let words: Vec<&str> = text.split_whitespace().collect();
            match words.as_slice() {
                [name, "version", v, ..] => Some(format!("{name} {v}")),
                _ => None,
            }
        })
        .unwrap_or_else(|| "haproxy".into())
}

/// The configuration for a proxy on `listen` in front of `backend` with `threads`.
pub fn render(listen: SocketAddr, backend: SocketAddr, threads: usize) -> String {
    TEMPLATE
        .replace("@LISTEN@", &listen.to_string())
        .replace("@BACKEND@", &backend.to_string())
        .replace("@THREADS@", &threads.max(1).to_string())
}

/// A running HAProxy.
pub struct Haproxy {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub version: String,
}

impl Haproxy {
    /// Writes the configuration under `dir`, checks it with `haproxy -c` and starts it,
    /// behind `launcher` (the profiler's command line) when it is not empty.
    pub fn start(
        bin: &Path,
        dir: &Path,
        listen: SocketAddr,
        backend: SocketAddr,
        threads: usize,
        launcher: &[String],
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).context(format!("creating {}", dir.display()))?;
        let conf = dir.join("haproxy.cfg");
        std::fs::write(&conf, render(listen, backend, threads))
            .context(format!("writing {}", conf.display()))?;
        let check = Command::new(bin)
            .arg("-c")
            .arg("-q")
            .arg("-f")
            .arg(&conf)
            .output()
            .context("running haproxy -c")?;
        if !check.status.success() {
            return Err(Error::msg(format!(
                "haproxy -c refused {}: {}",
                conf.display(),
                String::from_utf8_lossy(&check.stderr).trim()
            )));
        }
        let mut cmd = crate::child::command(launcher, bin);
        cmd.arg("-db").arg("-f").arg(&conf);
        let proc = Proc::spawn(
            "haproxy",
            cmd,
            &dir.join("haproxy.log"),
            Duration::from_secs(5),
        )?;
        Ok(Self {
            proc,
            listen,
            version: version(bin),
        })
    }

    /// Its one process (threads, not workers).
    pub fn pids(&self) -> Vec<u32> {
        vec![self.proc.pid()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_keep_alive_proxy() {
        let conf = render(
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
            2,
        );
        assert!(!conf.contains('@'), "placeholder left in:\n{conf}");
        for needed in [
            "nbthread 2",
            "server replica 127.0.0.1:2000",
            "bind 127.0.0.1:1000",
            "option http-keep-alive",
            "http-reuse always",
            "option forwardfor",
        ] {
            assert!(conf.contains(needed), "{needed} missing");
        }
    }
}
