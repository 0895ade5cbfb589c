//! The `g_step` stage: generator updates, and sample images from a fixed latent batch.
//!
//! Input: `Item::DDone` from `d_step` (one per generator step). Output: `Item::Images` to the
//! sampler when a grid is due. Each generator step:
//!
//! ```text
//! z ~ N(0, I);  L_G = loss(D(G(z)));  θ_G ← optimizer(θ_G, ∇L_G)
//! ```
//! with the loss of [`crate::train::losses::GLoss`]; by default the one that goes with d_step's loss
//! (the non-saturating E softplus(−D(G(z))) for the logistic D of DRAGAN, Goodfellow et al. 2014).
//! Gradients flow through D's view (its weights frozen) into G only.

use crate::io::checkpoint::{self, host_vars, step_seed, Checkpoint, Manifest};
use crate::core::item::{DState, Images, Item, StepReport};
use crate::train::losses::{GLoss, Loss};
use crate::train::models::{build_g, GModel, Net};
use crate::core::ports::{ItemKind, Ports};
use crate::core::problem::Problem;
use crate::kinds::{BuildContext, CheckContext, DataCaps};
use crate::core::stage::{BusMessage, Stage, StageContext, StageError};
use crate::train::cuda::Bf16Autocast;
use crate::train::step::{Ran, StepRunner};
use crate::train::{FiniteGuard, GSide, Optim, Optimizer, RunSettings, TrainError, Verdict};
use crossbeam_channel::Sender;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Settings of the `g_step` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GStepConfig {
    /// Generator architecture: `Mlp(hidden, layers, batch_norm)` (any image shape),
    /// `Dcgan(width, batch_norm)` (square, side 4·2^k) or `InfoGan(width, hidden)` (height and
    /// width multiples of 4). Default `Mlp(hidden: 1024, layers: 2, batch_norm: false)`.
    pub model: GModel,
    /// Size of the latent z ~ N(0, I). Default 100 (the DRAGAN MNIST MLP uses 62).
    pub latent: i64,
    /// G's optimiser. Default `Adam(lr: 1e-4, beta1: 0.5, beta2: 0.9)`.
    pub optimizer: Optimizer,
    /// G's adversarial loss. Default: the one that goes with d_step's `loss` (`NonSaturating`
    /// for `Logistic`, and the loss of the same name for the others); `Minimax` is the other
    /// choice for `Logistic`.
    pub loss: Option<GLoss>,
    /// Keep an exponential moving average of G's weights and draw the sample grids from it,
    /// e.g. `ema: (decay: 0.999)`. Default `None` (off).
    pub ema: Option<EmaConfig>,
}

impl Default for GStepConfig {
    fn default() -> Self {
        GStepConfig { model: GModel::default(), latent: 100, optimizer: Optimizer::default(), loss: None, ema: None }
    }
}

/// Exponential moving average (EMA) of the generator's weights (Yazıcı et al. 2019, "The
/// Unusual Effectiveness of Averaging in GAN Training"; BigGAN's `ema_start`).
///
/// After each G update at generator step t: θ_ema ← β·θ_ema + (1 − β)·θ for the weights when
/// t ≥ `start`, θ_ema ← θ before that; batch-norm running statistics are copied from G.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct EmaConfig {
    /// β in [0, 1). The average spans about 1/(1 − β) steps. Default 0.999.
    pub decay: f64,
    /// Generator step from which averaging starts (before it the EMA copies G). Default 0.
    pub start: u64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        EmaConfig { decay: 0.999, start: 0 }
    }
}

impl GStepConfig {
    /// Check values, naming the field at fault.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs: Vec<Problem> = crate::core::problem::under("model", self.model.problems()).collect();
        if !(1..=65536).contains(&self.latent) {
            errs.push(Problem::new("latent", format!("latent must be in 1..=65536, got {}", self.latent)));
        }
        errs.extend(crate::core::problem::under("optimizer", self.optimizer.problems()));
        if let Some(e) = &self.ema {
            if !(0.0..1.0).contains(&e.decay) {
                errs.push(Problem::new("ema.decay", format!("ema decay must be in [0, 1), got {}", e.decay)));
            }
        }
        errs
    }

    /// [`Self::problems`] as one result: every message, one per line.
    pub fn validate(&self) -> Result<(), crate::core::problem::Problems> {
        crate::core::problem::to_result(self.problems())
    }
}

