//! `pipe sample`: generate from a checkpoint, as a grid PNG or a latent-space walk video.
//!
//! The generator is rebuilt from the pipeline stored in the checkpoint (its `g_step` model,
//! latent size and image shape) and loaded with the EMA weights when the checkpoint has them
//! (`--no-ema` for the raw G), else G's. Batch norm runs in eval mode, as for the training
//! grids. The latents for `--seed S` are those the training grids use for pipeline seed `S`
//! ([`fixed_latent`]), so with the default seed (the pipeline's) the grid of a checkpoint
//! equals the training grid of that step.

use crate::run::{resolve_device, RunError};
use crate::spec::{self, DeviceChoice};
use pipe_stages::core::item::{Frame, Images};
use pipe_stages::io::checkpoint::{self, Checkpoint};
use pipe_stages::io::grid::{make_grid, write_png_atomic};
use pipe_stages::kinds::g_step::{fixed_latent, slerp, to_u8, GStepConfig};
use pipe_stages::kinds::sampler::{SamplerConfig, PAD_VALUE};
use pipe_stages::kinds::video::{self, VideoConfig};
use pipe_stages::train::models::{build_g, Net};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Tensor};

/// Images per grid of `pipe sample` for a run without a sampler, and the padding between them
/// (pixels) when the grid is not the run's.
pub const DEFAULT_N: usize = 64;
pub const DEFAULT_PAD: usize = 2;

/// Options of `pipe sample`.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    /// A checkpoint file, a run folder or a `checkpoints` folder (its newest readable one).
    pub checkpoint: PathBuf,
    /// Images per grid (per frame of a walk), 1 to 4096, laid out in ⌈√n⌉ columns. Default:
    /// the run's sample grid (its sampler's `grid`², with its `pad`), else 64.
    pub n: Option<usize>,
    /// Seed of the latents (default: the pipeline's seed).
    pub seed: Option<u64>,
    /// Output file: `.png` for a grid, `.mp4` for a walk.
    pub out: PathBuf,
    /// Write a latent walk video instead of a grid.
    pub walk: bool,
    /// Frames of the walk, 2 to 100000.
    pub frames: usize,
    /// Random latents the walk passes through (per image) before looping back, 2 to 1000.
    pub keys: usize,
    /// Frames per second of the walk video, 1 to 240.
    pub fps: u32,
    pub device: DeviceChoice,
    /// Use G's own weights even when the checkpoint has EMA weights.
    pub no_ema: bool,
}

/// What `pipe sample` wrote.
#[derive(Debug)]
pub struct SampleReport {
    pub out: PathBuf,
    pub checkpoint: PathBuf,
    pub step: u64,
    /// `g_ema` or `g`.
    pub weights: &'static str,
    pub frames: usize,
    /// Images per grid (per frame).
    pub n: usize,
}

fn invalid(m: String) -> RunError {
    RunError::Invalid(vec![m])
}

/// The sampler of the checkpoint's stored pipeline (its grid side, padding and folder): how the
/// run drew its sample grids. `None` when the pipeline has no Sampler stage (or does not parse).
pub fn run_sampler(ck: &Checkpoint) -> Option<SamplerConfig> {
    stored_pipeline(ck).ok()?.stages.iter().find_map(|s| s.kind.config::<SamplerConfig>().cloned())
}

/// Find and read the checkpoint `path` names.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint, RunError> {
    if path.is_file() {
        return checkpoint::read(path).map_err(|e| invalid(e.to_string()));
    }
    if !path.is_dir() {
        return Err(invalid(format!("{}: no such checkpoint file or run folder", path.display())));
    }
    let dir = if path.join(checkpoint::DIR).is_dir() { path.join(checkpoint::DIR) } else { path.to_path_buf() };
    let (ck, skipped) = checkpoint::latest(&dir).map_err(|e| invalid(e.to_string()))?;
    for s in skipped {
        crate::say!("warning: skipped a damaged checkpoint: {s}");
    }
    Ok(ck)
}

/// A generator rebuilt from a checkpoint ([`generator`]).
#[derive(Debug)]
pub struct Generator {
    /// Its variables (weights, biases, batch-norm statistics), loaded from the checkpoint.
    pub vs: nn::VarStore,
    pub net: Net,
    /// The `g_step` settings of the stored pipeline (its `model`, `latent`, `ema`).
    pub config: GStepConfig,
    /// The weights loaded: `g_ema` (the EMA of G) or `g` (G's own).
    pub weights: &'static str,
}

/// The pipeline stored in a checkpoint's manifest.
///
/// Errors (exit 2): it does not parse, naming the checkpoint.
pub fn stored_pipeline(ck: &Checkpoint) -> Result<spec::Pipeline, RunError> {
    spec::parse(&ck.manifest.pipeline, &ck.path.display().to_string())
        .map_err(|es| invalid(format!("{}: the pipeline stored in the checkpoint does not parse: {}", ck.path.display(), es[0])))
}

