//! The `d_step` stage: discriminator updates with a gradient penalty.
//!
//! Input: `Item::Batch` from `augment` (x, and x̂ when the penalty is DRAGAN's). Output:
//! `Item::DDone` to `g_step` once per generator step, after `n_critic` D updates.
//! Each D update (Kodali et al. 2017, Algorithm 1; Arjovsky et al. 2017, Algorithm 1 for the
//! clipping):
//!
//! ```text
//! z ~ N(0, I);  fake = G(z)   (no gradient into G)
//! L_D = loss(D(x), D(fake)) + penalty        (loss: see crate::train::losses; default Logistic)
//! θ_D ← optimizer(θ_D, ∇L_D)
//! θ_D ← clamp(θ_D, −c, c)                      (only with constraint Clip(c))
//! ```

use crate::io::checkpoint::{host_vars, step_seed, Checkpoint};
use crate::train::dragan::{gradient_penalty, interpolate};
use crate::core::item::DataPosition;
use crate::core::item::{DState, Item, StepReport};
use crate::train::losses::Loss;
use crate::train::models::DModel;
use crate::core::ports::{ItemKind, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext, DataCaps};
use crate::core::stage::{Sent, Stage, StageContext, StageError};
use crate::train::cuda::Bf16Autocast;
use crate::train::feed::Feeder;
use crate::train::step::{Ran, StepRunner};
use crate::train::{catch_torch, explain_oom, scalar, DSide, FiniteGuard, Optim, Optimizer, RunSettings, TrainError, Verdict};
use crossbeam_channel::Receiver;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Weight and target of a gradient penalty λ·E[(‖∇ₓD(x̂)‖₂ − k)²].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GpConfig {
    /// λ ≥ 0. Default 10 (DRAGAN and WGAN-GP).
    pub lambda: f64,
    /// Target gradient norm k. Default 1.
    pub k: f64,
}

impl Default for GpConfig {
    fn default() -> Self {
        GpConfig { lambda: 10.0, k: 1.0 }
    }
}

/// Gradient penalty of the discriminator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Penalty {
    /// No penalty: the plain (non-saturating) GAN.
    None,
    /// DRAGAN (Kodali et al. 2017, eq. 1): x̂ near the real data, drawn by `augment`'s
    /// `perturb: Dragan(..)`.
    Dragan(GpConfig),
    /// WGAN-GP (Gulrajani et al. 2017, eq. 3): x̂ = ε·x + (1 − ε)·G(z), ε ~ U[0,1) per sample,
    /// drawn here on the device.
    WganGp(GpConfig),
}

impl Default for Penalty {
    fn default() -> Self {
        Penalty::Dragan(GpConfig::default())
    }
}

impl Penalty {
    /// λ and k, if there is a penalty.
    pub fn weights(&self) -> Option<&GpConfig> {
        match self {
            Penalty::None => None,
            Penalty::Dragan(g) | Penalty::WganGp(g) => Some(g),
        }
    }
}

/// A hard constraint on D's weights, applied after each D update.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, Default)]
pub enum Constraint {
    /// None (the default).
    #[default]
    None,
    /// WGAN's weight clipping (Arjovsky et al. 2017, Algorithm 1): every trainable weight and
    /// bias of D is clamped to [−c, c] after each D update (batch-norm running statistics are
    /// not weights and are left alone).
    Clip(ClipConfig),
}

/// Settings of weight clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClipConfig {
    /// The bound c > 0. Default 0.01 (WGAN).
    pub c: f64,
}

impl Default for ClipConfig {
    fn default() -> Self {
        ClipConfig { c: 0.01 }
    }
}