/// When to generate sample images: `n` images from one fixed latent batch every `every`
/// generator steps and at the last step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleSchedule {
    pub n: usize,
    pub every: u64,
}

/// The fixed latent batch of the sample grids: `[n, latent]` f32 from N(0, 1), drawn from the
/// pipeline seed (so every run of a pipeline shows the same latents).
pub fn fixed_latent(seed: u64, n: usize, latent: i64) -> Vec<f32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5A3B_1E00_0000_0001);
    (0..n * latent as usize).map(|_| StandardNormal.sample(&mut rng)).collect()
}

/// The fixed latents of the eval stage's images: `[n, latent]` f32 from N(0, 1), drawn from the
/// pipeline seed (another stream than [`fixed_latent`]'s).
pub fn eval_latent(seed: u64, n: usize, latent: i64) -> Vec<f32> {
    fixed_latent(seed ^ 0x0E7A_1000_0000_0000, n, latent)
}

/// Spherical linear interpolation (Shoemake 1985; White 2016, "Sampling Generative Networks")
/// between latents `a` and `b` (same length) at `t` in [0, 1]:
/// `sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b`, Ω the angle between `a` and `b`. It follows the
/// great circle, keeping intermediate latents at the typical norm of N(0, I) draws (a straight
/// line would pass through low-norm points G never saw). Falls back to linear interpolation
/// when `a` and `b` are (anti)parallel or zero. Computed in f64.
pub fn slerp(a: &[f32], b: &[f32], t: f64) -> Vec<f32> {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let na = a.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = if na > 0.0 && nb > 0.0 { (dot / (na * nb)).clamp(-1.0, 1.0) } else { 1.0 };
    let omega = cos.acos();
    let (wa, wb) =
        if omega.sin().abs() < 1e-6 { (1.0 - t, t) } else { (((1.0 - t) * omega).sin() / omega.sin(), (t * omega).sin() / omega.sin()) };
    a.iter().zip(b).map(|(&x, &y)| (wa * x as f64 + wb * y as f64) as f32).collect()
}

/// Map generator output in [-1, 1] (any shape, any device) to host u8: round((t + 1)·127.5).
pub fn to_u8(t: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let u = ((t.f_clamp(-1.0, 1.0)? + 1.0) * 127.5).f_round()?.f_to_kind(Kind::Uint8)?.f_to_device(Device::Cpu)?;
    let n = u.numel();
    let mut out = vec![0u8; n];
    u.f_contiguous()?.f_copy_data_u8(&mut out, n)?;
    Ok(out)
}

/// The EMA copy of G: its own variables (frozen), and pairs (EMA variable, G variable,
/// averaged?) for the update.
struct Ema {
    cfg: EmaConfig,
    vs: tch::nn::VarStore,
    net: Net,
    pairs: Vec<(Tensor, Tensor, bool)>,
}

impl Ema {
    fn new(cfg: &EmaConfig, g_cfg: &GModel, side: &GSide) -> Result<Self, StageError> {
        let mut vs = tch::nn::VarStore::new(side.g_vs.device());
        let net = build_g(&vs.root(), g_cfg, side.latent, side.image).map_err(crate::train::TrainError::from)?;
        vs.copy(&side.g_vs)?;
        vs.freeze();
        let g = side.g_vs.variables();
        let mut pairs: Vec<(String, Tensor, Tensor, bool)> = vs
            .variables()
            .into_iter()
            .map(|(n, e)| {
                let src = g[&n].shallow_clone();
                let param = src.requires_grad();
                (n, e, src, param)
            })
            .collect();
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Ema { cfg: cfg.clone(), vs, net, pairs: pairs.into_iter().map(|(_, e, s, p)| (e, s, p)).collect() })
    }

    /// The update after the G update of generator step `step`.
    fn update(&mut self, step: u64) -> Result<(), tch::TchError> {
        let average = step >= self.cfg.start;
        tch::no_grad(|| {
            for (e, src, param) in &mut self.pairs {
                if *param && average {
                    let _ = e.f_lerp_(src, 1.0 - self.cfg.decay)?;
                } else {
                    let _ = e.f_copy_(src)?;
                }
            }
            Ok(())
        })
    }
}

