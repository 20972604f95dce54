//! # mapet-trainer: MaPeT pre-training over the `mapet` kernel crate
//!
//! The `mapet` binary (`src/main.rs`) is the command line; this library holds the parts it is built
//! from, so that tests and benches can reach them:
//!
//! - [`data`]: the image pipeline. An image index (a folder or a manifest), decoding, center crop,
//!   bicubic resize and color jitter on worker threads, token files (`.npy`), and a loader that
//!   yields reproducible batches of uint8 pixels, target token ids and permutation ranks.
//! - [`config`]: `mapet pretrain`'s TOML configuration and its overrides.
//! - [`pretrain`]: the training loop.
//! - [`device`]: the `auto | cpu | cuda` choice and its fallback policy, shared by the commands.
//! - [`cmd_bench`]: `mapet bench`, training-step throughput on synthetic data.
//! - [`plot`]: PNG training curves.
//! - [`cmd`]: the other subcommands (`eval`, `export`, `tokenize`, `bench-data`).

pub mod cli;
pub mod cmd;
pub mod cmd_bench;
pub mod config;
pub mod data;
pub mod plot;

pub mod demo;
pub mod device;
pub mod pretrain;
pub mod say;
pub mod tokenize;