/// Settings of the `d_step` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DStepConfig {
    /// Discriminator architecture: `Mlp(hidden, layers, batch_norm)` (any image shape),
    /// `Dcgan(width, batch_norm)` (square, side 4·2^k) or `InfoGan(width, hidden)` (height and
    /// width multiples of 4). Default `Mlp(hidden: 1024, layers: 2, batch_norm: false)`.
    pub model: DModel,
    /// D's adversarial loss: `Logistic` (DRAGAN, the vanilla GAN), `Wasserstein` (WGAN, WGAN-GP),
    /// `Hinge`, `LeastSquares` (LSGAN) or `LossSensitive(margin, gamma)` (LS-GAN); the formulas
    /// are in pipelines/compare.md.
    /// Default `Logistic`.
    pub loss: Loss,
    /// Gradient penalty. Default `Dragan(lambda: 10.0, k: 1.0)`.
    pub penalty: Penalty,
    /// A constraint on D's weights after each update: `None` or `Clip(c: 0.01)` (WGAN's weight
    /// clipping). Default `None`.
    pub constraint: Constraint,
    /// D's optimiser. Default `Adam(lr: 1e-4, beta1: 0.5, beta2: 0.9)`.
    pub optimizer: Optimizer,
    /// D updates (each on a new real batch) per generator step, 1 to 1000. Default 1.
    pub n_critic: u32,
}

impl Default for DStepConfig {
    fn default() -> Self {
        DStepConfig {
            model: DModel::default(),
            loss: Loss::default(),
            penalty: Penalty::default(),
            constraint: Constraint::default(),
            optimizer: Optimizer::default(),
            n_critic: 1,
        }
    }
}

impl DStepConfig {
    /// Check values, naming the field at fault.
    /// Every problem is reported, one per line.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if let Some(g) = self.penalty.weights() {
            if !(g.lambda >= 0.0 && g.lambda.is_finite()) {
                errs.push(Problem::new("penalty.lambda", format!("penalty lambda must be ≥ 0, got {}", g.lambda)));
            }
            if !g.k.is_finite() || g.k < 0.0 {
                errs.push(Problem::new("penalty.k", format!("penalty k must be ≥ 0, got {}", g.k)));
            }
        }
        errs.extend(crate::core::problem::under("model", self.model.problems()));
        errs.extend(crate::core::problem::under("loss", self.loss.problems()));
        if let Constraint::Clip(c) = &self.constraint {
            if !(c.c > 0.0 && c.c.is_finite()) {
                errs.push(Problem::new("constraint.c", format!("constraint Clip: `c` must be a finite number > 0, got {}", c.c)));
            }
        }
        if self.n_critic == 0 || self.n_critic > 1000 {
            errs.push(Problem::new("n_critic", format!("n_critic must be 1 to 1000, got {}", self.n_critic)));
        }
        errs.extend(crate::core::problem::under("optimizer", self.optimizer.problems()));
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

/// The running `d_step` stage. Owns D, its optimiser, a view of G, and its device buffers.
pub struct DStep {
    cfg: DStepConfig,
    run: RunSettings,
    side: DSide,
    opt: Optim,
    /// Non-finite losses and gradients (set up when the stage runs: it needs the stage name).
    guard: Option<FiniteGuard>,
    latent: i64,
    baton: Receiver<()>,
    /// Static device buffers, allocated on the first batch (again if its shape changes): the
    /// inputs x, x̂, z and WGAN-GP's ε, and the outputs of the last update.
    bufs: Option<DBuffers>,
    runner: StepRunner,
    feeder: Feeder,
    /// The stage's drain flag (a stop asked for), set when the stage runs: a data-parallel
    /// update votes with it.
    drain: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Data-parallel runs: the last update's votes, all-reduced ([`FiniteGuard::votes`]); its
    /// second value counts the ranks asking to stop.
    votes: Option<Tensor>,
}