/// The running `g_step` stage. Owns G, its optimiser, a view of D, z and the fixed latent.
pub struct GStep {
    run: RunSettings,
    side: GSide,
    opt: Optim,
    /// The generator loss in use (g_step's `loss`, or the default of d_step's).
    loss: GLoss,
    /// Non-finite losses and gradients (set up when the stage runs).
    guard: Option<FiniteGuard>,
    ema: Option<Ema>,
    baton: Sender<()>,
    schedule: Option<SampleSchedule>,
    fixed_z: Option<Tensor>,
    /// Images for an eval stage: `n` every `every` steps (and at the last step), from the
    /// fixed latents `eval_z` `[n, latent]` on the device.
    eval: Option<SampleSchedule>,
    eval_z: Option<Tensor>,
    /// Latent buffer `[batch, latent]` on the device (static: drawn before each update): this
    /// rank's rows of `z_all`, the draw for every rank (see [`crate::train::draw_buffer`]).
    z: Tensor,
    z_all: Tensor,
    /// The last update's L_G, f32 scalar on the device (static).
    loss_out: Tensor,
    runner: StepRunner,
}

/// Why generator loss `g` cannot train against a D trained with `d`, and what would.
pub fn mismatch(g: GLoss, d: &Loss) -> String {
    let fits: Vec<&str> =
        [GLoss::NonSaturating, GLoss::Minimax, GLoss::Wasserstein, GLoss::Hinge, GLoss::LeastSquares, GLoss::LossSensitive]
            .into_iter()
            .filter(|l| l.pairs_with(d))
            .map(GLoss::name)
            .collect();
    format!(
        "loss {} does not go with d_step's loss {}: D's output means something else to each (a logit, a critic value, a score, a loss); use {} (or leave g_step's loss out to get the matching one)",
        g.name(),
        d.name(),
        fits.join(" or ")
    )
}

impl GStep {
    /// Build the stage around the G side of the models. `baton` tells d_step a generator step
    /// is complete. `schedule`: None when the pipeline has no sampler. `batch`: latents per
    /// generator update (the real batch size B). `resume`: a checkpoint to continue from; G's
    /// variables (`g.*`), Adam state (`g_adam.*`) and EMA (`g_ema.*`, when both the checkpoint
    /// and `cfg` have one; otherwise the EMA starts from G) are loaded from it. `d_loss`:
    /// d_step's loss, which picks G's loss when `cfg.loss` is None.
    ///
    /// Errors: invalid settings; a generator loss that does not go with `d_loss`; a checkpoint
    /// written for another G (naming the tensor and both shapes).
    #[allow(clippy::too_many_arguments)]
    pub fn build(
        cfg: &GStepConfig,
        d_loss: &Loss,
        run: RunSettings,
        side: GSide,
        baton: Sender<()>,
        schedule: Option<SampleSchedule>,
        batch: i64,
        resume: Option<&Checkpoint>,
    ) -> Result<Self, StageError> {
        cfg.validate()?;
        let loss = cfg.loss.unwrap_or_else(|| d_loss.generator_default());
        if !loss.pairs_with(d_loss) {
            return Err(StageError::msg(mismatch(loss, d_loss)));
        }
        let mut opt = cfg.optimizer.build(&side.g_vs)?;
        if let Some(ck) = resume {
            ck.load_vars("g.", &side.g_vs)?;
            opt.check_resume(ck, "g_adam.", "g_step.optimizer")?;
            ck.check_shapes("g_adam.", &opt.state_shapes())?;
            opt.load_state(ck.manifest.g_adam_steps, |n| ck.get("g_adam.", n))?;
        }
        let ema = match &cfg.ema {
            Some(e) => {
                let ema = Ema::new(e, &cfg.model, &side)?;
                if let Some(ck) = resume.filter(|ck| ck.manifest.ema) {
                    ck.load_vars("g_ema.", &ema.vs)?;
                }
                Some(ema)
            }
            None => None,
        };
        let fixed_z = match schedule {
            Some(s) => Some(
                Tensor::f_from_slice(&fixed_latent(run.seed, s.n, side.latent))?
                    .f_view([s.n as i64, side.latent])?
                    .f_to_device(run.device)?,
            ),
            None => None,
        };
        let (z_all, z) = crate::train::draw_buffer(&run, batch, &[side.latent])?;
        let loss_out = Tensor::f_zeros([], (Kind::Float, run.device))?;
        let runner = StepRunner::new(&run.speed)?;
        Ok(GStep { run, side, opt, loss, guard: None, ema, baton, schedule, fixed_z, eval: None, eval_z: None, z, z_all, loss_out, runner })
    }

