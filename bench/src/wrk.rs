//! A second opinion on the data path from wrk (Debian's), when it is installed: the same
//! targets at the high concurrencies, so a conclusion that holds with one load generator
//! but not the other shows up in the report. wrk costs less CPU per request than the
//! harness's hyper client, which matters on 2 CPUs where the client competes with the
//! proxy. It runs with one thread (`-t1`, one event loop like a proxy worker), in rounds
//! that alternate the targets like the harness's own runs; each cell reports the round
//! with the median throughput. It has no warm-up of its own: a 1 s run is made and
//! discarded first. The proxies' CPU is read from `/proc` around the measured run, so
//! wrk's start (a thread, connections: well under a millisecond here) falls inside it.

use std::path::PathBuf;
use std::process::Command;

use serde::{Deserialize, Serialize};

use crate::datapath::Target;
use crate::error::{Context, Error, Result};
use crate::procfs::Sample;

/// One wrk run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WrkRun {
    pub target: String,
    pub concurrency: usize,
    #[serde(default)]
    pub round: usize,
    pub threads: usize,
    pub duration_s: u64,
    pub requests: u64,
    pub rps: f64,
    pub p50_us: Option<f64>,
    pub p90_us: Option<f64>,
    pub p99_us: Option<f64>,
    /// Non-2xx/3xx responses plus socket errors.
    pub errors: u64,
    /// Proxy CPU microseconds per request (None for direct).
    pub proxy_cpu_us_per_request: Option<f64>,
}

/// wrk on PATH, if any.
pub fn binary() -> Option<PathBuf> {
    std::env::var("PATH").ok().and_then(|path| {
        path.split(':')
            .map(|d| PathBuf::from(d).join("wrk"))
            .find(|p| p.is_file())
    })
}

/// `wrk --version` (it prints its version with its usage and exits non-zero).
pub fn version(bin: &PathBuf) -> String {
    Command::new(bin)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string();
            // "wrk debian/4.1.0-3+b2 [epoll] Copyright ...": keep the name and version.
            let words: Vec<&str> = text.split_whitespace().take(2).collect();
            (!words.is_empty()).then(|| words.join(" "))
        })
        .unwrap_or_else(|| "wrk".into())
}

/// wrk's threads: one, as in the measurements (`wrk -t1 -c64`).
const THREADS: usize = 1;

/// Runs wrk against every target at each concurrency, `rounds` times, targets interleaved
/// and the first one rotating each round. Returns every run.
pub fn measure(
    bin: &PathBuf,
    targets: &[Target],
    host: &str,
    levels: &[usize],
    duration_s: u64,
    rounds: usize,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<WrkRun>> {
    let threads = THREADS;
    let mut out = Vec::new();
    for round in 0..rounds.max(1) {
        for &c in levels {
            for i in 0..targets.len() {
                let t = &targets[(i + round) % targets.len()];
                // Warm-up, discarded.
                run(bin, t, host, c, threads, 1)?;
                let before = sample(&t.pids)?;
                let text = run(bin, t, host, c, threads, duration_s)?;
                let after = sample(&t.pids)?;
                let mut r = parse(&text).context(format!("reading wrk's output:\n{text}"))?;
                r.target = t.name.clone();
                r.concurrency = c;
                r.round = round;
                r.threads = threads;
                r.duration_s = duration_s;
                if let (Some(a), Some(b)) = (before, after)
                    && r.requests > 0
                {
                    r.proxy_cpu_us_per_request =
                        Some(a.cpu_seconds_until(&b) * 1e6 / r.requests as f64);
                }
                log(&format!(
                    "  wrk round {} c={c:<4} {:<10} {:>9.0} req/s  p50 {:>7.1} us  p99 {:>8.1} us",
                    round + 1,
                    t.name,
                    r.rps,
                    r.p50_us.unwrap_or(f64::NAN),
                    r.p99_us.unwrap_or(f64::NAN)
                ));
                out.push(r);
            }
        }
    }
    Ok(out)
}

/// The round with the median throughput of each (target, concurrency), in run order.
pub fn median_runs(runs: &[WrkRun]) -> Vec<WrkRun> {
    let mut out: Vec<WrkRun> = Vec::new();
    for r in runs {
        if out
            .iter()
            .any(|o| o.target == r.target && o.concurrency == r.concurrency)
        {
            continue;
        }
        let mut same: Vec<&WrkRun> = runs
            .iter()
            .filter(|o| o.target == r.target && o.concurrency == r.concurrency)
            .collect();
        same.sort_by(|a, b| a.rps.total_cmp(&b.rps));
        if let Some(mid) = same.get(same.len() / 2) {
            out.push((*mid).clone());
        }
    }
    out
}

fn sample(pids: &[u32]) -> Result<Option<Sample>> {
    if pids.is_empty() {
        return Ok(None);
    }
    Sample::take(pids).map(Some)
}

fn run(
    bin: &PathBuf,
    t: &Target,
    host: &str,
    c: usize,
    threads: usize,
    duration_s: u64,
) -> Result<String> {
    let out = Command::new(bin)
        .arg(format!("-t{}", threads.min(c).max(1)))
        .arg(format!("-c{c}"))
        .arg(format!("-d{duration_s}s"))
        .arg("--latency")
        .arg("-H")
        .arg(format!("Host: {host}"))
        .arg(format!("http://{}/", t.addr))
        .output()
        .context("running wrk")?;
    if !out.status.success() {
        return Err(Error::msg(format!(
            "wrk against {} failed: {}",
            t.name,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A wrk duration ("133.00us", "2.62ms", "1.10s") in microseconds.
fn micros(text: &str) -> Option<f64> {
    let (num, scale) = if let Some(v) = text.strip_suffix("us") {
        (v, 1.0)
    } else if let Some(v) = text.strip_suffix("ms") {
        (v, 1e3)
    } else if let Some(v) = text.strip_suffix('m') {
        (v, 60e6)
    } else if let Some(v) = text.strip_suffix('s') {
        (v, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * scale)
}

/// Reads the figures of `wrk --latency` output.
fn parse(text: &str) -> Option<WrkRun> {
    let mut r = WrkRun::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", v] => r.rps = v.parse().ok()?,
            [n, "requests", "in", ..] => r.requests = n.parse().ok()?,
            ["50%", v] => r.p50_us = micros(v),
            ["90%", v] => r.p90_us = micros(v),
            ["99%", v] => r.p99_us = micros(v),
            ["Non-2xx", "or", "3xx", "responses:", n] => r.errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                r.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            _ => {}
        }
    }
    (r.rps > 0.0).then_some(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_latency_output() {
        let text = "\
Running 3s test @ http://127.0.0.1:19999/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   708.03us    1.16ms  13.29ms   85.30%
    Req/Sec   109.46k     4.99k  120.58k    66.67%
  Latency Distribution
     50%  133.00us
     75%  620.00us
     90%    2.62ms
     99%    1.10s
  653936 requests in 3.01s, 87.93MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec: 217502.05
Transfer/sec:     29.25MB
";
        let r = parse(text).unwrap();
        assert_eq!(r.requests, 653_936);
        assert_eq!(r.rps, 217_502.05);
        assert_eq!(r.p50_us, Some(133.0));
        assert_eq!(r.p90_us, Some(2620.0));
        assert_eq!(r.p99_us, Some(1_100_000.0));
        assert_eq!(r.errors, 7);
    }
}
