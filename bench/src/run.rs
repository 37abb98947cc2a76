//! `zeroscale-bench run`: every benchmark in one go, each part a separate process, then
//! the markdown table on stdout and the JSON results file.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use http::StatusCode;
use serde::{Deserialize, Serialize};

use crate::child::Proc;
use crate::coldstart::{self, ColdStart};
use crate::datapath::{self, LoadSettings, Target};
use crate::error::{Context, Error, Result};
use crate::haproxy::{self, Haproxy};
use crate::instructions::{self, CountSettings};
use crate::machine::Machine;
use crate::nginx::{self, Nginx};
use crate::procfs;
use crate::{autoscale, memory, report};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Where the JSON results go (the markdown goes to stdout).
    #[arg(long, default_value = "bench/out/results.json")]
    pub out: PathBuf,
    /// The `zeroscale` binary (default: next to this one).
    #[arg(long)]
    pub zeroscale: Option<PathBuf>,
    /// Warm-up of every load run, excluded from every figure.
    #[arg(long, default_value_t = 1000)]
    pub warmup_ms: u64,
    /// Measured window of every load run.
    #[arg(long, default_value_t = 4000)]
    pub duration_ms: u64,
    /// Rounds over all targets and concurrencies; each cell reports the median round.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Fixed concurrencies of the data-path table.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub concurrency: Vec<usize>,
    /// Concurrency of the extra max-throughput run.
    #[arg(long, default_value_t = 256)]
    pub max_concurrency: usize,
    /// Cold starts measured (one fresh Function each).
    #[arg(long, default_value_t = 25)]
    pub cold_samples: usize,
    /// Cold starts of one Function that goes back to zero between samples (a few seconds
    /// each: idle timeout, autoscaler tick, replica stop).
    #[arg(long, default_value_t = 5)]
    pub cycled_samples: usize,
    /// Requests counted per proxy under callgrind (instructions per request).
    #[arg(long, default_value_t = 20_000)]
    pub count_requests: u64,
    /// Requests sent to a proxy under callgrind before its counters are zeroed.
    #[arg(long, default_value_t = 2_000)]
    pub count_warmup: u64,
    /// Concurrency of the counted requests.
    #[arg(long, default_value_t = 64)]
    pub count_concurrency: usize,
    /// Parts to skip: data-path, instructions, cold-start, memory, autoscaler
    /// (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub skip: Vec<String>,
}

/// Everything a run measured; what `bench/out/results.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Results {
    pub machine: Machine,
    pub command: String,
    pub settings: Option<LoadSettings>,
    pub data_path: Option<DataPath>,
    pub cold_start: Option<ColdStart>,
    /// Cold starts of one Function that the autoscaler takes back to zero each time.
    pub cold_start_cycled: Option<ColdStart>,
    pub memory: Option<memory::Memory>,
    pub autoscaler: Option<autoscale::Autoscaler>,
    /// The goals of the issue, judged on this run.
    pub goals: Vec<report::Goal>,
    /// Why a part is missing or what to keep in mind reading it.
    pub notes: Vec<String>,
    pub wall_clock_s: f64,
}

/// The warm data path results.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DataPath {
    pub load_generator: String,
    pub backend: String,
    pub targets: Vec<Target>,
    /// Every load run, every round.
    pub runs: Vec<datapath::Run>,
    /// Per proxy, after all runs: peak RSS (VmHWM summed over its processes), KiB.
    pub peak_rss_kib: Vec<(String, u64)>,
    /// Per proxy, before the first run: RSS, KiB.
    pub idle_rss_kib: Vec<(String, u64)>,
    pub nginx_version: Option<String>,
    #[serde(default)]
    pub haproxy_version: Option<String>,
    /// Instructions per request of each proxy (callgrind), when valgrind is installed.
    #[serde(default)]
    pub instructions: Vec<crate::instructions::Count>,
    #[serde(default)]
    pub instructions_settings: Option<crate::instructions::CountSettings>,
    /// The second opinion of wrk at the high concurrencies, when it is installed.
    pub wrk: Vec<crate::wrk::WrkRun>,
    pub wrk_version: Option<String>,
}