    /// Also generate images for an eval stage: `s.n` every `s.every` generator steps and at the
    /// last step, always from the same latents ([`eval_latent`]), so the scores of two steps
    /// differ only by G.
    pub fn with_eval(mut self, s: SampleSchedule) -> Result<Self, StageError> {
        let z = Tensor::f_from_slice(&eval_latent(self.run.seed, s.n, self.side.latent))?
            .f_view([s.n as i64, self.side.latent])?
            .f_to_device(self.run.device)?;
        self.eval = Some(s);
        self.eval_z = Some(z);
        Ok(self)
    }

    /// The eval images of step `step`: G (the EMA when there is one, batch norm in eval mode)
    /// on the eval latents, 500 at a time.
    fn eval_images(&self, step: u64, last: bool) -> Result<Option<Images>, StageError> {
        let Some(z) = &self.eval_z else { return Ok(None) };
        let net = self.ema.as_ref().map(|e| &e.net).unwrap_or(&self.side.g);
        let n = z.size()[0];
        let (mut data, mut shape) = (Vec::new(), [0usize; 4]);
        let mut start = 0;
        while start < n {
            let len = 500.min(n - start);
            let out = tch::no_grad(|| net.forward(&z.narrow(0, start, len), false));
            let s = out.size();
            shape = [n as usize, s[1] as usize, s[2] as usize, s[3] as usize];
            data.extend(to_u8(&out)?);
            start += len;
        }
        Ok(Some(Images { step, shape, data, last }))
    }

    /// The trained network's variables (tests).
    #[cfg(test)]
    pub(crate) fn g_vars(&self) -> &tch::nn::VarStore {
        &self.side.g_vs
    }

    /// Set up what needs the stage's name (the non-finite guard and its test hook); the stage's
    /// thread calls it first.
    pub(crate) fn start(&mut self, stage: &str) {
        self.guard = Some(FiniteGuard::new(&self.run, stage));
    }

    /// The generator update of step `step` on a fresh z in the owned buffer (drawn from torch's
    /// generator seeded with [`step_seed`]`(seed, step, u32::MAX)`), then the EMA update.
    /// Returns L_G as a device scalar.
    pub(crate) fn update(&mut self, step: u64) -> Result<(), StageError> {
        tch::manual_seed(step_seed(self.run.seed, step, u32::MAX));
        let _ = self.z_all.f_normal_(0.0, 1.0)?;
        self.guard.as_mut().expect("guard set when the stage runs").begin(step, self.run.device).map_err(TrainError::from)?;
        let mut runner = std::mem::take(&mut self.runner);
        let ran = runner.run(|| self.body(step));
        self.runner = runner;
        if self.run.kill_at == Some(step) {
            // The test hook: die as a crashed machine would (no unwinding, no drain).
            let _ = std::process::Command::new("kill").args(["-KILL", &std::process::id().to_string()]).status();
        }
        if ran? == Ran::Replayed {
            self.opt.count_replayed_step();
        }
        // Data-parallel: every rank's G holds the same running statistics (batch norm), so the
        // grids, evaluations and checkpoints use their mean over the ranks.
        crate::train::average_buffers(&self.run, &self.side.g_vs, "G's batch-norm statistics")?;
        // The EMA's schedule (copy before `start`, average after) is decided on the host, so it
        // runs after the captured part.
        if let Some(ema) = &mut self.ema {
            ema.update(step)?;
        }
        Ok(())
    }

