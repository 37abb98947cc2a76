//! The markdown report of a run and the goals it is judged against (from the issues):
//! at concurrency 64, activator throughput at least nginx's and HAProxy's and p99 no
//! worse, with the harness's load generator and with wrk; CPU time and instructions per
//! request below theirs; at most 5 ms of zeroscale's own cold-start share; at most 2 KiB
//! of activator memory per registered Function; and no autoscaler flapping at the
//! boundary load.

use std::fmt::Write;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::datapath::{self, Run};
use crate::error::{Context, Error, Result};
use crate::run::Results;

/// The markers in BENCHMARKS.md between which `report --update` puts the figures.
const BEGIN: &str = "<!-- bench:results:begin -->";
const END: &str = "<!-- bench:results:end -->";

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The JSON results of a run.
    #[arg(long, default_value = "bench/out/results.json")]
    pub from: PathBuf,
    /// Put the report between the result markers of this file (BENCHMARKS.md) instead
    /// of printing it.
    #[arg(long)]
    pub update: Option<PathBuf>,
}

/// Renders a results file again, to stdout or into BENCHMARKS.md.
pub fn main(args: Args) -> Result<()> {
    let json =
        std::fs::read_to_string(&args.from).context(format!("reading {}", args.from.display()))?;
    let results: Results =
        serde_json::from_str(&json).context(format!("parsing {}", args.from.display()))?;
    let report = markdown(&results);
    let Some(doc) = args.update else {
        print!("{report}");
        return Ok(());
    };
    let text = std::fs::read_to_string(&doc).context(format!("reading {}", doc.display()))?;
    let (head, rest) = text
        .split_once(BEGIN)
        .context(format!("{} has no {BEGIN} marker", doc.display()))?;
    let (_, tail) = rest
        .split_once(END)
        .ok_or_else(|| Error::msg(format!("{} has no {END} marker", doc.display())))?;
    let updated = format!("{head}{BEGIN}\n{report}{END}{tail}");
    std::fs::write(&doc, updated).context(format!("writing {}", doc.display()))?;
    eprintln!("updated {}", doc.display());
    Ok(())
}

/// One goal and how the run did against it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    /// `None` when the run has no figure for it.
    pub met: Option<bool>,
    /// How far from the goal, signed so that positive is better than the goal.
    pub margin: String,
}

const ORDER: [&str; 4] = ["direct", "zeroscale", "nginx", "haproxy"];

fn order(name: &str) -> usize {
    ORDER.iter().position(|n| *n == name).unwrap_or(ORDER.len())
}

/// The reported cell of every (target, concurrency), ordered by concurrency then target.
pub fn cells(runs: &[Run]) -> Vec<Run> {
    let mut cells = datapath::median_runs(runs);
    cells.sort_by_key(|r| (r.concurrency, order(&r.target)));
    cells
}

fn cell<'a>(cells: &'a [Run], target: &str, c: usize) -> Option<&'a Run> {
    cells
        .iter()
        .find(|r| r.target == target && r.concurrency == c)
}

/// The best throughput of a target over every concurrency.
pub fn max_throughput<'a>(cells: &'a [Run], target: &str) -> Option<&'a Run> {
    cells
        .iter()
        .filter(|r| r.target == target)
        .max_by(|a, b| a.result.rps.total_cmp(&b.result.rps))
}

fn pct(ours: f64, theirs: f64) -> String {
    if theirs == 0.0 {
        return "n/a".into();
    }
    format!("{:+.1}%", (ours / theirs - 1.0) * 100.0)
}

/// The median wrk cell of every (target, concurrency), ordered like the harness's.
pub fn wrk_cells(runs: &[crate::wrk::WrkRun]) -> Vec<crate::wrk::WrkRun> {
    let mut cells = crate::wrk::median_runs(runs);
    cells.sort_by_key(|r| (r.concurrency, order(&r.target)));
    cells
}

/// One figure of zeroscale against the same figure of a reference proxy.
fn versus(
    goal: String,
    ours: Option<f64>,
    theirs: Option<f64>,
    reference: &str,
    unit: &str,
    higher_is_better: bool,
) -> Goal {
    match (ours, theirs) {
        (Some(z), Some(r)) => Goal {
            goal,
            measured: format!("{z:.1} {unit} vs {reference} {r:.1} {unit}"),
            met: Some(if higher_is_better { z >= r } else { z <= r }),
            // Signed so that positive is better than the reference.
            margin: if higher_is_better {
                pct(z, r)
            } else {
                pct(r, z)
            },
        },
        _ => missing(&goal),
    }
}

