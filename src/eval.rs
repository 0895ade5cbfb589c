//! `pipe eval`: FID, KID (and with LeNet features an IS-style score) between two image sources.
//!
//! A source is an IDX image file (or a folder holding one by the standard names), a folder of
//! images, or a checkpoint (a file, or a run folder: its newest checkpoint), which generates
//! the samples. From each source `n` images are used: a seeded random subset of a data set,
//! or `n` generated samples. Features are cached under `$PIPE_CACHE/features/` keyed by a
//! SHA-256 of the extractor (and its weights) and the exact u8 pixels, so evaluating against
//! the same real data again skips its features (the expensive half with Inception).

use crate::run::{resolve_device, RunError};
use crate::spec::DeviceChoice;
use pipe_stages::kinds::eval::pad_to;
use pipe_stages::quality::features::INCEPTION_PATH;
use pipe_stages::quality::fid;
use pipe_stages::quality::{load_images, score, Extractor, Features, QualityError, Scores};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// Options of `pipe eval`.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub real: PathBuf,
    pub fake: PathBuf,
    /// Images per side (fewer when a data set has fewer).
    pub n: usize,
    /// Seed of the data subsets and of the generated latents. The fake side's data subset uses
    /// `seed + 1`, so one data set against itself compares two different subsets.
    pub seed: u64,
    /// Side of the square folder images are decoded to (padded on white, as the loader does).
    pub size: u32,
    /// KID: subsets and their size (capped by the number of images).
    pub kid_subsets: usize,
    pub kid_size: usize,
    /// Where the JSON report goes.
    pub json: PathBuf,
    pub device: DeviceChoice,
    /// The feature extractor.
    pub features: Features,
}

/// The result, as written to the JSON file.
#[derive(Debug, serde::Serialize)]
pub struct EvalReport {
    pub features: &'static str,
    /// The classifier file (LeNet features).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub classifier: Option<String>,
    pub real: String,
    pub fake: String,
    pub n_real: usize,
    pub n_fake: usize,
    pub fid: f64,
    pub kid_mean: f64,
    pub kid_std: f64,
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    /// IS-style score of the fake and of the real images (mean, std over 10 splits); LeNet only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_fake: Option<(f64, f64)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_real: Option<(f64, f64)>,
    pub seconds: f64,
}

fn invalid(m: String) -> RunError {
    RunError::Invalid(vec![m])
}

/// Load up to `n` images of `path` as u8 `[N, C, H, W]` on the CPU, with a description.
/// `seed` picks the data subset (or the latents of a checkpoint).
/// The bool says whether the images come from a data set (worth caching their features).
fn load(path: &Path, o: &EvalOptions, seed: u64, device: Device) -> Result<(Tensor, String, bool), RunError> {
    let is_ckpt = path.extension().is_some_and(|e| e == "safetensors") || path.join(pipe_stages::io::checkpoint::DIR).is_dir();
    if is_ckpt {
        let ck = crate::sample::open_checkpoint(path)?;
        let imgs = crate::sample::generate(&ck, o.n, seed, device, false)?;
        return Ok((imgs, format!("{} (step {}, {} generated samples)", ck.path.display(), ck.manifest.step, o.n), false));
    }
    if !path.exists() {
        return Err(invalid(format!("{}: no such file or folder", path.display())));
    }
    let (t, desc) = load_images(path, o.n, seed, o.size, pipe_stages::kinds::folder_loader::Channels::Rgb, |w| crate::say!("warning: {w}"))
        .map_err(|e| invalid(e.to_string()))?;
    Ok((t, desc, true))
}

/// Run `pipe eval`. Errors: a source that cannot be read (exit 2), the feature weights
/// missing (exit 2), images the features cannot take (exit 2), a failure while computing
/// (exit 1).
pub fn eval(o: &EvalOptions) -> Result<EvalReport, RunError> {
    let t0 = std::time::Instant::now();
    let mut bad = vec![];
    if o.n < 2 {
        bad.push(format!("--n {}: expected at least 2 images", o.n));
    }
    if o.kid_size < 2 {
        bad.push(format!("--kid-size {}: expected at least 2 images per KID subset", o.kid_size));
    }
    if !(1..=1000).contains(&o.kid_subsets) {
        bad.push(format!("--kid-subsets {}: expected 1 to 1000", o.kid_subsets));
    }
    if !(1..=4096).contains(&o.size) {
        bad.push(format!("--size {}: expected 1 to 4096 pixels", o.size));
    }
    if o.json.is_dir() {
        bad.push(format!("--json {}: is a folder; give the report's file name", o.json.display()));
    }
    if !bad.is_empty() {
        return Err(RunError::Invalid(bad));
    }
    let device = resolve_device(o.device)?;
    if matches!(o.features, Features::Inception) && !Path::new(INCEPTION_PATH).is_file() {
        return Err(invalid(format!("{INCEPTION_PATH}: the FID Inception weights are missing (scripts/setup.sh fetches them)")));
    }
    let extractor = Extractor::load(&o.features, device).map_err(|e| invalid(e.to_string()))?;
    let (real, real_desc, real_data) = load(&o.real, o, o.seed, device)?;
    let (fake, fake_desc, fake_data) = load(&o.fake, o, o.seed.wrapping_add(1), device)?;
    // IDX data against a generator trained on it padded (fashion_dcgan: 28×28 → 32×32): pad the
    // smaller side the same way, so the border is not counted as a difference.
    let shape = |t: &Tensor| {
        let s = t.size();
        [s[1] as usize, s[2] as usize, s[3] as usize]
    };
    let (real, fake) = (pad_to(real, shape(&fake)), fake);
    let fake = pad_to(fake, shape(&real));
    let bad = |side: &str, e: QualityError| invalid(format!("--{side}: {e}"));
    // A line every 10 s while features are computed (Inception on a CPU takes minutes).
    let progress = |side: &'static str| {
        let mut last = std::time::Instant::now();
        move |done: i64, total: i64| {
            if last.elapsed().as_secs() >= 10 && done < total {
                last = std::time::Instant::now();
                crate::say!("{side}: features of {done} of {total} images");
            }
        }
    };
    let fr = extractor.features(&real, real_data, &mut progress("real")).map_err(|e| bad("real", e))?;
    let ff = extractor.features(&fake, fake_data, &mut progress("fake")).map_err(|e| bad("fake", e))?;
    let sr = fid::stats(&fr.features).map_err(|e| RunError::Failed(e.to_string()))?;
    let Scores { fid, kid_mean, kid_std, is_fake, is_real, kid_size, kid_subsets } =
        score(&fr, &sr, &ff, o.kid_subsets, o.kid_size, o.seed).map_err(|e| RunError::Failed(e.to_string()))?;
    let report = EvalReport {
        features: o.features.name(),
        classifier: match &o.features {
            Features::Lenet { classifier } => Some(classifier.display().to_string()),
            Features::Inception => None,
        },
        real: real_desc,
        fake: fake_desc,
        n_real: sr.n,
        n_fake: ff.features.size()[0] as usize,
        fid,
        kid_mean,
        kid_std,
        kid_subsets,
        kid_subset_size: kid_size,
        is_fake,
        is_real,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| RunError::Failed(e.to_string()))? + "\n";
    if let Some(d) = o.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| RunError::Failed(format!("{}: {e}", d.display())))?;
    }
    pipe_stages::io::atomic::write_bytes_atomic(&o.json, text.as_bytes())
        .map_err(|e| RunError::Failed(format!("{}: {e}", o.json.display())))?;
    Ok(report)
}
