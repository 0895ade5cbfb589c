//! The `eval` stage: sample quality while training.
//!
//! Every `every` generator steps (and at the last step) g_step generates `n` images from one
//! fixed set of latents and sends them as [`Item::EvalImages`]. The eval stage computes their
//! features ([`Features`]: a LeNet classifier, or Inception-v3), and FID, KID and (LeNet) the
//! Inception-Score-style score against `n` images of `real`, whose features were computed once
//! when the stage was built (and are cached on disk by content, see
//! [`crate::quality::Extractor::features`]). The scores go on the bus
//! ([`BusMessage::Scores`]): the runner writes them into that step's row of metrics.csv
//! (columns `fid`, `kid`, `is`), draws them in loss.png and shows them in the progress bar.
//!
//! It runs on the CPU, beside training: with LeNet features 5,000 images take about a second.
//! Inception features on a CPU take minutes per thousand images; training waits when the
//! stage falls behind (its input link is full).

use crate::quality::fid;
use crate::core::item::Item;
use crate::data::image::Channels;
use crate::core::ports::{ItemKind, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext, DataCaps, ImageRequest, Purpose};
use crate::quality::{load_images, score, Extractor, FeatureSet, Features};
use crate::core::stage::{BusMessage, Stage, StageContext, StageError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{Device, Tensor};

fn default_every() -> u64 {
    2000
}
fn default_n() -> usize {
    5000
}
fn default_features() -> Features {
    Features::Inception
}
fn default_kid_subsets() -> usize {
    100
}
fn default_kid_size() -> usize {
    1000
}

/// Settings of the `eval` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
    /// Generator steps between two evaluations (also at the last step); a multiple of the
    /// pipeline's `log_every`, so that the step has a row in metrics.csv. Default 2000.
    #[serde(default = "default_every")]
    pub every: u64,
    /// Images per side: generated samples, and a seeded random subset of `real` (all of it
    /// when it has fewer). 2 to 100,000. Default 5000.
    #[serde(default = "default_n")]
    pub n: usize,
    /// The real images (required): an IDX image file, a folder holding IDX training images,
    /// or a folder of images (decoded to the generated size and channels, padded on white).
    #[serde(default)]
    pub real: PathBuf,
    /// Features: `Lenet(classifier: "data/lenet/mnist.safetensors")` (grey 28×28 / 32×32) or
    /// `Inception` (the default; slow on a CPU).
    #[serde(default = "default_features")]
    pub features: Features,
    /// KID: number of random subsets of `kid_size` images per side, 1 to 1000. Default 100.
    #[serde(default = "default_kid_subsets")]
    pub kid_subsets: usize,
    /// KID: images per subset, at least 2 (capped by `n`). Default 1000.
    #[serde(default = "default_kid_size")]
    pub kid_size: usize,
}

