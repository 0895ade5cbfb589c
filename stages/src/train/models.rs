//! Generator and discriminator architectures.
//!
//! All networks work on NCHW `f32` tensors. Generators map a latent batch z `[B, latent]`
//! (z ~ N(0, I)) to images `[B, C, H, W]` in [-1, 1] (tanh output). Discriminators map images
//! `[B, C, H, W]` to one logit per sample `[B, 1]` (no sigmoid: the losses and the gradient
//! penalty work on the logit).
//!
//! Weights start from PyTorch's default initialisation (`nn.Linear`, `nn.Conv2d`,
//! `nn.ConvTranspose2d`: weights U(−1/√fan_in, 1/√fan_in) via kaiming_uniform with a = √5,
//! biases the same bound), as in the reference scripts, so runs compare like with like.
//! tch's own defaults differ (Kaiming with the ReLU gain: bounds √6 times larger, zero conv
//! biases), which makes D win much faster at the start.

use crate::core::problem::Problem;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::nn::{self, ModuleT};
use tch::Tensor;

/// Generator architecture (a field of `g_step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum GModel {
    /// Multi-layer perceptron: `layers` hidden layers of `hidden` units (each followed by 1-d
    /// batch norm when `batch_norm: true`) with ReLU, then a linear layer to C·H·W values and
    /// tanh. The DRAGAN MNIST experiment uses 2 × 1024 without batch norm.
    Mlp(MlpConfig),
    /// DCGAN generator (Radford et al. 2016): a transposed convolution from z to a 4×4 map of
    /// `width·2^(k-1)` channels, then transposed convolutions (kernel 4, stride 2, padding 1)
    /// halving the channels and doubling the size, each followed by batch norm and ReLU; the
    /// last one outputs C channels and tanh. Image size must be 4·2^k with k ≥ 1 (8, 16, 32, 64, 128…).
    Dcgan(DcganConfig),
    /// The InfoGAN-style generator that Lucic et al. 2018 ("Are GANs Created Equal?", Table 3)
    /// use for MNIST and Fashion-MNIST (Chen et al. 2016, InfoGAN, appendix C.1): z → linear
    /// `hidden` → BN → ReLU → linear 2·`width`·(H/4)·(W/4) → BN → ReLU → reshape
    /// `[2·width, H/4, W/4]` → transposed conv (kernel 4, stride 2, padding 1) to `width` → BN →
    /// ReLU → transposed conv to C channels → tanh (the paper's sigmoid, for data in [-1, 1]).
    /// H and W must be multiples of 4 (28×28 works unpadded).
    InfoGan(InfoGanConfig),
}

/// Discriminator architecture (a field of `d_step`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum DModel {
    /// Multi-layer perceptron on the flattened image: `layers` hidden layers of `hidden` units
    /// (each followed by 1-d batch norm when `batch_norm: true`) with leaky ReLU (slope 0.2),
    /// then one logit. Batch norm is off by default and `pipe check` refuses it with a gradient
    /// penalty (it mixes samples and breaks the per-sample penalty).
    Mlp(MlpConfig),
    /// DCGAN discriminator: strided convolutions (kernel 4, stride 2, padding 1) doubling the
    /// channels from `width`, each with leaky ReLU (slope 0.2), down to 4×4, then a 4×4
    /// convolution to one logit. No batch norm, as DRAGAN requires.
    Dcgan(DcganConfig),
    /// The InfoGAN-style discriminator of Lucic et al. 2018 for MNIST-like data: conv (kernel 4,
    /// stride 2, padding 1) to `width` → leaky ReLU → conv to 2·`width` → leaky ReLU → flatten →
    /// linear `hidden` → leaky ReLU → linear to one logit. No batch norm (the paper's D has it in
    /// some methods; a per-sample gradient penalty forbids it). H and W must be multiples of 4.
    InfoGan(InfoGanConfig),
}

impl Default for GModel {
    fn default() -> Self {
        GModel::Mlp(MlpConfig::default())
    }
}
impl Default for DModel {
    fn default() -> Self {
        DModel::Mlp(MlpConfig::default())
    }
}

