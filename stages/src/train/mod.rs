//! What d_step and g_step share: the optimiser choice (each optimiser's settings live beside
//! it, in [`crate::train::optim::adam`] and [`crate::train::optim::rmsprop`]), run settings, the two networks and the
//! hand-over ("baton") that keeps their steps in strict alternation.
//!
//! d_step owns D and its optimiser; g_step owns G and its optimiser. Each also holds a
//! read-only *view* of the other network: a second module whose parameter tensors alias the
//! owner's storage (no copies), with `requires_grad` off. One generator step is:
//!
//! 1. d_step: `n_critic` D updates, each generating fakes with its G view (no grad);
//! 2. d_step sends `DDone` to g_step;
//! 3. g_step: one G update through its D view, then samples if due;
//! 4. g_step hands the baton back to d_step, which may only then start the next step.
//!
//! So at any moment only one thread touches the shared parameters, and each step runs wholly
//! on one thread from buffers that thread owns.
//!
//! Errors of this module (the models, the optimisers, the fused-Adam shim) are
//! [`TrainError`]s.

pub mod cuda;
pub mod dragan;
pub mod feed;
pub mod finite;
pub mod losses;
pub mod models;
pub mod optim;
pub mod shim;
pub mod speed;
pub mod step;

pub use finite::{FiniteGuard, Verdict};

use crate::core::problem::Problem;
use crate::core::stage::{first_line, StageError};
use crate::io::checkpoint::CheckpointPlan;
use crate::train::models::{build_d, build_g, DModel, GModel, Net, ShapeError};
use crate::train::optim::adam::Adam;
pub use crate::train::optim::adam::AdamConfig;
use crate::train::optim::rmsprop::RmsProp;
pub use crate::train::optim::rmsprop::RmsPropConfig;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use tch::nn;
use tch::{Device, Kind, Tensor};

/// What to do about a non-finite loss, in the messages that report one.
const NONFINITE_HINT: &str = "lower the learning rate or check the data; `on_nonfinite: Skip` in the pipeline skips such updates instead";

/// Why the networks could not be built or trained on: an image shape the architecture cannot
/// take, optimiser state that does not fit, a non-finite loss, a libtorch failure.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A libtorch operation failed (its message, first line only).
    #[error("{}", first_line(&.0.to_string()))]
    Torch(#[from] tch::TchError),
    /// Images of a shape the architecture cannot take.
    #[error(transparent)]
    Shape(#[from] ShapeError),
    /// A variable of a network's read-only view has no counterpart in the network (a bug).
    #[error("internal: view variable {0} has no owner")]
    ViewWithoutOwner(String),
    /// Optimiser state to restore is missing (the tensor's name).
    #[error("no tensor `{0}`")]
    MissingState(String),
    /// Optimiser state to restore has another shape than the parameter.
    #[error("tensor `{name}`: saved {saved:?}, expected {expected:?}")]
    StateShape { name: String, saved: Vec<i64>, expected: Vec<i64> },
    /// Optimiser state cannot be copied in.
    #[error("tensor `{name}`: {}", first_line(&.source.to_string()))]
    StateCopy { name: String, source: tch::TchError },
    /// The checkpoint `path` holds the state of the other optimiser for `field`.
    #[error(
        "{}: the checkpoint holds {saved} state for {field}, but the pipeline asks for {wanted}: resume with the optimiser the run was trained with (its pipeline.ron), or start a new run",
        path.display()
    )]
    OtherOptimizer { path: PathBuf, saved: &'static str, field: String, wanted: &'static str },
    /// `on_nonfinite: Skip` skipped [`MAX_SKIPPED_IN_A_ROW`] updates in a row, up to `step`.
    #[error(
        "step {step}: {MAX_SKIPPED_IN_A_ROW} updates in a row had a non-finite {what} or gradient and were skipped: training has diverged (lower the learning rate or check the data)"
    )]
    Diverged { step: u64, what: String },
    /// The loss `what` of generator step `step` is `value`, NaN or ±Inf (`on_nonfinite: Stop`).
    #[error("step {step}: non-finite {what} ({value}): {NONFINITE_HINT}")]
    NonFinite { step: u64, what: String, value: f64 },
    /// The loss `what` was first non-finite at generator step `step`, as recorded on the device
    /// (`on_nonfinite: Stop` on a GPU).
    #[error("step {step}: non-finite {what}: {NONFINITE_HINT}")]
    NonFiniteOnDevice { step: u64, what: String },
    /// A CUDA stream, graph, upload, bf16 autocast or channels_last call of the shim failed.
    #[error(transparent)]
    Cuda(#[from] cuda::CudaError),
    /// The fused Adam kernel was given lists of different lengths.
    #[error("fused Adam: lists of different lengths")]
    FusedAdamLists,
    /// The fused Adam kernel failed (libtorch's message, first line only).
    #[error("fused Adam: {0}")]
    FusedAdam(String),
}

