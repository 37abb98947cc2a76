//! What the kernel says about a process: CPU time (utime + stime of all its threads, from
//! `/proc/<pid>/stat`) and memory (`VmRSS`, `VmHWM` from `/proc/<pid>/status`). Read from
//! outside, so a proxy is measured the same way whether it is nginx or zeroscale.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};

/// CPU time a process has used, user and system, in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .context(format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parentheses: count after its end.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context(format!("parsing /proc/{pid}/stat"))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After ")", index 0 is field 3 (state); utime is field 14, stime field 15.
    let field = |i: usize| -> Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .context(format!("field {} of /proc/{pid}/stat", i + 3))
    };
    Ok(field(11)? + field(12)?)
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on every Linux this runs on).
pub fn ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .filter(|t| *t > 0)
            .unwrap_or(100)
    })
}

/// A `kB` line of `/proc/<pid>/status` (`VmRSS`, `VmHWM`...), in KiB.
pub fn status_kib(pid: u32, key: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .context(format!("reading /proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| {
            let value = line.strip_prefix(key)?.strip_prefix(':')?;
            value.split_whitespace().next()?.parse().ok()
        })
        .context(format!("{key} in /proc/{pid}/status"))
}

/// The direct children of a process (nginx's workers, dev's replicas).
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut out: Vec<u32> = tasks
        .filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
        .flat_map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// CPU and memory of a group of processes (a proxy's master and workers) at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub pids: Vec<u32>,
    /// utime + stime summed over the processes, in clock ticks.
    pub cpu_ticks: u64,
    /// Peak resident set summed over the processes (VmHWM), KiB.
    pub hwm_kib: u64,
    /// Resident set now summed over the processes (VmRSS), KiB.
    pub rss_kib: u64,
}

impl Sample {
    pub fn take(pids: &[u32]) -> Result<Self> {
        let mut s = Sample {
            pids: pids.to_vec(),
            ..Sample::default()
        };
        for &pid in pids {
            s.cpu_ticks += cpu_ticks(pid)?;
            s.hwm_kib += status_kib(pid, "VmHWM")?;
            s.rss_kib += status_kib(pid, "VmRSS")?;
        }
        Ok(s)
    }

    /// CPU seconds used between `self` and a later sample.
    pub fn cpu_seconds_until(&self, later: &Sample) -> f64 {
        later.cpu_ticks.saturating_sub(self.cpu_ticks) as f64 / ticks_per_second() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        // Burn a little CPU so the counters have something to show.
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = x.wrapping_add(std::hint::black_box(i));
        }
        std::hint::black_box(x);
        assert!(cpu_ticks(me).is_ok());
        assert!(status_kib(me, "VmRSS").unwrap() > 0);
        assert!(status_kib(me, "VmHWM").unwrap() >= status_kib(me, "VmRSS").unwrap() / 2);
        assert!(status_kib(me, "NoSuchKey").is_err());
    }
}
