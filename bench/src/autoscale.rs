//! The autoscaler on the standard synthetic traces (`zeroscale::autoscaler::simulate`):
//! the real decider in simulated time, with the built-in default scale settings, so the
//! figures say what a Function that sets nothing gets; and on the boundary load of issue
//! 12 (one client exactly at `target: 1`), with its replica timeline, where any scale
//! change after the wake is a flap. Deterministic: no clock is read.

use std::fmt::Write;

use serde::{Deserialize, Serialize};
use zeroscale::api::config::ScaleConfig;
use zeroscale::autoscaler::simulate;

use crate::error::{Error, Result};

/// The traces' outcomes under one set of scale settings.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Autoscaler {
    /// The scale settings, for a person.
    pub settings: String,
    pub traces: Vec<TraceResult>,
}

/// One trace's outcome.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TraceResult {
    pub trace: String,
    /// What the trace is and its scale settings, when not the table's defaults.
    #[serde(default)]
    pub about: Option<String>,
    pub seconds: usize,
    pub replica_startup_s: f64,
    pub peak_needed: u32,
    pub peak_desired: u32,
    pub overshoot: u32,
    pub time_to_peak_desired_s: Option<u64>,
    pub time_to_peak_ready_s: Option<u64>,
    pub under_provisioned_s: u32,
    pub replica_seconds: u64,
    pub scale_changes: u32,
    pub wakes: u32,
    pub time_to_zero_s: Option<u64>,
    /// The trace still has load in its last second (so no time to zero).
    pub ends_loaded: bool,
    /// The seconds where the asked-for or ready count changed: (second, demand,
    /// needed, desired, ready).
    pub timeline: Vec<(u32, f64, u32, u32, u32)>,
}

/// `zeroscale-bench autoscaler`: the autoscaler part of `run` alone, to stdout.
pub fn main() -> Result<()> {
    print!("{}", markdown(&run_standard_traces()?));
    Ok(())
}

pub fn run_standard_traces() -> Result<Autoscaler> {
    let cfg = simulate::default_scale_config()
        .map_err(|e| Error::msg(format!("the default scale settings: {e}")))?;
    let mut traces: Vec<TraceResult> = simulate::standard_traces()
        .iter()
        .map(|trace| run(&cfg, trace, None))
        .collect();
    let boundary = simulate::boundary_scale_config()
        .map_err(|e| Error::msg(format!("the boundary scale settings: {e}")))?;
    let trace = simulate::boundary_trace();
    let about = format!(
        "one closed-loop client of {} ms requests after {} s of quiet, as the activator \
         measures it: one request in flight, sometimes a hair over (one request in {:.0} \
         still counted {} ms after its answer when the next arrives: 1.0 in flight in \
         most seconds, {} in the others, a snapshot of 2 when a tick falls in such an \
         overlap); {}",
        trace.latency.as_millis(),
        trace.demand.iter().take_while(|d| **d == 0.0).count(),
        1.0 / trace.overlapping,
        trace.overlap.as_millis(),
        1.0 + trace.overlap.as_secs_f64(),
        describe(&boundary)
    );
    traces.push(run(&boundary, &trace, Some(about)));
    Ok(Autoscaler {
        settings: format!("built-in defaults: {}", describe(&cfg)),
        traces,
    })
}

/// Scale settings for a person.
fn describe(cfg: &ScaleConfig) -> String {
    format!(
        "target {} {} per replica at {:.0}%, window {:?}, panic window {:?} at {:.0}%, \
         idle timeout {:?}, min {}, max {}, initial {}",
        cfg.target,
        match cfg.metric {
            zeroscale::api::Metric::Concurrency => "in flight",
            zeroscale::api::Metric::Rps => "req/s",
        },
        cfg.utilization * 100.0,
        cfg.window,
        cfg.panic_window,
        cfg.panic_threshold * 100.0,
        cfg.idle_timeout,
        cfg.min,
        cfg.max,
        cfg.initial
    )
}

