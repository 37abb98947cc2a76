//! What registered Functions cost the activator: each size runs in a fresh child process
//! (`zeroscale-bench memory --functions N`), the library [`Activator`] over the in-memory
//! platform, measured from the kernel's side (VmRSS), the figure an operator sees on a
//! dashboard. The routing lookup is timed in the same process against the same table.
//!
//! Per child, in order:
//! 1. the platform is filled with N Functions (the objects a watch would have decoded);
//!    `before` = VmRSS;
//! 2. the activator starts and lists them; `registered` = VmRSS. `registered - before`
//!    is what the activator itself holds for N idle Functions;
//! 3. `lookup_ns`: host normalisation + table lookup under its lock, what a request pays
//!    to find its Function, timed over a mix of the three service-name forms, `spec.hosts`
//!    names and misses;
//! 4. every Function gets a ready replica and one request through the activator (a
//!    backend in its own process answers, so its connection state is not counted),
//!    `active` = VmRSS: the cost once traffic state, per-Function metrics and a pooled
//!    connection per replica exist.
//!
//! The activator's fixed cost (runtime threads, client pool, metrics registry) is taken
//! out by subtracting the N = 0 child's figures; at N = 1 what is left is below the
//! 4 KiB page granularity of RSS, so that row shows the fixed cost, not a per-Function one.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1 as client_http1;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use zeroscale::activator::{Activator, Settings};
use zeroscale::api::{Function, FunctionKey, FunctionSpec};
use zeroscale::platform::Endpoint;
use zeroscale::platform::memory::MemoryPlatform;

use crate::error::{Context, Error, Result};
use crate::procfs;

/// The sizes measured, as the issue asks (0 is the baseline).
pub const SIZES: [usize; 4] = [0, 1, 1_000, 10_000];

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Functions to register.
    #[arg(long)]
    pub functions: usize,
    /// Routing lookups to time.
    #[arg(long, default_value_t = 2_000_000)]
    pub lookups: usize,
}

/// One child's figures.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Point {
    pub functions: usize,
    /// VmRSS with the platform filled, before the activator starts, KiB.
    pub before_kib: u64,
    /// VmRSS with every Function registered in the activator, KiB.
    pub registered_kib: u64,
    /// VmRSS after one request to every Function, KiB.
    pub active_kib: u64,
    /// Peak VmRSS of the child (VmHWM), KiB.
    pub hwm_kib: u64,
    /// Nanoseconds per routing lookup (normalise the Host, find the Function).
    pub lookup_ns: f64,
    /// Time from the activator's start until it had listed every Function.
    pub sync_ms: f64,
}

/// Every size, and the per-Function figures derived against the N = 0 baseline.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {
    pub points: Vec<Point>,
    pub method: String,
}

impl Memory {
    fn baseline(&self) -> Option<&Point> {
        self.points.iter().find(|p| p.functions == 0)
    }

    /// Activator memory per registered (idle) Function at size `n`, bytes.
    pub fn per_function_at(&self, n: usize) -> Option<f64> {
        let base = self.baseline()?;
        let p = self.points.iter().find(|p| p.functions == n && n > 0)?;
        Some(per(
            p.registered_kib - p.before_kib,
            base.registered_kib - base.before_kib,
            n,
        ))
    }

    /// The same after one request to each Function (traffic state and metrics exist).
    pub fn active_per_function_at(&self, n: usize) -> Option<f64> {
        let base = self.baseline()?;
        let p = self.points.iter().find(|p| p.functions == n && n > 0)?;
        Some(per(
            p.active_kib - p.before_kib,
            base.active_kib - base.before_kib,
            n,
        ))
    }
}

/// (delta - baseline delta) / n, in bytes; deltas in KiB, saturating at zero.
fn per(delta_kib: u64, base_kib: u64, n: usize) -> f64 {
    (delta_kib as f64 - base_kib as f64).max(0.0) * 1024.0 / n as f64
}

