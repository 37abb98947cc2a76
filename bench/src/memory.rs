//! Activator memory per registered Function (placeholder until the activator lands).

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    #[arg(long)]
    pub functions: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Memory {}

pub fn main(_args: Args) -> Result<()> {
    Err(Error::msg("the activator has not landed yet"))
}

pub fn measure_all(_bench_bin: &std::path::Path) -> Result<Memory> {
    Err(Error::msg("the activator has not landed yet"))
}

impl Memory {
    pub fn per_function_at(&self, _n: usize) -> Option<f64> {
        None
    }
}

pub fn markdown(_m: &Memory) -> String {
    String::new()
}