/// The generator of a checkpoint, on `device`, with its EMA weights unless `no_ema` (or none).
///
/// Errors (exit 2): the stored pipeline does not parse or has no `g_step`, or the checkpoint's
/// tensors do not fit the model it describes; each names the checkpoint.
pub fn generator(ck: &Checkpoint, device: Device, no_ema: bool) -> Result<Generator, RunError> {
    let m = &ck.manifest;
    let p = stored_pipeline(ck)?;
    let g = p
        .stages
        .iter()
        .find_map(|s| s.kind.config::<GStepConfig>())
        .ok_or_else(|| invalid(format!("{}: the stored pipeline has no g_step", ck.path.display())))?;
    let vs = nn::VarStore::new(device);
    let net = build_g(&vs.root(), &g.model, m.latent, m.image).map_err(|e| invalid(format!("{}: {e}", ck.path.display())))?;
    let (prefix, weights) = if m.ema && !no_ema { ("g_ema.", "g_ema") } else { ("g.", "g") };
    ck.load_vars(prefix, &vs).map_err(|e| invalid(e.to_string()))?;
    Ok(Generator { vs, net, config: g.clone(), weights })
}

/// `n` generated images of a checkpoint as u8 `[n, C, H, W]` on the CPU (EMA weights unless
/// `no_ema`), from the latents [`fixed_latent`]`(seed, n, latent)`, in chunks of 256.
pub fn generate(ck: &Checkpoint, n: usize, seed: u64, device: Device, no_ema: bool) -> Result<Tensor, RunError> {
    let Generator { vs: _vs, net, .. } = generator(ck, device, no_ema)?;
    let latent = ck.manifest.latent;
    let z = fixed_latent(seed, n, latent);
    let mut parts = vec![];
    for chunk in z.chunks(256 * latent as usize) {
        let rows = (chunk.len() / latent as usize) as i64;
        let fail = |e: tch::TchError| RunError::Failed(format!("{}: generating samples: {e}", ck.path.display()));
        let zt = Tensor::f_from_slice(chunk).and_then(|t| t.f_view([rows, latent])).and_then(|t| t.f_to_device(device)).map_err(fail)?;
        let out = tch::no_grad(|| net.forward(&zt, false));
        let u = ((out.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to_kind(tch::Kind::Uint8).to_device(Device::Cpu);
        parts.push(u);
    }
    Ok(Tensor::cat(&parts, 0))
}

/// Generate `z` (`[n, latent]` host values) through `net` and tile the images as a grid of
/// ⌈√n⌉ columns, `pad` pixels apart.
fn grid_of(net: &Net, z: &[f32], n: usize, pad: usize, latent: i64, device: Device, step: u64) -> Result<Frame, tch::TchError> {
    let zt = Tensor::f_from_slice(z).and_then(|t| t.f_view([n as i64, latent])).and_then(|t| t.f_to_device(device))?;
    let out = tch::no_grad(|| net.forward(&zt, false));
    let s = out.size();
    let images = Images { step, shape: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize], data: to_u8(&out)?, last: true };
    let ncol = (n as f64).sqrt().ceil() as usize;
    Ok(make_grid(&images, ncol, pad, PAD_VALUE))
}

/// Check the options that need no checkpoint.
fn check(o: &SampleOptions) -> Result<(), RunError> {
    let mut errs = vec![];
    if let Some(n) = o.n.filter(|n| !(1..=4096).contains(n)) {
        errs.push(format!("--n {n}: expected 1 to 4096 images"));
    }
    let ext = o.out.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    match (o.walk, ext.as_deref()) {
        (false, Some("png")) | (true, Some("mp4")) => {}
        (false, _) => {
            errs.push(format!("--out {}: a grid is written as PNG: give a .png name (or add --walk for a video)", o.out.display()))
        }
        (true, _) => errs.push(format!("--out {}: a walk is written as an MP4 video: give a .mp4 name", o.out.display())),
    }
    if o.walk {
        if !(2..=100_000).contains(&o.frames) {
            errs.push(format!("--frames {}: expected 2 to 100000", o.frames));
        }
        if !(2..=1000).contains(&o.keys) {
            errs.push(format!("--keys {}: expected 2 to 1000", o.keys));
        }
        if !(1..=video::MAX_FPS).contains(&o.fps) {
            errs.push(format!("--fps {}: expected 1 to {}", o.fps, video::MAX_FPS));
        }
    }
    if o.out.is_dir() {
        errs.push(format!("--out {}: is a folder; give a file name", o.out.display()));
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(RunError::Invalid(errs))
    }
}

/// The latent of image `i` at frame `f` of a walk through `keys` (each `[n·latent]`): the
/// frames are spread evenly over the loop key 0 → key 1 → … → key K−1 → key 0, slerping
/// between neighbours.
fn walk_latent(keys: &[Vec<f32>], n: usize, latent: usize, frames: usize, f: usize) -> Vec<f32> {
    let k = keys.len();
    let u = f as f64 * k as f64 / frames as f64;
    let seg = (u.floor() as usize).min(k - 1);
    let t = u - seg as f64;
    let (a, b) = (&keys[seg], &keys[(seg + 1) % k]);
    (0..n).flat_map(|i| slerp(&a[i * latent..(i + 1) * latent], &b[i * latent..(i + 1) * latent], t)).collect()
}

/// Run `pipe sample`.
///
/// Errors: bad options, or a checkpoint that is missing, unreadable or not loadable (exit 2);
/// generating or writing failed (exit 1).
pub fn sample(o: &SampleOptions) -> Result<SampleReport, RunError> {
    check(o)?;
    let ck = open_checkpoint(&o.checkpoint)?;
    let device = resolve_device(o.device)?;
    let Generator { vs: _vs, net, weights, .. } = generator(&ck, device, o.no_ema)?;
    let m = &ck.manifest;
    let seed = o.seed.unwrap_or(m.seed);
    let latent = m.latent as usize;
    // The run's grid layout, so that the default draws the training grids.
    let (n, pad) = match (o.n, run_sampler(&ck)) {
        (Some(n), Some(s)) if n == s.grid * s.grid => (n, s.pad),
        (Some(n), _) => (n, DEFAULT_PAD),
        (None, Some(s)) => (s.grid * s.grid, s.pad),
        (None, None) => (DEFAULT_N, DEFAULT_PAD),
    };
    let fail = |e: String| RunError::Failed(format!("{}: {e}", o.out.display()));
    if let Some(dir) = o.out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("cannot create its folder: {e}")))?;
    }
    if !o.walk {
        let frame = grid_of(&net, &fixed_latent(seed, n, m.latent), n, pad, m.latent, device, m.step).map_err(|e| fail(e.to_string()))?;
        write_png_atomic(&frame, &o.out).map_err(|e| fail(e.to_string()))?;
        return Ok(SampleReport { out: o.out.clone(), checkpoint: ck.path.clone(), step: m.step, weights, frames: 1, n });
    }
    // Key latents: key 0 is the grid's latent batch, the others follow from seed + k.
    let keys: Vec<Vec<f32>> = (0..o.keys as u64).map(|k| fixed_latent(seed.wrapping_add(k), n, m.latent)).collect();
    let mut error = None;
    let frames =
        (0..o.frames).map_while(|f| match grid_of(&net, &walk_latent(&keys, n, latent, o.frames, f), n, pad, m.latent, device, f as u64) {
            Ok(fr) => Some(fr),
            Err(e) => {
                error = Some(e);
                None
            }
        });
    let cfg = VideoConfig { path: o.out.clone(), fps: o.fps, crf: 18, hold_last: 0 };
    let written = video::encode_mp4(&o.out, &cfg, frames);
    if let Some(e) = error {
        return Err(fail(e.to_string()));
    }
    written.map_err(|e| RunError::Failed(e.to_string()))?;
    Ok(SampleReport { out: o.out.clone(), checkpoint: ck.path.clone(), step: m.step, weights, frames: o.frames, n })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_loops_through_the_keys() {
        let keys = vec![vec![1.0f32, 0.0, 0.0, 2.0], vec![0.0f32, 1.0, 2.0, 0.0], vec![-1.0f32, 0.0, 0.0, -2.0]];
        // 2 images of latent 2, 6 frames: frames 0, 2, 4 sit on keys 0, 1, 2; frame 6 would be key 0 again.
        assert_eq!(walk_latent(&keys, 2, 2, 6, 0), keys[0]);
        assert_eq!(walk_latent(&keys, 2, 2, 6, 2), keys[1]);
        assert_eq!(walk_latent(&keys, 2, 2, 6, 4), keys[2]);
        // Frame 5 is halfway from key 2 back to key 0: image 0 goes from (-1, 0) to (1, 0)
        // — antiparallel, so a straight line through 0.
        let f5 = walk_latent(&keys, 2, 2, 6, 5);
        assert!(f5[0].abs() < 1e-6 && f5[1].abs() < 1e-6, "{f5:?}");
        // Frame 1 is halfway from key 0 to key 1 on the circle: image 0 at 45°.
        let f1 = walk_latent(&keys, 2, 2, 6, 1);
        let h = 1.0 / 2f32.sqrt();
        assert!((f1[0] - h).abs() < 1e-6 && (f1[1] - h).abs() < 1e-6, "{f1:?}");
    }
}