/// d_step's static device buffers (see [`crate::train::step`]).
struct DBuffers {
    /// Real images `[B, C, H, W]` f32 in [-1, 1] (channels_last with `memory_format`).
    x: Tensor,
    /// DRAGAN's x̂ near the real data, same shape (None without `perturb: Dragan`).
    x_hat: Option<Tensor>,
    /// Latents `[B, latent]` f32 ~ N(0, I), drawn before each update: this rank's rows of
    /// `z_all`, the draw for every rank's batch (see [`crate::train::draw_buffer`]).
    z: Tensor,
    z_all: Tensor,
    /// WGAN-GP's ε `[B]` ~ U[0, 1), drawn before each update (None for other penalties), with
    /// the draw for every rank.
    eps: Option<(Tensor, Tensor)>,
    /// The last update's L_D (without the penalty), penalty and mean ‖∇ₓD(x̂)‖: f32 scalars.
    loss: Tensor,
    penalty: Tensor,
    norm: Tensor,
}

impl DStep {
    /// Build the stage around the D side of the models. `baton` is signalled by g_step after
    /// each generator step. `resume`: a checkpoint to continue from; D's variables (`d.*`) and
    /// Adam state (`d_adam.*`) are loaded from it.
    ///
    /// Errors: invalid settings; a checkpoint written for another D (naming the tensor and
    /// both shapes); the CUDA graph or copy stream of `run.speed` cannot be made.
    pub fn build(
        cfg: &DStepConfig,
        run: RunSettings,
        side: DSide,
        latent: i64,
        baton: Receiver<()>,
        resume: Option<&Checkpoint>,
    ) -> Result<Self, StageError> {
        cfg.validate()?;
        let mut opt = cfg.optimizer.build(&side.d_vs)?;
        if let Some(ck) = resume {
            ck.load_vars("d.", &side.d_vs)?;
            opt.check_resume(ck, "d_adam.", "d_step.optimizer")?;
            ck.check_shapes("d_adam.", &opt.state_shapes())?;
            opt.load_state(ck.manifest.d_adam_steps, |n| ck.get("d_adam.", n))?;
        }
        let runner = StepRunner::new(&run.speed)?;
        let feeder = Feeder::new(run.device)?;
        Ok(DStep { cfg: cfg.clone(), run, side, opt, guard: None, latent, baton, bufs: None, runner, feeder, drain: None, votes: None })
    }

    /// D's half of a checkpoint: its variables and Adam state on the host.
    fn state(&self, data: DataPosition, last: bool) -> Result<DState, StageError> {
        let mut tensors = host_vars(&self.side.d_vs, "d.")?;
        let (adam, adam_steps) = self.opt.state()?;
        tensors.extend(adam.into_iter().map(|(n, t)| (format!("d_adam.{n}"), t)));
        Ok(DState { tensors, adam_steps, data, last })
    }

    /// The trained network's variables (tests).
    #[cfg(test)]
    pub(crate) fn d_vars(&self) -> &tch::nn::VarStore {
        &self.side.d_vs
    }

    /// Set up what needs the stage's name (the non-finite guard and its test hook); the stage's
    /// thread calls it first.
    pub(crate) fn start(&mut self, stage: &str) {
        self.guard = Some(FiniteGuard::new(&self.run, stage));
    }

    /// D update `k` (0-based) of generator step `step` on the batch in the static buffers,
    /// leaving (gan loss, penalty, mean grad norm) in the output buffers. Its random draws (z,
    /// and WGAN-GP's ε) come from torch's generator seeded with [`step_seed`]`(seed, step, k)`,
    /// before the body ([`Self::body`]), which [`StepRunner`] runs, captures or replays.
    pub(crate) fn update(&mut self, step: u64, k: u32) -> Result<(), StageError> {
        let b = self.bufs.as_mut().expect("buffers set before update");
        tch::manual_seed(step_seed(self.run.seed, step, k));
        let _ = b.z_all.f_normal_(0.0, 1.0)?;
        if let Some((eps_all, _)) = &mut b.eps {
            let _ = eps_all.f_uniform_(0.0, 1.0)?;
        }
        self.guard.as_mut().expect("guard set when the stage runs").begin(step, self.run.device).map_err(TrainError::from)?;
        let mut runner = std::mem::take(&mut self.runner);
        let ran = runner.run(|| self.body(step));
        self.runner = runner;
        if ran? == Ran::Replayed {
            self.opt.count_replayed_step();
        }
        Ok(())
    }