/// Judges the run against the goals.
pub fn goals(results: &Results) -> Vec<Goal> {
    let mut goals = Vec::new();
    let cells = results
        .data_path
        .as_ref()
        .map(|d| cells(&d.runs))
        .unwrap_or_default();

    let (zs, ng) = (
        max_throughput(&cells, "zeroscale"),
        max_throughput(&cells, "nginx"),
    );
    goals.push(match (zs, ng) {
        (Some(z), Some(n)) => Goal {
            goal: "activator max throughput >= nginx's".into(),
            measured: format!(
                "{:.0} req/s (c={}) vs nginx {:.0} req/s (c={})",
                z.result.rps, z.concurrency, n.result.rps, n.concurrency
            ),
            met: Some(z.result.rps >= n.result.rps),
            margin: pct(z.result.rps, n.result.rps),
        },
        _ => missing("activator max throughput >= nginx's"),
    });

    let wrk = results
        .data_path
        .as_ref()
        .map(|d| wrk_cells(&d.wrk))
        .unwrap_or_default();
    let wrk_cell = |target: &str| {
        wrk.iter()
            .find(|r| r.target == target && r.concurrency == 64)
    };
    let counts = results
        .data_path
        .as_ref()
        .map(|d| d.instructions.clone())
        .unwrap_or_default();
    let per_request = |target: &str| {
        counts
            .iter()
            .find(|c| c.target == target)
            .map(|c| c.per_request)
    };
    let harness = |target: &str| cell(&cells, target, 64);
    for reference in ["nginx", "haproxy"] {
        goals.push(versus(
            format!("c=64 throughput >= {reference}'s (harness)"),
            harness("zeroscale").map(|r| r.result.rps),
            harness(reference).map(|r| r.result.rps),
            reference,
            "req/s",
            true,
        ));
        goals.push(versus(
            format!("c=64 p99 <= {reference}'s (harness)"),
            harness("zeroscale").map(|r| r.result.latency.p99_us),
            harness(reference).map(|r| r.result.latency.p99_us),
            reference,
            "us",
            false,
        ));
        goals.push(versus(
            format!("c=64 throughput >= {reference}'s (wrk)"),
            wrk_cell("zeroscale").map(|r| r.rps),
            wrk_cell(reference).map(|r| r.rps),
            reference,
            "req/s",
            true,
        ));
        goals.push(versus(
            format!("c=64 p99 <= {reference}'s (wrk)"),
            wrk_cell("zeroscale").and_then(|r| r.p99_us),
            wrk_cell(reference).and_then(|r| r.p99_us),
            reference,
            "us",
            false,
        ));
        goals.push(versus(
            format!("c=64 CPU per request <= {reference}'s (harness)"),
            harness("zeroscale").and_then(Run::proxy_cpu_us_per_request),
            harness(reference).and_then(Run::proxy_cpu_us_per_request),
            reference,
            "us",
            false,
        ));
        goals.push(versus(
            format!("instructions per request <= {reference}'s (callgrind)"),
            per_request("zeroscale"),
            per_request(reference),
            reference,
            "",
            false,
        ));
    }

    goals.push(match &results.cold_start {
        Some(cs) if cs.activator_share.samples > 0 => {
            let a = &cs.activator_share;
            Goal {
                goal: "zeroscale's own cold-start share <= 5 ms (median)".into(),
                measured: format!(
                    "median {:.2} ms, p99 {:.2} ms (activator: arrival -> wake, ready -> forwarded)",
                    a.median_ms, a.p99_ms
                ),
                met: Some(a.median_ms <= 5.0),
                margin: format!("{:+.2} ms", 5.0 - a.median_ms),
            }
        }
        _ => missing("zeroscale's own cold-start share <= 5 ms (median)"),
    });

    goals.push(
        match results
            .memory
            .as_ref()
            .and_then(|m| m.per_function_at(10_000))
        {
            Some(bytes) => Goal {
                goal: "activator memory <= 2 KiB per registered Function (10,000)".into(),
                measured: format!("{bytes:.0} B per Function (RSS delta / N)"),
                met: Some(bytes <= 2048.0),
                margin: format!("{:+.0} B", 2048.0 - bytes),
            },
            None => missing("activator memory <= 2 KiB per registered Function (10,000)"),
        },
    );

    const BOUNDARY: &str = "autoscaler: no scale change after the wake at the boundary load";
    let boundary = results
        .autoscaler
        .as_ref()
        .and_then(|a| a.traces.iter().find(|t| t.trace == "boundary"));
    goals.push(match boundary {
        Some(t) => {
            let flaps = t.scale_changes.saturating_sub(t.wakes);
            Goal {
                goal: BOUNDARY.into(),
                measured: format!(
                    "{flaps} changes after the wake in {} s (one client at target 1, simulated)",
                    t.seconds
                ),
                met: Some(flaps == 0),
                margin: format!("{} changes", -i64::from(flaps)),
            }
        }
        None => missing(BOUNDARY),
    });
    goals
}

