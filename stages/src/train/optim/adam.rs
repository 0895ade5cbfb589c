//! Adam over the trainable variables of a [`nn::VarStore`], with its state in the open.
//!
//! tch's `nn::Optimizer` keeps Adam's moments inside libtorch where they cannot be read or set,
//! so a checkpoint could not hold them. This one owns its moment tensors (on the parameters'
//! device), so they can be saved and restored exactly.
//!
//! The update is PyTorch's `torch.optim.Adam` (single-tensor form; Kingma & Ba 2015,
//! Algorithm 1, with L2 weight decay added to the gradient). For each parameter θ with
//! gradient g, at step t (from 1):
//!
//! ```text
//! g ← g + wd·θ                                  (only when wd > 0)
//! m ← β₁·m + (1 − β₁)·g
//! v ← β₂·v + (1 − β₂)·g²
//! θ ← θ − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
//! ```

use crate::train::TrainError;
use serde::{Deserialize, Serialize};
use tch::{nn, Kind, Tensor};

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
    /// Update all parameters at once with ATen's fused multi-tensor kernel (PyTorch's
    /// `Adam(fused=True)`; same maths, sums in another order) instead of a few kernels per
    /// parameter. Default: on (see [`AdamConfig::fused_on`]).
    pub fused: Option<bool>,
}

impl AdamConfig {
    /// Whether the fused kernel is used: `fused`, or by default yes.
    pub fn fused_on(&self) -> bool {
        self.fused.unwrap_or(true)
    }
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-4, beta1: 0.5, beta2: 0.9, eps: 1e-8, weight_decay: 0.0, fused: None }
    }
}

/// Adam's state for one network: the parameters (aliases of the VarStore's tensors), first and
/// second moments `m`, `v` (same shapes, dtype and device as the parameters, starting at 0), and
/// the number of steps taken.
pub struct Adam {
    cfg: AdamConfig,
    /// (name in the VarStore, parameter), sorted by name.
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// A buffer per parameter for the denominator, so a step allocates nothing.
    scratch: Vec<Tensor>,
    steps: u64,
    /// The step number t as a one-element f32 tensor on the parameters' device, for the fused
    /// kernel, incremented on the device by each update (None: the per-parameter update, whose
    /// bias correction is computed on the host and so cannot be captured in a CUDA graph).
    fused_t: Option<Tensor>,
}

impl Adam {
    /// Adam over every variable of `vs` that requires a gradient (batch-norm running
    /// statistics do not), with zero moments and step count 0.
    pub fn new(cfg: &AdamConfig, vs: &nn::VarStore) -> Result<Self, tch::TchError> {
        let mut params: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let mut m = Vec::with_capacity(params.len());
        let mut v = Vec::with_capacity(params.len());
        let mut scratch = Vec::with_capacity(params.len());
        for (_, p) in &params {
            m.push(p.f_zeros_like()?);
            v.push(p.f_zeros_like()?);
            scratch.push(p.f_empty_like()?);
        }
        let fused_t = match (cfg.fused_on(), params.first()) {
            (true, Some((_, p))) => Some(Tensor::f_zeros([1], (Kind::Float, p.device()))?),
            _ => None,
        };
        Ok(Adam { cfg: cfg.clone(), params, m, v, scratch, steps: 0, fused_t })
    }

    /// Zero every parameter's gradient (where one exists).
    pub fn zero_grad(&mut self) {
        zero_grads(&mut self.params);
    }

