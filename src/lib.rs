//! `pipe`: train GANs (DRAGAN and its relatives) as a streaming pipeline of typed stages,
//! wired by a RON file. See the README for the commands and `pipelines/` for examples.

pub mod describe;
pub mod runner;
pub mod sample;
pub mod spec;