    /// The capturable part of a G update (see [`crate::train::step`]): reads the static z,
    /// leaves L_G in `loss_out`. `step` only names the step in messages (eager checks).
    fn body(&mut self, step: u64) -> Result<(), StageError> {
        let bf16 = self.run.speed.bf16;
        let out = {
            let _ac = if bf16 { Some(Bf16Autocast::on().map_err(TrainError::from)?) } else { None };
            let fake = self.side.g.forward(&self.z, true);
            self.side.d_view.forward(&fake, true)
        };
        let out = if bf16 { out.to_kind(Kind::Float) } else { out };
        let guard = self.guard.as_mut().expect("guard set when the stage runs");
        let loss = guard.maybe_poison(self.loss.g_loss(&out)?);
        self.opt.zero_grad();
        loss.f_backward()?;
        let votes = guard.votes(&loss, false)?;
        crate::train::average_grads(&self.run, &self.side.g_vs, "G's gradients", votes.as_ref())?;
        if guard.check(&loss, &mut self.opt, step, "generator loss")? == Verdict::Step {
            self.opt.step()?;
        }
        self.loss_out.f_copy_(&loss.f_detach()?)?;
        Ok(())
    }

    /// Write the checkpoint of step `step` from D's half and this stage's state. Returns the
    /// file written.
    fn checkpoint(&self, report: &StepReport, logged: bool, d: DState) -> Result<std::path::PathBuf, StageError> {
        let (step, images) = (report.step, report.images);
        let plan = self.run.checkpoint.as_ref().ok_or_else(|| StageError::msg("internal: a checkpoint without a plan"))?;
        let mut tensors = d.tensors;
        tensors.extend(host_vars(&self.side.g_vs, "g.")?);
        let (adam, g_adam_steps) = self.opt.state()?;
        tensors.extend(adam.into_iter().map(|(n, t)| (format!("g_adam.{n}"), t)));
        if let Some(ema) = &self.ema {
            tensors.extend(host_vars(&ema.vs, "g_ema.")?);
        }
        let manifest = Manifest {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            step,
            images,
            elapsed_s: self.run.elapsed(),
            seed: self.run.seed,
            data: d.data,
            g_adam_steps,
            d_adam_steps: d.adam_steps,
            image: plan.image,
            latent: plan.latent,
            ema: self.ema.is_some(),
            pipeline: plan.pipeline.clone(),
            crc32: 0,
            pipe_version: env!("CARGO_PKG_VERSION").into(),
            last: d.last,
            losses: logged.then_some(checkpoint::Losses {
                d_loss: report.d_loss,
                g_loss: report.g_loss,
                penalty: report.penalty,
                grad_norm: report.grad_norm.is_finite().then_some(report.grad_norm),
            }),
        };
        checkpoint::write(&plan.dir, manifest, &tensors, plan.keep).map_err(StageError::from)
    }

    /// Generate the sample images from the fixed latent (batch norm in eval mode), with the
    /// EMA generator when there is one.
    fn sample(&self, step: u64, last: bool) -> Result<Option<Images>, StageError> {
        let Some(z) = &self.fixed_z else { return Ok(None) };
        let net = self.ema.as_ref().map(|e| &e.net).unwrap_or(&self.side.g);
        let out = tch::no_grad(|| net.forward(z, false));
        let s = out.size();
        Ok(Some(Images { step, shape: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize], data: to_u8(&out)?, last }))
    }
}

