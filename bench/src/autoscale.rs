//! The autoscaler on synthetic traces (placeholder until the autoscaler lands).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TraceResult {}

pub fn run_standard_traces() -> Result<Vec<TraceResult>> {
    Err(Error::msg(
        "the autoscaler's simulate module has not landed yet",
    ))
}

pub fn markdown(_t: &[TraceResult]) -> String {
    String::new()
}
