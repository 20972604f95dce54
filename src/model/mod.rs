//! The MaPeT model: configuration, parameters (one flat buffer, official names), and the
//! two-stream forward and backward over a [`crate::Backend`].

pub mod checkpoint;
pub mod cpu;
pub mod cuda;
pub mod golden;
pub mod optim;
pub mod params;
pub mod train;

pub use params::{ModelConfig, ParamLayout, ParamSpec};