/// Optimiser of a step stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Optimizer {
    /// Adam (Kingma & Ba 2015). DRAGAN's defaults: lr 1e-4, β = (0.5, 0.9).
    Adam(AdamConfig),
    /// RMSProp (Tieleman & Hinton 2012), WGAN's optimiser: e.g. `RmsProp(lr: 5e-5)`.
    RmsProp(RmsPropConfig),
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Adam(AdamConfig::default())
    }
}

impl Optimizer {
    /// Check the values, naming the field at fault.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        let (lr, eps, wd, betas): (f64, f64, f64, Vec<(&str, f64)>) = match self {
            Optimizer::Adam(a) => (a.lr, a.eps, a.weight_decay, vec![("beta1", a.beta1), ("beta2", a.beta2)]),
            Optimizer::RmsProp(r) => (r.lr, r.eps, r.weight_decay, vec![("alpha", r.alpha)]),
        };
        if !(lr > 0.0 && lr.is_finite()) {
            errs.push(Problem::new("lr", format!("optimizer lr must be a finite number > 0, got {lr}")));
        }
        for (n, b) in betas {
            if !(0.0..1.0).contains(&b) {
                errs.push(Problem::new(n, format!("optimizer {n} must be in [0, 1), got {b}")));
            }
        }
        if !(eps > 0.0 && eps.is_finite()) {
            errs.push(Problem::new("eps", format!("optimizer eps must be > 0, got {eps}")));
        }
        if !(wd >= 0.0 && wd.is_finite()) {
            errs.push(Problem::new("weight_decay", format!("optimizer weight_decay must be ≥ 0, got {wd}")));
        }
        errs
    }

    /// L2 weight decay of the optimiser.
    pub fn weight_decay(&self) -> f64 {
        match self {
            Optimizer::Adam(a) => a.weight_decay,
            Optimizer::RmsProp(r) => r.weight_decay,
        }
    }

    /// Build the optimiser over the trainable variables of `vs` (fresh state).
    pub fn build(&self, vs: &nn::VarStore) -> Result<Optim, tch::TchError> {
        Ok(match self {
            Optimizer::Adam(a) => Optim::Adam(Adam::new(a, vs)?),
            Optimizer::RmsProp(r) => Optim::RmsProp(RmsProp::new(r, vs)?),
        })
    }
}

/// A built optimiser with its state: [`Adam`] or [`RmsProp`]. The step stages hold one for
/// their network; its state goes into checkpoints under `d_adam.` / `g_adam.` whichever it is.
pub enum Optim {
    Adam(Adam),
    RmsProp(RmsProp),
}

