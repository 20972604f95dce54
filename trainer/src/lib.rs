//! The `mapet` command's library: training-curve plots and, beside them, the data pipeline.

pub mod config;
pub mod plot;