/// `zeroscale-bench count`: the instruction counts alone (quick to repeat while working
/// on the data path), with a backend of their own.
#[derive(Debug, Clone, clap::Args)]
pub struct CountArgs {
    /// Proxies to count: zeroscale, nginx, haproxy (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "zeroscale,nginx,haproxy")]
    pub targets: Vec<String>,
    /// Requests counted per proxy.
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// Requests sent before the counters are zeroed.
    #[arg(long, default_value_t = 2_000)]
    pub warmup: u64,
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Where the dumps and logs go.
    #[arg(long, default_value = "bench/out/count")]
    pub work: PathBuf,
}

pub fn count_main(args: CountArgs) -> Result<()> {
    let bench_bin = std::env::current_exe().context("locating zeroscale-bench")?;
    let zeroscale = bench_bin
        .parent()
        .map(|d| d.join("zeroscale"))
        .context("locating zeroscale")?;
    if !instructions::available() {
        return Err(Error::msg("valgrind and callgrind_control are needed"));
    }
    let _ = std::fs::remove_dir_all(&args.work);
    std::fs::create_dir_all(&args.work).context("creating the work directory")?;
    let work = std::fs::canonicalize(&args.work).context("resolving the work directory")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let settings = LoadSettings {
        warmup_ms: 0,
        duration_ms: 0,
        rounds: 1,
        concurrency: vec![],
        max_concurrency: 0,
        host: "bench.default".into(),
    };
    let cs = CountSettings {
        warmup_requests: args.warmup,
        requests: args.requests,
        concurrency: args.concurrency,
        idle_ms: 3000,
    };
    let mut log = |line: &str| eprintln!("{line}");
    let port = free_port()?;
    let mut cmd = Command::new(&bench_bin);
    cmd.arg("backend").arg("--port").arg(port.to_string());
    let _backend = Proc::spawn(
        "backend",
        cmd,
        &work.join("backend.log"),
        Duration::from_secs(2),
    )?;
    runtime.block_on(crate::http::wait_for_status(
        loopback(port),
        &settings.host,
        "/",
        StatusCode::OK,
        Duration::from_secs(10),
    ))?;
    let mut counts = Vec::new();
    for t in &args.targets {
        let c = match t.as_str() {
            "zeroscale" => count_zeroscale(
                &runtime, &bench_bin, &zeroscale, &work, &settings, &cs, &mut log,
            )?,
            other => count_reference(
                &runtime,
                &bench_bin,
                &work,
                loopback(port),
                &settings,
                &cs,
                other,
                &mut log,
            )?,
        };
        counts.extend(c);
    }
    println!("{}", serde_json::to_string_pretty(&counts)?);
    Ok(())
}

pub fn main(args: Args) -> Result<()> {
    let started = Instant::now();
    let bench_bin = std::env::current_exe().context("locating zeroscale-bench")?;
    let zeroscale = match &args.zeroscale {
        Some(p) => p.clone(),
        None => bench_bin
            .parent()
            .map(|d| d.join("zeroscale"))
            .context("locating zeroscale")?,
    };
    let out_dir = args
        .out
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let work = out_dir.join("work");
    // Logs and configs of the previous run would mix with this one's.
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).context(format!("creating {}", work.display()))?;
    let work = std::fs::canonicalize(&work).context("resolving the work directory")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;

    let mut results = Results {
        machine: Machine::describe(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        ..Results::default()
    };
    let skip = |part: &str| args.skip.iter().any(|s| s == part);
    let mut log = |line: &str| eprintln!("{line}");

    if !skip("data-path") {
        let settings = LoadSettings {
            warmup_ms: args.warmup_ms,
            duration_ms: args.duration_ms,
            rounds: args.rounds,
            concurrency: args.concurrency.clone(),
            max_concurrency: args.max_concurrency,
            host: "bench.default".into(),
        };
        log(&format!(
            "data path: 4 targets, about {:?} of load",
            datapath::expected_duration(&settings, 4)
        ));
        let counting = (!skip("instructions")).then_some(CountSettings {
            warmup_requests: args.count_warmup,
            requests: args.count_requests,
            concurrency: args.count_concurrency,
            idle_ms: 3000,
        });
        match data_path(
            &runtime,
            &bench_bin,
            &zeroscale,
            &work,
            &settings,
            counting.as_ref(),
            &mut log,
        ) {
            Ok((dp, notes)) => {
                results.data_path = Some(dp);
                results.notes.extend(notes);
            }
            Err(e) => {
                log(&format!("data path failed: {e}"));
                results.notes.push(format!("data path: {e}"));
            }
        }
        results.settings = Some(settings);
    }

    if !skip("cold-start") {
        log(&format!(
            "cold start: {} fresh Functions, {} cycles of one",
            args.cold_samples, args.cycled_samples
        ));
        match cold_start(
            &runtime,
            &bench_bin,
            &zeroscale,
            &work,
            args.cold_samples,
            args.cycled_samples,
        ) {
            Ok((fresh, cycled)) => {
                results.cold_start = Some(fresh);
                results.cold_start_cycled = cycled;
            }
            Err(e) => {
                log(&format!("cold start failed: {e}"));
                results.notes.push(format!("cold start: {e}"));
            }
        }
    }

    if !skip("memory") {
        log("memory: activator with 0, 1, 1000, 10000 Functions");
        match memory::measure_all(&bench_bin) {
            Ok(m) => results.memory = Some(m),
            Err(e) => {
                log(&format!("memory failed: {e}"));
                results.notes.push(format!("memory: {e}"));
            }
        }
    }

    if !skip("autoscaler") {
        match autoscale::run_standard_traces() {
            Ok(t) => results.autoscaler = Some(t),
            Err(e) => {
                log(&format!("autoscaler failed: {e}"));
                results.notes.push(format!("autoscaler: {e}"));
            }
        }
    }

    results.machine.loadavg_at_end = crate::machine::loadavg();
    results.wall_clock_s = started.elapsed().as_secs_f64();
    results.goals = report::goals(&results);
    let json = serde_json::to_string_pretty(&results).context("encoding the results")?;
    std::fs::write(&args.out, json).context(format!("writing {}", args.out.display()))?;
    print!("{}", report::markdown(&results));
    eprintln!(
        "wrote {} ({:.0} s)",
        args.out.display(),
        results.wall_clock_s
    );
    Ok(())
}

