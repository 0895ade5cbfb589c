//! Building the stages of a checked pipeline: the models of the training pair first (they
//! are shared by d_step and g_step), then every stage in file order, each through its kind's
//! [`pipe_stages::kinds::Kind::build`].

use super::{invalid, RunError};
use crate::spec::{self, Pipeline};
use pipe_stages::core::stage::Stage;
use pipe_stages::io::checkpoint::{self, Checkpoint, CheckpointPlan};
use pipe_stages::kinds::d_step::DStepConfig;
use pipe_stages::kinds::g_step::{GStepConfig, SampleSchedule};
use pipe_stages::kinds::training::TrainingPair;
use pipe_stages::kinds::{BuildContext, Purpose};
use pipe_stages::train::{build_models_laid_out, RunSettings};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Build every stage of `p`, in file order. `resume`: the checkpoint a resumed run continues
/// from (sources start at its data position, the step stages load their state from it);
/// `prefix_frames`: the grid PNGs that open the frame sinks of a resumed run.
///
/// Errors: a stage that cannot be built (exit 2, naming it), models too big for the memory.
pub fn build_stages(
    p: &Pipeline,
    run: &RunSettings,
    run_dir: &Path,
    resume: Option<&Checkpoint>,
    prefix_frames: &[PathBuf],
) -> Result<Vec<Box<dyn Stage>>, RunError> {
    let ((_, d_cfg), (g_spec, g_cfg)) = spec::training_pair(p).ok_or_else(|| invalid("a pipeline needs a d_step and a g_step".into()))?;
    let (image, _) = spec::loader_shape(p).map_err(|e| invalid(e.to_string()))?;
    // The pipeline's batch is the global batch; each rank trains on its share of it.
    let batch = p.stages.iter().find_map(|s| s.kind.source()).map_or(1, |s| s.batch) / run.shard().world.max(1);
    let data_start = resume.map(|c| c.manifest.data).unwrap_or_default();
    // Batches are numbered across the whole run (a resumed one included): those read before the
    // checkpoint, then n_critic per step still to go (n_critic may differ from the first run's).
    let max_batches = Some(data_start.next_index + p.max_steps.saturating_sub(run.start_step) * d_cfg.n_critic as u64);
    // The images g_step generates for the stages that read it.
    let asked = |purpose: Purpose| {
        p.stages
            .iter()
            .filter(|s| s.input.contains(&g_spec.name))
            .find_map(|s| s.kind.asks_images().filter(|r| r.purpose == purpose).map(|r| SampleSchedule { n: r.n, every: r.every }))
    };
    let (grid, eval) = (asked(Purpose::Grid), asked(Purpose::Eval));
    let image_i64 = image.map(|v| v as i64);
    let mut run = run.clone();
    run.checkpoint = p.checkpoint.as_ref().map(|c| {
        Arc::new(CheckpointPlan {
            dir: run_dir.join(checkpoint::DIR),
            every: c.every,
            keep: c.keep,
            pipeline: spec::to_ron(p),
            image: image_i64,
            latent: g_cfg.latent,
        })
    });
    let mut training =
        TrainingPair::new(d_cfg, g_cfg, build_pair_models(d_cfg, g_cfg, image_i64, run.device, run.speed.channels_last)?, grid, eval);
    let note = |m: String| crate::say!("{m}");
    let expected_frames =
        prefix_frames.len() as u64 + expected_grids(run.start_step, p.max_steps, grid.map(|g| g.every), run.sample_at_start);
    let mut stages = vec![];
    for s in &p.stages {
        let mut cx = BuildContext {
            stage: &s.name,
            seed: p.seed,
            run_dir,
            run: &run,
            resume,
            data_start,
            max_batches,
            image,
            batch,
            prefix_frames,
            expected_frames,
            training: Some(&mut training),
            note: &note,
        };
        stages.push(s.kind.build(&mut cx).map_err(|e| invalid(format!("stage `{}` ({}): {e}", s.name, s.kind.name())))?);
    }
    Ok(stages)
}

