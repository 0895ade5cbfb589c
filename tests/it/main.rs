//! The end-to-end tests of `pipe`, in one test binary (one link against libtorch instead of
//! one per file): each module is one area, run as `cargo test --release --test it AREA::`.
//!
//! - [`cli`]: the `pipe` command on real data and small fixtures;
//! - [`engine`]: checks before a run (positions, `--set`), self-description, stage failures,
//!   statistics, memory;
//! - [`checkpoint`]: checkpoints, exact resume, EMA, `pipe sample`;
//! - [`eval`]: `pipe eval` and the eval stage;
//! - [`export`]: `pipe export`, its files loaded in PyTorch against pipe's own outputs;
//! - [`hostile`]: hostile inputs and faults;
//! - [`methods`]: the shipped method pipelines;
//! - [`harness`]: the harness itself, and runs on data the tests make;
//! - [`progress`]: JSON lines, plain progress lines without a terminal, `--quiet`, the live
//!   loss.png;
//! - [`speed`]: the speed settings on the CPU, `pipe devices`, `pipe compare`;
//! - [`tensorboard`]: the TensorBoard stage, read back with TensorBoard's own reader.
//!
//! [`common`] is the harness: `Pipe`, a command builder with its own temporary folder whose
//! `code(N)` assertion shows stderr and lists the run folder when it fails; `TINY`, the one
//! tiny-model preset; `synthetic_idx` and `pipeline_on`, IDX data and a pipeline that need no
//! download; and readers of what a run wrote.

mod checkpoint;
mod cli;
mod common;
mod dist;
mod engine;
mod eval;
mod export;
mod harness;
mod hostile;
mod methods;
mod progress;
mod speed;
mod tensorboard;
