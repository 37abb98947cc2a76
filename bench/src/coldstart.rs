//! Cold starts: time to the first byte of a request to a Function at zero, through
//! `zeroscale dev`, split into the parts that belong to someone.
//!
//! Each sample calls a Function that has never run (a fresh Function per sample, all
//! registered up front), so every sample is a real wake from zero and none waits for an
//! idle timeout. For sample i:
//! - `ttfb`: the client's time from sending the request to the response head, on an
//!   already open connection;
//! - `wake_to_ready`: the activator's own measure, from the wake it issued to the first
//!   ready replica (its `zeroscale_activator_wake_to_ready_seconds` histogram, which has
//!   one observation per Function here);
//! - `activator = ttfb - wake_to_ready`: request arrival -> wake issued, plus replica
//!   ready -> request forwarded -> response head back; the goal is about this share;
//! - `platform = wake_to_ready - backend start`: dev's share (spawning the process and
//!   polling its readiness), with the backend's start time measured apart by starting
//!   the same binary and polling its port every 100 µs (median of its own samples, since
//!   one sample's start cannot be observed inside dev).

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};

/// Median and 99th percentile (nearest rank) of a set of durations, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Spread {
    pub samples: usize,
    pub median_ms: f64,
    pub p99_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

impl Spread {
    pub fn of(values_ms: &[f64]) -> Self {
        let mut v: Vec<f64> = values_ms
            .iter()
            .copied()
            .filter(|x| x.is_finite())
            .collect();
        v.sort_by(f64::total_cmp);
        if v.is_empty() {
            return Self::default();
        }
        let rank = |q: f64| {
            let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
            v[i]
        };
        Self {
            samples: v.len(),
            median_ms: rank(0.5),
            p99_ms: rank(0.99),
            min_ms: v[0],
            max_ms: v[v.len() - 1],
        }
    }
}

/// One cold request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub function: String,
    pub status: u16,
    /// The activator marked the answer as a cold start (`X-Zeroscale-Cold-Start`).
    pub cold_header: bool,
    pub ttfb_ms: f64,
    pub wake_to_ready_ms: Option<f64>,
}

/// The cold-start figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ColdStart {
    pub samples: Vec<Sample>,
    /// Exec of the backend binary to its port accepting, measured apart.
    pub backend_start: Spread,
    pub ttfb: Spread,
    pub wake_to_ready: Spread,
    /// `ttfb - wake_to_ready` per sample: zeroscale's activator share.
    pub activator_share: Spread,
    /// `wake_to_ready - median backend start` per sample: dev's process platform share.
    pub platform_share: Spread,
    pub notes: Vec<String>,
}

/// Starts the backend binary `samples` times and measures exec -> port accepting.
pub fn backend_start_times(bench_bin: &Path, samples: usize) -> Result<Vec<f64>> {
    let mut out = Vec::with_capacity(samples);
    for _ in 0..samples {
        let port = crate::run::free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let started = Instant::now();
        let mut child = Command::new(bench_bin)
            .arg("backend")
            .arg("--port")
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the backend")?;
        // A tight poll (100 µs) so the measure is the backend's, not the poller's.
        let ready = loop {
            if TcpStream::connect(addr).is_ok() {
                break Some(started.elapsed());
            }
            if started.elapsed() > Duration::from_secs(10) {
                break None;
            }
            std::thread::sleep(Duration::from_micros(100));
        };
        let _ = child.kill();
        let _ = child.wait();
        let ready = ready.context(format!("the backend on {addr} never accepted"))?;
        out.push(ready.as_secs_f64() * 1e3);
    }
    Ok(out)
}

/// The Function manifests of the cold-start run: `count` Functions at zero.
pub fn manifests(bench_bin: &Path, count: usize) -> String {
    (0..count)
        .map(|i| crate::run::function_manifest(&name(i), bench_bin, 0, 1, "60s"))
        .collect::<Vec<_>>()
        .join("---\n")
}

pub fn name(i: usize) -> String {
    format!("cold-{i:03}")
}