impl Optim {
    /// The parameters it updates, (name, tensor) sorted by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        match self {
            Optim::Adam(a) => a.params(),
            Optim::RmsProp(r) => r.params(),
        }
    }

    fn params_mut(&mut self) -> &mut [(String, Tensor)] {
        match self {
            Optim::Adam(a) => a.params_mut(),
            Optim::RmsProp(r) => r.params_mut(),
        }
    }

    /// Zero every parameter's gradient (where one exists).
    pub fn zero_grad(&mut self) {
        crate::train::optim::adam::zero_grads(self.params_mut());
    }

    /// One update from the gradients left by `backward`.
    pub fn step(&mut self) -> Result<(), tch::TchError> {
        match self {
            Optim::Adam(a) => a.step(),
            Optim::RmsProp(r) => r.step(),
        }
    }

    /// True when every existing gradient is finite. Reads one value back from the device.
    pub fn grads_finite(&self) -> Result<bool, tch::TchError> {
        crate::train::optim::adam::grads_finite(self.params())
    }

    /// The state to save (host `f32` tensors by name) and the step count.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64), tch::TchError> {
        match self {
            Optim::Adam(a) => a.state(),
            Optim::RmsProp(r) => r.state(),
        }
    }

    /// Names and shapes of the state tensors.
    pub fn state_shapes(&self) -> Vec<(String, Vec<i64>)> {
        match self {
            Optim::Adam(a) => a.state_shapes(),
            Optim::RmsProp(r) => r.state_shapes(),
        }
    }

    /// Restore the state saved by [`Optim::state`]; errors name the tensor at fault
    /// ([`TrainError::MissingState`], [`TrainError::StateShape`], [`TrainError::StateCopy`]).
    pub fn load_state(&mut self, steps: u64, get: impl FnMut(&str) -> Option<Tensor>) -> Result<(), TrainError> {
        match self {
            Optim::Adam(a) => a.load_state(steps, get),
            Optim::RmsProp(r) => r.load_state(steps, get),
        }
    }

    /// Count an update that a replayed CUDA graph made (the host did not call [`Optim::step`]).
    pub fn count_replayed_step(&mut self) {
        match self {
            Optim::Adam(a) => a.count_replayed_step(),
            Optim::RmsProp(r) => r.count_replayed_step(),
        }
    }

    /// The optimiser's name as written in RON.
    pub fn name(&self) -> &'static str {
        match self {
            Optim::Adam(_) => "Adam",
            Optim::RmsProp(_) => "RmsProp",
        }
    }

    /// Refuse to resume from a checkpoint whose optimiser state under `prefix` (`d_adam.` or
    /// `g_adam.`) was written by the other optimiser: Adam saves `m.*` and `v.*`, RMSProp only
    /// `v.*`. `field`: the setting named in the message (`d_step.optimizer`).
    ///
    /// Errors: [`TrainError::OtherOptimizer`].
    pub fn check_resume(&self, ck: &crate::io::checkpoint::Checkpoint, prefix: &str, field: &str) -> Result<(), TrainError> {
        let has_m = ck.tensors.keys().any(|k| k.starts_with(&format!("{prefix}m.")));
        let saved = if has_m { "Adam" } else { "RmsProp" };
        if has_m != matches!(self, Optim::Adam(_)) && !self.params().is_empty() {
            return Err(TrainError::OtherOptimizer { path: ck.path.clone(), saved, field: field.to_string(), wanted: self.name() });
        }
        Ok(())
    }

    /// Clamp every parameter to [−c, c] (WGAN's weight clipping, Arjovsky et al. 2017,
    /// Algorithm 1 line 7), in place.
    pub fn clip(&mut self, c: f64) -> Result<(), tch::TchError> {
        tch::no_grad(|| {
            for (_, p) in self.params_mut() {
                let _ = p.f_clamp_(-c, c)?;
            }
            Ok(())
        })
    }
}

/// What the step stages do when a loss (or, with `Skip`, a gradient) is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub enum NonFinite {
    /// Stop the run with a message naming the step and the stage (the default). On the CPU the
    /// loss is checked after every update; on a GPU the check runs on the device and is read
    /// back at logged steps and before checkpoints, naming the first bad step. A checkpoint is
    /// never written with non-finite weights, so the last one stays good.
    #[default]
    Stop,
    /// Skip the update (no optimiser step) and go on, with a warning; the run stops when
    /// [`MAX_SKIPPED_IN_A_ROW`] updates in a row are skipped. Checks the loss and every
    /// gradient after every update (on a GPU: one read-back per update).
    Skip,
}

/// Consecutive skipped updates after which `on_nonfinite: Skip` gives up.
pub const MAX_SKIPPED_IN_A_ROW: u32 = 20;