    /// One Adam update from the gradients left by `backward`. Parameters without a gradient
    /// are left alone (their moments too), as in PyTorch.
    pub fn step(&mut self) -> Result<(), tch::TchError> {
        self.steps += 1;
        let t = self.steps as i32;
        let AdamConfig { lr, beta1, beta2, eps, weight_decay, .. } = self.cfg;
        if let Some(t_dev) = &mut self.fused_t {
            // t on the device counts up by itself (exact in f32 up to 2^24 steps), so a captured
            // update replays with the right bias correction.
            let _ = t_dev.f_add_scalar_(1.0)?;
            let mut held: Vec<(usize, Tensor)> = vec![];
            for (i, (_, p)) in self.params.iter().enumerate() {
                let g = p.grad();
                if g.defined() {
                    held.push((i, g));
                }
            }
            fn pick<'a>(held: &[(usize, Tensor)], ts: &'a [Tensor]) -> Vec<&'a Tensor> {
                held.iter().map(|(i, _)| &ts[*i]).collect()
            }
            let params: Vec<&Tensor> = held.iter().map(|(i, _)| &self.params[*i].1).collect();
            let grads: Vec<&Tensor> = held.iter().map(|(_, g)| g).collect();
            let steps: Vec<&Tensor> = held.iter().map(|_| &*t_dev).collect();
            let h = crate::train::shim::AdamHyper { lr, beta1, beta2, weight_decay, eps };
            return crate::train::shim::fused_adam(&params, &grads, &pick(&held, &self.m), &pick(&held, &self.v), &steps, h)
                .map_err(|e| tch::TchError::Torch(e.to_string()));
        }
        let bias1 = 1.0 - beta1.powi(t);
        let bias2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        let step_size = lr / bias1;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            let state = self.m.iter_mut().zip(self.v.iter_mut()).zip(self.scratch.iter_mut());
            for ((_, p), ((m, v), denom)) in self.params.iter_mut().zip(state) {
                let g = p.grad();
                if !g.defined() {
                    continue;
                }
                let g = if weight_decay != 0.0 { g.f_add(&(&*p * weight_decay))? } else { g };
                // m ← β₁m + (1−β₁)g
                let _ = m.f_lerp_(&g, 1.0 - beta1)?;
                // v ← β₂v + (1−β₂)g², as (1−β₂)·(v·β₂/(1−β₂) + g·g): in-place kernels only.
                let _ = v.f_mul_scalar_(beta2 / (1.0 - beta2))?;
                let _ = v.f_addcmul_(&g, &g)?;
                let _ = v.f_mul_scalar_(1.0 - beta2)?;
                // θ ← θ + m / d with d = −(√v/√(1−β₂ᵗ) + ε)/step_size.
                let _ = v.f_sqrt_out(denom)?;
                let _ = denom.f_mul_scalar_(-1.0 / (bias2_sqrt * step_size))?;
                let _ = denom.f_add_scalar_(-eps / step_size)?;
                let _ = p.f_addcdiv_(m, denom)?;
            }
            Ok(())
        })
    }

    /// The parameters it updates, (name, tensor) sorted by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// The same, to update in place (zeroing gradients, clipping).
    pub(crate) fn params_mut(&mut self) -> &mut [(String, Tensor)] {
        &mut self.params
    }

    /// Steps taken so far (t of the last update).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The state to save: `m.<name>` and `v.<name>` for every parameter, as host `f32` copies,
    /// sorted by name; plus the step count.
    pub fn state(&self) -> Result<(Vec<(String, Tensor)>, u64), tch::TchError> {
        let mut out = Vec::with_capacity(2 * self.params.len());
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter().zip(self.v.iter())) {
            out.push((format!("m.{name}"), m.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?));
            out.push((format!("v.{name}"), v.f_to_device(tch::Device::Cpu)?.f_to_kind(Kind::Float)?));
        }
        Ok((out, self.steps))
    }

    /// Names of the state tensors [`Adam::state`] gives and [`Adam::load_state`] takes, with
    /// their shapes.
    pub fn state_shapes(&self) -> Vec<(String, Vec<i64>)> {
        self.params.iter().flat_map(|(n, p)| [(format!("m.{n}"), p.size()), (format!("v.{n}"), p.size())]).collect()
    }

    /// Restore moments and step count. `get(name)` returns the saved tensor for each name of
    /// [`Adam::state_shapes`]; shapes were checked by the caller (an error here otherwise).
    ///
    /// Errors: [`TrainError::MissingState`], [`TrainError::StateShape`],
    /// [`TrainError::StateCopy`], naming the tensor.
    pub fn load_state(&mut self, steps: u64, mut get: impl FnMut(&str) -> Option<Tensor>) -> Result<(), TrainError> {
        for ((name, _), (m, v)) in self.params.iter().zip(self.m.iter_mut().zip(self.v.iter_mut())) {
            for (prefix, dst) in [("m", &mut *m), ("v", &mut *v)] {
                let key = format!("{prefix}.{name}");
                let src = get(&key).ok_or_else(|| TrainError::MissingState(key.clone()))?;
                if src.size() != dst.size() {
                    return Err(TrainError::StateShape { name: key, saved: src.size(), expected: dst.size() });
                }
                tch::no_grad(|| dst.f_copy_(&src)).map_err(|source| TrainError::StateCopy { name: key, source })?;
            }
        }
        self.steps = steps;
        if let Some(t) = &mut self.fused_t {
            let _ = t.f_fill_(steps as f64)?;
        }
        Ok(())
    }

    /// Count an update that ran without [`Adam::step`] on the host: a replay of a captured
    /// update (its device step count moved on by itself).
    pub fn count_replayed_step(&mut self) {
        self.steps += 1;
    }

    /// Whether an update can be captured in a CUDA graph: only the fused kernel keeps its step
    /// count on the device.
    pub fn capturable(&self) -> bool {
        self.fused_t.is_some() || self.params.is_empty()
    }
}

