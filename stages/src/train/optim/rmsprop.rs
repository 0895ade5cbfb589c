//! RMSProp over the trainable variables of a [`nn::VarStore`], with its state in the open (so
//! checkpoints hold it, as for [`crate::train::optim::adam::Adam`]).
//!
//! The update is PyTorch's `torch.optim.RMSprop` without momentum and not centred (Tieleman &
//! Hinton 2012, lecture 6.5), the optimiser of WGAN (Arjovsky et al. 2017, Algorithm 1). For
//! each parameter θ with gradient g:
//!
//! ```text
//! g ← g + wd·θ                     (only when wd > 0)
//! v ← α·v + (1 − α)·g²
//! θ ← θ − lr · g / (√v + ε)
//! ```

use crate::train::TrainError;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

/// RMSProp settings (PyTorch's `RMSprop` without momentum, not centred).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RmsPropConfig {
    /// Learning rate, > 0. Default 5e-5 (WGAN, Arjovsky et al. 2017).
    pub lr: f64,
    /// Smoothing constant α of the running mean of g², in [0, 1). Default 0.99 (PyTorch's).
    pub alpha: f64,
    /// ε added to the denominator, > 0. Default 1e-8.
    pub eps: f64,
    /// L2 weight decay added to the gradient, ≥ 0. Default 0.
    pub weight_decay: f64,
}

impl Default for RmsPropConfig {
    fn default() -> Self {
        RmsPropConfig { lr: 5e-5, alpha: 0.99, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// RMSProp's state for one network: the parameters (aliases of the VarStore's tensors), the
/// running mean of squared gradients `v` (same shapes, dtype and device, starting at 0) and
/// the number of steps taken.
pub struct RmsProp {
    cfg: RmsPropConfig,
    /// (name in the VarStore, parameter), sorted by name.
    params: Vec<(String, Tensor)>,
    v: Vec<Tensor>,
    /// A buffer per parameter for the denominator, so a step allocates nothing.
    scratch: Vec<Tensor>,
    steps: u64,
}

impl RmsProp {
    /// RMSProp over every variable of `vs` that requires a gradient, v = 0, step count 0.
    pub fn new(cfg: &RmsPropConfig, vs: &nn::VarStore) -> Result<Self, tch::TchError> {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let v = params.iter().map(|(_, p)| p.f_zeros_like()).collect::<Result<_, _>>()?;
        let scratch = params.iter().map(|(_, p)| p.f_empty_like()).collect::<Result<_, _>>()?;
        Ok(RmsProp { cfg: cfg.clone(), params, v, scratch, steps: 0 })
    }

    /// The parameters this optimiser updates, sorted by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The same, to update in place (zeroing gradients, clipping).
    pub(crate) fn params_mut(&mut self) -> &mut [(String, Tensor)] {
        &mut self.params
    }

    /// One update from the gradients left by `backward`; parameters without a gradient are
    /// left alone.
    pub fn step(&mut self) -> Result<(), tch::TchError> {
        self.steps += 1;
        let RmsPropConfig { lr, alpha, eps, weight_decay } = self.cfg;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for ((_, p), (v, denom)) in self.params.iter_mut().zip(self.v.iter_mut().zip(self.scratch.iter_mut())) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = if weight_decay != 0.0 { g.f_add(&(&*p * weight_decay))? } else { g };
                // v ← αv + (1−α)g², as (1−α)·(v·α/(1−α) + g·g): in-place kernels only.
                let _ = v.f_mul_scalar_(alpha / (1.0 - alpha))?;
                let _ = v.f_addcmul_(&g, &g)?;
                let _ = v.f_mul_scalar_(1.0 - alpha)?;
                // θ ← θ + g / d with d = −(√v + ε)/lr.
                let _ = v.f_sqrt_out(denom)?;
                let _ = denom.f_add_scalar_(eps)?;
                let _ = denom.f_mul_scalar_(-1.0 / lr)?;
                let _ = p.f_addcdiv_(&g, denom)?;
            }
            Ok(())
        })
    }

    /// Count an update that ran without [`RmsProp::step`] on the host (a replayed CUDA graph).
    pub fn count_replayed_step(&mut self) {
        self.steps += 1;
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state to save: `v.<name>` for every parameter, as host `f32` copies sorted by name;
    /// plus the step count.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64), tch::TchError> {
        let mut out = Vec::with_capacity(self.params.len());
        for ((name, _), v) in self.params.iter().zip(&self.v) {
            out.push((format!("v.{name}"), v.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?));
        }
        Ok((out, self.steps))
    }