/// Settings of the run that the step stages need.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Where the networks live.
    pub device: Device,
    /// Stop after this many generator steps (None: when the data ends).
    pub max_steps: Option<u64>,
    /// Read losses back from the device every this many generator steps (and at the last).
    pub log_every: u64,
    /// Pipeline seed.
    pub seed: u64,
    /// Checkpoints to write (None: none).
    pub checkpoint: Option<Arc<CheckpointPlan>>,
    /// Generator steps already done when this run starts (0, or the step of the checkpoint
    /// it resumes from), and the real images consumed by then.
    pub start_step: u64,
    pub start_images: u64,
    /// When this run started, and the training time of the runs before it (seconds), for the
    /// elapsed time stored in checkpoints.
    pub started: std::time::Instant,
    pub elapsed_before: f64,
    /// What to do with a non-finite loss or gradient.
    pub on_nonfinite: NonFinite,
    /// Test hook (`PIPE_TEST_NONFINITE=STAGE:STEP`, or `STAGE:STEP..`): the stage named makes
    /// its loss NaN at that generator step (`true`: and every later one).
    pub inject_nonfinite: Option<(String, u64, bool)>,
    /// Resumed run: draw the grid of `start_step` first (its PNG was lost when the run died).
    pub sample_at_start: bool,
    /// How the step stages run their updates (graph, bf16, channels_last), `Auto` resolved.
    pub speed: speed::Speed,
    /// On CUDA: the stream both step stages queue their work on (see [`cuda::CudaStream`]);
    /// None on the CPU.
    pub stream: Option<Arc<cuda::CudaStream>>,
    /// Data-parallel runs: the process group the step stages average gradients and logged
    /// losses over (c10d; both stages use it in turn, so the ranks issue the same collectives
    /// in the same order). None in a single-process run.
    pub group: Option<Arc<crate::dist::ProcessGroup>>,
    /// Data-parallel runs: a second group, always Gloo on host tensors, for the host stages
    /// (augment's σ over the global batch), which run alongside the step stages. None in a
    /// single-process run.
    pub host_group: Option<Arc<crate::dist::ProcessGroup>>,
    /// Test hook (`PIPE_TEST_KILL_RANK=RANK:STEP`, fault-injection builds): this rank kills
    /// itself with SIGKILL after generator step STEP, as a crashed machine would.
    pub kill_at: Option<u64>,
}

impl RunSettings {
    /// This process's rank and the world size, from [`RunSettings::group`] (rank 0 of 1 in a
    /// single-process run).
    pub fn shard(&self) -> crate::data::batches::Shard {
        self.group.as_ref().map_or_else(Default::default, |g| crate::data::batches::Shard { rank: g.rank(), world: g.world() })
    }

    /// Settings for a fresh run without checkpoints (tests, tools).
    pub fn new(device: Device, max_steps: Option<u64>, log_every: u64, seed: u64) -> Self {
        RunSettings {
            device,
            max_steps,
            log_every,
            seed,
            checkpoint: None,
            start_step: 0,
            start_images: 0,
            started: std::time::Instant::now(),
            elapsed_before: 0.0,
            on_nonfinite: NonFinite::Stop,
            inject_nonfinite: None,
            sample_at_start: false,
            speed: speed::Speed::default(),
            stream: None,
            group: None,
            host_group: None,
            kill_at: None,
        }
    }

    /// Training time of the whole run so far, seconds.
    pub fn elapsed(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }
}

impl RunSettings {
    /// Is generator step `step` (1-based) one whose figures are read back and logged?
    pub fn logged(&self, step: u64) -> bool {
        step == 1 || step % self.log_every.max(1) == 0 || Some(step) == self.max_steps
    }
}

/// The discriminator side: D (trainable) and a read-only view of G.
pub struct DSide {
    pub d_vs: nn::VarStore,
    pub d: Net,
    pub g_view_vs: nn::VarStore,
    pub g_view: Net,
}

