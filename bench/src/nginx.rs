//! nginx from the distribution, as the reference proxy: the configuration is
//! `bench/nginx.conf.template` (upstream keep-alive, HTTP/1.1, `Connection ""`), run in
//! the foreground with its own prefix under the results directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::child::Proc;
use crate::error::{Context, Error, Result};
use crate::procfs;

const TEMPLATE: &str = include_str!("../nginx.conf.template");

/// The nginx binary: on PATH, or where Debian puts it.
pub fn binary() -> Option<PathBuf> {
    let candidates = ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"];
    if let Ok(path) = std::env::var("PATH") {
        for dir in path.split(':') {
            let p = Path::new(dir).join("nginx");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    candidates.iter().map(PathBuf::from).find(|p| p.is_file())
}

/// `nginx -v`, e.g. "nginx/1.22.1".
pub fn version(bin: &Path) -> String {
    Command::new(bin)
        .arg("-v")
        .output()
        .ok()
        .map(|o| {
            // nginx prints its version on stderr.
            let text = String::from_utf8_lossy(&o.stderr).to_string();
            text.trim()
                .trim_start_matches("nginx version: ")
                .to_string()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The configuration for a proxy on `listen` in front of `backend`. `workers == 0` is
/// nginx in one process (`master_process off`, one worker): the form the instruction
/// counts run under the profiler, which follows one process.
pub fn render(prefix: &Path, listen: SocketAddr, backend: SocketAddr, workers: usize) -> String {
    let conf = TEMPLATE
        .replace("@PREFIX@", &prefix.display().to_string())
        .replace("@LISTEN@", &listen.to_string())
        .replace("@BACKEND@", &backend.to_string());
    if workers == 0 {
        conf.replace("@WORKERS@", "1")
            .replace("master_process on;", "master_process off;")
    } else {
        conf.replace("@WORKERS@", &workers.to_string())
    }
}

/// A running nginx.
pub struct Nginx {
    pub proc: Proc,
    pub listen: SocketAddr,
    pub version: String,
}

impl Nginx {
    /// Writes the configuration under `prefix`, checks it with `nginx -t` and starts it,
    /// behind `launcher` (the profiler's command line) when it is not empty.
    pub fn start(
        bin: &Path,
        prefix: &Path,
        listen: SocketAddr,
        backend: SocketAddr,
        workers: usize,
        launcher: &[String],
    ) -> Result<Self> {
        std::fs::create_dir_all(prefix).context(format!("creating {}", prefix.display()))?;
        let conf = prefix.join("nginx.conf");
        std::fs::write(&conf, render(prefix, listen, backend, workers))
            .context(format!("writing {}", conf.display()))?;
        let mut check = Command::new(bin);
        check
            .arg("-t")
            .arg("-q")
            .arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("error.log"));
        let status = check.status().context("running nginx -t")?;
        if !status.success() {
            return Err(Error::msg(format!(
                "nginx -t refused {} (see {})",
                conf.display(),
                prefix.join("error.log").display()
            )));
        }
        let mut cmd = crate::child::command(launcher, bin);
        cmd.arg("-p")
            .arg(prefix)
            .arg("-c")
            .arg(&conf)
            .arg("-e")
            .arg(prefix.join("error.log"));
        let proc = Proc::spawn(
            "nginx",
            cmd,
            &prefix.join("stdout.log"),
            Duration::from_secs(5),
        )?;
        Ok(Self {
            proc,
            listen,
            version: version(bin),
        })
    }

    /// The master and its workers: what the CPU and memory figures add up.
    pub fn pids(&self) -> Vec<u32> {
        let master = self.proc.pid();
        let mut pids = vec![master];
        pids.extend(procfs::children(master));
        pids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_keep_alive_proxy() {
        let conf = render(
            Path::new("/tmp/x"),
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
            2,
        );
        assert!(!conf.contains('@'), "placeholder left in:\n{conf}");
        let single = render(
            Path::new("/tmp/x"),
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
            0,
        );
        assert!(single.contains("master_process off;") && single.contains("worker_processes 1;"));
        for needed in [
            "worker_processes 2;",
            "server 127.0.0.1:2000;",
            "listen 127.0.0.1:1000",
            "proxy_http_version 1.1;",
            "proxy_set_header Connection \"\";",
            "keepalive 256;",
        ] {
            assert!(conf.contains(needed), "{needed} missing");
        }
    }
}