/// MLP sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct MlpConfig {
    /// Units per hidden layer. Default 1024.
    pub hidden: i64,
    /// Number of hidden layers. Default 2.
    pub layers: usize,
    /// 1-d batch norm after each hidden linear layer (before the activation). Default false.
    /// In a generator it keeps the hidden units' scale fixed and, in this project's MNIST
    /// trials, removes the salt-and-pepper speckle of MLP samples (pipelines/RECIPES.md); in a
    /// discriminator `pipe check` refuses it with a gradient penalty (it mixes the samples).
    pub batch_norm: bool,
}
impl Default for MlpConfig {
    fn default() -> Self {
        MlpConfig { hidden: 1024, layers: 2, batch_norm: false }
    }
}

/// Sizes of the InfoGAN-style networks ([`GModel::InfoGan`], [`DModel::InfoGan`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct InfoGanConfig {
    /// Channels of the full-resolution convolution (the other has twice as many). Default 64.
    pub width: i64,
    /// Units of the fully connected hidden layer. Default 1024.
    pub hidden: i64,
}
impl Default for InfoGanConfig {
    fn default() -> Self {
        InfoGanConfig { width: 64, hidden: 1024 }
    }
}

/// DCGAN sizes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DcganConfig {
    /// Channels of the widest-resolution layer (ngf / ndf in the DCGAN paper). Default 64.
    pub width: i64,
    /// Batch norm after each hidden (transposed) convolution but D's first, as in the DCGAN
    /// paper. Default: on in the generator, off in the discriminator (a gradient penalty needs
    /// D(x̂ᵢ) to depend on x̂ᵢ alone; `pipe check` refuses batch norm in D with a penalty).
    pub batch_norm: Option<bool>,
}
impl Default for DcganConfig {
    fn default() -> Self {
        DcganConfig { width: 64, batch_norm: None }
    }
}

impl DModel {
    /// Whether D has batch norm (it mixes the samples of a batch).
    pub fn has_batch_norm(&self) -> bool {
        match self {
            DModel::Dcgan(d) => d.batch_norm == Some(true),
            DModel::Mlp(m) => m.batch_norm,
            DModel::InfoGan(_) => false,
        }
    }
}

/// Why an architecture cannot take images of some shape ([`check_shape`]), saying what it
/// takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// A DCGAN side that is not 4·2^k, k ≥ 1.
    #[error(
        "a DCGAN needs square images of size 4·2^k with k ≥ 1 (8, 16, 32, 64, 128, ...), got {0}×{0}; set FolderLoader's size (or IdxLoader's pad: 2 takes 28 to 32) to one of those, or use Mlp"
    )]
    DcganSize(usize),
    /// A DCGAN given non-square images.
    #[error("a DCGAN needs square images, got {height}×{width}")]
    DcganNotSquare { height: usize, width: usize },
    /// InfoGan given a height or width that is not a multiple of 4.
    #[error(
        "InfoGan needs a height and width that are multiples of 4 (28, 32, 64, ...), got {height}×{width}; set the loader's size (or IdxLoader's pad) to make them so, or use Mlp"
    )]
    InfoGanSize { height: usize, width: usize },
}

/// Number of stride-2 stages k for a DCGAN at image size `size` = 4·2^k, or an explanation
/// ([`ShapeError::DcganSize`]).
pub fn dcgan_depth(size: usize) -> Result<u32, ShapeError> {
    if size >= 8 && size % 4 == 0 && (size / 4).is_power_of_two() {
        Ok((size / 4).trailing_zeros())
    } else {
        Err(ShapeError::DcganSize(size))
    }
}

/// Which image shapes an architecture takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// Any `[C, H, W]`.
    Mlp,
    /// Square, side 4·2^k, k ≥ 1.
    Dcgan,
    /// H and W multiples of 4.
    InfoGan,
}