/// The generator side: G (trainable) and a read-only view of D.
pub struct GSide {
    pub g_vs: nn::VarStore,
    pub g: Net,
    pub d_view_vs: nn::VarStore,
    pub d_view: Net,
    /// Latent size.
    pub latent: i64,
    /// Image shape `[C, H, W]` G produces.
    pub image: [i64; 3],
}

/// Make every variable of `view` share storage with the variable of the same name in `owner`,
/// and freeze the view (no gradients for its parameters).
fn alias(view: &mut nn::VarStore, owner: &nn::VarStore) -> Result<(), TrainError> {
    let own = owner.variables();
    for (name, mut v) in view.variables() {
        let src = own.get(&name).ok_or_else(|| TrainError::ViewWithoutOwner(name.clone()))?;
        tch::no_grad(|| v.set_data(src));
    }
    view.freeze();
    Ok(())
}

/// Build G and D on `device` for images `[C, H, W]` and split them into the two sides.
/// Draws the initial weights from torch's generator (seed it first with `tch::manual_seed`).
///
/// Errors: an image shape an architecture cannot take ([`TrainError::Shape`]).
pub fn build_models(g_cfg: &GModel, d_cfg: &DModel, latent: i64, image: [i64; 3], device: Device) -> Result<(DSide, GSide), TrainError> {
    build_models_laid_out(g_cfg, d_cfg, latent, image, device, false)
}

/// [`build_models`], with every 4-D weight (the convolutions') laid out channels_last when
/// `channels_last` (before the views alias them, so the views share the layout).
pub fn build_models_laid_out(
    g_cfg: &GModel,
    d_cfg: &DModel,
    latent: i64,
    image: [i64; 3],
    device: Device,
    channels_last: bool,
) -> Result<(DSide, GSide), TrainError> {
    let g_vs = nn::VarStore::new(device);
    let g = build_g(&g_vs.root(), g_cfg, latent, image)?;
    let d_vs = nn::VarStore::new(device);
    let d = build_d(&d_vs.root(), d_cfg, image)?;
    if channels_last {
        for vs in [&g_vs, &d_vs] {
            let vars = vs.variables();
            cuda::to_channels_last(vars.values())?;
        }
    }
    let mut g_view_vs = nn::VarStore::new(device);
    let g_view = build_g(&g_view_vs.root(), g_cfg, latent, image)?;
    alias(&mut g_view_vs, &g_vs)?;
    let mut d_view_vs = nn::VarStore::new(device);
    let d_view = build_d(&d_view_vs.root(), d_cfg, image)?;
    alias(&mut d_view_vs, &d_vs)?;
    Ok((DSide { d_vs, d, g_view_vs, g_view }, GSide { g_vs, g, d_view_vs, d_view, latent, image }))
}

/// Run `f`, turning a panic inside it (tch's infallible tensor ops panic on a libtorch error,
/// e.g. an allocation failure inside a model's forward pass) into a [`StageError`] holding
/// libtorch's message, first line only.
pub fn catch_torch<T>(f: impl FnOnce() -> Result<T, StageError>) -> Result<T, StageError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(payload) => {
            let m = crate::core::stage::panic_message(&*payload);
            // `Result::unwrap()` on Err(Torch("...")) shows the message escaped, with its C++
            // backtrace after a literal `\n`.
            let inner = m.split_once("Torch(\"").map(|(_, r)| r).unwrap_or(m);
            let first = inner.split("\\n").next().unwrap_or(inner);
            let first = first.strip_suffix("\")").unwrap_or(first);
            Err(StageError::Msg(format!("torch: {}", crate::core::stage::first_line(first))))
        }
    }
}

/// Does libtorch's error text say it ran out of memory (host or GPU)?
pub fn is_oom(text: &str) -> bool {
    ["not enough memory", "can't allocate memory", "out of memory", "CUBLAS_STATUS_ALLOC_FAILED"].iter().any(|k| text.contains(k))
}

