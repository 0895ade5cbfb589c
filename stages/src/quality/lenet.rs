//! A LeNet-style classifier for MNIST-like data (28×28 or 32×32 grey images, 10 classes),
//! trained by `pipe train-classifier`, whose features score generated samples the way
//! Inception features do for natural images: FID and KID on its penultimate layer (128-d),
//! an Inception-Score-style score on its softmax ([`crate::quality::fid::inception_score`]).
//!
//! Network (LeCun et al. 1998, LeNet-5, wider): input `[N, 1, 32, 32]` f32 in [-1, 1]
//! (28×28 images are padded by 2 background pixels on every side, as LeNet-5 did);
//! conv 5×5 → 32, ReLU, max-pool 2 → `[32, 14, 14]`; conv 5×5 → 64, ReLU, max-pool 2 →
//! `[64, 5, 5]`; linear 1600 → 128, ReLU (the **features**); dropout 0.5 (training only);
//! linear 128 → 10 (logits).
//!
//! The file is a safetensors file of f32 tensors with a JSON [`ClassifierInfo`] under the
//! metadata key `pipe`: what it was trained on and its accuracy on the test images.

use crate::data::batches::epoch_order;
use crate::data::idx::{labels_file_for, read_idx_images, read_idx_labels, IdxImages};
use crate::quality::QualityError;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

/// Side of the network's input, in pixels.
pub const INPUT: i64 = 32;
/// Size of the feature vector (penultimate layer).
pub const FEATURES: i64 = 128;
/// Number of classes.
pub const CLASSES: i64 = 10;
/// Format name in a classifier file's metadata.
pub const FORMAT: &str = "pipe-lenet";
const META_KEY: &str = "pipe";

/// What a classifier file says about itself (its safetensors metadata).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifierInfo {
    /// Always [`FORMAT`].
    pub format: String,
    pub version: u32,
    /// The training images file.
    pub train: String,
    /// Images it was trained on.
    pub train_n: usize,
    /// Where the test images came from: the test split file, or "held out from <train>".
    pub test: String,
    pub test_n: usize,
    /// Fraction of test images classified right, in [0, 1].
    pub test_accuracy: f64,
    pub epochs: usize,
    pub seed: u64,
    /// Whether the training images were randomly distorted.
    #[serde(default)]
    pub distorted: bool,
}

/// The network's layers.
#[derive(Debug)]
struct Layers {
    c1: nn::Conv2D,
    c2: nn::Conv2D,
    f1: nn::Linear,
    f2: nn::Linear,
}

impl Layers {
    fn new(p: &nn::Path) -> Self {
        Layers {
            c1: nn::conv2d(p / "c1", 1, 32, 5, Default::default()),
            c2: nn::conv2d(p / "c2", 32, 64, 5, Default::default()),
            f1: nn::linear(p / "f1", 1600, FEATURES, Default::default()),
            f2: nn::linear(p / "f2", FEATURES, CLASSES, Default::default()),
        }
    }
    /// Features `[N, 128]` of network inputs `[N, 1, 32, 32]`.
    fn features(&self, x: &Tensor) -> Tensor {
        let h = x.apply(&self.c1).relu().max_pool2d_default(2);
        let h = h.apply(&self.c2).relu().max_pool2d_default(2);
        h.flatten(1, -1).apply(&self.f1).relu()
    }
    fn logits(&self, x: &Tensor, train: bool) -> Tensor {
        self.features(x).dropout(0.5, train).apply(&self.f2)
    }
}

/// A trained classifier, ready to score images on the CPU.
pub struct LeNet {
    vs: nn::VarStore,
    layers: Layers,
    /// What the file says about it.
    pub info: ClassifierInfo,
}

impl std::fmt::Debug for LeNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeNet").field("info", &self.info).finish()
    }
}

