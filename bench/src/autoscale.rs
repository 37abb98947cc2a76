//! The autoscaler on synthetic traces (placeholder until the autoscaler lands).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Autoscaler {}

pub fn run_standard_traces() -> Result<Autoscaler> {
    Err(Error::msg(
        "the autoscaler's simulate module has not landed yet",
    ))
}

pub fn markdown(_a: &Autoscaler) -> String {
    String::new()
}