    /// The capturable part of a D update: reads only the static buffers (see
    /// [`crate::train::step`]). `step` only names the step in messages (eager checks).
    fn body(&mut self, step: u64) -> Result<(), StageError> {
        let dev = self.run.device;
        let bf16 = self.run.speed.bf16;
        let b = self.bufs.as_ref().expect("buffers set before update");
        let (x, z) = (&b.x, &b.z);
        let d = &self.side.d;
        let f32_of = |t: Tensor| if bf16 { t.to_kind(Kind::Float) } else { t };
        let (d_real, d_fake, fake) = {
            let _ac = if bf16 { Some(Bf16Autocast::on().map_err(TrainError::from)?) } else { None };
            let fake = tch::no_grad(|| self.side.g_view.forward(z, true));
            let (d_real, d_fake) = d.forward_two(x, &fake, true)?;
            (d_real, d_fake, fake)
        };
        let fake = f32_of(fake);
        let loss = self.cfg.loss.d_loss(&f32_of(d_real), &f32_of(d_fake), x, &fake)?;
        let d_of = |t: &Tensor| {
            let _ac = if bf16 { Bf16Autocast::on().ok() } else { None };
            f32_of(d.forward_for_input_grad(t, true))
        };
        let (penalty, norm) = match &self.cfg.penalty {
            Penalty::None => (Tensor::f_zeros([], (Kind::Float, dev))?, Tensor::f_full([], f64::NAN, (Kind::Float, dev))?),
            Penalty::Dragan(g) => {
                let xh = b
                    .x_hat
                    .as_ref()
                    .ok_or_else(|| StageError::msg("penalty Dragan needs x̂ from augment: set augment's `perturb: Dragan(..)`"))?;
                gradient_penalty(d_of, xh, g.lambda, g.k)?
            }
            Penalty::WganGp(g) => {
                let (_, eps) = b.eps.as_ref().expect("ε buffer set with penalty WganGp");
                let xh = interpolate(x, &fake, eps)?;
                gradient_penalty(d_of, &xh, g.lambda, g.k)?
            }
        };
        let guard = self.guard.as_mut().expect("guard set when the stage runs");
        let loss = guard.maybe_poison(loss);
        let total = &loss + &penalty;
        self.opt.zero_grad();
        total.f_backward()?;
        // Data-parallel: a non-finite loss and a stop asked for ride in the gradients' all-reduce.
        let stop = self.drain.as_ref().is_some_and(|d| d.load(std::sync::atomic::Ordering::SeqCst));
        self.votes = guard.votes(&total, stop)?;
        crate::train::average_grads(&self.run, &self.side.d_vs, "D's gradients", self.votes.as_ref())?;
        if guard.check(&total, &mut self.opt, step, "discriminator loss")? == Verdict::Step {
            self.opt.step()?;
            if let Constraint::Clip(c) = &self.cfg.constraint {
                self.opt.clip(c.c)?;
            }
        }
        let b = self.bufs.as_mut().expect("buffers set before update");
        b.loss.f_copy_(&loss.f_detach()?)?;
        b.penalty.f_copy_(&penalty.f_detach()?)?;
        b.norm.f_copy_(&norm)?;
        Ok(())
    }

    /// The outputs of the last update, read back (a synchronisation on a GPU): (L_D, penalty,
    /// mean grad norm).
    fn read_outputs(&self) -> Result<(f64, f64, f64), StageError> {
        let b = self.bufs.as_ref().expect("an update ran");
        let mut v = [scalar(&b.loss)?, scalar(&b.penalty)?, scalar(&b.norm)?];
        crate::train::average_logged(&self.run, &mut v, "D's logged losses")?;
        Ok((v[0], v[1], v[2]))
    }