/// u8 grey images `[N, 1, H, W]` (H = W = 28 or 32) as network input `[N, 1, 32, 32]` f32 in
/// [-1, 1] (`p / 127.5 − 1`; 28×28 padded with background 0 → −1).
///
/// Errors: colour images or another size, naming what was expected
/// ([`QualityError::NotGrey`], [`QualityError::LenetSize`]).
pub fn preprocess(images: &Tensor) -> Result<Tensor, QualityError> {
    let s = images.size();
    if s.len() != 4 || s[1] != 1 {
        return Err(QualityError::NotGrey { shape: s });
    }
    let x = images.f_to_kind(Kind::Float)? / 127.5 - 1.0;
    match (s[2], s[3]) {
        (32, 32) => Ok(x),
        // Pad x + 1 with zeros, so the new border is −1 (background).
        (28, 28) => Ok((x + 1.0).f_constant_pad_nd([2, 2, 2, 2]).map(|t| t - 1.0)?),
        (height, width) => Err(QualityError::LenetSize { height, width }),
    }
}

impl LeNet {
    /// A freshly initialised network (PyTorch's default init, from the current torch seed).
    fn fresh(info: ClassifierInfo) -> Self {
        let vs = nn::VarStore::new(Device::Cpu);
        let layers = Layers::new(&vs.root());
        LeNet { vs, layers, info }
    }

    /// Load a classifier file written by [`LeNet::save`].
    ///
    /// Errors (naming the file): missing, saying how to make one
    /// ([`QualityError::NoClassifier`]); unreadable ([`QualityError::ReadClassifier`]); not
    /// safetensors ([`QualityError::NotSafetensors`], [`QualityError::ClassifierHeader`]); not a
    /// pipe LeNet ([`QualityError::NotLenet`]); tensors missing or of the wrong shape
    /// ([`QualityError::MissingTensor`], [`QualityError::TensorShape`],
    /// [`QualityError::TensorData`]).
    pub fn load(path: &Path) -> Result<Self, QualityError> {
        let p = || path.to_path_buf();
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                QualityError::NoClassifier(p())
            } else {
                QualityError::ReadClassifier { path: p(), source }
            }
        })?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|source| QualityError::NotSafetensors { path: p(), source })?;
        let (_, meta) =
            safetensors::SafeTensors::read_metadata(&bytes).map_err(|source| QualityError::ClassifierHeader { path: p(), source })?;
        let info: ClassifierInfo = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .and_then(|j| serde_json::from_str(j).ok())
            .filter(|i: &ClassifierInfo| i.format == FORMAT)
            .ok_or_else(|| QualityError::NotLenet(p()))?;
        let net = LeNet::fresh(info);
        for (name, mut var) in net.vs.variables() {
            let view = st.tensor(&name).map_err(|_| QualityError::MissingTensor { path: p(), name: name.clone() })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            if view.dtype() != safetensors::Dtype::F32 || shape != var.size() {
                return Err(QualityError::TensorShape { path: p(), name, dtype: view.dtype(), shape, expected: var.size() });
            }
            let t = crate::io::checkpoint::f32_tensor(view.data(), &shape).map_err(|source| QualityError::TensorData {
                path: p(),
                name: name.clone(),
                source,
            })?;
            tch::no_grad(|| var.copy_(&t));
        }
        Ok(net)
    }

    /// Write the weights and [`LeNet::info`] to `path` (atomically).
    ///
    /// Errors: the folder cannot be created ([`QualityError::Io`]) or the file written
    /// ([`QualityError::WriteClassifier`]); a tensor or the description that cannot be encoded
    /// ([`QualityError::Torch`], [`QualityError::Json`], [`QualityError::Safetensors`]).
    pub fn save(&self, path: &Path) -> Result<(), QualityError> {
        let mut named: Vec<(String, Vec<u8>, Vec<usize>)> = vec![];
        for (name, t) in self.vs.variables() {
            named.push((name, crate::io::checkpoint::f32_bytes(&t)?, t.size().iter().map(|&d| d as usize).collect()));
        }
        let meta: HashMap<String, String> = [(META_KEY.to_string(), serde_json::to_string(&self.info)?)].into();
        let data = crate::io::checkpoint::serialize_f32(&named, meta)?;
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d).map_err(|source| QualityError::Io { path: d.to_path_buf(), source })?;
        }
        crate::io::atomic::write_bytes_atomic(path, &data)
            .map_err(|source| QualityError::WriteClassifier { path: path.to_path_buf(), source })
    }

    /// Features `[N, 128]` (f32, ≥ 0) and class probabilities `[N, 10]` (softmax, rows sum to
    /// 1) of u8 grey images `[N, 1, 28|32, 28|32]`, in chunks of `chunk` images, on the CPU.
    ///
    /// Errors: images of another kind (see [`preprocess`]).
    pub fn features_and_probs(&self, images: &Tensor, chunk: i64) -> Result<(Tensor, Tensor), QualityError> {
        let n = images.size()[0];
        let (mut fs, mut ps) = (vec![], vec![]);
        let mut start = 0;
        while start < n {
            let len = chunk.max(1).min(n - start);
            let x = preprocess(&images.narrow(0, start, len).to_device(Device::Cpu))?;
            let (f, p) = tch::no_grad(|| {
                let f = self.layers.features(&x);
                let p = f.apply(&self.layers.f2).softmax(-1, Kind::Float);
                (f, p)
            });
            fs.push(f);
            ps.push(p);
            start += len;
        }
        if fs.is_empty() {
            return Ok((Tensor::zeros([0, FEATURES], (Kind::Float, Device::Cpu)), Tensor::zeros([0, CLASSES], (Kind::Float, Device::Cpu))));
        }
        Ok((Tensor::cat(&fs, 0), Tensor::cat(&ps, 0)))
    }

    /// Fraction of `images` (u8 `[N, 1, 28|32, 28|32]`) whose predicted class is `labels[i]`.
    ///
    /// Errors: as [`LeNet::features_and_probs`].
    pub fn accuracy(&self, images: &Tensor, labels: &[u8]) -> Result<f64, QualityError> {
        let (_, p) = self.features_and_probs(images, 500)?;
        let pred = Vec::<i64>::try_from(p.argmax(-1, false))?;
        let right = pred.iter().zip(labels).filter(|(a, b)| **a == **b as i64).count();
        Ok(right as f64 / labels.len().max(1) as f64)
    }
}

