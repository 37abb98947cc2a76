//! The warm data path: the same backend process reached three ways — straight, through
//! zeroscale's activator (`zeroscale dev`, a separate process) and through nginx (a
//! keep-alive reverse proxy, separate processes) — at the same concurrencies, for the
//! same warm-up and window, each run a fresh load-generator process.
//!
//! Rounds interleave the targets (and rotate which goes first) so that drift in the
//! machine's other load spreads over all three instead of landing on one; each cell
//! reports the round with the median throughput, and the JSON keeps every round.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::load::LoadResult;

/// One way of reaching the backend.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    /// `direct`, `zeroscale` or `nginx`.
    pub name: String,
    pub addr: SocketAddr,
    /// What it is, for the report.
    pub description: String,
    /// The proxy's processes (empty for `direct`).
    pub pids: Vec<u32>,
}

/// One load run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub target: String,
    pub concurrency: usize,
    pub round: usize,
    pub result: LoadResult,
    /// The backend's own CPU in the window (the same process for every target).
    pub backend_cpu_s: f64,
}

impl Run {
    fn requests(&self) -> u64 {
        self.result.ok + self.result.non_2xx
    }

    /// CPU microseconds the proxy spent per request answered in the window.
    pub fn proxy_cpu_us_per_request(&self) -> Option<f64> {
        (self.requests() > 0 && self.result.sampled_start.is_some())
            .then(|| self.result.sampled_cpu_s * 1e6 / self.requests() as f64)
    }

    pub fn backend_cpu_us_per_request(&self) -> Option<f64> {
        (self.requests() > 0).then(|| self.backend_cpu_s * 1e6 / self.requests() as f64)
    }
}

/// What the load runs share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadSettings {
    pub warmup_ms: u64,
    pub duration_ms: u64,
    pub rounds: usize,
    /// The fixed concurrencies, plus the one of the max-throughput run.
    pub concurrency: Vec<usize>,
    pub max_concurrency: usize,
    pub host: String,
}

/// Runs every (round, concurrency, target) and returns the runs in order.
pub fn measure(
    bench_bin: &Path,
    targets: &[Target],
    backend_pid: u32,
    settings: &LoadSettings,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<Run>> {
    let mut levels = settings.concurrency.clone();
    if !levels.contains(&settings.max_concurrency) {
        levels.push(settings.max_concurrency);
    }
    let mut runs = Vec::new();
    for round in 0..settings.rounds.max(1) {
        for &c in &levels {
            for i in 0..targets.len() {
                let target = &targets[(i + round) % targets.len()];
                let run = one(bench_bin, target, backend_pid, c, round, settings)?;
                log(&format!(
                    "  round {} c={:<4} {:<10} {:>9.0} req/s  p50 {:>7.1} us  p99 {:>8.1} us  errors {}",
                    round + 1,
                    c,
                    target.name,
                    run.result.rps,
                    run.result.latency.p50_us,
                    run.result.latency.p99_us,
                    run.result.errors + run.result.non_2xx
                ));
                runs.push(run);
            }
        }
    }
    Ok(runs)
}

/// One load-generator process against one target.
fn one(
    bench_bin: &Path,
    target: &Target,
    backend_pid: u32,
    concurrency: usize,
    round: usize,
    settings: &LoadSettings,
) -> Result<Run> {
    let mut cmd = Command::new(bench_bin);
    cmd.arg("load")
        .arg("--target")
        .arg(target.addr.to_string())
        .arg("--host")
        .arg(&settings.host)
        .arg("--concurrency")
        .arg(concurrency.to_string())
        .arg("--warmup-ms")
        .arg(settings.warmup_ms.to_string())
        .arg("--duration-ms")
        .arg(settings.duration_ms.to_string())
        .arg("--backend-pid")
        .arg(backend_pid.to_string());
    for pid in &target.pids {
        cmd.arg("--sample-pid").arg(pid.to_string());
    }
    let out = cmd.output().context("running the load generator")?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "load generator against {} (c={concurrency}) failed: {}",
            target.name,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let result: LoadResult =
        serde_json::from_slice(&out.stdout).context("reading the load generator's JSON")?;
    let backend_cpu_s = result.backend_cpu_s;
    Ok(Run {
        target: target.name.clone(),
        concurrency,
        round,
        result,
        backend_cpu_s,
    })
}

/// The round with the median throughput of each (target, concurrency).
pub fn median_runs(runs: &[Run]) -> Vec<Run> {
    let mut keys: Vec<(String, usize)> = runs
        .iter()
        .map(|r| (r.target.clone(), r.concurrency))
        .collect();
    keys.dedup();
    let mut seen = Vec::new();
    let mut out = Vec::new();
    for key in keys {
        if seen.contains(&key) {
            continue;
        }
        let mut same: Vec<&Run> = runs
            .iter()
            .filter(|r| r.target == key.0 && r.concurrency == key.1)
            .collect();
        same.sort_by(|a, b| a.result.rps.total_cmp(&b.result.rps));
        if let Some(mid) = same.get(same.len() / 2) {
            out.push((*mid).clone());
        }
        seen.push(key);
    }
    out
}

/// Time a load run takes, to tell the user what to expect.
pub fn expected_duration(settings: &LoadSettings, targets: usize) -> Duration {
    let levels = settings.concurrency.len()
        + usize::from(!settings.concurrency.contains(&settings.max_concurrency));
    let per_run = Duration::from_millis(settings.warmup_ms + settings.duration_ms + 150);
    per_run * (levels * targets * settings.rounds.max(1)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(target: &str, c: usize, round: usize, rps: f64) -> Run {
        Run {
            target: target.into(),
            concurrency: c,
            round,
            result: LoadResult {
                rps,
                ..LoadResult::default()
            },
            backend_cpu_s: 0.0,
        }
    }

    #[test]
    fn reports_the_median_round_of_each_cell() {
        let runs = vec![
            run("nginx", 1, 0, 10.0),
            run("zeroscale", 1, 0, 5.0),
            run("nginx", 1, 1, 30.0),
            run("zeroscale", 1, 1, 7.0),
            run("nginx", 1, 2, 20.0),
            run("zeroscale", 1, 2, 6.0),
        ];
        let cells = median_runs(&runs);
        assert_eq!(cells.len(), 2);
        let nginx = cells.iter().find(|r| r.target == "nginx").unwrap();
        assert_eq!((nginx.round, nginx.result.rps), (2, 20.0));
        let zs = cells.iter().find(|r| r.target == "zeroscale").unwrap();
        assert_eq!((zs.round, zs.result.rps), (2, 6.0));
    }
}