impl Arch {
    /// The architecture's name as written in a pipeline.
    pub fn name(self) -> &'static str {
        match self {
            Arch::Mlp => "Mlp",
            Arch::Dcgan => "Dcgan",
            Arch::InfoGan => "InfoGan",
        }
    }
    /// What the architecture takes, for messages.
    pub fn takes(self) -> &'static str {
        match self {
            Arch::Mlp => "batch[B,C,H,W]",
            Arch::Dcgan => "batch[B,C,S,S] with S = 4·2^k, k ≥ 1",
            Arch::InfoGan => "batch[B,C,H,W] with H and W multiples of 4",
        }
    }
}

/// Check that an architecture can take images of shape `[C, H, W]`, or explain why not
/// ([`ShapeError`]).
pub fn check_shape(arch: Arch, shape: [usize; 3]) -> Result<(), ShapeError> {
    let (height, width) = (shape[1], shape[2]);
    match arch {
        Arch::Mlp => Ok(()),
        Arch::Dcgan => {
            if height != width {
                return Err(ShapeError::DcganNotSquare { height, width });
            }
            dcgan_depth(height).map(|_| ())
        }
        Arch::InfoGan => {
            if height % 4 != 0 || width % 4 != 0 || height == 0 || width == 0 {
                return Err(ShapeError::InfoGanSize { height, width });
            }
            Ok(())
        }
    }
}

impl MlpConfig {
    fn problems(&self) -> Vec<Problem> {
        if !(1..=65536).contains(&self.hidden) || self.layers > 16 {
            let field = if (1..=65536).contains(&self.hidden) { "layers" } else { "hidden" };
            return vec![Problem::new(
                field,
                format!("Mlp needs hidden in 1..=65536 and layers in 0..=16, got hidden {} and layers {}", self.hidden, self.layers),
            )];
        }
        vec![]
    }
}
impl DcganConfig {
    fn problems(&self) -> Vec<Problem> {
        if !(1..=4096).contains(&self.width) {
            return vec![Problem::new("width", format!("Dcgan needs width in 1..=4096, got {}", self.width))];
        }
        vec![]
    }
}
impl InfoGanConfig {
    fn problems(&self) -> Vec<Problem> {
        if !(1..=4096).contains(&self.width) || !(1..=65536).contains(&self.hidden) {
            let field = if (1..=4096).contains(&self.width) { "hidden" } else { "width" };
            return vec![Problem::new(
                field,
                format!("InfoGan needs width in 1..=4096 and hidden in 1..=65536, got width {} and hidden {}", self.width, self.hidden),
            )];
        }
        vec![]
    }
}

impl GModel {
    /// The architecture family (what image shapes it takes).
    pub fn arch(&self) -> Arch {
        match self {
            GModel::Mlp(_) => Arch::Mlp,
            GModel::Dcgan(_) => Arch::Dcgan,
            GModel::InfoGan(_) => Arch::InfoGan,
        }
    }
    /// Check the sizes, naming the field at fault.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            GModel::Mlp(m) => m.problems(),
            GModel::Dcgan(d) => d.problems(),
            GModel::InfoGan(i) => i.problems(),
        }
    }
}
impl GModel {
    /// Whether G has 1-d batch norm (over units, not over pixels too): it needs batches of at
    /// least 2 images.
    pub fn has_batch_norm_1d(&self) -> bool {
        match self {
            GModel::Mlp(m) => m.batch_norm,
            GModel::InfoGan(_) => true,
            GModel::Dcgan(_) => false,
        }
    }
}
impl DModel {
    /// Whether D has 1-d batch norm (see [`GModel::has_batch_norm_1d`]).
    pub fn has_batch_norm_1d(&self) -> bool {
        matches!(self, DModel::Mlp(m) if m.batch_norm)
    }
}

impl DModel {
    /// The architecture family (what image shapes it takes).
    pub fn arch(&self) -> Arch {
        match self {
            DModel::Mlp(_) => Arch::Mlp,
            DModel::Dcgan(_) => Arch::Dcgan,
            DModel::InfoGan(_) => Arch::InfoGan,
        }
    }
    /// Check the sizes, naming the field at fault.
    pub fn problems(&self) -> Vec<Problem> {
        match self {
            DModel::Mlp(m) => m.problems(),
            DModel::Dcgan(d) => d.problems(),
            DModel::InfoGan(i) => i.problems(),
        }
    }
}

