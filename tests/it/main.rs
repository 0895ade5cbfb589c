//! The end-to-end tests of `pipe`, in one test binary (one link against libtorch instead of
//! one per file): each module is one area, run as `cargo test --release --test it AREA::`.
//!
//! - [`cli`]: the `pipe` command on real data and small fixtures;
//! - [`engine`]: checks before a run (positions, `--set`), self-description, stage failures,
//!   statistics, memory;
//! - [`checkpoint`]: checkpoints, exact resume, EMA, `pipe sample`;
//! - [`eval`]: `pipe eval` and the eval stage;
//! - [`hostile`]: hostile inputs and faults;
//! - [`methods`]: the shipped method pipelines.
//!
//! [`common`] runs the binary from the project folder and reads what a run wrote.

mod checkpoint;
mod cli;
mod common;
mod engine;
mod eval;
mod hostile;
mod methods;