/// Options of [`train`].
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// An IDX training images file, or a folder holding the standard names.
    pub data: PathBuf,
    /// Passes over the training images.
    pub epochs: usize,
    /// Images held out for testing when the data has no test split (MNIST here has only 10,000).
    pub holdout: usize,
    pub batch: usize,
    pub seed: u64,
    /// Random affine distortions of the training images; `None`: when there are fewer than
    /// [`DISTORT_BELOW`] of them (a large set needs none, and Fashion-MNIST's classes are
    /// partly told apart by orientation).
    pub distort: Option<bool>,
}

/// Training sets smaller than this get random affine distortions by default.
pub const DISTORT_BELOW: usize = 20_000;

/// Labelled images: u8 `[n, 1, H, W]` and one label per image.
struct Labelled {
    images: Tensor,
    labels: Vec<u8>,
}

fn labelled(file: &Path, order: Option<&[usize]>) -> Result<(Labelled, String), QualityError> {
    let imgs: IdxImages = read_idx_images(file)?;
    let lf = labels_file_for(file).ok_or_else(|| QualityError::NoLabels(file.to_path_buf()))?;
    let labels = read_idx_labels(&lf)?;
    if labels.n != imgs.n {
        return Err(QualityError::LabelCount { images: file.to_path_buf(), n_images: imgs.n, labels: lf, n_labels: labels.n });
    }
    if let Some(&label) = labels.labels.iter().find(|&&l| l as i64 >= CLASSES) {
        return Err(QualityError::LabelRange { path: lf, label });
    }
    let all: Vec<usize> = (0..imgs.n).collect();
    let pick = order.unwrap_or(&all);
    let mut px = Vec::with_capacity(pick.len() * imgs.h * imgs.w);
    let mut lab = Vec::with_capacity(pick.len());
    for &i in pick {
        px.extend_from_slice(imgs.image(i));
        lab.push(labels.labels[i]);
    }
    let images = Tensor::from_slice(&px).view([pick.len() as i64, 1, imgs.h as i64, imgs.w as i64]);
    Ok((Labelled { images, labels: lab }, format!("{}×{}", imgs.h, imgs.w)))
}