/// PyTorch's default weight init: U(−b, b), b = 1/√fan_in (kaiming_uniform, a = √5).
const TORCH_W: nn::Init = nn::Init::Kaiming {
    dist: nn::init::NormalOrUniform::Uniform,
    fan: nn::init::FanInOut::FanIn,
    non_linearity: nn::init::NonLinearity::ExplicitGain(0.577_350_269_189_625_8), // 1/√3
};

/// PyTorch's default bias init for a layer with `fan_in` inputs: U(−1/√fan_in, 1/√fan_in).
fn torch_b(fan_in: i64) -> nn::Init {
    let b = 1.0 / (fan_in as f64).sqrt();
    nn::Init::Uniform { lo: -b, up: b }
}

fn linear(vs: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(vs, i, o, nn::LinearConfig { ws_init: TORCH_W, bs_init: Some(torch_b(i)), bias: true })
}

/// A built network: a module plus the image shape it produces or takes.
#[derive(Debug)]
pub struct Net {
    seq: nn::SequentialT,
    /// `[C, H, W]` of the images.
    pub image: [i64; 3],
    /// Set while [`Net::forward_for_input_grad`] runs: the leaky ReLUs then multiply by a
    /// slope mask with no gradient instead of calling the fused kernel.
    masked: Arc<AtomicBool>,
    /// No batch norm: each sample's output depends on that sample alone.
    per_sample: bool,
}

impl Net {
    /// Forward pass. Generator: `[B, latent]` → `[B, C, H, W]`; discriminator: `[B, C, H, W]`
    /// → `[B, 1]`. `train` selects batch-norm batch statistics (and updates running stats).
    pub fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        self.seq.forward_t(x, train)
    }

    /// `(forward(a), forward(b))` for two batches `[Bₐ, ...]`, `[B_b, ...]` of the same item
    /// shape. A network without batch norm runs them as one batch (`cat`, then `narrow`): the
    /// same maths in half as many, larger kernels, and one backward pass instead of two (~5%
    /// faster DRAGAN steps for the DCGAN on the CPU). The values can differ from two separate
    /// calls in the last bits (weight gradients sum the samples in another order). With batch
    /// norm, two calls, so each batch is normalised by its own statistics.
    ///
    /// Errors (joint case, no batch norm): the two item shapes differ (libtorch's message).
    pub fn forward_two(&self, a: &Tensor, b: &Tensor, train: bool) -> Result<(Tensor, Tensor), tch::TchError> {
        if !self.per_sample {
            return Ok((self.forward(a, train), self.forward(b, train)));
        }
        let n = a.size()[0];
        let both = self.forward(&Tensor::f_cat(&[a, b], 0)?, train);
        Ok((both.f_narrow(0, 0, n)?, both.f_narrow(0, n, b.size()[0])?))
    }

    /// The same values as [`Net::forward`], built for a gradient w.r.t. the input that is then
    /// differentiated again (the gradient penalty's double backward).
    ///
    /// Each leaky ReLU runs as `h · m`, with `m` (1 where h > 0, else 0.2) a slope that
    /// carries no gradient (computed by `leaky_relu_backward(h, h.detach())`). Forward values
    /// and ∇ₓD are bit-identical to the fused kernel's (the same products `h·1`, `h·0.2`). What changes is the second backward: the fused kernel's
    /// backward is differentiated w.r.t. its saved input too, and that derivative is a tensor
    /// of zeros (the slope is piecewise constant) which autograd then carries through a whole
    /// extra backward pass of the forward chain: a convolution-backward or matmul per layer
    /// that only adds zeros to the weight gradients. With the mask, ∇ₓD depends on the weights
    /// alone and that pass is never built. Measured on the CPU in PyTorch, DCGAN b16: the
    /// DRAGAN step ~8% faster, MLP b64 ~18%.
    ///
    /// The switch is a flag shared by the network's leaky ReLUs (an `Arc<AtomicBool>`, set for
    /// the duration of this call): it is sound because one thread (d_step's) runs this network,
    /// so no plain forward of it runs at the same time.
    pub fn forward_for_input_grad(&self, x: &Tensor, train: bool) -> Tensor {
        struct Reset<'a>(&'a AtomicBool);
        impl Drop for Reset<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Relaxed);
            }
        }
        self.masked.store(true, Ordering::Relaxed);
        let _reset = Reset(&self.masked);
        self.seq.forward_t(x, train)
    }
}