/// If `e` is libtorch running out of memory (host or GPU), a message that says so in words,
/// naming the batch size and what to change; otherwise `e` unchanged.
pub fn explain_oom(e: StageError, step: u64, batch: usize) -> StageError {
    let text = e.to_string();
    if !is_oom(&text) {
        return e;
    }
    let asked = text
        .split("allocate ")
        .skip(1)
        .find(|r| r.starts_with(|c: char| c.is_ascii_digit()))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse::<f64>().ok())
        .map(|b| format!(" (it asked for {:.1} GB)", b / 1e9))
        .unwrap_or_default();
    StageError::Msg(format!(
        "out of memory at step {step}{asked} with batches of {batch} images: use a smaller `batch` in the loader (or smaller models); {}",
        crate::core::stage::first_line(&text)
    ))
}

/// Read a scalar tensor (on any device) back to the host: a synchronisation point, so the
/// step stages call it only on logged steps.
pub fn scalar(t: &Tensor) -> Result<f64, tch::TchError> {
    t.f_to_device(Device::Cpu)?.f_double_value(&[])
}

/// Copy a host slice into a device buffer of the same number of elements.
pub fn upload(dst: &mut Tensor, src: &[f32]) -> Result<(), tch::TchError> {
    let host = Tensor::f_from_slice(src)?.f_view(dst.size().as_slice())?;
    dst.f_copy_(&host)
}

#[cfg(test)]
mod tests;

/// Data-parallel runs: average the gradients of `vs`'s trainable variables over the ranks, after
/// the backward pass and before the optimiser step (NVlabs/stylegan3's training loop does the
/// same: flatten, all-reduce the sum, divide by the world size). A no-op in a single process.
/// `what` names the network in the error ("D's gradients").
///
/// Errors: the collective failed (a rank died, or the process group timed out), c10d's message.
///
/// `votes`: flags carried in the same collective and summed over the ranks
/// ([`finite::FiniteGuard::votes`]).
pub(crate) fn average_grads(run: &RunSettings, vs: &nn::VarStore, what: &str, votes: Option<&Tensor>) -> Result<(), StageError> {
    let Some(g) = &run.group else { return Ok(()) };
    g.average_grads(&vs.trainable_variables(), votes)
        .map_err(|e| StageError::msg(format!("averaging {what} over {} ranks: {e}", g.world())))
}

/// Data-parallel runs: average the batch-norm running statistics of `vs` (its floating-point
/// variables without gradients: running_mean and running_var) over the ranks, in place. A no-op
/// in a single process and for networks without batch norm.
///
/// Each rank normalises with its own share of the batch (as DDP without SyncBatchNorm), so each
/// updates its running statistics r ← (1 − m)·r + m·b with its own b. The update is linear, so
/// averaging after every step gives every rank the running statistics a run that averaged them
/// only at checkpoints and samples would have: the mean over the ranks. Every rank calls this at
/// the same point of every step.
///
/// Errors: as [`average_grads`].
pub(crate) fn average_buffers(run: &RunSettings, vs: &nn::VarStore, what: &str) -> Result<(), StageError> {
    let Some(g) = &run.group else { return Ok(()) };
    let mut bufs: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| !t.requires_grad() && t.is_floating_point()).collect();
    if bufs.is_empty() {
        return Ok(());
    }
    bufs.sort_by(|a, b| a.0.cmp(&b.0));
    let flat = Tensor::f_cat(&bufs.iter().map(|(_, t)| t.f_flatten(0, -1)).collect::<Result<Vec<_>, _>>()?, 0)?;
    g.all_reduce_sum(&flat).map_err(|e| StageError::msg(format!("averaging {what} over {} ranks: {e}", g.world())))?;
    let flat = flat.f_div_scalar(g.world() as f64)?;
    let mut at = 0;
    tch::no_grad(|| -> Result<(), tch::TchError> {
        for (_, t) in &mut bufs {
            let n = t.numel() as i64;
            t.f_copy_(&flat.f_narrow(0, at, n)?.f_view_as(t)?)?;
            at += n;
        }
        Ok(())
    })?;
    Ok(())
}

