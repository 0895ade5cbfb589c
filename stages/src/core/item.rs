//! Items that flow along the links of a pipeline.

/// Where a loader is in its data stream: what the next batch would be.
///
/// The default is the start of the data (batch 0, epoch 0, position 0). A batch gives the
/// position after it with [`HostBatch::position_after`]; a loader built with that position
/// goes on exactly as the run that produced the batch did (see the [loader docs](crate::data::batches)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    /// Index of the next batch (batches are numbered from 0 across epochs).
    pub next_index: u64,
    /// Epoch of the next image to visit, from 0.
    pub epoch: u32,
    /// Position in that epoch's visiting order ([`crate::data::batches::epoch_order`]) of the next image to visit:
    /// the number of images (files, for the folder loader) of the epoch already visited, from
    /// 0 to the number of images. At the number of images, the next batch starts the next
    /// epoch.
    pub pos: u64,
}

/// Scores of generated images against real ones.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Scores {
    pub fid: f64,
    pub kid_mean: f64,
    pub kid_std: f64,
    /// Inception-Score-style score of the generated images (mean, std over 10 splits), with
    /// class probabilities (LeNet) only.
    pub is_fake: Option<(f64, f64)>,
    /// The same score of the real images: what a perfect generator would get.
    pub is_real: Option<(f64, f64)>,
    /// The KID subset size and number of subsets used (1 when a subset is all of both sets).
    pub kid_size: usize,
    pub kid_subsets: usize,
}

/// A batch of real images in host memory, as produced by a loader and extended by `augment`.
///
/// Layout NCHW, row-major, `f32`, values in [-1, 1] (pixel u8 `p` maps to `p / 127.5 - 1`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostBatch {
    /// Position of this batch in the stream, counted from 0 across epochs.
    pub index: u64,
    /// Epoch this batch belongs to, counted from 0.
    pub epoch: u32,
    /// Position in epoch `epoch`'s visiting order ([`crate::data::batches::epoch_order`]) just after
    /// this batch's last image: the number of images (files, for the folder loader, counting
    /// unreadable ones that were skipped) of that epoch visited so far, at most the epoch's
    /// length. A smaller last batch of an epoch (without `drop_last`) is only complete once the
    /// whole epoch was visited: its `next_pos` is the epoch's length.
    pub next_pos: u64,
    /// `[batch, channels, height, width]`.
    pub shape: [usize; 4],
    /// Real images x, `shape.iter().product()` values in [-1, 1].
    pub x: Vec<f32>,
    /// DRAGAN points x̂ near x (same shape as `x`), filled by `augment` when its `perturb` is
    /// set; `None` otherwise. Values may leave [-1, 1] slightly (x + c·σ·u).
    pub x_hat: Option<Vec<f32>>,
}

impl HostBatch {
    /// Where the loader is once this batch is out: a loader started at this position (see
    /// [`crate::data::batches`]) goes on with exactly the batches that followed this one.
    pub fn position_after(&self) -> DataPosition {
        DataPosition { next_index: self.index + 1, epoch: self.epoch, pos: self.next_pos }
    }

    /// Number of values in one image, `C·H·W`.
    pub fn image_len(&self) -> usize {
        self.shape[1] * self.shape[2] * self.shape[3]
    }
}

/// A batch of generated images in host memory, for sample grids.
///
/// Layout NCHW, row-major, `u8` in [0, 255] (from G's tanh output `t` as `round((t + 1) · 127.5)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Images {
    /// Generator step after which these images were generated (1-based count of G steps).
    pub step: u64,
    /// `[n, channels (1 or 3), height, width]`.
    pub shape: [usize; 4],
    pub data: Vec<u8>,
    /// True for the images of the last step of the run.
    pub last: bool,
}

/// One video frame: an RGB8 picture, row-major HWC.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Generator step shown in this frame.
    pub step: u64,
    pub width: u32,
    pub height: u32,
    /// `width · height · 3` bytes.
    pub rgb: Vec<u8>,
}

/// Training figures of one generator step, sent from d_step to g_step and then on the bus.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepReport {
    /// Generator step, 1-based.
    pub step: u64,
    /// Discriminator loss (GAN part, without the penalty), mean over the last D step's batch.
    pub d_loss: f64,
    /// Generator loss of this step.
    pub g_loss: f64,
    /// Gradient penalty term λ·E[(‖∇D(x̂)‖ − k)²] of the last D step (0 without a penalty).
    pub penalty: f64,
    /// Mean of ‖∇ₓD(x̂)‖₂ over the batch (NaN without a penalty).
    pub grad_norm: f64,
    /// Real images consumed so far (all D steps).
    pub images: u64,
}

/// What the runner tells the stages that watch the run ([`crate::kinds::Kind::watches_run`]),
/// as it writes metrics.csv: each logged step's figures and each evaluation's scores.
#[derive(Debug, Clone, PartialEq)]
pub enum Record {
    /// A logged generator step: its figures, the run's wall time so far (seconds, resumed runs
    /// included) and the speed since the previous logged step (real images per second, all
    /// ranks).
    Step { report: StepReport, elapsed_s: f64, img_per_s: f64 },
    /// Sample-quality scores of generator step `step`, from an eval stage.
    Scores { step: u64, scores: Scores },
}

/// D's half of a checkpoint, sent by d_step with [`Item::DDone`] when a checkpoint is due; g_step
/// adds G's half and writes the file.
pub struct DState {
    /// Host `f32` copies of D's variables (`d.*`) and of its Adam moments (`d_adam.m.*`,
    /// `d_adam.v.*`).
    pub tensors: Vec<(String, tch::Tensor)>,
    /// Adam updates D's optimiser has taken.
    pub adam_steps: u64,
    /// Where the loader resumes: after the last batch D consumed.
    pub data: DataPosition,
    /// This is the run's last step.
    pub last: bool,
}

impl std::fmt::Debug for DState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DState")
            .field("tensors", &self.tensors.len())
            .field("adam_steps", &self.adam_steps)
            .field("data", &self.data)
            .finish()
    }
}

/// What travels on a link.
#[derive(Debug)]
pub enum Item {
    /// Real data (loader → augment → d_step).
    Batch(HostBatch),
    /// The discriminator has finished the D steps of one generator step (d_step → g_step).
    /// `logged` says whether the figures were read back from the device; `last` that no step
    /// follows (max_steps reached, the data ended, or a stop was asked for).
    /// `state` carries D's half of a checkpoint when one is due after this step.
    DDone { report: StepReport, logged: bool, last: bool, state: Option<Box<DState>> },
    /// Generated sample images for grids (g_step → sampler).
    Images(Images),
    /// Generated images to score (g_step → eval): `n` images from the eval stage's fixed
    /// latents. Same kind (`images`) on the link; a sampler ignores them, as an eval stage
    /// ignores grid images.
    EvalImages(Images),
    /// A picture for a video or GIF sink (sampler → video).
    Frame(Frame),
}

impl Item {
    /// Short name of the item kind, as used in caps (`batch`, `d_done`, `images`, `frame`).
    pub fn kind(&self) -> &'static str {
        match self {
            Item::Batch(_) => "batch",
            Item::DDone { .. } => "d_done",
            Item::Images(_) | Item::EvalImages(_) => "images",
            Item::Frame(_) => "frame",
        }
    }
}