/// Build a generator under `vs` for images `[C, H, W]` from latents of size `latent`.
/// Errors when the architecture can't produce that shape ([`ShapeError`]).
pub fn build_g(vs: &nn::Path, cfg: &GModel, latent: i64, image: [i64; 3]) -> Result<Net, ShapeError> {
    let [c, h, w] = image;
    let mut seq = nn::seq_t();
    match cfg {
        GModel::Mlp(m) => {
            let mut inp = latent;
            for i in 0..m.layers {
                seq = seq.add(linear(vs / format!("fc{i}"), inp, m.hidden));
                if m.batch_norm {
                    seq = seq.add(nn::batch_norm1d(vs / format!("bn{i}"), m.hidden, Default::default()));
                }
                seq = seq.add_fn(|x| x.relu());
                inp = m.hidden;
            }
            seq = seq.add(linear(vs / "out", inp, c * h * w)).add_fn(|x| x.tanh()).add_fn(move |x| x.view([-1, c, h, w]));
        }
        GModel::InfoGan(g) => {
            check_shape(Arch::InfoGan, [c as usize, h as usize, w as usize])?;
            let (h4, w4, wd) = (h / 4, w / 4, g.width);
            let up = nn::ConvTransposeConfig { stride: 2, padding: 1, bias: true, ws_init: TORCH_W, ..Default::default() };
            let up_b = |fan_in: i64| nn::ConvTransposeConfig { bs_init: torch_b(fan_in), ..up };
            seq = seq
                .add(linear(vs / "fc0", latent, g.hidden))
                .add(nn::batch_norm1d(vs / "bn0", g.hidden, Default::default()))
                .add_fn(|x| x.relu())
                .add(linear(vs / "fc1", g.hidden, 2 * wd * h4 * w4))
                .add(nn::batch_norm1d(vs / "bn1", 2 * wd * h4 * w4, Default::default()))
                .add_fn(|x| x.relu())
                .add_fn(move |x| x.view([-1, 2 * wd, h4, w4]))
                .add(nn::conv_transpose2d(vs / "up0", 2 * wd, wd, 4, up_b(wd * 16)))
                .add(nn::batch_norm2d(vs / "bn2", wd, Default::default()))
                .add_fn(|x| x.relu())
                .add(nn::conv_transpose2d(vs / "up1", wd, c, 4, up_b(c * 16)))
                .add_fn(|x| x.tanh());
        }
        GModel::Dcgan(d) => {
            check_shape(Arch::Dcgan, [c as usize, h as usize, w as usize])?;
            let k = dcgan_depth(h as usize)? as i64;
            let nobias = nn::ConvTransposeConfig { stride: 1, padding: 0, bias: false, ws_init: TORCH_W, ..Default::default() };
            let up = nn::ConvTransposeConfig { stride: 2, padding: 1, bias: false, ws_init: TORCH_W, ..Default::default() };
            let bn = d.batch_norm.unwrap_or(true);
            let mut ch = d.width << (k - 1);
            seq = seq.add_fn(move |z| z.view([-1, latent, 1, 1])).add(nn::conv_transpose2d(vs / "up0", latent, ch, 4, nobias));
            if bn {
                seq = seq.add(nn::batch_norm2d(vs / "bn0", ch, Default::default()));
            }
            seq = seq.add_fn(|x| x.relu());
            for i in 1..k {
                seq = seq.add(nn::conv_transpose2d(vs / format!("up{i}"), ch, ch / 2, 4, up));
                if bn {
                    seq = seq.add(nn::batch_norm2d(vs / format!("bn{i}"), ch / 2, Default::default()));
                }
                seq = seq.add_fn(|x| x.relu());
                ch /= 2;
            }
            seq = seq.add(nn::conv_transpose2d(vs / format!("up{k}"), ch, c, 4, up)).add_fn(|x| x.tanh());
        }
    }
    Ok(Net { seq, image, masked: Arc::default(), per_sample: false })
}