fn missing(goal: &str) -> Goal {
    Goal {
        goal: goal.into(),
        measured: "not measured (see notes)".into(),
        met: None,
        margin: "-".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.digits$}"))
}

/// The whole report.
pub fn markdown(results: &Results) -> String {
    let mut s = String::new();
    let m = &results.machine;
    let _ = writeln!(s, "## zeroscale benchmark results\n");
    let _ = writeln!(
        s,
        "Machine: {}, {} CPUs, {} GiB, Linux {}; {}; load average {} at start, {} at end. \
         Commit {}, {}.\n",
        m.cpu_model,
        m.nproc,
        m.memory_gib,
        m.kernel,
        m.date,
        m.loadavg_at_start,
        m.loadavg_at_end,
        m.commit,
        m.rustc
    );

    if let Some(dp) = &results.data_path {
        let cells = cells(&dp.runs);
        let _ = writeln!(s, "### Warm data path\n");
        if let Some(st) = &results.settings {
            let _ = writeln!(
                s,
                "{} rounds of {} ms warm-up + {} ms measured per cell, median round shown. \
                 Load generator: {}. Backend: {}.\n",
                st.rounds, st.warmup_ms, st.duration_ms, dp.load_generator, dp.backend
            );
        }
        let _ = writeln!(
            s,
            "| c | target | req/s | p50 us | p90 us | p99 us | proxy CPU us/req | backend CPU us/req | errors |"
        );
        let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|---:|");
        for r in &cells {
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
                r.concurrency,
                r.target,
                r.result.rps,
                r.result.latency.p50_us,
                r.result.latency.p90_us,
                r.result.latency.p99_us,
                opt(r.proxy_cpu_us_per_request(), 1),
                opt(r.backend_cpu_us_per_request(), 1),
                r.result.errors + r.result.non_2xx,
            );
        }
        let _ = writeln!(
            s,
            "\n| target | max req/s (at c) | instructions/req | peak RSS | idle RSS |"
        );
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for t in &dp.targets {
            let max = max_throughput(&cells, &t.name)
                .map(|r| format!("{:.0} (c={})", r.result.rps, r.concurrency))
                .unwrap_or_else(|| "-".into());
            let kib = |list: &[(String, u64)]| {
                list.iter()
                    .find(|(n, _)| *n == t.name)
                    .map(|(_, k)| format!("{:.1} MiB", *k as f64 / 1024.0))
                    .unwrap_or_else(|| "-".into())
            };
            let instructions = dp
                .instructions
                .iter()
                .find(|c| c.target == t.name)
                .map_or_else(|| "-".into(), |c| format!("{:.0}", c.per_request));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} |",
                t.name,
                max,
                instructions,
                kib(&dp.peak_rss_kib),
                kib(&dp.idle_rss_kib)
            );
        }
        let _ = writeln!(s);
        if let (Some(cs), false) = (&dp.instructions_settings, dp.instructions.is_empty()) {
            let _ = writeln!(
                s,
                "Instructions per request: each proxy under `valgrind --tool=callgrind` \
                 (user-space instructions, all threads), {} requests at c={} counted after {} \
                 of warm-up, minus the idle rate of a {} ms baseline; nginx as one process, \
                 HAProxy with one thread, zeroscale as it runs.\n",
                cs.requests, cs.concurrency, cs.warmup_requests, cs.idle_ms
            );
            let _ = writeln!(
                s,
                "| target | instructions/req | requests | errors | counted | idle baseline |"
            );
            let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|");
            for c in &dp.instructions {
                let _ = writeln!(
                    s,
                    "| {} | {:.0} | {} | {} | {:.2e} in {:.1} s | {:.2e} in {:.1} s |",
                    c.target,
                    c.per_request,
                    c.requests,
                    c.errors,
                    c.loaded_instructions as f64,
                    c.loaded_s,
                    c.idle_instructions as f64,
                    c.idle_s
                );
            }
            let _ = writeln!(s);
        }
        if !dp.wrk.is_empty() {
            let rounds = dp.wrk.iter().map(|w| w.round + 1).max().unwrap_or(1);
            let _ = writeln!(
                s,
                "Cross-check with {} (`-t{}`, {} s per cell after a 1 s warm-up, {} rounds, \
                 median round shown):\n",
                dp.wrk_version.as_deref().unwrap_or("wrk"),
                dp.wrk[0].threads,
                dp.wrk[0].duration_s,
                rounds
            );
            let _ = writeln!(
                s,
                "| c | target | req/s | p50 us | p90 us | p99 us | proxy CPU us/req | errors |"
            );
            let _ = writeln!(s, "|---:|---|---:|---:|---:|---:|---:|---:|");
            for w in &wrk_cells(&dp.wrk) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {:.0} | {} | {} | {} | {} | {} |",
                    w.concurrency,
                    w.target,
                    w.rps,
                    opt(w.p50_us, 0),
                    opt(w.p90_us, 0),
                    opt(w.p99_us, 0),
                    opt(w.proxy_cpu_us_per_request, 1),
                    w.errors
                );
            }
            let _ = writeln!(s);
        }
    }

    if let Some(cs) = &results.cold_start {
        let _ = writeln!(s, "### Cold start ({} samples)\n", cs.ttfb.samples);
        let _ = writeln!(s, "| part | median ms | p99 ms | min ms | max ms |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for (name, sp) in [
            ("time to first byte, total", &cs.ttfb),
            ("activator: wake issued -> replica ready", &cs.wake_to_ready),
            (
                "zeroscale activator share (total - wake-to-ready)",
                &cs.activator_share,
            ),
            (
                "dev platform share (wake-to-ready - backend start)",
                &cs.platform_share,
            ),
            ("backend's own start (exec -> port open)", &cs.backend_start),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                sp.median_ms, sp.p99_ms, sp.min_ms, sp.max_ms
            );
        }
        let _ = writeln!(s);
    }

    if let Some(cs) = &results.cold_start_cycled {
        let _ = writeln!(
            s,
            "One Function cycling through zero ({} samples; the activator served it before and \
             its old replica is gone):\n",
            cs.ttfb.samples
        );
        let _ = writeln!(s, "| part | median ms | p99 ms | min ms | max ms |");
        let _ = writeln!(s, "|---|---:|---:|---:|---:|");
        for (name, sp) in [
            ("time to first byte, total", &cs.ttfb),
            ("activator: wake issued -> replica ready", &cs.wake_to_ready),
            ("zeroscale activator share", &cs.activator_share),
        ] {
            let _ = writeln!(
                s,
                "| {name} | {:.2} | {:.2} | {:.2} | {:.2} |",
                sp.median_ms, sp.p99_ms, sp.min_ms, sp.max_ms
            );
        }
        let _ = writeln!(s);
    }

    if let Some(mem) = &results.memory {
        s.push_str(&crate::memory::markdown(mem));
    }

    if let Some(a) = &results.autoscaler {
        s.push_str(&crate::autoscale::markdown(a));
    }

    let _ = writeln!(s, "### Goals\n");
    let _ = writeln!(s, "| goal | measured | met | margin |");
    let _ = writeln!(s, "|---|---|---|---:|");
    for g in goals(results) {
        let met = match g.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            g.goal, g.measured, met, g.margin
        );
    }
    let mut notes: Vec<String> = results.notes.clone();
    for cs in [&results.cold_start, &results.cold_start_cycled]
        .into_iter()
        .flatten()
    {
        notes.extend(cs.notes.iter().map(|n| format!("cold start: {n}")));
    }
    if !notes.is_empty() {
        let _ = writeln!(s, "\nNotes:\n");
        for n in &notes {
            let _ = writeln!(s, "- {n}");
        }
    }
    s
}