/// Runs one child per size.
pub fn measure_all(bench_bin: &Path) -> Result<Memory> {
    let mut points = Vec::new();
    for n in SIZES {
        let out = Command::new(bench_bin)
            .arg("memory")
            .arg("--functions")
            .arg(n.to_string())
            .output()
            .context("running the memory child")?;
        if !out.status.success() {
            return Err(Error::msg(format!(
                "memory child with {n} Functions failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        points.push(serde_json::from_slice(&out.stdout).context("reading the memory child")?);
    }
    Ok(Memory {
        points,
        method: "library Activator over the in-memory platform in a child process; VmRSS \
                 deltas across the activator's start, minus the same delta with 0 Functions"
            .into(),
    })
}

pub fn main(args: Args) -> Result<()> {
    // The same runtime shape as `zeroscale activator` (multi-threaded, one worker per CPU).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let point = runtime.block_on(measure(args.functions, args.lookups))?;
    println!("{}", serde_json::to_string(&point)?);
    Ok(())
}

/// A Function like the examples: one container with a command, env, a port and a
/// readiness probe, scale settings, and every tenth one with an extra host.
fn function(i: usize) -> Result<Function> {
    let hosts: Vec<String> = if i.is_multiple_of(10) {
        vec![format!("fn-{i}.example.com")]
    } else {
        vec![]
    };
    let spec: FunctionSpec = serde_json::from_value(serde_json::json!({
        "template": {"spec": {"containers": [{
            "name": "app",
            "image": "registry.example.com/team/app:1.2.3",
            "command": ["/app/server", "--port", "$(PORT)"],
            "env": [{"name": "PORT", "value": "8080"}, {"name": "LOG_LEVEL", "value": "info"}],
            "ports": [{"containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 1},
        }]}},
        "hosts": hosts,
        "scale": {"max": 5, "target": 20, "idleTimeout": "60s"},
    }))
    .context("building a Function spec")?;
    let mut f = Function::new(&format!("function-{i:05}"), spec);
    f.metadata.namespace = Some(format!("team-{}", i % 50));
    Ok(f)
}

fn rss_kib() -> Result<u64> {
    procfs::status_kib(std::process::id(), "VmRSS")
}

async fn measure(n: usize, lookups: usize) -> Result<Point> {
    let backend = Backend::start().await?;
    let platform = MemoryPlatform::new();
    let mut keys = Vec::with_capacity(n);
    for i in 0..n {
        let f = function(i)?;
        keys.push(f.key());
        platform.apply_function(f);
    }
    let before_kib = rss_kib()?;

    let registry = prometheus::Registry::new();
    let settings = Settings {
        id: "bench-memory".into(),
        ..Settings::default()
    };
    let started = Instant::now();
    let activator = Activator::new(platform.clone(), settings, &registry)
        .map_err(|e| Error::msg(format!("creating the activator: {e}")))?;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding the activator")?;
    let addr = listener
        .local_addr()
        .context("reading the activator's address")?;
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(activator.clone().run(listener, shutdown.clone()));
    tokio::time::timeout(Duration::from_secs(120), activator.synced())
        .await
        .context("the activator did not list the Functions in time")?;
    let sync_ms = started.elapsed().as_secs_f64() * 1e3;
    if activator.function_count() != n {
        return Err(Error::msg(format!(
            "the activator lists {} Functions, not {n}",
            activator.function_count()
        )));
    }
    // Let the listing's transient allocations go before reading.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let registered_kib = rss_kib()?;

    let lookup_ns = time_lookups(&activator, &keys, lookups);

    for key in &keys {
        platform.set_endpoints(
            key,
            vec![Endpoint {
                addr: backend.addr,
                name: format!("{}-0", key.name),
            }],
        );
    }
    one_request_each(addr, &keys).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let active_kib = rss_kib()?;
    let hwm_kib = procfs::status_kib(std::process::id(), "VmHWM")?;

    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    Ok(Point {
        functions: n,
        before_kib,
        registered_kib,
        active_kib,
        hwm_kib,
        lookup_ns,
        sync_ms,
    })
}

/// Times `lookups` routing lookups over a fixed mix of hosts; ns per lookup.
fn time_lookups(activator: &Activator, keys: &[FunctionKey], lookups: usize) -> f64 {
    // The mix a cluster sees: the three service-name forms, an Ingress host, a miss.
    let mut hosts = Vec::new();
    for (i, k) in keys.iter().enumerate().step_by((keys.len() / 200).max(1)) {
        hosts.push(format!("{}.{}", k.name, k.namespace));
        hosts.push(format!("{}.{}.svc", k.name, k.namespace));
        hosts.push(format!("{}.{}.svc.cluster.local:80", k.name, k.namespace));
        hosts.push(format!("fn-{}.example.com", i - i % 10));
    }
    hosts.push("nobody.nowhere".into());
    let lookups = lookups.max(hosts.len());
    let started = Instant::now();
    let mut found = 0usize;
    for i in 0..lookups {
        let host = std::hint::black_box(hosts[i % hosts.len()].as_str());
        found += usize::from(activator.routes(host));
    }
    let elapsed = started.elapsed();
    std::hint::black_box(found);
    elapsed.as_nanos() as f64 / lookups as f64
}

/// One request to every Function through the activator, on one keep-alive connection.
async fn one_request_each(addr: SocketAddr, keys: &[FunctionKey]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let stream = TcpStream::connect(addr)
        .await
        .context("connecting to the activator")?;
    let (mut sender, conn) = client_http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
        .await
        .context("HTTP/1.1 handshake")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    for key in keys {
        sender.ready().await.context("connection not ready")?;
        let req = Request::get("/")
            .header(header::HOST, format!("{}.{}", key.name, key.namespace))
            .body(Empty::new())
            .context("building a request")?;
        let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req))
            .await
            .context(format!("request to {key} timed out"))?
            .context(format!("request to {key}"))?;
        let status = resp.status();
        resp.into_body().collect().await.context("reading a body")?;
        if !status.is_success() {
            return Err(Error::msg(format!("request to {key} answered {status}")));
        }
    }
    Ok(())
}

/// The bench backend in its own process, killed when dropped.
struct Backend {
    child: std::process::Child,
    addr: SocketAddr,
}

impl Backend {
    async fn start() -> Result<Self> {
        let port = crate::run::free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let bin = std::env::current_exe().context("locating zeroscale-bench")?;
        let child = Command::new(bin)
            .arg("backend")
            .arg("--port")
            .arg(port.to_string())
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting the backend")?;
        let backend = Self { child, addr };
        let started = Instant::now();
        while TcpStream::connect(addr).await.is_err() {
            if started.elapsed() > Duration::from_secs(10) {
                return Err(Error::msg(format!("the backend on {addr} never accepted")));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(backend)
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn markdown(m: &Memory) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(s, "### Activator memory and routing\n");
    let _ = writeln!(s, "{}.\n", m.method);
    let _ = writeln!(
        s,
        "| Functions | RSS registered | per Function, registered | per Function, with a replica and 1 request each | lookup ns | listed in |"
    );
    let _ = writeln!(s, "|---:|---:|---:|---:|---:|---:|");
    for p in &m.points {
        // Below ~100 Functions the difference is inside RSS's page and malloc-arena
        // granularity: a per-Function figure there would be noise divided by N.
        let bytes = |v: Option<f64>| match v {
            Some(b) if p.functions >= 100 => format!("{b:.0} B"),
            Some(_) => "below RSS resolution".into(),
            None => "-".into(),
        };
        let _ = writeln!(
            s,
            "| {} | {:.1} MiB | {} | {} | {} | {:.0} ms |",
            p.functions,
            p.registered_kib as f64 / 1024.0,
            bytes(m.per_function_at(p.functions)),
            bytes(m.active_per_function_at(p.functions)),
            if p.functions == 0 {
                format!("{:.0} (misses)", p.lookup_ns)
            } else {
                format!("{:.0}", p.lookup_ns)
            },
            p.sync_ms
        );
    }
    let _ = writeln!(s);
    s
}