/// Build a discriminator under `vs` for images `[C, H, W]`. Output: one logit per sample.
/// Errors when the architecture can't take that shape ([`ShapeError`]).
pub fn build_d(vs: &nn::Path, cfg: &DModel, image: [i64; 3]) -> Result<Net, ShapeError> {
    let [c, h, w] = image;
    let mut seq = nn::seq_t();
    let masked: Arc<AtomicBool> = Arc::default();
    let leaky = {
        let masked = masked.clone();
        move || {
            let masked = masked.clone();
            move |x: &Tensor| leaky(x, masked.load(Ordering::Relaxed))
        }
    };
    match cfg {
        DModel::Mlp(m) => {
            seq = seq.add_fn(|x| x.flatten(1, -1));
            let mut inp = c * h * w;
            for i in 0..m.layers {
                seq = seq.add(linear(vs / format!("fc{i}"), inp, m.hidden));
                if m.batch_norm {
                    seq = seq.add(nn::batch_norm1d(vs / format!("bn{i}"), m.hidden, Default::default()));
                }
                seq = seq.add_fn(leaky());
                inp = m.hidden;
            }
            seq = seq.add(linear(vs / "out", inp, 1));
        }
        DModel::InfoGan(g) => {
            check_shape(Arch::InfoGan, [c as usize, h as usize, w as usize])?;
            let wd = g.width;
            let down =
                |fan_in: i64| nn::ConvConfig { stride: 2, padding: 1, ws_init: TORCH_W, bs_init: torch_b(fan_in), ..Default::default() };
            let flat = 2 * wd * (h / 4) * (w / 4);
            seq = seq
                .add(nn::conv2d(vs / "conv0", c, wd, 4, down(c * 16)))
                .add_fn(leaky())
                .add(nn::conv2d(vs / "conv1", wd, 2 * wd, 4, down(wd * 16)))
                .add_fn(leaky())
                .add_fn(|x| x.flatten(1, -1))
                .add(linear(vs / "fc0", flat, g.hidden))
                .add_fn(leaky())
                .add(linear(vs / "out", g.hidden, 1));
        }
        DModel::Dcgan(d) => {
            check_shape(Arch::Dcgan, [c as usize, h as usize, w as usize])?;
            let k = dcgan_depth(h as usize)? as i64;
            let down =
                |fan_in: i64| nn::ConvConfig { stride: 2, padding: 1, ws_init: TORCH_W, bs_init: torch_b(fan_in), ..Default::default() };
            let mut inp = c;
            let mut ch = d.width;
            for i in 0..k {
                seq = seq.add(nn::conv2d(vs / format!("conv{i}"), inp, ch, 4, down(inp * 16)));
                if i > 0 && d.batch_norm == Some(true) {
                    seq = seq.add(nn::batch_norm2d(vs / format!("bn{i}"), ch, Default::default()));
                }
                seq = seq.add_fn(leaky());
                inp = ch;
                ch *= 2;
            }
            seq = seq
                .add(nn::conv2d(
                    vs / "out",
                    inp,
                    1,
                    4,
                    nn::ConvConfig { ws_init: TORCH_W, bs_init: torch_b(inp * 16), ..Default::default() },
                ))
                .add_fn(|x| x.flatten(1, -1));
        }
    }
    Ok(Net { seq, image, masked, per_sample: !cfg.has_batch_norm() })
}

