//! The load generator: `concurrency` keep-alive HTTP/1.1 connections, each sending its
//! next request as soon as the previous response has been read in full (a closed loop),
//! for a warm-up and then a measured window. Only requests that start and finish inside
//! the window count, in throughput and in latency (an HDR histogram per connection, in
//! nanoseconds, 3 significant digits). CPU time of the processes under test is read from
//! `/proc` exactly at the window's edges, so warm-up work is excluded there too.
//!
//! A closed loop measures service time: when the server stalls, the clients stall with
//! it and send less, so tail latencies understate what an open-loop client would see
//! (coordinated omission). The same loop drives every target, so the comparison holds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::error::{Context, Error, Result};
use crate::procfs::Sample;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where to send requests (a loopback address).
    #[arg(long)]
    pub target: SocketAddr,
    /// The Host header of every request (routes to the Function through the activator).
    #[arg(long, default_value = "bench.default")]
    pub host: String,
    /// Request path.
    #[arg(long, default_value = "/")]
    pub path: String,
    /// Connections, each with one request at a time.
    #[arg(long, default_value_t = 1)]
    pub concurrency: usize,
    /// Warm-up before the measured window, in milliseconds (not counted anywhere).
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
    /// The measured window, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    pub duration_ms: u64,
    /// Processes whose CPU time is read at the window's edges (repeatable).
    #[arg(long = "sample-pid")]
    pub sample_pids: Vec<u32>,
    /// The backend process, whose CPU time is read the same way and reported apart.
    #[arg(long)]
    pub backend_pid: Option<u32>,
    /// Runtime worker threads (default: one per CPU).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Send exactly this many requests (shared by the connections) and stop, instead of
    /// a timed warm-up and window: every request counts. The instruction counts use it,
    /// so that the work under the profiler is the same for every proxy.
    #[arg(long)]
    pub requests: Option<u64>,
}

/// Latency percentiles, in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    pub mean_us: f64,
}

/// What one load run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoadResult {
    pub concurrency: usize,
    pub window_s: f64,
    /// Responses with a 2xx status inside the window.
    pub ok: u64,
    /// Responses with another status inside the window.
    pub non_2xx: u64,
    /// Failed requests (connection or protocol errors) inside the window.
    pub errors: u64,
    /// `ok / window_s`.
    pub rps: f64,
    pub latency: Latency,
    /// The processes under test at the window's start and end.
    pub sampled_start: Option<Sample>,
    pub sampled_end: Option<Sample>,
    /// CPU seconds the sampled processes used inside the window.
    pub sampled_cpu_s: f64,
    /// CPU seconds the backend used inside the window.
    pub backend_cpu_s: f64,
    /// CPU seconds the load generator itself used inside the window.
    pub loadgen_cpu_s: f64,
}

pub fn main(args: Args) -> Result<()> {
    if !args.target.ip().is_loopback() {
        return Err(Error::msg(
            "the load generator only targets loopback addresses",
        ));
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = args.threads {
        builder.worker_threads(n.max(1));
    }
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let result = runtime.block_on(run(&args))?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Counters of one connection.
struct ConnResult {
    histogram: Histogram<u64>,
    ok: u64,
    non_2xx: u64,
    errors: u64,
}

async fn run(args: &Args) -> Result<LoadResult> {
    if let Some(n) = args.requests {
        return run_counted(args, n).await;
    }
    let concurrency = args.concurrency.max(1);
    let start = Instant::now();
    let window_start = start + Duration::from_millis(args.warmup_ms);
    let window_end = window_start + Duration::from_millis(args.duration_ms.max(1));
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let target = args.target;
        let host = args.host.clone();
        let path = args.path.clone();
        tasks.push(tokio::spawn(async move {
            connection(target, host, path, window_start, window_end).await
        }));
    }

    let self_pid = std::process::id();
    tokio::time::sleep_until(window_start).await;
    let backend: Vec<u32> = args.backend_pid.into_iter().collect();
    let sampled_start = sample(&args.sample_pids)?;
    let backend_start = sample(&backend)?;
    let self_start = Sample::take(&[self_pid])?;
    tokio::time::sleep_until(window_end).await;
    let sampled_end = sample(&args.sample_pids)?;
    let backend_end = sample(&backend)?;
    let self_end = Sample::take(&[self_pid])?;

    let mut histogram = new_histogram()?;
    let (mut ok, mut non_2xx, mut errors) = (0, 0, 0);
    for task in tasks {
        let c = task.await.context("a load connection panicked")??;
        histogram.add(&c.histogram).context("merging histograms")?;
        ok += c.ok;
        non_2xx += c.non_2xx;
        errors += c.errors;
    }
    let window_s = (window_end - window_start).as_secs_f64();
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let cpu = |a: &Option<Sample>, b: &Option<Sample>| match (a, b) {
        (Some(a), Some(b)) => a.cpu_seconds_until(b),
        _ => 0.0,
    };
    let sampled_cpu_s = cpu(&sampled_start, &sampled_end);
    let backend_cpu_s = cpu(&backend_start, &backend_end);
    Ok(LoadResult {
        concurrency,
        window_s,
        ok,
        non_2xx,
        errors,
        rps: ok as f64 / window_s,
        latency: Latency {
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: histogram.max() as f64 / 1000.0,
            mean_us: histogram.mean() / 1000.0,
        },
        sampled_start,
        sampled_end,
        sampled_cpu_s,
        backend_cpu_s,
        loadgen_cpu_s: self_start.cpu_seconds_until(&self_end),
    })
}

/// `--requests n`: exactly `n` requests over `concurrency` connections, all counted.
async fn run_counted(args: &Args, n: u64) -> Result<LoadResult> {
    let concurrency = args.concurrency.max(1);
    let tickets = Arc::new(AtomicU64::new(n));
    let started = Instant::now();
    let sampled_start = sample(&args.sample_pids)?;
    let mut tasks = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let (target, host, path) = (args.target, args.host.clone(), args.path.clone());
        let tickets = tickets.clone();
        tasks.push(tokio::spawn(async move {
            counted_connection(target, host, path, tickets).await
        }));
    }
    let mut histogram = new_histogram()?;
    let (mut ok, mut non_2xx, mut errors) = (0, 0, 0);
    for task in tasks {
        let c = task.await.context("a load connection panicked")??;
        histogram.add(&c.histogram).context("merging histograms")?;
        ok += c.ok;
        non_2xx += c.non_2xx;
        errors += c.errors;
    }
    let sampled_end = sample(&args.sample_pids)?;
    let window_s = started.elapsed().as_secs_f64();
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    let sampled_cpu_s = match (&sampled_start, &sampled_end) {
        (Some(a), Some(b)) => a.cpu_seconds_until(b),
        _ => 0.0,
    };
    Ok(LoadResult {
        concurrency,
        window_s,
        ok,
        non_2xx,
        errors,
        rps: ok as f64 / window_s,
        latency: Latency {
            p50_us: us(0.50),
            p90_us: us(0.90),
            p99_us: us(0.99),
            p999_us: us(0.999),
            max_us: histogram.max() as f64 / 1000.0,
            mean_us: histogram.mean() / 1000.0,
        },
        sampled_start,
        sampled_end,
        sampled_cpu_s,
        backend_cpu_s: 0.0,
        loadgen_cpu_s: 0.0,
    })
}