    /// The static buffers for batches of `shape` (with x̂ or not), made anew when they differ
    /// from the current ones (a graph captured on the old ones is then dropped).
    fn buffers_for(&mut self, shape: &[i64], x_hat: bool) -> Result<(), StageError> {
        let fits = self.bufs.as_ref().is_some_and(|b| b.x.size() == shape && b.x_hat.is_some() == x_hat);
        if fits {
            return Ok(());
        }
        let dev = self.run.device;
        let f32s = (Kind::Float, dev);
        let x = Tensor::f_zeros(shape, f32s)?;
        let x_hat = if x_hat { Some(Tensor::f_zeros(shape, f32s)?) } else { None };
        if self.run.speed.channels_last && shape.len() == 4 {
            crate::train::cuda::to_channels_last(std::iter::once(&x).chain(x_hat.iter())).map_err(TrainError::from)?;
        }
        let eps = match self.cfg.penalty {
            Penalty::WganGp(_) => Some(crate::train::draw_buffer(&self.run, shape[0], &[])?),
            _ => None,
        };
        let (z_all, z) = crate::train::draw_buffer(&self.run, shape[0], &[self.latent])?;
        let (loss, penalty, norm) = (Tensor::f_zeros([], f32s)?, Tensor::f_zeros([], f32s)?, Tensor::f_zeros([], f32s)?);
        if self.bufs.is_some() {
            self.runner = StepRunner::new(&self.run.speed)?;
        }
        self.bufs = Some(DBuffers { x, x_hat, z, z_all, eps, loss, penalty, norm });
        Ok(())
    }

    /// Start moving a batch towards the device (CUDA: overlapping the step in flight).
    fn stage(&mut self, b: &crate::core::item::HostBatch) -> Result<(), StageError> {
        let shape: Vec<i64> = b.shape.iter().map(|&v| v as i64).collect();
        let mut srcs: Vec<&[f32]> = vec![&b.x];
        srcs.extend(b.x_hat.as_deref());
        let shapes = vec![shape; srcs.len()];
        Ok(self.feeder.stage(&srcs, &shapes)?)
    }

    pub(crate) fn load(&mut self, b: &crate::core::item::HostBatch) -> Result<(), StageError> {
        let shape: Vec<i64> = b.shape.iter().map(|&v| v as i64).collect();
        self.buffers_for(&shape, b.x_hat.is_some())?;
        let bufs = self.bufs.as_mut().expect("allocated above");
        let mut dsts: Vec<&mut Tensor> = vec![&mut bufs.x];
        dsts.extend(bufs.x_hat.as_mut());
        let mut srcs: Vec<&[f32]> = vec![&b.x];
        srcs.extend(b.x_hat.as_deref());
        Ok(self.feeder.load(&mut dsts, &srcs)?)
    }
}

/// Adds the time since `.1` to the stage's hand-over wait when dropped.
struct WaitGuard<'a>(&'a crate::core::stage::StageStats, std::time::Instant);
impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.add_wait_handover(self.1.elapsed());
    }
}

