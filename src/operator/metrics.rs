//! The operator's Prometheus metrics, registered in the registry `/metrics` serves.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Counters and timings of the reconciler and the leader election.
#[derive(Clone)]
pub struct Metrics {
    pub reconciles: IntCounter,
    pub reconcile_errors: IntCounterVec,
    pub reconcile_duration: Histogram,
    pub leader: IntGauge,
}

impl Metrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let reconciles = IntCounter::new(
            "zeroscale_operator_reconciles_total",
            "Reconciles of Functions started.",
        )?;
        let reconcile_errors = IntCounterVec::new(
            Opts::new(
                "zeroscale_operator_reconcile_errors_total",
                "Reconciles of Functions that failed, by reason.",
            ),
            &["reason"],
        )?;
        let reconcile_duration = Histogram::with_opts(
            HistogramOpts::new(
                "zeroscale_operator_reconcile_duration_seconds",
                "Time one reconcile of a Function took.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ]),
        )?;
        let leader = IntGauge::new(
            "zeroscale_operator_leader",
            "1 while this replica holds the leader lease.",
        )?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(reconcile_errors.clone()))?;
        registry.register(Box::new(reconcile_duration.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        Ok(Self {
            reconciles,
            reconcile_errors,
            reconcile_duration,
            leader,
        })
    }
}