/// A free loopback port (bound then released; the race with other processes is
/// harmless on a machine that is not handing out ports in a tight loop).
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("reading a bound port")?.port())
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A Function whose replicas are the bench backend.
pub fn function_manifest(name: &str, bench_bin: &Path, min: u32, max: u32, idle: &str) -> String {
    format!(
        r#"apiVersion: zeroscale.dev/v1alpha1
kind: Function
metadata:
  name: {name}
  namespace: default
spec:
  template:
    spec:
      containers:
        - name: app
          image: zeroscale-bench:local
          command: ["{bin}", "backend", "--port", "$(PORT)"]
          env:
            - {{name: PORT, value: "8080"}}
          ports:
            - containerPort: 8080
  scale:
    min: {min}
    max: {max}
    initial: 1
    idleTimeout: {idle}
"#,
        bin = bench_bin.display()
    )
}

/// A running `zeroscale dev`.
struct Dev {
    proc: Proc,
    listen: SocketAddr,
    admin: SocketAddr,
}

impl Dev {
    fn start(
        runtime: &tokio::runtime::Runtime,
        zeroscale: &Path,
        dir: &Path,
        manifests: &str,
    ) -> Result<Self> {
        Self::start_behind(runtime, zeroscale, dir, manifests, &[])
    }

    /// Starts dev behind `launcher` (the profiler's command line) when it is not empty.
    fn start_behind(
        runtime: &tokio::runtime::Runtime,
        zeroscale: &Path,
        dir: &Path,
        manifests: &str,
        launcher: &[String],
    ) -> Result<Self> {
        // Under the profiler everything takes tens of times longer.
        let slow = if launcher.is_empty() { 1 } else { 10 };
        std::fs::create_dir_all(dir).context(format!("creating {}", dir.display()))?;
        std::fs::write(dir.join("functions.yaml"), manifests).context("writing manifests")?;
        let listen = loopback(free_port()?);
        let admin = loopback(free_port()?);
        let mut cmd = crate::child::command(launcher, zeroscale);
        cmd.arg("dev")
            .arg("-f")
            .arg(dir.join("functions.yaml"))
            .arg("--listen")
            .arg(listen.to_string())
            .arg("--admin-listen")
            .arg(admin.to_string());
        let mut proc = Proc::spawn(
            "zeroscale dev",
            cmd,
            &dir.join("dev.log"),
            Duration::from_secs(15),
        )?;
        let ready = runtime.block_on(crate::http::wait_for_status(
            admin,
            "localhost",
            "/readyz",
            StatusCode::OK,
            Duration::from_secs(20 * slow),
        ));
        if let Err(e) = ready {
            proc.check_running()?;
            return Err(e);
        }
        Ok(Self {
            proc,
            listen,
            admin,
        })
    }