impl EvalConfig {
    /// Check values without touching the disk, naming the field at fault.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if self.real.as_os_str().is_empty() {
            errs.push(Problem::new("real", "`real` is missing: the real images to compare with (IDX files or a folder of images)"));
        }
        if self.every == 0 {
            errs.push(Problem::new("every", "`every` must be at least 1 (generator steps between evaluations)"));
        }
        if !(2..=100_000).contains(&self.n) {
            errs.push(Problem::new("n", format!("`n` is {}, expected 2 to 100000 images", self.n)));
        }
        if !(1..=1000).contains(&self.kid_subsets) {
            errs.push(Problem::new("kid_subsets", format!("`kid_subsets` is {}, expected 1 to 1000", self.kid_subsets)));
        }
        if self.kid_size < 2 {
            errs.push(Problem::new("kid_size", format!("`kid_size` is {}, expected at least 2", self.kid_size)));
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

/// Pad grey images `[N, 1, h, w]` with background 0 to `[N, 1, H, W]` when they are smaller by
/// an even margin (IDX data against a generator trained on it with the loader's `pad`); other
/// images are returned as they are.
pub fn pad_to(images: Tensor, shape: [usize; 3]) -> Tensor {
    let s = images.size();
    let (dh, dw) = (shape[1] as i64 - s[2], shape[2] as i64 - s[3]);
    if s[1] == 1 && shape[0] == 1 && dh > 0 && dh == dw && dh % 2 == 0 {
        let p = dh / 2;
        images.constant_pad_nd([p, p, p, p])
    } else {
        images
    }
}

/// The built stage: the extractor and the real side's features and statistics.
pub struct EvalStage {
    cfg: EvalConfig,
    extractor: Extractor,
    real: FeatureSet,
    real_stats: fid::Stats,
    seed: u64,
    /// Description of the real images, for messages.
    pub real_desc: String,
}

impl EvalStage {
    /// Load the extractor and compute (or find in the cache) the features of `n` real images,
    /// decoded to `image` `[C, H, W]`, the generated images' shape. `seed` picks the subset.
    ///
    /// Errors (naming the field): a classifier or Inception file that is missing or unreadable;
    /// LeNet features for images that are not grey 28×28 / 32×32; `real` unreadable or of
    /// another shape than the generated images.
    pub fn build(cfg: &EvalConfig, image: [usize; 3], seed: u64, mut warn: impl FnMut(String)) -> Result<Self, StageError> {
        cfg.validate()?;
        let extractor = Extractor::load(&cfg.features, Device::Cpu).map_err(|e| StageError::msg(format!("features: {e}")))?;
        if matches!(cfg.features, Features::Lenet { .. }) && !(image[0] == 1 && image[1] == image[2] && matches!(image[1], 28 | 32)) {
            return Err(StageError::msg(format!(
                "features: Lenet takes grey 28×28 or 32×32 images, but the generator makes {}×{}×{}: use `features: Inception`",
                image[0], image[1], image[2]
            )));
        }
        let channels = if image[0] == 1 { Channels::Grey } else { Channels::Rgb };
        let (real, desc) =
            load_images(&cfg.real, cfg.n, seed, image[1] as u32, channels, &mut warn).map_err(|e| StageError::msg(format!("real: {e}")))?;
        let real = pad_to(real, image);
        let s = real.size();
        if s[1..] != [image[0] as i64, image[1] as i64, image[2] as i64] {
            return Err(StageError::msg(format!(
                "real: {} holds {}×{}×{} images, the generator makes {}×{}×{}",
                cfg.real.display(),
                s[1],
                s[2],
                s[3],
                image[0],
                image[1],
                image[2]
            )));
        }
        let real = extractor.features(&real, true, &mut |_, _| {}).map_err(|e| StageError::msg(format!("real: {e}")))?;
        let real_stats = fid::stats(&real.features).map_err(|e| StageError::msg(format!("real: {e}")))?;
        Ok(EvalStage { cfg: cfg.clone(), extractor, real, real_stats, seed, real_desc: desc })
    }
}

impl Stage for EvalStage {
    /// For each [`Item::EvalImages`]: features, scores, [`BusMessage::Scores`]. Grid images
    /// are ignored. Errors: another item kind; a failure computing the scores.
    fn run(self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        let mut skipped = vec![];
        while let Some(item) = ctx.recv() {
            let im = match item {
                // A stop was asked for (Ctrl-C, or another stage failed): don't hold it up.
                Item::EvalImages(im) if ctx.draining() => {
                    skipped.push(im.step);
                    continue;
                }
                Item::EvalImages(im) => im,
                Item::Images(_) => continue,
                other => {
                    return Err(StageError::msg(format!("the eval stage takes `images` items from g_step, got a `{}` item", other.kind())))
                }
            };
            let [n, c, h, w] = im.shape;
            let t = Tensor::from_slice(&im.data).view([n as i64, c as i64, h as i64, w as i64]);
            let fake = self.extractor.features(&t, false, &mut |_, _| {}).map_err(|e| StageError::msg(format!("step {}: {e}", im.step)))?;
            let scores = score(&self.real, &self.real_stats, &fake, self.cfg.kid_subsets, self.cfg.kid_size, self.seed)
                .map_err(|e| StageError::msg(format!("step {}: {e}", im.step)))?;
            ctx.bus.post(BusMessage::Scores { step: im.step, scores });
        }
        if !skipped.is_empty() {
            let steps: Vec<String> = skipped.iter().map(|s| s.to_string()).collect();
            ctx.bus.warn(format!("stopping: skipped the evaluation of step {}", steps.join(", ")));
        }
        Ok(())
    }
}

impl crate::kinds::Kind for EvalConfig {
    const NAME: &'static str = "Eval";
    const PORTS: Ports = Ports::sink(ItemKind::Images, "images[n,C,H,W] u8 in [0, 255] on cpu (n = eval n, from fixed latents)");

    /// [`EvalConfig::problems`], then: `every` a multiple of `log_every`, `real` and a LeNet
    /// classifier present on disk (with the command that trains a missing classifier on the
    /// pipeline's own labelled data).
    fn validate(&self, cx: &CheckContext<'_>) -> Vec<Problem> {
        let mut v = self.problems();
        if v.is_empty() && self.every % cx.log_every.max(1) != 0 {
            v.push(Problem::new(
                "every",
                format!(
                    "`every` is {}, expected a multiple of the pipeline's log_every ({}), so that each evaluation has its row in metrics.csv",
                    self.every, cx.log_every
                ),
            ));
        }
        if !self.real.as_os_str().is_empty() && !self.real.exists() {
            v.push(Problem::new(
                "real",
                format!("real {} does not exist (expected IDX files or a folder of images)", self.real.display()),
            ));
        }
        if let Features::Lenet { classifier } = &self.features {
            if !classifier.is_file() {
                let data = match cx.source {
                    Some(s) if s.labelled => s.root.display().to_string(),
                    _ => "LABELLED_IDX_DATA".into(),
                };
                v.push(Problem::new(
                    "features.classifier",
                    format!(
                        "classifier {} does not exist; train it with `pipe train-classifier --data {data} --out {}`",
                        classifier.display(),
                        classifier.display()
                    ),
                ));
            }
        }
        v
    }

    /// LeNet features take grey 28×28 or 32×32 images only.
    fn negotiate(&self, data: &DataCaps<'_>) -> Vec<Problem> {
        let [ch, h, w] = data.shape;
        if matches!(self.features, Features::Lenet { .. }) && !(ch == 1 && h == w && matches!(h, 28 | 32)) {
            return vec![Problem::new(
                "features",
                format!(
                    "features Lenet take grey 28×28 or 32×32 images, but stage `{}` produces {}: use `features: Inception`",
                    data.source,
                    data.caps()
                ),
            )];
        }
        vec![]
    }

    fn asks_images(&self) -> Option<ImageRequest> {
        Some(ImageRequest { purpose: Purpose::Eval, n: self.n, every: self.every })
    }

    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        let (note, stage) = (cx.note, cx.stage);
        Ok(Box::new(EvalStage::build(self, cx.image, cx.seed, |w| note(format!("warning: stage `{stage}`: {w}")))?))
    }
}