/// The two networks and their views ([`build_models`]), after checking that they fit in the
/// memory (on the CPU). A model too big for the memory makes libtorch fail inside tch (a
/// panic): caught here and reported as out of memory.
fn build_pair_models(
    d: &DStepConfig,
    g: &GStepConfig,
    image: [i64; 3],
    device: tch::Device,
    channels_last: bool,
) -> Result<(pipe_stages::train::DSide, pipe_stages::train::GSide), RunError> {
    if device == tch::Device::Cpu {
        check_model_memory(&g.model, &d.model, g.latent, image, g.ema.is_some())?;
    }
    pipe_stages::train::catch_torch(|| {
        build_models_laid_out(&g.model, &d.model, g.latent, image, device, channels_last).map_err(pipe_stages::StageError::from)
    })
    .map_err(|e| {
        let e = e.to_string();
        if pipe_stages::train::is_oom(&e) {
            RunError::Failed(format!("out of memory building the models (d_step and g_step `model`): choose smaller models; {e}"))
        } else {
            invalid(format!("models: {e}"))
        }
    })
}

/// Sample grids a run makes after step `start` up to `max_steps` with a sampler every `every`
/// steps (None: no sampler on g_step): one at each multiple of `every` and one at the last step,
/// plus the grid of step `start` when a resumed run makes it again (`at_start`).
fn expected_grids(start: u64, max_steps: u64, every: Option<u64>, at_start: bool) -> u64 {
    let Some(every) = every.map(|e| e.max(1)) else { return 0 };
    let mut n = u64::from(at_start);
    if max_steps > start {
        n += max_steps / every - start / every + u64::from(max_steps % every != 0);
    }
    n
}

/// Refuse models whose weights and optimiser state alone would not fit in the memory
/// available now (Linux's MemAvailable): building them would get the process killed by the
/// kernel instead of failing cleanly. Each trained value takes 5 floats (weight, gradient,
/// Adam's two moments and its scratch), 6 for G with an EMA. No check where MemAvailable
/// cannot be read.
fn check_model_memory(
    g: &pipe_stages::train::models::GModel,
    d: &pipe_stages::train::models::DModel,
    latent: i64,
    image: [i64; 3],
    ema: bool,
) -> Result<(), RunError> {
    let (Some(gv), Some(dv)) = (pipe_stages::train::models::g_values(g, latent, image), pipe_stages::train::models::d_values(d, image))
    else {
        return Ok(());
    };
    let need = (gv * if ema { 6 } else { 5 } + dv * 5) * 4;
    let avail = std::fs::read_to_string("/proc/meminfo").ok().and_then(|t| {
        t.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    match avail {
        Some(a) if need > a => Err(RunError::Invalid(vec![format!(
            "the models need about {:.1} GB for weights, gradients and Adam's state (G {} and D {} values), more than the {:.1} GB of memory available: choose smaller models (d_step and g_step `model`)",
            need as f64 / 1e9,
            gv,
            dv,
            a as f64 / 1e9
        )])),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_grids_count_multiples_and_the_last_step() {
        // A fresh run: 20, 40 and the last step 50.
        assert_eq!(expected_grids(0, 50, Some(20), false), 3);
        // The last step a multiple of `every`: no extra grid.
        assert_eq!(expected_grids(0, 200, Some(20), false), 10);
        // Resumed at 30 (its grids are prefix frames): 40, 50; with the checkpoint step's grid made again, one more.
        assert_eq!(expected_grids(30, 50, Some(20), false), 2);
        assert_eq!(expected_grids(30, 50, Some(20), true), 3);
        assert_eq!(expected_grids(40, 40, Some(20), false), 0);
        assert_eq!(expected_grids(0, 5, Some(500), false), 1);
        assert_eq!(expected_grids(0, 50, None, false), 0);
    }
}