/// One keep-alive connection sending requests back to back while tickets last. A failed
/// exchange counts as an error and is not retried (its ticket is spent).
async fn counted_connection(
    target: SocketAddr,
    host: String,
    path: String,
    tickets: Arc<AtomicU64>,
) -> Result<ConnResult> {
    let mut out = ConnResult {
        histogram: new_histogram()?,
        ok: 0,
        non_2xx: 0,
        errors: 0,
    };
    let take = || {
        tickets
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |t| t.checked_sub(1))
            .is_ok()
    };
    let mut sender: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while take() {
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(target).await {
                Ok(s) => s,
                Err(_) => {
                    out.errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let began = Instant::now();
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut s, &host, &path)).await {
            Ok(Ok(status_ok)) => {
                sender = Some(s);
                let nanos = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
                out.histogram.saturating_record(nanos.max(1));
                if status_ok {
                    out.ok += 1;
                } else {
                    out.non_2xx += 1;
                }
            }
            Ok(Err(_)) | Err(_) => out.errors += 1,
        }
    }
    Ok(out)
}

fn sample(pids: &[u32]) -> Result<Option<Sample>> {
    if pids.is_empty() {
        return Ok(None);
    }
    Sample::take(pids).map(Some)
}

fn new_histogram() -> Result<Histogram<u64>> {
    // 1 ns to 120 s at 3 significant digits: 0.1% resolution at every latency.
    Histogram::new_with_bounds(1, 120_000_000_000, 3).context("creating a histogram")
}

/// Upper bound of one request, so a stalled target cannot hang the run.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One keep-alive connection sending requests back to back until `window_end`.
async fn connection(
    target: SocketAddr,
    host: String,
    path: String,
    window_start: Instant,
    window_end: Instant,
) -> Result<ConnResult> {
    let mut out = ConnResult {
        histogram: new_histogram()?,
        ok: 0,
        non_2xx: 0,
        errors: 0,
    };
    let mut sender: Option<http1::SendRequest<Empty<Bytes>>> = None;
    loop {
        let began = Instant::now();
        if began >= window_end {
            return Ok(out);
        }
        let in_window = began >= window_start;
        let mut s = match sender.take() {
            Some(s) => s,
            None => match connect(target).await {
                Ok(s) => s,
                Err(_) => {
                    if in_window {
                        out.errors += 1;
                    }
                    // Do not spin on a refused connection.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let began = Instant::now();
        let outcome = tokio::time::timeout(REQUEST_TIMEOUT, exchange(&mut s, &host, &path)).await;
        let ended = Instant::now();
        let counted = began >= window_start && ended <= window_end;
        match outcome {
            Ok(Ok(status_ok)) => {
                sender = Some(s);
                if counted {
                    let nanos = u64::try_from((ended - began).as_nanos()).unwrap_or(u64::MAX);
                    out.histogram.saturating_record(nanos.max(1));
                    if status_ok {
                        out.ok += 1;
                    } else {
                        out.non_2xx += 1;
                    }
                }
            }
            // The connection is dropped and a new one made on the next round.
            Ok(Err(_)) | Err(_) => {
                if counted {
                    out.errors += 1;
                }
            }
        }
    }
}

async fn connect(target: SocketAddr) -> Result<http1::SendRequest<Empty<Bytes>>> {
    let stream = TcpStream::connect(target)
        .await
        .context(format!("connecting to {target}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        // Ends when the sender is dropped or the server closes; errors show on requests.
        let _ = conn.await;
    });
    Ok(sender)
}

/// Sends one GET and reads the whole response; true when the status is 2xx.
async fn exchange(
    sender: &mut http1::SendRequest<Empty<Bytes>>,
    host: &str,
    path: &str,
) -> Result<bool> {
    sender.ready().await.context("connection not ready")?;
    let req = Request::get(path)
        .header(header::HOST, host)
        .body(Empty::new())
        .context("building a request")?;
    let resp = sender.send_request(req).await.context("request")?;
    let ok = resp.status().is_success();
    resp.into_body()
        .collect()
        .await
        .context("reading the body")?;
    Ok(ok)
}
