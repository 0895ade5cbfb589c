//! The `g_step` stage: generator updates, and sample images from a fixed latent batch.
//!
//! Input: `Item::DDone` from `d_step` (one per generator step). Output: `Item::Images` to the
//! sampler when a grid is due. Each generator step (non-saturating loss, Goodfellow et al. 2014):
//!
//! ```text
//! z ~ N(0, I);  L_G = mean softplus(−D(G(z)));  θ_G ← Adam(θ_G, ∇L_G)
//! ```
//! Gradients flow through D's view (its weights frozen) into G only.

use crate::dragan::g_loss_ns;
use crate::item::{Images, Item};
use crate::models::GModel;
use crate::stage::{BusMessage, Stage, StageContext, StageError};
use crate::train::{GSide, Optimizer, RunSettings};
use crossbeam_channel::Sender;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// Settings of the `g_step` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct GStepConfig {
    /// Generator architecture. Default `Mlp(hidden: 1024, layers: 2)`.
    pub model: GModel,
    /// Size of the latent z ~ N(0, I). Default 100 (the DRAGAN MNIST MLP uses 62).
    pub latent: i64,
    /// G's optimiser. Default `Adam(lr: 1e-4, beta1: 0.5, beta2: 0.9)`.
    pub optimizer: Optimizer,
}

impl Default for GStepConfig {
    fn default() -> Self {
        GStepConfig { model: GModel::default(), latent: 100, optimizer: Optimizer::default() }
    }
}

impl GStepConfig {
    /// Check values, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let mut errs: Vec<String> = self.model.validate().err().into_iter().collect();
        if !(1..=65536).contains(&self.latent) {
            errs.push(format!("latent must be in 1..=65536, got {}", self.latent));
        }
        errs.extend(self.optimizer.validate().err());
        crate::stage::problems(errs)
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

/// Map generator output in [-1, 1] (any shape, any device) to host u8: round((t + 1)·127.5).
pub fn to_u8(t: &Tensor) -> Result<Vec<u8>, tch::TchError> {
    let u = ((t.f_clamp(-1.0, 1.0)? + 1.0) * 127.5).f_round()?.f_to_kind(Kind::Uint8)?.f_to_device(Device::Cpu)?;
    let n = u.numel();
    let mut out = vec![0u8; n];
    u.f_contiguous()?.f_copy_data_u8(&mut out, n)?;
    Ok(out)
}

/// The running `g_step` stage. Owns G, its optimiser, a view of D, z and the fixed latent.
pub struct GStep {
    run: RunSettings,
    side: GSide,
    opt: tch::nn::Optimizer,
    baton: Sender<()>,
    schedule: Option<SampleSchedule>,
    fixed_z: Option<Tensor>,
    /// Latent buffer `[batch, latent]` on the device.
    z: Tensor,
}

impl GStep {
    /// Build the stage around the G side of the models. `baton` tells d_step a generator step
    /// is complete. `schedule`: None when the pipeline has no sampler. `batch`: latents per
    /// generator update (the real batch size B).
    pub fn build(
        cfg: &GStepConfig,
        run: RunSettings,
        side: GSide,
        baton: Sender<()>,
        schedule: Option<SampleSchedule>,
        batch: i64,
    ) -> Result<Self, StageError> {
        cfg.validate().map_err(StageError::Msg)?;
        let opt = cfg.optimizer.build(&side.g_vs)?;
        let fixed_z = match schedule {
            Some(s) => Some(
                Tensor::f_from_slice(&fixed_latent(run.seed, s.n, side.latent))?
                    .f_view([s.n as i64, side.latent])?
                    .f_to_device(run.device)?,
            ),
            None => None,
        };
        let z = Tensor::f_zeros([batch, side.latent], (Kind::Float, run.device))?;
        Ok(GStep { run, side, opt, baton, schedule, fixed_z, z })
    }

    /// One generator update on a fresh z in the owned buffer. Returns L_G as a device scalar.
    fn update(&mut self) -> Result<Tensor, StageError> {
        let _ = self.z.f_normal_(0.0, 1.0)?;
        let z = &self.z;
        let fake = self.side.g.forward(z, true);
        let loss = g_loss_ns(&self.side.d_view.forward(&fake, true))?;
        self.opt.zero_grad();
        loss.f_backward()?;
        self.opt.step();
        Ok(loss.f_detach()?)
    }

    /// Generate the sample images from the fixed latent (batch norm in eval mode).
    fn sample(&self, step: u64, last: bool) -> Result<Option<Images>, StageError> {
        let Some(z) = &self.fixed_z else { return Ok(None) };
        let out = tch::no_grad(|| self.side.g.forward(z, false));
        let s = out.size();
        Ok(Some(Images { step, shape: [s[0] as usize, s[1] as usize, s[2] as usize, s[3] as usize], data: to_u8(&out)?, last }))
    }
}

impl Stage for GStep {
    fn run(mut self: Box<Self>, ctx: StageContext) -> Result<(), StageError> {
        let mut last_sampled = 0u64;
        let mut step = 0u64;
        while let Some(item) = ctx.recv() {
            let Item::DDone { mut report, logged, last } = item else {
                return Err(StageError::msg(format!("g_step expects `d_done` from d_step, got `{}`", item.kind())));
            };
            step = report.step;
            let loss = self.update()?;
            if logged {
                report.g_loss = crate::train::scalar(&loss)?;
                if !report.g_loss.is_finite() {
                    return Err(StageError::msg(format!("non-finite generator loss at step {step}: lower the learning rate")));
                }
            }
            if logged {
                ctx.bus.post(BusMessage::Progress { report, logged });
            } else {
                ctx.bus.offer(BusMessage::Progress { report, logged });
            }
            let is_last = last || Some(step) == self.run.max_steps;
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