    /// Names and shapes of the state tensors [`RmsProp::state`] gives.
    pub fn state_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.params.iter().map(|(n, p)| (format!("v.{n}"), p.size())).collect()
    }

    /// Restore v and the step count; `get(name)` returns the saved tensor of each name of
    /// [`RmsProp::state_shapes`]. Errors name a missing tensor or a wrong shape
    /// ([`TrainError::MissingState`], [`TrainError::StateShape`], [`TrainError::StateCopy`]).
    pub fn load_state(&mut self, steps: u64, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<(), TrainError> {
        for ((name, _), v) in self.params.iter().zip(self.v.iter_mut()) {
            let key = format!("v.{name}");
            let src = get(&key).ok_or_else(|| TrainError::MissingState(key.clone()))?;
            if src.size() != v.size() {
                return Err(TrainError::StateShape { name: key, saved: src.size(), expected: v.size() });
            }
            tch::no_grad(|| v.f_copy_(&src)).map_err(|source| TrainError::StateCopy { name: key, source })?;
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::Device;

    fn cfg(wd: f64) -> RmsPropConfig {
        RmsPropConfig { lr: 0.01, alpha: 0.9, eps: 1e-8, weight_decay: wd }
    }

    #[test]
    fn first_two_steps_match_hand_computed_values() {
        // θ₀ = 1, L = 3θ: g = 3, v₁ = 0.1·9 = 0.9, θ₁ = 1 − 0.01·3/√0.9;
        // v₂ = 0.9·0.9 + 0.9 = 1.71, θ₂ = θ₁ − 0.01·3/√1.71.
        let vs = nn::VarStore::new(Device::Cpu);
        let p = vs.root().var("w", &[1], nn::Init::Const(1.0));
        let mut opt = RmsProp::new(&cfg(0.0), &vs).unwrap();
        let mut want = 1.0f64;
        for v in [0.9f64, 1.71] {
            crate::train::optim::adam::zero_grads(&mut opt.params);
            (&p * 3.0).sum(Kind::Float).backward();
            opt.step().unwrap();
            want -= 0.01 * 3.0 / (v.sqrt() + 1e-8);
            assert!((p.double_value(&[0]) - want).abs() < 1e-6, "{} vs {want}", p.double_value(&[0]));
        }
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn matches_libtorch_rmsprop_and_resumes() {
        for wd in [0.0, 0.01] {
            tch::manual_seed(4);
            let a = nn::VarStore::new(Device::Cpu);
            let net_a = nn::linear(a.root() / "l", 5, 3, Default::default());
            let mut b = nn::VarStore::new(Device::Cpu);
            let net_b = nn::linear(b.root() / "l", 5, 3, Default::default());
            b.copy(&a).unwrap();
            let mut ours = RmsProp::new(&cfg(wd), &a).unwrap();
            let mut theirs = nn::RmsProp { alpha: 0.9, eps: 1e-8, wd, momentum: 0.0, centered: false }.build(&b, 0.01).unwrap();
            let xs: Vec<Tensor> = (0..20).map(|i| Tensor::randn([4, 5], (Kind::Float, Device::Cpu)) * (1 + i % 3)).collect();
            for x in &xs {
                crate::train::optim::adam::zero_grads(&mut ours.params);
                net_a.forward(x).pow_tensor_scalar(2).mean(Kind::Float).backward();
                ours.step().unwrap();
                theirs.zero_grad();
                net_b.forward(x).pow_tensor_scalar(2).mean(Kind::Float).backward();
                theirs.step();
            }
            for (name, t) in a.variables() {
                let diff = (&t - &b.variables()[&name]).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "wd {wd}: {name} differs by {diff}");
            }
            // State round trip: a copy restored from the saved state takes the same next step.
            let (state, steps) = ours.state().unwrap();
            assert_eq!(state.iter().map(|(n, t)| (n.clone(), t.size())).collect::<Vec<_>>(), ours.state_shapes());
            let mut c = nn::VarStore::new(Device::Cpu);
            let net_c = nn::linear(c.root() / "l", 5, 3, Default::default());
            c.copy(&a).unwrap();
            let mut restored = RmsProp::new(&cfg(wd), &c).unwrap();
            restored.load_state(steps, |n| state.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone())).unwrap();
            for (opt, net) in [(&mut ours, &net_a), (&mut restored, &net_c)] {
                crate::train::optim::adam::zero_grads(&mut opt.params);
                net.forward(&xs[0]).pow_tensor_scalar(2).mean(Kind::Float).backward();
                opt.step().unwrap();
            }
            for (name, t) in a.variables() {
                assert!(t.equal(&c.variables()[&name]), "{name} differs after resuming");
            }
            let e = restored.load_state(1, |_| Some(Tensor::zeros([7], (Kind::Float, Device::Cpu)))).unwrap_err().to_string();
            assert!(e.contains("tensor `v.l.bias`: saved [7], expected [3]"), "{e}");
        }
    }
}