impl Stage for DStep {
    fn run(mut self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        self.start(&ctx.name);
        self.drain = Some(ctx.drain.clone());
        if let Some(stream) = &self.run.stream {
            stream.make_current().map_err(TrainError::from)?;
        }
        // Data-parallel: every rank starts from the same G and D (a no-op in one process).
        crate::train::check_same_weights(&self.run, &[&self.side.d_vs, &self.side.g_view_vs])?;
        let mut warned_skips = 0u64;
        let first = self.run.start_step;
        let mut step: u64 = first;
        let mut images: u64 = self.run.start_images;
        let mut position = DataPosition::default();
        let max_steps = self.run.max_steps;
        let at_max = move |step: u64| max_steps.is_some_and(|m| step >= m);
        // One batch of lookahead, so that the last step (data ended, or a stop was asked for)
        // is known when it is reported: it is always logged and sampled.
        let mut pending = if at_max(step) { None } else { ctx.recv() };
        'steps: loop {
            // A stop asked for before the first step; in a data-parallel run all ranks agree.
            if at_max(step) || (step == first && crate::train::agree_any(&self.run, ctx.draining(), "the ranks' stop")?) {
                break;
            }
            if step > first {
                // Wait until g_step has finished the previous generator step.
                let t = std::time::Instant::now();
                let _count = WaitGuard(&ctx.stats, t);
                loop {
                    match self.baton.recv_timeout(std::time::Duration::from_millis(100)) {
                        Ok(()) => break,
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) if !ctx.aborted() => continue,
                        _ => break 'steps,
                    }
                }
            }
            let mut updated = false;
            for k in 0..self.cfg.n_critic {
                let Some(item) = pending.take().or_else(|| ctx.recv()) else { break 'steps };
                let Item::Batch(b) = item else {
                    return Err(StageError::msg(format!("d_step expects batches of real images, got `{}`", item.kind())));
                };
                let n = b.shape[0];
                self.load(&b).map_err(|e| explain_oom(e, step + 1, n))?;
                // Real images over all ranks (this rank's share × the world size).
                images += (n * self.run.shard().world.max(1)) as u64;
                position = b.position_after();
                catch_torch(|| self.update(step + 1, k)).map_err(|e| explain_oom(e, step + 1, n))?;
                if let Some(why) = self.runner.fell_back.take() {
                    ctx.bus.warn(crate::train::step::fell_back_warning(&why));
                }
                updated = true;
            }
            step += 1;
            // Data-parallel: every rank's D holds the same running statistics (batch norm).
            crate::train::average_buffers(&self.run, &self.side.d_vs, "D's batch-norm statistics")?;
            // Data-parallel: the ranks end at the same step (an interrupt reaches them at
            // slightly different times), or their collectives would no longer pair up. The
            // step count and the data are the same on every rank; a stop asked for is voted on
            // in the last update's all-reduce, read back every step on the CPU and at logged
            // steps on a GPU (where reading it costs a synchronisation).
            let asked = match &self.votes {
                None => ctx.draining(),
                Some(v) if !self.run.device.is_cuda() || self.run.logged(step) => {
                    v.f_narrow(0, 1, 1)?.f_to_device(tch::Device::Cpu)?.f_double_value(&[0])? > 0.0
                }
                Some(_) => false,
            };
            let end = at_max(step) || asked || {
                pending = ctx.recv();
                pending.is_none()
            };
            // Upload the next batch while the device runs this step (CUDA).
            if let Some(Item::Batch(b)) = &pending {
                let n = b.shape[0];
                self.stage(b).map_err(|e| explain_oom(e, step + 1, n))?;
            }
            let logged = self.run.logged(step) || end;
            let mut report = StepReport { step, images, grad_norm: f64::NAN, ..Default::default() };
            if logged {
                debug_assert!(updated, "n_critic ≥ 1");
                (report.d_loss, report.penalty, report.grad_norm) = self.read_outputs()?;
            }
            let guard = self.guard.as_ref().expect("set above");
            if guard.skipped > warned_skips {
                warned_skips = guard.skipped;
                ctx.bus.warn(format!("step {step}: non-finite discriminator loss or gradient: update skipped ({} so far)", guard.skipped));
            }
            let checkpoint_due = self.run.checkpoint.as_ref().is_some_and(|p| p.due(step, end));
            if logged || checkpoint_due {
                guard.verify("discriminator loss")?;
            }
            let state = if checkpoint_due { Some(Box::new(self.state(position, end)?)) } else { None };
            if ctx.send(Item::DDone { report, logged, last: end, state }) == Sent::Closed || end {
                break;
            }
        }
        Ok(())
    }
}