/// The `_sum` of the activator's wake-to-ready histogram for one Function, in ms.
pub fn wake_to_ready_ms(metrics: &str, function: &str) -> Option<f64> {
    let label = format!("function=\"{function}\"");
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix("zeroscale_activator_wake_to_ready_seconds_sum{")?;
        let (labels, value) = rest.split_once('}')?;
        if !labels.split(',').any(|l| l == label) {
            return None;
        }
        value.trim().parse::<f64>().ok().map(|s| s * 1e3)
    })
}

/// Puts the samples and the backend's start times together.
pub fn summarize(samples: Vec<Sample>, backend_ms: &[f64], mut notes: Vec<String>) -> ColdStart {
    let backend_start = Spread::of(backend_ms);
    let ttfb: Vec<f64> = samples.iter().map(|s| s.ttfb_ms).collect();
    let w2r: Vec<f64> = samples.iter().filter_map(|s| s.wake_to_ready_ms).collect();
    let activator: Vec<f64> = samples
        .iter()
        .filter_map(|s| Some(s.ttfb_ms - s.wake_to_ready_ms?))
        .collect();
    let platform: Vec<f64> = samples
        .iter()
        .filter_map(|s| Some(s.wake_to_ready_ms? - backend_start.median_ms))
        .collect();
    if w2r.len() < samples.len() {
        notes.push(format!(
            "{} of {} samples had no wake-to-ready observation",
            samples.len() - w2r.len(),
            samples.len()
        ));
    }
    let not_cold = samples.iter().filter(|s| !s.cold_header).count();
    if not_cold > 0 {
        notes.push(format!(
            "{not_cold} answers lacked the X-Zeroscale-Cold-Start header"
        ));
    }
    ColdStart {
        backend_start,
        ttfb: Spread::of(&ttfb),
        wake_to_ready: Spread::of(&w2r),
        activator_share: Spread::of(&activator),
        platform_share: Spread::of(&platform),
        samples,
        notes,
    }
}

/// Fails unless every sample got a 2xx.
pub fn check(samples: &[Sample]) -> Result<()> {
    match samples.iter().find(|s| !(200..300).contains(&s.status)) {
        Some(s) => Err(Error::msg(format!(
            "cold request to {} answered {}",
            s.function, s.status
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_uses_nearest_rank() {
        let v: Vec<f64> = (1..=25).map(f64::from).collect();
        let s = Spread::of(&v);
        assert_eq!(s.samples, 25);
        assert_eq!(s.median_ms, 13.0);
        // With 25 samples the 99th percentile is the largest one.
        assert_eq!(s.p99_ms, 25.0);
        assert_eq!(s.min_ms, 1.0);
        assert_eq!(Spread::of(&[]).samples, 0);
    }

    #[test]
    fn reads_one_functions_wake_to_ready_sum() {
        let metrics = "\
zeroscale_activator_wake_to_ready_seconds_bucket{function=\"cold-001\",namespace=\"default\",le=\"0.1\"} 1
zeroscale_activator_wake_to_ready_seconds_sum{function=\"cold-000\",namespace=\"default\"} 0.5
zeroscale_activator_wake_to_ready_seconds_sum{function=\"cold-001\",namespace=\"default\"} 0.0125
";
        assert_eq!(wake_to_ready_ms(metrics, "cold-001"), Some(12.5));
        assert_eq!(wake_to_ready_ms(metrics, "cold-00"), None);
        assert_eq!(wake_to_ready_ms(metrics, "cold-002"), None);
    }

    #[test]
    fn splits_each_sample_into_shares() {
        let sample = |ttfb, w2r| Sample {
            function: "f".into(),
            status: 200,
            cold_header: true,
            ttfb_ms: ttfb,
            wake_to_ready_ms: Some(w2r),
        };
        let cs = summarize(vec![sample(60.0, 58.0), sample(10.0, 9.0)], &[3.0], vec![]);
        assert_eq!(cs.activator_share.min_ms, 1.0);
        assert_eq!(cs.activator_share.max_ms, 2.0);
        assert_eq!(cs.platform_share.max_ms, 55.0);
        assert!(cs.notes.is_empty());
    }
}
