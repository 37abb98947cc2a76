//! The per-Function request statistics an activator publishes and the autoscaler reads.
//!
//! Counters are cumulative (monotonic since the activator started) rather than "since the
//! last read": the autoscaler takes differences between two reads, so a lost read, a
//! second reader (an operator replica that is not the leader yet) or a retry never loses
//! or double-counts requests. `concurrency_seconds_total` integrates in-flight requests
//! over time, so the average concurrency between two reads is exact, not a sample.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::api::FunctionKey;

/// One Function's counters in one activator.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionStats {
    pub namespace: String,
    pub name: String,
    /// Requests forwarded to a replica and not finished, now.
    pub in_flight: u64,
    /// Requests waiting in the queue (for a wake or for capacity), now.
    pub queued: u64,
    /// Requests received since start (counted on arrival, queued or not).
    pub requests_total: u64,
    /// Integral of (in flight + queued) over time, in request-seconds, since start.
    pub concurrency_seconds_total: f64,
    /// Unix time in milliseconds of the last request received, if any.
    pub last_request_unix_ms: Option<i64>,
}

impl FunctionStats {
    pub fn key(&self) -> FunctionKey {
        FunctionKey::new(&self.namespace, &self.name)
    }
}

/// Everything one activator reports in one read.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Identifies the activator process (pod name or a random id); counters reset when
    /// it changes.
    pub activator: String,
    /// Unix time in milliseconds when the snapshot was taken.
    pub taken_unix_ms: i64,
    pub functions: Vec<FunctionStats>,
}

impl StatsSnapshot {
    /// The counters by Function.
    pub fn by_function(&self) -> BTreeMap<FunctionKey, &FunctionStats> {
        self.functions.iter().map(|f| (f.key(), f)).collect()
    }
}
