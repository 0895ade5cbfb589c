//! What d_step and g_step share: optimiser settings, run settings, the two networks and the
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

use crate::adam::Adam;
use crate::checkpoint::CheckpointPlan;
use crate::models::{build_d, build_g, DModel, GModel, Net};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tch::nn;
use tch::{Device, Tensor};

/// Optimiser of a step stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Optimizer {
    /// Adam (Kingma & Ba 2015). DRAGAN's defaults: lr 1e-4, β = (0.5, 0.9).
    Adam(AdamConfig),
}

impl Default for Optimizer {
    fn default() -> Self {
        Optimizer::Adam(AdamConfig::default())
    }
}

/// Adam settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AdamConfig {
    /// Learning rate, > 0. Default 1e-4 (DRAGAN).
    pub lr: f64,
    /// β₁ in [0, 1). Default 0.5.
    pub beta1: f64,
    /// β₂ in [0, 1). Default 0.9.
    pub beta2: f64,
    /// ε added to the denominator. Default 1e-8.
    pub eps: f64,
    /// L2 weight decay added to the gradient. Default 0.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-4, beta1: 0.5, beta2: 0.9, eps: 1e-8, weight_decay: 0.0 }
    }
}

impl Optimizer {
    /// Check the values, naming the field at fault.
    pub fn validate(&self) -> Result<(), String> {
        let Optimizer::Adam(a) = self;
        let mut errs = vec![];
        if !(a.lr > 0.0 && a.lr.is_finite()) {
            errs.push(format!("optimizer lr must be a finite number > 0, got {}", a.lr));
        }
        for (n, b) in [("beta1", a.beta1), ("beta2", a.beta2)] {
            if !(0.0..1.0).contains(&b) {
                errs.push(format!("optimizer {n} must be in [0, 1), got {b}"));
            }
        }
        if !(a.eps > 0.0 && a.eps.is_finite()) {
            errs.push(format!("optimizer eps must be > 0, got {}", a.eps));
        }
        if !(a.weight_decay >= 0.0 && a.weight_decay.is_finite()) {
            errs.push(format!("optimizer weight_decay must be ≥ 0, got {}", a.weight_decay));
        }
        crate::stage::problems(errs)
    }

    /// Build the optimiser over the trainable variables of `vs` (fresh state).
    pub fn build(&self, vs: &nn::VarStore) -> Result<Adam, tch::TchError> {
        let Optimizer::Adam(a) = self;
        Adam::new(a, vs)
    }
}

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
}

impl RunSettings {
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
fn alias(view: &mut nn::VarStore, owner: &nn::VarStore) -> Result<(), String> {
    let own = owner.variables();
    for (name, mut v) in view.variables() {
        let src = own.get(&name).ok_or_else(|| format!("internal: view variable {name} has no owner"))?;
        tch::no_grad(|| v.set_data(src));
    }
    view.freeze();
    Ok(())
}

/// Build G and D on `device` for images `[C, H, W]` and split them into the two sides.
/// Draws the initial weights from torch's generator (seed it first with `tch::manual_seed`).
pub fn build_models(g_cfg: &GModel, d_cfg: &DModel, latent: i64, image: [i64; 3], device: Device) -> Result<(DSide, GSide), String> {
    let g_vs = nn::VarStore::new(device);
    let g = build_g(&g_vs.root(), g_cfg, latent, image)?;
    let d_vs = nn::VarStore::new(device);
    let d = build_d(&d_vs.root(), d_cfg, image)?;
    let mut g_view_vs = nn::VarStore::new(device);
    let g_view = build_g(&g_view_vs.root(), g_cfg, latent, image)?;
    alias(&mut g_view_vs, &g_vs)?;
    let mut d_view_vs = nn::VarStore::new(device);
    let d_view = build_d(&d_view_vs.root(), d_cfg, image)?;
    alias(&mut d_view_vs, &d_vs)?;
    Ok((DSide { d_vs, d, g_view_vs, g_view }, GSide { g_vs, g, d_view_vs, d_view, latent, image }))
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
mod tests {
    use super::*;
    use crate::models::MlpConfig;

    #[test]
    fn views_alias_the_owner_weights_and_are_frozen() {
        let m = MlpConfig { hidden: 8, layers: 1 };
        let (ds, gs) = build_models(&GModel::Mlp(m.clone()), &DModel::Mlp(m), 4, [1, 4, 4], Device::Cpu).unwrap();
        let own = gs.g_vs.variables();
        for (name, v) in ds.g_view_vs.variables() {
            assert!(!v.requires_grad(), "{name} in the view must be frozen");
            assert_eq!(v.data_ptr(), own[&name].data_ptr(), "{name} must share storage");
        }
        // An update of D is seen by the D view.
        let mut d_vars = ds.d_vs.variables();
        let w = d_vars.get_mut("out.weight").unwrap();
        tch::no_grad(|| {
            let _ = w.fill_(0.25);
        });
        assert_eq!(gs.d_view_vs.variables()["out.weight"].double_value(&[0, 0]), 0.25);
    }

    #[test]
    fn optimizer_values_are_checked() {
        assert!(Optimizer::default().validate().is_ok());
        let bad = Optimizer::Adam(AdamConfig { lr: 0.0, ..Default::default() });
        assert!(bad.validate().unwrap_err().contains("lr must be a finite number > 0, got 0"));
        // Every problem, one per line.
        let bad = Optimizer::Adam(AdamConfig { lr: -1.0, beta1: 2.0, eps: 0.0, ..Default::default() });
        assert_eq!(bad.validate().unwrap_err().lines().count(), 3);
        let bad = Optimizer::Adam(AdamConfig { beta2: 1.0, ..Default::default() });
        assert!(bad.validate().unwrap_err().contains("beta2"));
    }
}