    fn admin_get(&self, runtime: &tokio::runtime::Runtime, path: &str) -> Result<String> {
        let a = runtime.block_on(crate::http::get(
            self.admin,
            "localhost",
            path,
            Duration::from_secs(10),
        ))?;
        if !a.status.is_success() {
            return Err(Error::msg(format!("admin {path} answered {}", a.status)));
        }
        Ok(String::from_utf8_lossy(&a.body).into_owned())
    }

    /// Waits until `function` has no replica process left (scaled to zero and stopped).
    fn wait_for_zero(
        &self,
        runtime: &tokio::runtime::Runtime,
        function: &str,
        limit: Duration,
    ) -> Result<()> {
        let started = Instant::now();
        loop {
            let body = self.admin_get(runtime, "/functions")?;
            let view: serde_json::Value =
                serde_json::from_str(&body).context("parsing /functions")?;
            let at_zero = view
                .as_array()
                .and_then(|fs| fs.iter().find(|f| f["name"] == function))
                .is_some_and(|f| {
                    f["desired"] == 0 && f["processes"].as_array().is_none_or(|p| p.is_empty())
                });
            if at_zero {
                return Ok(());
            }
            if started.elapsed() > limit {
                return Err(Error::msg(format!(
                    "{function} did not scale to zero within {limit:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid and port of the one running replica of `function`.
    fn replica(&self, runtime: &tokio::runtime::Runtime, function: &str) -> Result<(u32, u16)> {
        let body = self.admin_get(runtime, "/functions")?;
        let view: serde_json::Value = serde_json::from_str(&body).context("parsing /functions")?;
        let f = view
            .as_array()
            .and_then(|fs| fs.iter().find(|f| f["name"] == function))
            .context(format!("{function} missing from /functions"))?;
        let running: Vec<(u32, u16)> = f["processes"]
            .as_array()
            .map(|ps| {
                ps.iter()
                    .filter_map(|p| {
                        Some((
                            u32::try_from(p["pid"].as_u64()?).ok()?,
                            u16::try_from(p["port"].as_u64()?).ok()?,
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        match running.as_slice() {
            [one] => Ok(*one),
            other => Err(Error::msg(format!(
                "expected one replica of {function}, found {}",
                other.len()
            ))),
        }
    }
}

fn data_path(
    runtime: &tokio::runtime::Runtime,
    bench_bin: &Path,
    zeroscale: &Path,
    work: &Path,
    settings: &LoadSettings,
    counting: Option<&CountSettings>,
    log: &mut dyn FnMut(&str),
) -> Result<(DataPath, Vec<String>)> {
    let mut notes = Vec::new();
    // One replica, never more and never zero, so the activator forwards to exactly the
    // one backend nginx and the direct runs use, and the autoscaler adds no processes.
    let dev = start_bench_function(runtime, bench_bin, zeroscale, work, &settings.host);
    let mut own_backend = None;
    let (dev, backend_pid, backend) = match dev {
        Ok((dev, pid, port)) => {
            log(&format!(
                "  backend: pid {pid} on port {port} (dev's replica of Function bench)"
            ));
            (Some(dev), pid, loopback(port))
        }
        Err(e) => {
            log(&format!("  zeroscale dev unavailable: {e}"));
            notes.push(format!(
                "zeroscale dev was unavailable ({e}): its rows are missing and the backend ran \
                 on its own"
            ));
            let port = free_port()?;
            let mut cmd = Command::new(bench_bin);
            cmd.arg("backend").arg("--port").arg(port.to_string());
            let p = Proc::spawn(
                "backend",
                cmd,
                &work.join("backend.log"),
                Duration::from_secs(2),
            )?;
            let pid = p.pid();
            own_backend = Some(p);
            runtime.block_on(crate::http::wait_for_status(
                loopback(port),
                &settings.host,
                "/",
                StatusCode::OK,
                Duration::from_secs(10),
            ))?;
            (None, pid, loopback(port))
        }
    };

    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let nginx_bin = nginx::binary();
    let nginx = match &nginx_bin {
        Some(bin) => {
            let listen = loopback(free_port()?);
            let mut n = Nginx::start(bin, &work.join("nginx"), listen, backend, workers, &[])?;
            if let Err(e) = runtime.block_on(crate::http::wait_for_status(
                listen,
                &settings.host,
                "/",
                StatusCode::OK,
                Duration::from_secs(10),
            )) {
                n.proc.check_running()?;
                return Err(e);
            }
            Some(n)
        }
        None => {
            notes.push(
                "nginx is not installed: its rows are missing (make bench installs it)".into(),
            );
            None
        }
    };

    let haproxy = match haproxy::binary() {
        Some(bin) => {
            let listen = loopback(free_port()?);
            let mut h = Haproxy::start(&bin, &work.join("haproxy"), listen, backend, workers, &[])?;
            if let Err(e) = runtime.block_on(crate::http::wait_for_status(
                listen,
                &settings.host,
                "/",
                StatusCode::OK,
                Duration::from_secs(10),
            )) {
                h.proc.check_running()?;
                return Err(e);
            }
            Some(h)
        }
        None => {
            notes.push(
                "haproxy is not installed: its rows are missing (make bench installs it)".into(),
            );
            None
        }
    };

    let mut targets = vec![Target {
        name: "direct".into(),
        addr: backend,
        description: "client straight to the backend".into(),
        pids: vec![],
    }];
    if let Some(dev) = &dev {
        targets.push(Target {
            name: "zeroscale".into(),
            addr: dev.listen,
            description: "through the activator of `zeroscale dev` (a separate process)".into(),
            pids: vec![dev.proc.pid()],
        });
    }
    if let Some(n) = &nginx {
        targets.push(Target {
            name: "nginx".into(),
            addr: n.listen,
            description: format!(
                "through {} as a keep-alive reverse proxy, {workers} workers",
                n.version
            ),
            pids: n.pids(),
        });
    }
    if let Some(h) = &haproxy {
        targets.push(Target {
            name: "haproxy".into(),
            addr: h.listen,
            description: format!(
                "through {} as a keep-alive reverse proxy, {workers} threads",
                h.version
            ),
            pids: h.pids(),
        });
    }
    let rss = |pids: &[u32]| -> u64 { procfs::Sample::take(pids).map(|s| s.rss_kib).unwrap_or(0) };
    let idle_rss_kib = targets
        .iter()
        .filter(|t| !t.pids.is_empty())
        .map(|t| (t.name.clone(), rss(&t.pids)))
        .collect();

    let runs = datapath::measure(bench_bin, &targets, backend_pid, settings, log)?;

    let (wrk, wrk_version) = match crate::wrk::binary() {
        Some(bin) => {
            let mut levels = vec![64, settings.max_concurrency];
            levels.dedup();
            let duration_s = (settings.duration_ms / 1000).max(1);
            match crate::wrk::measure(
                &bin,
                &targets,
                &settings.host,
                &levels,
                duration_s,
                settings.rounds,
                log,
            ) {
                Ok(w) => (w, Some(crate::wrk::version(&bin))),
                Err(e) => {
                    notes.push(format!("wrk cross-check failed: {e}"));
                    (Vec::new(), None)
                }
            }
        }
        None => {
            notes.push("wrk is not installed: no cross-check (make bench installs it)".into());
            (Vec::new(), None)
        }
    };

    let peak_rss_kib = targets
        .iter()
        .filter(|t| !t.pids.is_empty())
        .map(|t| {
            let hwm = procfs::Sample::take(&t.pids)
                .map(|s| s.hwm_kib)
                .unwrap_or(0);
            (t.name.clone(), hwm)
        })
        .collect();
    if nginx.is_some() {
        notes.push(
            "nginx's memory is the sum over its master and worker processes, which counts the \
             pages they share more than once"
                .into(),
        );
    }
    let counts = match counting {
        Some(cs) if instructions::available() => {
            let mut counts = Vec::new();
            for (name, result) in [
                (
                    "zeroscale",
                    count_zeroscale(runtime, bench_bin, zeroscale, work, settings, cs, log),
                ),
                (
                    "nginx",
                    count_reference(
                        runtime, bench_bin, work, backend, settings, cs, "nginx", log,
                    ),
                ),
                (
                    "haproxy",
                    count_reference(
                        runtime, bench_bin, work, backend, settings, cs, "haproxy", log,
                    ),
                ),
            ] {
                match result {
                    Ok(Some(c)) => counts.push(c),
                    Ok(None) => {}
                    Err(e) => {
                        log(&format!("  instructions of {name} failed: {e}"));
                        notes.push(format!("instructions of {name}: {e}"));
                    }
                }
            }
            counts
        }
        Some(_) => {
            notes.push(
                "valgrind is not installed: no instruction counts (apt-get install valgrind)"
                    .into(),
            );
            Vec::new()
        }
        None => Vec::new(),
    };

    let dp = DataPath {
        load_generator: "zeroscale-bench load: a hyper HTTP/1.1 client, keep-alive, closed loop, \
                         HDR histogram (separate process)"
            .into(),
        backend: format!(
            "zeroscale-bench backend: hyper HTTP/1.1, {} byte body; one process, dev's replica",
            crate::backend::BODY.len()
        ),
        targets,
        runs,
        peak_rss_kib,
        idle_rss_kib,
        nginx_version: nginx.as_ref().map(|n| n.version.clone()),
        haproxy_version: haproxy.as_ref().map(|h| h.version.clone()),
        instructions: counts,
        instructions_settings: counting.cloned(),
        wrk,
        wrk_version,
    };
    drop(nginx);
    drop(haproxy);
    drop(dev);
    drop(own_backend);
    Ok((dp, notes))
}

/// Instructions per request of the activator: a second `zeroscale dev` under callgrind,
/// with its own replica of the same backend binary.
pub(crate) fn count_zeroscale(
    runtime: &tokio::runtime::Runtime,
    bench_bin: &Path,
    zeroscale: &Path,
    work: &Path,
    settings: &LoadSettings,
    cs: &CountSettings,
    log: &mut dyn FnMut(&str),
) -> Result<Option<instructions::Count>> {
    let dir = work.join("callgrind");
    std::fs::create_dir_all(&dir).context("creating the callgrind directory")?;
    let out = dir.join("zeroscale");
    let dev = Dev::start_behind(
        runtime,
        zeroscale,
        &work.join("dev-callgrind"),
        &function_manifest("bench", bench_bin, 1, 1, "1h"),
        &instructions::launcher(&out),
    )
    .context("starting zeroscale dev under callgrind")?;
    runtime
        .block_on(crate::http::wait_for_status(
            dev.listen,
            &settings.host,
            "/",
            StatusCode::OK,
            Duration::from_secs(120),
        ))
        .context("waiting for the bench Function through the activator under callgrind")?;
    let c = instructions::count(
        "zeroscale",
        bench_bin,
        dev.proc.pid(),
        &out,
        dev.listen,
        &settings.host,
        cs,
    )?;
    log(&format!(
        "  instructions zeroscale {:>9.0} per request ({} requests)",
        c.per_request, c.requests
    ));
    Ok(Some(c))
}

/// Instructions per request of nginx (one process) or HAProxy (one thread) under
/// callgrind, in front of `backend`. `None` when it is not installed.
#[allow(clippy::too_many_arguments)]
pub(crate) fn count_reference(
    runtime: &tokio::runtime::Runtime,
    bench_bin: &Path,
    work: &Path,
    backend: SocketAddr,
    settings: &LoadSettings,
    cs: &CountSettings,
    which: &str,
    log: &mut dyn FnMut(&str),
) -> Result<Option<instructions::Count>> {
    let dir = work.join("callgrind");
    std::fs::create_dir_all(&dir).context("creating the callgrind directory")?;
    let out = dir.join(which);
    let launcher = instructions::launcher(&out);
    let listen = loopback(free_port()?);
    let (mut proc, pid) = match which {
        "nginx" => {
            let Some(bin) = nginx::binary() else {
                return Ok(None);
            };
            let n = Nginx::start(
                &bin,
                &work.join("nginx-callgrind"),
                listen,
                backend,
                0,
                &launcher,
            )?;
            let pid = n.proc.pid();
            (n.proc, pid)
        }
        _ => {
            let Some(bin) = haproxy::binary() else {
                return Ok(None);
            };
            let h = Haproxy::start(
                &bin,
                &work.join("haproxy-callgrind"),
                listen,
                backend,
                1,
                &launcher,
            )?;
            let pid = h.proc.pid();
            (h.proc, pid)
        }
    };
    if let Err(e) = runtime.block_on(crate::http::wait_for_status(
        listen,
        &settings.host,
        "/",
        StatusCode::OK,
        Duration::from_secs(60),
    )) {
        proc.check_running()?;
        return Err(e);
    }
    let c = instructions::count(which, bench_bin, pid, &out, listen, &settings.host, cs)?;
    log(&format!(
        "  instructions {which:<9} {:>9.0} per request ({} requests)",
        c.per_request, c.requests
    ));
    drop(proc);
    Ok(Some(c))
}

/// Starts dev with the `bench` Function and returns it with its replica's pid and port.
fn start_bench_function(
    runtime: &tokio::runtime::Runtime,
    bench_bin: &Path,
    zeroscale: &Path,
    work: &Path,
    host: &str,
) -> Result<(Dev, u32, u16)> {
    let dev = Dev::start(
        runtime,
        zeroscale,
        &work.join("dev-datapath"),
        &function_manifest("bench", bench_bin, 1, 1, "1h"),
    )
    .context("starting zeroscale dev")?;
    runtime
        .block_on(crate::http::wait_for_status(
            dev.listen,
            host,
            "/",
            StatusCode::OK,
            Duration::from_secs(30),
        ))
        .context("waiting for the bench Function through the activator")?;
    let (pid, port) = dev.replica(runtime, "bench")?;
    Ok((dev, pid, port))
}

fn cold_start(
    runtime: &tokio::runtime::Runtime,
    bench_bin: &Path,
    zeroscale: &Path,
    work: &Path,
    samples: usize,
    cycled_samples: usize,
) -> Result<(ColdStart, Option<ColdStart>)> {
    let samples = samples.max(1);
    let backend_ms = coldstart::backend_start_times(bench_bin, samples)?;
    let mut manifests = coldstart::manifests(bench_bin, samples);
    manifests.push_str("---\n");
    // The shortest idle timeout the API allows, so each cycle to zero is quick.
    manifests.push_str(&function_manifest(CYCLED, bench_bin, 0, 1, "1s"));
    let dev = Dev::start(runtime, zeroscale, &work.join("dev-coldstart"), &manifests)
        .context("starting zeroscale dev")?;
    let mut fresh = Vec::with_capacity(samples);
    for i in 0..samples {
        fresh.push(cold_request(runtime, &dev, &coldstart::name(i))?);
        // Let the new replica's start-up settle before the next wake.
        std::thread::sleep(Duration::from_millis(100));
    }
    coldstart::check(&fresh)?;
    let fresh = coldstart::summarize(
        fresh,
        &backend_ms,
        vec![
            "one fresh Function per sample, so each is a wake from zero with no idle-timeout wait"
                .into(),
        ],
    );

    let mut cycled = Vec::with_capacity(cycled_samples);
    for _ in 0..cycled_samples {
        dev.wait_for_zero(runtime, CYCLED, Duration::from_secs(60))?;
        cycled.push(cold_request(runtime, &dev, CYCLED)?);
    }
    coldstart::check(&cycled)?;
    let cycled = (!cycled.is_empty()).then(|| {
        coldstart::summarize(
            cycled,
            &backend_ms,
            vec![format!(
                "one Function ({CYCLED}, idleTimeout 1s) scaled to zero by the autoscaler \
                 between samples: the activator has served it before and its old replica is gone"
            )],
        )
    });
    drop(dev);
    Ok((fresh, cycled))
}

/// The Function of the cold starts that cycle through zero.
const CYCLED: &str = "cycled";

/// One timed request to a Function at zero, with the activator's wake-to-ready for it.
fn cold_request(
    runtime: &tokio::runtime::Runtime,
    dev: &Dev,
    function: &str,
) -> Result<coldstart::Sample> {
    let host = format!("{function}.default");
    // The histogram's sum before, so a Function woken before counts only this wake.
    let before = coldstart::wake_to_ready_ms(&dev.admin_get(runtime, "/metrics")?, function);
    let answer = runtime.block_on(crate::http::get(
        dev.listen,
        &host,
        "/",
        Duration::from_secs(60),
    ))?;
    let cold_header = answer
        .headers
        .get(zeroscale::api::COLD_START_HEADER)
        .is_some_and(|v| v == "true");
    let after = coldstart::wake_to_ready_ms(&dev.admin_get(runtime, "/metrics")?, function);
    Ok(coldstart::Sample {
        function: function.to_string(),
        status: answer.status.as_u16(),
        cold_header,
        ttfb_ms: answer.ttfb.as_secs_f64() * 1e3,
        wake_to_ready_ms: after.map(|a| a - before.unwrap_or(0.0)),
    })
}