/// Number of values (weights, biases, batch-norm scale, shift and running statistics) of the
/// generator [`build_g`] builds, computed from the settings without building it. `None` when
/// the shape does not suit the architecture.
pub fn g_values(cfg: &GModel, latent: i64, image: [i64; 3]) -> Option<u64> {
    let [c, h, w] = image.map(|v| v as u64);
    let latent = latent as u64;
    match cfg {
        GModel::Mlp(m) => Some(mlp_values(latent, m, c * h * w)),
        GModel::InfoGan(g) => {
            if check_shape(Arch::InfoGan, [c as usize, h as usize, w as usize]).is_err() {
                return None;
            }
            let (wd, hid) = (g.width as u64, g.hidden as u64);
            let flat = 2 * wd * (h / 4) * (w / 4);
            // fc0 + bn0, fc1 + bn1 (4 values per unit: scale, shift, running mean, variance),
            // up0 + bn2, up1.
            Some(latent * hid + hid + 4 * hid + hid * flat + flat + 4 * flat + 2 * wd * wd * 16 + wd + 4 * wd + wd * c * 16 + c)
        }
        GModel::Dcgan(d) => {
            let k = dcgan_depth(h as usize).ok()? as u64;
            let mut ch = (d.width as u64) << (k - 1);
            let bn = if d.batch_norm.unwrap_or(true) { 4 } else { 0 };
            // up0 (no bias) + bn0 (4 per channel), then up_i + bn_i, then the last up.
            let mut n = latent * ch * 16 + bn * ch;
            for _ in 1..k {
                n += ch * (ch / 2) * 16 + bn * (ch / 2);
                ch /= 2;
            }
            Some(n + ch * c * 16)
        }
    }
}

/// Number of values of the discriminator [`build_d`] builds (see [`g_values`]).
pub fn d_values(cfg: &DModel, image: [i64; 3]) -> Option<u64> {
    let [c, h, w] = image.map(|v| v as u64);
    match cfg {
        DModel::Mlp(m) => Some(mlp_values(c * h * w, m, 1)),
        DModel::InfoGan(g) => {
            if check_shape(Arch::InfoGan, [c as usize, h as usize, w as usize]).is_err() {
                return None;
            }
            let (wd, hid) = (g.width as u64, g.hidden as u64);
            let flat = 2 * wd * (h / 4) * (w / 4);
            Some(c * wd * 16 + wd + wd * 2 * wd * 16 + 2 * wd + flat * hid + hid + hid + 1)
        }
        DModel::Dcgan(d) => {
            let k = dcgan_depth(h as usize).ok()? as u64;
            let (mut inp, mut ch, mut n) = (c, d.width as u64, 0u64);
            let bn = if d.batch_norm == Some(true) { 4 } else { 0 };
            for i in 0..k {
                n += inp * ch * 16 + ch + if i > 0 { bn * ch } else { 0 };
                inp = ch;
                ch *= 2;
            }
            Some(n + inp * 16 + 1)
        }
    }
}

fn mlp_values(inp: u64, m: &MlpConfig, out: u64) -> u64 {
    let h = m.hidden as u64;
    let bn = if m.batch_norm { 4 * h } else { 0 };
    let mut n = 0;
    let mut i = inp;
    for _ in 0..m.layers {
        n += i * h + h + bn;
        i = h;
    }
    n + i * out + out
}

/// Leaky ReLU with slope 0.2: x where x > 0, else 0.2·x. ATen's fused kernel (its backward is
/// differentiable again, as the gradient penalty's double backward needs), or (`masked`, see
/// [`Net::forward_for_input_grad`]) the same values as `leaky_relu_backward(grad = x,
/// input = x.detach())`: x where x > 0, 0.2·x elsewhere, linear in `x` with a slope that
/// carries no gradient. One fused kernel either way, in `x`'s dtype (16-bit inputs are
/// computed in `f32` and rounded, as the forward kernel does).
fn leaky(x: &Tensor, masked: bool) -> Tensor {
    const SLOPE: f64 = 0.2;
    if masked {
        return x.detach().leaky_relu_backward(x, SLOPE, false);
    }
    crate::train::cuda::leaky_relu(x, SLOPE).unwrap_or_else(|e| panic!("{e}"))
}

#[cfg(test)]
mod tests;