/// Random affine distortions, one per image: rotation up to ±12°, scale 0.9–1.1, shift up to
/// ±2 pixels (bilinear, background −1 outside): the augmentation that lets 8,000 training digits
/// reach 99%. Input and output `[N, 1, 32, 32]` in [-1, 1].
fn distort(x: &Tensor, gen: &mut rand::rngs::StdRng) -> Tensor {
    use rand::Rng;
    let n = x.size()[0];
    let mut theta = Vec::with_capacity(n as usize * 6);
    for _ in 0..n {
        let r = gen.random_range(-12.0f32..12.0).to_radians();
        let s = gen.random_range(0.9f32..1.1);
        // Normalised coordinates: the image spans [-1, 1], so 2 pixels of 32 are 0.125.
        let (tx, ty) = (gen.random_range(-0.125f32..0.125), gen.random_range(-0.125f32..0.125));
        theta.extend_from_slice(&[s * r.cos(), -s * r.sin(), tx, s * r.sin(), s * r.cos(), ty]);
    }
    let theta = Tensor::from_slice(&theta).view([n, 2, 3]);
    let grid = Tensor::affine_grid_generator(&theta, [n, 1, INPUT, INPUT], false);
    // Zero padding of x + 1 = background −1 of x.
    Tensor::grid_sampler(&(x + 1.0), &grid, 0, 0, false) - 1.0
}

/// Train a classifier on the labelled IDX images of `o.data` and test it: on the test split
/// when the folder has one (`t10k-…`), else on `o.holdout` images held out of the training
/// file (a seeded random choice). Adam (lr 1e-3, ×0.1 for the last quarter of the epochs),
/// cross-entropy, batch `o.batch`, random affine distortions (rotation, scale, shift) for small
/// training sets (see [`TrainOptions::distort`]). `progress` gets one line per epoch.
///
/// Errors: unreadable or unlabelled data, naming the file ([`QualityError::Data`],
/// [`QualityError::NoLabels`], [`QualityError::LabelCount`], [`QualityError::LabelRange`]); too
/// few images to hold out ([`QualityError::Holdout`]); a libtorch failure
/// ([`QualityError::Torch`]).
pub fn train(o: &TrainOptions, mut progress: impl FnMut(String)) -> Result<LeNet, QualityError> {
    use crate::data::idx::{find_images_file, Split};
    use rand::SeedableRng;
    let train_file = if o.data.is_file() { o.data.clone() } else { find_images_file(&o.data, Split::Train)? };
    let test_file = if o.data.is_dir() { find_images_file(&o.data, Split::Test).ok() } else { None };
    let (train, test, test_desc) = match &test_file {
        Some(tf) => {
            let (tr, _) = labelled(&train_file, None)?;
            let (te, _) = labelled(tf, None)?;
            let desc = format!("the {} test images of {}", te.labels.len(), tf.display());
            (tr, te, desc)
        }
        None => {
            let n = read_idx_images(&train_file)?.n;
            if o.holdout == 0 || o.holdout * 2 > n {
                return Err(QualityError::Holdout { data: o.data.clone(), n, holdout: o.holdout });
            }
            let order = epoch_order(n, o.seed ^ 0x1e4e7, 0, true);
            let (te, _) = labelled(&train_file, Some(&order[..o.holdout]))?;
            let (tr, _) = labelled(&train_file, Some(&order[o.holdout..]))?;
            (tr, te, format!("{} images held out from {}", o.holdout, train_file.display()))
        }
    };
    let info = ClassifierInfo {
        format: FORMAT.into(),
        version: 1,
        train: train_file.display().to_string(),
        train_n: train.labels.len(),
        test: test_desc,
        test_n: test.labels.len(),
        test_accuracy: 0.0,
        epochs: o.epochs,
        seed: o.seed,
        distorted: false,
    };
    tch::manual_seed(o.seed as i64);
    let mut net = LeNet::fresh(info);
    let mut opt = nn::Adam::default().build(&net.vs, 1e-3)?;
    let mut gen = rand::rngs::StdRng::seed_from_u64(o.seed);
    let n = train.labels.len();
    let labels = Tensor::from_slice(&train.labels).to_kind(Kind::Int64);
    let x_all = preprocess(&train.images)?;
    let distorting = o.distort.unwrap_or(n < DISTORT_BELOW);
    net.info.distorted = distorting;
    for epoch in 0..o.epochs {
        if epoch == o.epochs - o.epochs / 4 && o.epochs >= 4 {
            opt.set_lr(1e-4);
        }
        let order = epoch_order(n, o.seed, epoch as u32, true);
        let (mut sum, mut batches) = (0.0, 0);
        for chunk in order.chunks(o.batch.max(1)) {
            let idx = Tensor::from_slice(&chunk.iter().map(|&i| i as i64).collect::<Vec<_>>());
            let x = x_all.index_select(0, &idx);
            let x = if distorting { distort(&x, &mut gen) } else { x };
            let y = labels.index_select(0, &idx);
            let loss = net.layers.logits(&x, true).cross_entropy_for_logits(&y);
            opt.backward_step(&loss);
            sum += loss.double_value(&[]);
            batches += 1;
        }
        let acc = net.accuracy(&test.images, &test.labels)?;
        progress(format!("epoch {}/{}  loss {:.4}  test accuracy {:.2}%", epoch + 1, o.epochs, sum / batches.max(1) as f64, acc * 100.0));
        net.info.test_accuracy = acc;
    }
    Ok(net)
}