/// Data-parallel runs: the mean of each of `values` over the ranks (for the log; every rank
/// calls this at the same logged steps). A no-op in a single process.
///
/// Errors: as [`average_grads`].
pub(crate) fn average_logged(run: &RunSettings, values: &mut [f64], what: &str) -> Result<(), StageError> {
    let Some(g) = &run.group else { return Ok(()) };
    let t = on_group_device(run, Tensor::from_slice(values).to_kind(Kind::Double))?;
    g.all_reduce_sum(&t).map_err(|e| StageError::msg(format!("averaging {what} over {} ranks: {e}", g.world())))?;
    let t = t.f_to_device(Device::Cpu)?;
    for (i, v) in values.iter_mut().enumerate() {
        *v = t.double_value(&[i as i64]) / g.world() as f64;
    }
    Ok(())
}

/// A draw buffer for `rows` rows of this rank (and its view of them): in a data-parallel run the
/// buffer holds the rows of every rank (`world · rows`), so that one draw from the step's seed
/// gives each rank its own slice of what a single process would draw for the global batch.
/// `row` is the shape of one row (`[latent]`, or `[]`).
pub(crate) fn draw_buffer(run: &RunSettings, rows: i64, row: &[i64]) -> Result<(Tensor, Tensor), tch::TchError> {
    let world = run.shard().world.max(1) as i64;
    let mut shape = vec![rows * world];
    shape.extend_from_slice(row);
    let all = Tensor::f_zeros(shape.as_slice(), (Kind::Float, run.device))?;
    let mine = all.f_narrow(0, run.shard().rank as i64 * rows, rows)?;
    Ok((all, mine))
}

/// Data-parallel runs: check that every rank starts from the same weights (they build G and D
/// from the same seed; a different build, pipeline or resume checkpoint would differ). Compares
/// Σw and Σw² over the variables of `stores`, in f64, with an all-reduce of their maxima and
/// minima. A no-op in a single process.
///
/// Errors: the weights differ (naming the rank), or the collective failed.
pub(crate) fn check_same_weights(run: &RunSettings, stores: &[&nn::VarStore]) -> Result<(), StageError> {
    let Some(g) = &run.group else { return Ok(()) };
    let (mut s1, mut s2) = (0f64, 0f64);
    for vs in stores {
        let mut vars: Vec<_> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (_, v) in vars {
            let v = v.f_to_kind(Kind::Double)?;
            s1 += v.f_sum(Kind::Double)?.f_double_value(&[])?;
            s2 += v.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        }
    }
    let t = on_group_device(run, Tensor::from_slice(&[s1, -s1, s2, -s2]))?;
    g.all_reduce_max(&t).map_err(|e| StageError::msg(format!("comparing the initial weights of {} ranks: {e}", g.world())))?;
    let t = t.f_to_device(Device::Cpu)?;
    let same = t.double_value(&[0]) == s1 && -t.double_value(&[1]) == s1 && t.double_value(&[2]) == s2 && -t.double_value(&[3]) == s2;
    if !same {
        return Err(StageError::msg(format!(
            "rank {} starts from other weights than another rank (Σw = {s1}, Σw² = {s2}): every rank must run the same build, pipeline and checkpoint",
            run.shard().rank
        )));
    }
    Ok(())
}

/// Data-parallel runs: whether `local` holds on any rank (an all-reduce of the flag's maximum;
/// every rank calls this at the same point of the same step). A single process: `local`.
///
/// Errors: the collective failed.
pub(crate) fn agree_any(run: &RunSettings, local: bool, what: &str) -> Result<bool, StageError> {
    let Some(g) = &run.group else { return Ok(local) };
    let t = on_group_device(run, Tensor::from_slice(&[local as u8 as f32]))?;
    g.all_reduce_max(&t).map_err(|e| StageError::msg(format!("agreeing on {what} over {} ranks: {e}", g.world())))?;
    Ok(t.f_to_device(Device::Cpu)?.double_value(&[0]) > 0.0)
}

/// A host tensor moved to where the step stages' group reduces: the run's device (NCCL takes
/// only CUDA tensors; Gloo on the CPU takes host ones).
fn on_group_device(run: &RunSettings, t: Tensor) -> Result<Tensor, tch::TchError> {
    t.f_to_device(run.device)
}
