//! Instructions per proxied request, counted by `valgrind --tool=callgrind`: a figure that
//! does not move with the machine's other load, unlike wall-clock throughput on 2 shared
//! CPUs. Each proxy runs under callgrind in front of a backend; after a warm-up, the
//! counters are zeroed, a fixed number of requests is sent (the harness's load generator
//! in `--requests` mode, c=64 by default), and the counters are dumped. An idle baseline
//! (zeroed, the proxy left alone for a while, dumped) gives the instructions a proxy spends
//! with no traffic (timers, dev's manifest poll and autoscaler tick), which are subtracted
//! pro rata for the time the loaded run took:
//!
//! `per request = (loaded - idle_rate x loaded_seconds) / requests answered`.
//!
//! Callgrind counts user-space instructions of every thread of the process (the kernel's
//! part, the TCP stack, is not in it: the CPU-time column covers that). It runs the
//! threads of a process one at a time, so nginx runs as one process (`master_process
//! off`, one worker) and HAProxy with one thread, while the activator runs as it always
//! does (a runtime thread per CPU): what is counted is its real configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::load::LoadResult;

/// How the counts are taken.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CountSettings {
    /// Requests sent before the counters are zeroed (pools, allocator and caches warm).
    pub warmup_requests: u64,
    /// Requests counted.
    pub requests: u64,
    pub concurrency: usize,
    /// Length of the idle baseline.
    pub idle_ms: u64,
}

/// The count of one proxy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Count {
    pub target: String,
    pub concurrency: usize,
    /// Requests answered in the counted run (any status).
    pub requests: u64,
    pub errors: u64,
    /// Instructions from zero to dump around the counted run.
    pub loaded_instructions: u64,
    pub loaded_s: f64,
    /// Instructions of the idle baseline and its length.
    pub idle_instructions: u64,
    pub idle_s: f64,
    pub per_request: f64,
    /// Where the dumps are, for `callgrind_annotate`.
    pub profile: String,
}

/// Whether valgrind and callgrind_control can be run.
pub fn available() -> bool {
    ["valgrind", "callgrind_control"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// The command line that runs a program under callgrind, dumps going to `out.<pid>.<n>`.
pub fn launcher(out: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        format!("--callgrind-out-file={}.%p", out.display()),
        // Dumps only when asked: the one at exit would mix start-up and shutdown in.
        "--dump-instr=no".into(),
        // Every dump names its functions in full, so each one reads on its own
        // (`callgrind_annotate <dump>`).
        "--compress-strings=no".into(),
        "--log-file=".to_string() + &format!("{}.valgrind.log", out.display()),
    ]
}

fn control(pid: u32, what: &str) -> Result<()> {
    let out = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("OK") {
        return Err(Error::msg(format!(
            "callgrind_control {what} {pid}: {} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// The dumps of one process, `out.<pid>.<n>`, by n.
fn dumps(out: &Path, pid: u32) -> Vec<(u32, PathBuf)> {
    let dir = out.parent().unwrap_or(Path::new("."));
    let prefix = format!(
        "{}.{pid}.",
        out.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    );
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let n = name.strip_prefix(&prefix)?.parse().ok()?;
                    Some((n, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// Zeroes the counters of `pid`.
fn zero(pid: u32) -> Result<()> {
    control(pid, "-z")
}

/// Dumps the counters of `pid` and returns the instructions since the last zero.
fn dump(out: &Path, pid: u32) -> Result<(u64, PathBuf)> {
    let before = dumps(out, pid).last().map(|(n, _)| *n).unwrap_or(0);
    control(pid, "-d")?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some((n, path)) = dumps(out, pid).pop()
            && n > before
            && let Some(total) = totals(&path)
        {
            return Ok((total, path));
        }
        if Instant::now() > deadline {
            return Err(Error::msg(format!("no callgrind dump of {pid} appeared")));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `totals:` (or `summary:`) line of a finished dump: instructions executed.
fn totals(path: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text
        .lines()
        .rev()
        .find(|l| l.starts_with("totals:"))
        .or_else(|| text.lines().find(|l| l.starts_with("summary:")))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Sends `requests` at `concurrency` through `addr` with the harness's load generator.
fn load(
    bench_bin: &Path,
    addr: SocketAddr,
    host: &str,
    concurrency: usize,
    requests: u64,
) -> Result<LoadResult> {
    let out = Command::new(bench_bin)
        .arg("load")
        .arg("--target")
        .arg(addr.to_string())
        .arg("--host")
        .arg(host)
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .arg("--requests")
        .arg(requests.to_string())
        .output()
        .context("running the load generator")?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "load generator: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    serde_json::from_slice(&out.stdout).context("reading the load generator's JSON")
}

/// Counts one proxy already running under callgrind (`launcher(out)`) as `pid`,
/// answering on `addr`.
pub fn count(
    target: &str,
    bench_bin: &Path,
    pid: u32,
    out: &Path,
    addr: SocketAddr,
    host: &str,
    settings: &CountSettings,
) -> Result<Count> {
    let warm = load(
        bench_bin,
        addr,
        host,
        settings.concurrency,
        settings.warmup_requests,
    )?;
    if warm.ok == 0 {
        return Err(Error::msg(format!(
            "{target}: no request succeeded in warm-up"
        )));
    }

    zero(pid)?;
    let idle_started = Instant::now();
    std::thread::sleep(Duration::from_millis(settings.idle_ms));
    let idle_s = idle_started.elapsed().as_secs_f64();
    let (idle_instructions, _) = dump(out, pid)?;

    zero(pid)?;
    let started = Instant::now();
    let run = load(
        bench_bin,
        addr,
        host,
        settings.concurrency,
        settings.requests,
    )?;
    let loaded_s = started.elapsed().as_secs_f64();
    let (loaded_instructions, profile) = dump(out, pid)?;

    let requests = run.ok + run.non_2xx;
    if requests == 0 {
        return Err(Error::msg(format!("{target}: no request answered")));
    }
    let idle_rate = idle_instructions as f64 / idle_s.max(1e-3);
    let work = (loaded_instructions as f64 - idle_rate * loaded_s).max(0.0);
    Ok(Count {
        target: target.to_string(),
        concurrency: settings.concurrency,
        requests,
        errors: run.errors + run.non_2xx,
        loaded_instructions,
        loaded_s,
        idle_instructions,
        idle_s,
        per_request: work / requests as f64,
        profile: profile.display().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_totals_of_a_dump() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cg.out.42.1");
        std::fs::write(
            &p,
            "events: Ir\nfn=main\n1 10\nsummary: 1234\ntotals: 1234\n",
        )
        .unwrap();
        assert_eq!(totals(&p), Some(1234));
        std::fs::write(dir.path().join("cg.out.42.2"), "totals: 5\n").unwrap();
        let found = dumps(&dir.path().join("cg.out"), 42);
        assert_eq!(found.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
    }
}
