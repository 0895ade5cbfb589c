//! Run a pipeline from Rust instead of the command line: load a shipped file, change a few
//! settings as `--set` would, check it, and train for a few steps on the CPU.
//!
//! ```sh
//! cargo run --release --example run_pipeline -- pipelines/mnist_mlp.ron
//! ```

use pipe::run::{self, RunOptions};
use pipe::spec::DeviceChoice;
use std::path::PathBuf;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "pipelines/mnist_mlp.ron".into()));
    let opts = RunOptions {
        out: Some(PathBuf::from("runs/example")),
        max_steps: Some(30),
        device: Some(DeviceChoice::Cpu),
        sets: vec!["d_step.penalty=WganGp(lambda: 10.0)".into(), "augment.perturb=Off".into(), "sampler.every=10".into()],
        overwrite: true,
        stats: true,
        quiet: false,
        ..Default::default()
    };
    let pipeline = run::prepare(&file, &opts).map_err(|e| format!("{e:?}"))?;
    let summary = run::run(&pipeline, &opts, Arc::new(AtomicUsize::new(0))).map_err(|e| format!("{e:?}"))?;
    run::print_summary(&summary, "example done");
    Ok(())
}