/// Drop the gradient of every parameter (set to none; see [`crate::train::cuda::grads_to_none`]).
pub fn zero_grads(params: &mut [(String, Tensor)]) {
    // As PyTorch's zero_grad(set_to_none=True): the next backward writes fresh gradients
    // (the same values as adding into zeros, without the fill and the add).
    crate::train::cuda::grads_to_none(params.iter().map(|(_, p)| p));
}

/// True when the gradient of every parameter that has one is finite (no NaN or ±Inf). Reads
/// one value back from the device.
pub fn grads_finite(params: &[(String, Tensor)]) -> Result<bool, tch::TchError> {
    let mut all = vec![];
    for (_, p) in params {
        let g = p.grad();
        if g.defined() {
            all.push(g.f_isfinite()?.f_all()?);
        }
    }
    if all.is_empty() {
        return Ok(true);
    }
    Ok(Tensor::f_stack(&all, 0)?.f_all()?.f_to_device(tch::Device::Cpu)?.f_int64_value(&[])? != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{Module, OptimizerConfig};
    use tch::Device;

    fn cfg(wd: f64) -> AdamConfig {
        AdamConfig { lr: 0.1, beta1: 0.5, beta2: 0.9, eps: 1e-8, weight_decay: wd, fused: Some(false) }
    }

    fn fused(wd: f64) -> AdamConfig {
        AdamConfig { fused: Some(true), ..cfg(wd) }
    }

    #[test]
    fn first_two_steps_match_hand_computed_values() {
        // One scalar parameter θ₀ = 1 and loss L = 3θ (g = 3 each step).
        for c in [cfg(0.0), fused(0.0)] {
            let vs = nn::VarStore::new(Device::Cpu);
            let p = vs.root().var("w", &[1], nn::Init::Const(1.0));
            let mut opt = Adam::new(&c, &vs).unwrap();
            let mut theta = 1.0f64;
            let (mut m, mut v) = (0.0f64, 0.0f64);
            for t in 1..=2 {
                opt.zero_grad();
                (&p * 3.0).sum(Kind::Float).backward();
                opt.step().unwrap();
                m = 0.5 * m + 0.5 * 3.0;
                v = 0.9 * v + 0.1 * 9.0;
                let mh = m / (1.0 - 0.5f64.powi(t));
                let vh = v / (1.0 - 0.9f64.powi(t));
                theta -= 0.1 * mh / (vh.sqrt() + 1e-8);
                assert!((p.double_value(&[0]) - theta).abs() < 1e-6, "step {t}: {} vs {theta}", p.double_value(&[0]));
            }
            // With a constant gradient Adam moves by ≈ lr per step.
            assert!((theta - 0.8).abs() < 1e-6);
            assert_eq!(opt.steps(), 2);
        }
    }

    #[test]
    fn matches_libtorch_adam_over_many_steps() {
        // Same network, same gradients: this Adam and tch's (libtorch's C++ Adam) agree.
        for (wd, is_fused) in [(0.0, false), (0.01, false), (0.0, true), (0.01, true)] {
            tch::manual_seed(3);
            let a = nn::VarStore::new(Device::Cpu);
            let net_a = nn::linear(a.root() / "l", 5, 3, Default::default());
            let mut b = nn::VarStore::new(Device::Cpu);
            let net_b = nn::linear(b.root() / "l", 5, 3, Default::default());
            b.copy(&a).unwrap();
            let mut ours = Adam::new(&if is_fused { fused(wd) } else { cfg(wd) }, &a).unwrap();
            let mut theirs = nn::Adam { beta1: 0.5, beta2: 0.9, wd, eps: 1e-8, amsgrad: false }.build(&b, 0.1).unwrap();
            for i in 0..25 {
                let x = Tensor::randn([4, 5], (Kind::Float, Device::Cpu)) * (1 + i % 3);
                ours.zero_grad();
                net_a.forward(&x).pow_tensor_scalar(2).mean(Kind::Float).backward();
                ours.step().unwrap();
                theirs.zero_grad();
                net_b.forward(&x).pow_tensor_scalar(2).mean(Kind::Float).backward();
                theirs.step();
            }
            for (name, t) in a.variables() {
                let diff = (&t - &b.variables()[&name]).abs().max().double_value(&[]);
                assert!(diff < 1e-5, "wd {wd}, fused {is_fused}: {name} differs by {diff}");
            }
        }
    }

    /// Time of one step of this Adam and of libtorch's over a 1024-wide MLP's parameters
    /// (`cargo test --release -p pipe-stages adam_speed -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn adam_speed_against_libtorch() {
        let build = || {
            tch::manual_seed(1);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = nn::seq()
                .add(nn::linear(vs.root() / "a", 784, 1024, Default::default()))
                .add(nn::linear(vs.root() / "b", 1024, 1024, Default::default()))
                .add(nn::linear(vs.root() / "c", 1024, 1, Default::default()));
            (vs, net)
        };
        let x = Tensor::randn([64, 784], (Kind::Float, Device::Cpu));
        let (va, na) = build();
        let mut ours = Adam::new(&cfg(0.0), &va).unwrap();
        na.forward(&x).sum(Kind::Float).backward();
        let (vb, nb) = build();
        let mut theirs = nn::Adam { beta1: 0.5, beta2: 0.9, wd: 0.0, eps: 1e-8, amsgrad: false }.build(&vb, 0.1).unwrap();
        nb.forward(&x).sum(Kind::Float).backward();
        let (vc, nc) = build();
        let mut all_at_once = Adam::new(&fused(0.0), &vc).unwrap();
        nc.forward(&x).sum(Kind::Float).backward();
        // Interleaved, so that the three see the same machine load; the median of each.
        let n = 300;
        let (mut ta, mut tb, mut tc) = (vec![], vec![], vec![]);
        for _ in 0..n {
            let t = std::time::Instant::now();
            ours.step().unwrap();
            ta.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            theirs.step();
            tb.push(t.elapsed().as_secs_f64());
            let t = std::time::Instant::now();
            all_at_once.step().unwrap();
            tc.push(t.elapsed().as_secs_f64());
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|x, y| x.total_cmp(y));
            v[v.len() / 2]
        };
        let (a, b, c) = (median(&mut ta), median(&mut tb), median(&mut tc));
        println!(
            "Adam step over 1.86M parameters: pipe per-parameter {:.3} ms, pipe fused {:.3} ms, libtorch {:.3} ms; time ratios per-parameter/libtorch {:.2}, fused/libtorch {:.2}",
            a * 1e3,
            c * 1e3,
            b * 1e3,
            a / b,
            c / b
        );
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let make = || {
            tch::manual_seed(5);
            let vs = nn::VarStore::new(Device::Cpu);
            let net = nn::linear(vs.root() / "l", 4, 2, Default::default());
            (vs, net)
        };
        let xs: Vec<Tensor> = (0..10).map(|_| Tensor::randn([3, 4], (Kind::Float, Device::Cpu))).collect();
        let run = |opt: &mut Adam, net: &nn::Linear, xs: &[Tensor]| {
            for x in xs {
                opt.zero_grad();
                net.forward(x).pow_tensor_scalar(2).sum(Kind::Float).backward();
                opt.step().unwrap();
            }
        };
        // Straight: 10 steps.
        let (vs1, net1) = make();
        // The same start for both, copied rather than re-seeded: other tests running at the
        // same time draw from libtorch's one global generator.
        let (mut vs2, net2) = make();
        vs2.copy(&vs1).unwrap();
        let mut o1 = Adam::new(&cfg(0.0), &vs1).unwrap();
        run(&mut o1, &net1, &xs);
        // 4 steps, save, then a fresh copy restored from the saved state does the other 6.
        let mut o2 = Adam::new(&cfg(0.0), &vs2).unwrap();
        run(&mut o2, &net2, &xs[..4]);
        let (state, steps) = o2.state().unwrap();
        assert_eq!(steps, 4);
        assert_eq!(state.iter().map(|(n, t)| (n.clone(), t.size())).collect::<Vec<_>>(), o2.state_shapes());
        let (mut vs3, net3) = make();
        vs3.copy(&vs2).unwrap();
        let mut o3 = Adam::new(&cfg(0.0), &vs3).unwrap();
        o3.load_state(steps, |n| state.iter().find(|(k, _)| k == n).map(|(_, t)| t.shallow_clone())).unwrap();
        run(&mut o3, &net3, &xs[4..]);
        for (name, t) in vs1.variables() {
            assert!(t.equal(&vs3.variables()[&name]), "{name} differs after resuming");
        }
        // A wrong shape is refused, naming the tensor.
        let e = o3.load_state(1, |_| Some(Tensor::zeros([7], (Kind::Float, Device::Cpu)))).unwrap_err().to_string();
        assert!(e.contains("tensor `m.l.bias`: saved [7], expected [2]"), "{e}");
    }
}