impl DStepConfig {
    /// Combinations of loss, penalty, constraint and model that make no sense, explained.
    /// `upstream_xhat`: whether a stage upstream draws x̂ (DRAGAN's penalty needs it).
    pub fn method_problems(&self, upstream_xhat: bool) -> Vec<Problem> {
        let mut errs = vec![];
        let penalty = match &self.penalty {
            Penalty::None => None,
            Penalty::Dragan(_) => Some("Dragan"),
            Penalty::WganGp(_) => Some("WganGp"),
        };
        if matches!(self.penalty, Penalty::Dragan(_)) && !upstream_xhat {
            errs.push(Problem::new("penalty", "penalty Dragan needs x̂ near the real data, but no Augment stage upstream has `perturb: Dragan(..)`; add one, or use penalty WganGp or None"));
        }
        // A penalty of weight 0 constrains nothing.
        let constrained_by_penalty = self.penalty.weights().is_some_and(|g| g.lambda > 0.0);
        if let Some(pen) = penalty {
            if self.model.has_batch_norm() {
                errs.push(Problem::new("model.batch_norm", format!(
                    "model has batch_norm with penalty {pen}: the penalty constrains ‖∇ₓD(x̂ᵢ)‖ sample by sample, but batch norm makes each D(x̂ᵢ) depend on the whole batch, so the gradient is not the sample's own (Gulrajani et al. 2017, §4); set batch_norm: false, or penalty None"
                )));
            }
            if matches!(self.constraint, Constraint::Clip(_)) {
                errs.push(Problem::new("constraint", format!(
                    "constraint Clip with penalty {pen}: both bound D's Lipschitz constant, and clipping the weights fights the penalty (WGAN-GP replaces clipping, Gulrajani et al. 2017, §3); keep one: constraint None, or penalty None"
                )));
            }
        }
        if self.loss == Loss::Wasserstein && !constrained_by_penalty && self.constraint == Constraint::None {
            errs.push(Problem::new("loss", format!(
                "loss Wasserstein without a Lipschitz constraint{}: the critic's outputs grow without bound and the loss means nothing; add constraint Clip(c: 0.01) (WGAN) or penalty WganGp(lambda: 10.0) (WGAN-GP)",
                match self.penalty.weights() {
                    Some(g) => format!(" (the penalty's lambda is {}, so it constrains nothing)", g.lambda),
                    None => String::new(),
                }
            )));
        }
        errs
    }
}

impl crate::kinds::Kind for DStepConfig {
    const NAME: &'static str = "DStep";
    const PORTS: Ports = Ports::filter(
        (
            ItemKind::Batch,
            "batch[B,C,H,W] f32 in [-1, 1] on cpu, copied to the training device; x̂ needed by penalty Dragan; Dcgan needs H = W = 4·2^k, InfoGan H and W multiples of 4",
        ),
        (ItemKind::DDone, "d_done: one per generator step, losses as f64 on cpu"),
    );

    /// [`DStepConfig::problems`], then [`DStepConfig::method_problems`] when the values are fine.
    fn validate(&self, cx: &CheckContext<'_>) -> Vec<Problem> {
        let mut v = self.problems();
        v.extend(self.method_problems(cx.upstream_xhat));
        v
    }

    fn negotiate(&self, data: &DataCaps<'_>) -> Vec<Problem> {
        crate::kinds::training::model_problems(self.model.arch(), self.model.has_batch_norm_1d(), data)
    }

    /// D's side of the models and the baton's receiving end come from the training pair.
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        let t = cx.training()?;
        let (side, baton) = t.take_d()?;
        let latent = t.latent;
        Ok(Box::new(DStep::build(self, cx.run.clone(), side, latent, baton, cx.resume)?))
    }
}