fn run(cfg: &ScaleConfig, trace: &simulate::Trace, about: Option<String>) -> TraceResult {
    let t = simulate::run(cfg, trace);
    let s = &t.summary;
    let mut timeline = Vec::new();
    let mut last = None;
    for p in &t.points {
        let now = (p.needed, p.desired, p.ready);
        if last != Some(now) {
            timeline.push((p.at, p.demand, p.needed, p.desired, p.ready));
            last = Some(now);
        }
    }
    TraceResult {
        trace: trace.name.clone(),
        about,
        seconds: trace.demand.len(),
        replica_startup_s: trace.startup.as_secs_f64(),
        peak_needed: s.peak_needed,
        peak_desired: s.peak_desired,
        overshoot: s.overshoot,
        time_to_peak_desired_s: s.time_to_peak_desired.map(|d| d.as_secs()),
        time_to_peak_ready_s: s.time_to_peak_ready.map(|d| d.as_secs()),
        under_provisioned_s: s.under_provisioned_seconds,
        replica_seconds: s.replica_seconds,
        scale_changes: s.scale_changes,
        wakes: s.wakes,
        time_to_zero_s: s.time_to_zero.map(|d| d.as_secs()),
        ends_loaded: trace.demand.last().is_some_and(|d| *d > 0.0),
        timeline,
    }
}

pub fn markdown(a: &Autoscaler) -> String {
    let traces = &a.traces;
    let mut s = String::new();
    let secs = |v: Option<u64>| v.map_or_else(|| "never".into(), |v| format!("{v} s"));
    let _ = writeln!(s, "### Autoscaler on synthetic traces\n");
    let _ = writeln!(
        s,
        "Scale settings (unless a note below says otherwise): {}. Replicas ready {} s \
         after being asked for; simulated time. \
         \"asked in\"/\"ready in\": from the first second that needs the peak replica count \
         until it is asked for / ready (\"never\": the peak was never reached).\n",
        a.settings,
        traces.first().map_or(0.0, |t| t.replica_startup_s)
    );
    let _ = writeln!(
        s,
        "| trace | peak needed | peak asked | overshoot | asked in | ready in | under-provisioned | replica-seconds | changes | to zero after |"
    );
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for t in traces {
        let _ = writeln!(
            s,
            "| {}{} ({} s) | {} | {} | {} | {} | {} | {} s | {} | {} | {} |",
            t.trace,
            if t.about.is_some() { "*" } else { "" },
            t.seconds,
            t.peak_needed,
            t.peak_desired,
            t.overshoot,
            secs(t.time_to_peak_desired_s),
            secs(t.time_to_peak_ready_s),
            t.under_provisioned_s,
            t.replica_seconds,
            t.scale_changes,
            if t.ends_loaded {
                "- (ends loaded)".into()
            } else {
                secs(t.time_to_zero_s)
            }
        );
    }
    let _ = writeln!(s);
    for t in traces {
        let Some(about) = &t.about else { continue };
        let _ = writeln!(
            s,
            "\\* {}: {about}. Replica timeline (second: asked / ready): {}. {} scale \
             change{}, {} besides the wake{}.\n",
            t.trace,
            timeline(t),
            t.scale_changes,
            if t.scale_changes == 1 { "" } else { "s" },
            t.scale_changes.saturating_sub(t.wakes),
            if t.wakes == 1 { "" } else { "s" }
        );
    }
    s
}

/// The asked-for and ready counts at each change, the first 20 changes at most.
fn timeline(t: &TraceResult) -> String {
    const SHOWN: usize = 20;
    let mut parts: Vec<String> = t
        .timeline
        .iter()
        .take(SHOWN)
        .map(|(at, _, _, desired, ready)| format!("{at} s: {desired} / {ready}"))
        .collect();
    if t.timeline.len() > SHOWN {
        parts.push(format!("... ({} more)", t.timeline.len() - SHOWN));
    }
    parts.join(", ")
}