impl Stage for GStep {
    fn run(mut self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        self.start(&ctx.name);
        if let Some(stream) = &self.run.stream {
            stream.make_current().map_err(TrainError::from)?;
        }
        let mut warned_skips = 0u64;
        let mut last_sampled = 0u64;
        let mut step = 0u64;
        if self.run.sample_at_start {
            // A resumed run whose checkpoint step lost its grid (killed before the sampler wrote it).
            if let Some(im) = self.sample(self.run.start_step, false)? {
                let _ = ctx.send(Item::Images(im));
            }
        }
        while let Some(item) = ctx.recv() {
            let Item::DDone { mut report, logged, last, state } = item else {
                return Err(StageError::msg(format!("g_step expects `d_done` from d_step, got `{}`", item.kind())));
            };
            step = report.step;
            let batch = self.z.size()[0] as usize;
            crate::train::catch_torch(|| self.update(step)).map_err(|e| crate::train::explain_oom(e, step, batch))?;
            if let Some(why) = self.runner.fell_back.take() {
                ctx.bus.warn(crate::train::step::fell_back_warning(&why));
            }
            if logged {
                let mut g = [crate::train::scalar(&self.loss_out)?];
                crate::train::average_logged(&self.run, &mut g, "G's logged loss")?;
                report.g_loss = g[0];
            }
            let guard = self.guard.as_ref().expect("set above");
            if guard.skipped > warned_skips {
                warned_skips = guard.skipped;
                ctx.bus.warn(format!("step {step}: non-finite generator loss or gradient: update skipped ({} so far)", guard.skipped));
            }
            if logged || state.is_some() {
                guard.verify("generator loss")?;
            }
            let is_last = last || Some(step) == self.run.max_steps;
            // No new evaluation once a stop was asked for (the eval stage would skip it).
            let eval_due = self.eval.is_some_and(|s| step % s.every.max(1) == 0 || is_last) && !ctx.draining();
            if logged {
                ctx.bus.post(BusMessage::Progress { report, logged });
            } else {
                ctx.bus.offer(BusMessage::Progress { report, logged });
            }
            if let Some(d) = state {
                let path = self.checkpoint(&report, logged, *d)?;
                ctx.bus.wrote(path);
            }
            if eval_due {
                if let Some(im) = self.eval_images(step, is_last)? {
                    let _ = ctx.send(Item::EvalImages(im));
                }
            }
            if let Some(s) = self.schedule {
                if step % s.every.max(1) == 0 || is_last {
                    if let Some(im) = self.sample(step, is_last)? {
                        last_sampled = step;
                        let _ = ctx.send(Item::Images(im));
                    }
                }
            }
            let _ = self.baton.send(());
        }
        // EOS: make sure the last step has a grid (runs ended by epochs or a graceful stop).
        if step > 0 && last_sampled != step && !ctx.aborted() {
            if let Some(im) = self.sample(step, true)? {
                let _ = ctx.send(Item::Images(im));
            }
        }
        Ok(())
    }
}

impl crate::kinds::Kind for GStepConfig {
    const NAME: &'static str = "GStep";
    const PORTS: Ports = Ports::filter(
        (ItemKind::DDone, "d_done from d_step"),
        (ItemKind::Images, "images[n,C,H,W] u8 in [0, 255] on cpu (n = sampler grid²)"),
    );

    fn validate(&self, _cx: &CheckContext<'_>) -> Vec<Problem> {
        self.problems()
    }

    fn negotiate(&self, data: &DataCaps<'_>) -> Vec<Problem> {
        crate::kinds::training::model_problems(self.model.arch(), self.model.has_batch_norm_1d(), data)
    }

    /// G's side of the models, the baton's sending end, d_step's loss and the images the
    /// sampler and the eval stage ask for come from the training pair.
    fn build(&self, cx: &mut BuildContext<'_>) -> Result<Box<dyn Stage>, StageError> {
        let t = cx.training()?;
        let (side, baton) = t.take_g()?;
        let (d_loss, grid, eval) = (t.d_loss.clone(), t.grid, t.eval);
        let g = GStep::build(self, &d_loss, cx.run.clone(), side, baton, grid, cx.batch as i64, cx.resume)?;
        Ok(Box::new(match eval {
            Some(e) => g.with_eval(e)?,
            None => g,
        }))
    }
}

#[cfg(test)]
mod tests;