impl Module for LeNet {
    /// Logits `[N, 10]` of network inputs `[N, 1, 32, 32]` in [-1, 1] (evaluation mode).
    fn forward(&self, x: &Tensor) -> Tensor {
        self.layers.logits(x, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preprocess_pads_28_to_32_with_background() {
        let img = Tensor::full([1, 1, 28, 28], 255, (Kind::Uint8, Device::Cpu));
        let x = preprocess(&img).unwrap();
        assert_eq!(x.size(), [1, 1, 32, 32]);
        assert_eq!(x.double_value(&[0, 0, 0, 0]), -1.0); // padding = background
        assert_eq!(x.double_value(&[0, 0, 2, 2]), 1.0);
        assert_eq!(x.double_value(&[0, 0, 29, 29]), 1.0);
        assert_eq!(x.double_value(&[0, 0, 30, 30]), -1.0);
        let e = preprocess(&Tensor::zeros([1, 3, 28, 28], (Kind::Uint8, Device::Cpu))).unwrap_err().to_string();
        assert!(e.contains("colour") && e.contains("Inception"), "{e}");
        let e = preprocess(&Tensor::zeros([1, 1, 64, 64], (Kind::Uint8, Device::Cpu))).unwrap_err().to_string();
        assert!(e.contains("64×64"), "{e}");
    }

    #[test]
    fn save_load_round_trip_keeps_outputs_and_info() {
        let tmp = tempfile::tempdir().unwrap();
        tch::manual_seed(3);
        let info = ClassifierInfo {
            format: FORMAT.into(),
            version: 1,
            train: "t".into(),
            train_n: 5,
            test: "u".into(),
            test_n: 2,
            test_accuracy: 0.5,
            epochs: 1,
            seed: 3,
            distorted: true,
        };
        let net = LeNet::fresh(info.clone());
        let path = tmp.path().join("c.safetensors");
        net.save(&path).unwrap();
        let back = LeNet::load(&path).unwrap();
        assert_eq!(back.info, info);
        let imgs = Tensor::randint(256, [4, 1, 28, 28], (Kind::Int64, Device::Cpu)).to_kind(Kind::Uint8);
        let (f1, p1) = net.features_and_probs(&imgs, 3).unwrap();
        let (f2, p2) = back.features_and_probs(&imgs, 4).unwrap();
        assert_eq!(f1.size(), [4, FEATURES]);
        // Chunks of 3 and of 4: the same values up to the order of float sums.
        assert!(f1.allclose(&f2, 1e-5, 1e-6, false) && p1.allclose(&p2, 1e-5, 1e-6, false));
        let sums = Vec::<f32>::try_from(p1.sum_dim_intlist(-1, false, Kind::Float)).unwrap();
        assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "{sums:?}");
        let e = LeNet::load(&tmp.path().join("none.safetensors")).unwrap_err().to_string();
        assert!(e.contains("pipe train-classifier"), "{e}");
        std::fs::write(tmp.path().join("x.safetensors"), b"nope").unwrap();
        assert!(LeNet::load(&tmp.path().join("x.safetensors")).unwrap_err().to_string().contains("not a classifier file"));
    }
}
