//! The maths of DRAGAN and its relatives: perturbation near the real data and gradient
//! penalties (the GAN losses are in [`crate::train::losses`]).
//!
//! Source: Kodali, Abernethy, Hays, Kira, "On Convergence and Stability of GANs"
//! (arXiv:1705.07215, 2017), "How to train your DRAGAN". The penalty (their eq. 1, with the
//! authors' released code for the sampling of x̂) is
//!
//! ```text
//! λ · E_x̂ [ (‖∇ₓ D(x̂)‖₂ − k)² ],   x_p = x + c·σ·u,   x̂ = x + α (x_p − x)
//! ```
//!
//! with D the discriminator's logit, the norm taken per sample over all of C·H·W, λ = 10,
//! k = 1, c = 0.5, σ the standard deviation of the whole real batch, u ~ U[0,1) per element and
//! α ~ U[0,1) per sample. WGAN-GP (Gulrajani et al. 2017, eq. 3) uses the same penalty with x̂
//! on the segment between a real and a generated sample.

use rand::Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use tch::Tensor;

/// Small constant inside the square root of the gradient norm: √(Σg² + ε). Keeps the second
/// derivative finite when a gradient is exactly 0 (a NaN source in some public code).
pub const NORM_EPS: f64 = 1e-12;

/// How σ, the scale of the DRAGAN perturbation, is measured on the real batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default)]
pub enum Sigma {
    /// One number: the standard deviation of every value of the batch (the authors' code).
    #[default]
    Batch,
    /// One number per pixel position: the standard deviation over the batch axis
    /// (chainer-gan-lib).
    Pixel,
}

/// Distribution of the per-element noise u in x_p = x + c·σ·u.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema, Default)]
pub enum Noise {
    /// u ~ U[0, 1): one-sided, as in the authors' code (E[u] = 1/2, std = 1/√12).
    #[default]
    Uniform,
    /// u ~ U[−1, 1): symmetric, what the authors later said was intended (E[u] = 0, std = 1/√3).
    Symmetric,
    /// u ~ N(0, 1), as the paper's text writes δ ~ N(0, cI).
    Gaussian,
}

impl Noise {
    /// Mean and standard deviation of u.
    pub fn moments(self) -> (f64, f64) {
        match self {
            Noise::Uniform => (0.5, (1.0f64 / 12.0).sqrt()),
            Noise::Symmetric => (0.0, (1.0f64 / 3.0).sqrt()),
            Noise::Gaussian => (0.0, 1.0),
        }
    }
    fn draw<R: Rng>(self, rng: &mut R) -> f32 {
        match self {
            Noise::Uniform => rng.random::<f32>(),
            Noise::Symmetric => rng.random::<f32>() * 2.0 - 1.0,
            Noise::Gaussian => StandardNormal.sample(rng),
        }
    }
}

/// Settings of the DRAGAN perturbation (a field of `augment`). Defaults are the authors' code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Perturb {
    /// Scale c of the perturbation, in units of σ. Default 0.5. Must be ≥ 0.
    pub c: f64,
    /// How σ is measured. Default `Batch`.
    pub sigma: Sigma,
    /// Distribution of u. Default `Uniform` (U[0,1)).
    pub noise: Noise,
    /// Draw x̂ = x + α(x_p − x) with α ~ U[0,1) per sample (true, default), or use x̂ = x_p.
    pub interpolate: bool,
}

impl Default for Perturb {
    fn default() -> Self {
        Perturb { c: 0.5, sigma: Sigma::Batch, noise: Noise::Uniform, interpolate: true }
    }
}

/// Standard deviation σ of a batch `x` laid out as `[n, len]` (row-major), unbiased (n·len − 1
/// in the denominator, as `torch.std`). `Pixel` returns `len` values, one per position, over the
/// n samples (unbiased over n; 0 when n = 1); `Batch` returns one value.
/// The same as [`sigma_from_sums`] of [`sigma_sums`].
pub fn sigma(x: &[f32], n: usize, sigma: Sigma) -> Vec<f32> {
    sigma_from_sums(&sigma_sums(x, n, sigma), sigma)
}

/// The sums σ is computed from, so that σ of a batch split over several ranks can be had by
/// adding each rank's sums (an all-reduce): `[Σx, Σx², count]` for `Batch`, and for `Pixel`
/// `len` sums Σᵢ x[i, j], then `len` sums Σᵢ x[i, j]², then the number of samples `n`. f64,
/// whose 53-bit mantissa keeps Σx² − (Σx)²/N exact to ~1e-12 for values in [-1, 1] and
/// batches below 10⁹ values.
pub fn sigma_sums(x: &[f32], n: usize, sigma: Sigma) -> Vec<f64> {
    let len = x.len() / n.max(1);
    match sigma {
        Sigma::Batch => {
            let (mut s, mut ss) = (0f64, 0f64);
            for &v in x {
                let v = v as f64;
                s += v;
                ss += v * v;
            }
            vec![s, ss, x.len() as f64]
        }
        Sigma::Pixel => {
            let mut out = vec![0f64; 2 * len + 1];
            for row in x.chunks(len.max(1)) {
                for (j, &v) in row.iter().enumerate() {
                    let v = v as f64;
                    out[j] += v;
                    out[len + j] += v * v;
                }
            }
            out[2 * len] = n as f64;
            out
        }
    }
}

/// σ from sums laid out as [`sigma_sums`] returns them (possibly added over ranks): the
/// unbiased standard deviation √((Σx² − (Σx)²/N) / max(N − 1, 1)), 0 for N ≤ 1.
pub fn sigma_from_sums(sums: &[f64], sigma: Sigma) -> Vec<f32> {
    let sd = |s: f64, ss: f64, count: f64| ((ss - s * s / count.max(1.0)).max(0.0) / (count - 1.0).max(1.0)).sqrt() as f32;
    match sigma {
        Sigma::Batch => vec![sd(sums[0], sums[1], sums[2])],
        Sigma::Pixel => {
            let len = (sums.len() - 1) / 2;
            let n = sums[2 * len];
            (0..len).map(|j| sd(sums[j], sums[len + j], n)).collect()
        }
    }
}

/// Draw DRAGAN points x̂ near the real batch `x` (`[n, len]` row-major, host memory):
/// x_p = x + c·σ·u, then x̂ = x + α(x_p − x) with α ~ U[0,1) per sample when `interpolate`.
/// σ is measured on `x` itself ([`sigma`]). Returns x̂ with the same layout. Deterministic for a
/// given `rng` state.
pub fn perturb<R: Rng>(x: &[f32], n: usize, p: &Perturb, rng: &mut R) -> Vec<f32> {
    let s = sigma(x, n, p.sigma);
    let mut out = Vec::with_capacity(x.len());
    let len = x.len() / n.max(1);
    for row in x.chunks(len.max(1)) {
        perturb_sample(row, p, &s, rng, &mut out);
    }
    out
}

/// The DRAGAN point of one sample `x` (`len` values), appended to `out`: α (when
/// `interpolate`) is drawn first, then one u per value, in order. `s` is σ: one value
/// (`Batch`), or one per position (`Pixel`, `len` values).
pub fn perturb_sample<R: Rng>(x: &[f32], p: &Perturb, s: &[f32], rng: &mut R, out: &mut Vec<f32>) {
    let c = p.c as f32;
    let alpha = if p.interpolate { rng.random::<f32>() } else { 1.0 };
    for (j, &v) in x.iter().enumerate() {
        let sj = if s.len() == 1 { s[0] } else { s[j] };
        let u = p.noise.draw(rng);
        out.push(v + alpha * c * sj * u);
    }
}

/// Gradient penalty λ·E[(‖∇ₓD(x̂)‖₂ − k)²] (Kodali et al. 2017, eq. 1; Gulrajani et al. 2017,
/// eq. 3).
///
/// - `d`: the discriminator, mapping `[B, C, H, W]` (or any `[B, ...]`) to logits `[B, 1]`;
///   the gradient is taken of the logit, not of a sigmoid;
/// - `x_hat`: points `[B, ...]`, `f32`; gradients w.r.t. them are taken with
///   `create_graph = true`, so the penalty backpropagates into D's weights (double backward);
/// - the norm is per sample over all non-batch dimensions, √(Σ g² + [`NORM_EPS`]).
///
/// Returns `(penalty, mean_norm)`: a scalar tensor to add to D's loss, and the mean gradient
/// norm over the batch (a detached scalar, for logging).
pub fn gradient_penalty(d: impl Fn(&Tensor) -> Tensor, x_hat: &Tensor, lambda: f64, k: f64) -> Result<(Tensor, Tensor), tch::TchError> {
    let x_hat = x_hat.f_detach()?.f_set_requires_grad(true)?;
    let kind = x_hat.kind();
    let out = d(&x_hat);
    let grads = Tensor::f_run_backward(&[out.f_sum(out.kind())?], &[&x_hat], true, true)?;
    let g = grads[0].f_flatten(1, -1)?;
    let norm = (g.f_square()?.f_sum_dim_intlist(Some(&[1i64][..]), false, kind)? + NORM_EPS).f_sqrt()?;
    let penalty = (norm.f_sub_scalar(k)?.f_square()?.f_mean(kind)?) * lambda;
    let mean_norm = norm.f_detach()?.f_mean(kind)?;
    Ok((penalty, mean_norm))
}

/// WGAN-GP sample points x̂ = ε·x + (1 − ε)·x_fake, ε ~ U[0,1) per sample (Gulrajani et al.
/// 2017, Algorithm 1). `eps` has shape `[B]`; `x`, `fake` `[B, ...]`.
pub fn interpolate(x: &Tensor, fake: &Tensor, eps: &Tensor) -> Result<Tensor, tch::TchError> {
    let mut shape = vec![x.size()[0]];
    shape.extend(std::iter::repeat_n(1, x.dim() - 1));
    let e = eps.f_view(shape.as_slice())?;
    Ok(x * &e + fake.f_detach()? * (1.0 - e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use tch::{nn, nn::Module, Device, Kind};

    #[test]
    fn penalty_of_a_linear_discriminator_is_analytic() {
        // D(x) = w·x: ∇ₓD = w for every sample, so ‖∇‖ = ‖w‖ and the penalty is λ(‖w‖ − k)².
        let w = Tensor::from_slice(&[3.0f32, -4.0, 12.0]); // ‖w‖ = 13
        let x = Tensor::randn([5, 3], (Kind::Float, Device::Cpu));
        let d = |x: &Tensor| x.matmul(&w.view([3, 1]));
        let (p, n) = gradient_penalty(d, &x, 10.0, 1.0).unwrap();
        assert!((n.double_value(&[]) - 13.0).abs() < 1e-5);
        assert!((p.double_value(&[]) - 10.0 * 144.0).abs() < 1e-3);
        // 4-D input: the norm runs over all of C·H·W, not over one axis.
        let w4 = Tensor::full([1, 2, 2, 2], 0.5, (Kind::Float, Device::Cpu)); // ‖w‖ = √(8·0.25) = √2
        let x4 = Tensor::randn([4, 2, 2, 2], (Kind::Float, Device::Cpu));
        let d4 = |x: &Tensor| (x * &w4).sum_dim_intlist(Some(&[1i64, 2, 3][..]), false, Kind::Float).view([-1, 1]);
        let (p4, n4) = gradient_penalty(d4, &x4, 2.0, 1.0).unwrap();
        assert!((n4.double_value(&[]) - 2f64.sqrt()).abs() < 1e-5);
        assert!((p4.double_value(&[]) - 2.0 * (2f64.sqrt() - 1.0).powi(2)).abs() < 1e-5);
    }

    #[test]
    fn penalty_of_a_tiny_conv_net_matches_finite_differences() {
        tch::manual_seed(7);
        let mut vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let conv = nn::conv2d(&root / "c", 1, 2, 3, nn::ConvConfig { stride: 2, padding: 1, ..Default::default() });
        let lin = nn::linear(&root / "l", 2 * 2 * 2, 1, Default::default());
        vs.set_kind(Kind::Double);
        let d = |x: &Tensor| lin.forward(&conv.forward(x).tanh().flatten(1, -1));
        let x = Tensor::randn([3, 1, 4, 4], (Kind::Double, Device::Cpu));
        let h = 1e-6;
        // 1) gradient norm per sample vs central differences of D.
        let (_, mean_norm) = gradient_penalty(d, &x, 1.0, 1.0).unwrap();
        let mut fd_norms = vec![0.0f64; 3];
        for (b, fd) in fd_norms.iter_mut().enumerate() {
            let mut ss = 0.0;
            for i in 0..16 {
                let e = Tensor::zeros([3, 16], (Kind::Double, Device::Cpu));
                let _ = e.get(b as i64).get(i).fill_(h);
                let e = e.view([3, 1, 4, 4]);
                let dp = d(&(&x + &e)).double_value(&[b as i64, 0]);
                let dm = d(&(&x - &e)).double_value(&[b as i64, 0]);
                ss += ((dp - dm) / (2.0 * h)).powi(2);
            }
            *fd = ss.sqrt();
        }
        let fd_mean = fd_norms.iter().sum::<f64>() / 3.0;
        assert!((mean_norm.double_value(&[]) - fd_mean).abs() < 1e-6, "{} vs {fd_mean}", mean_norm.double_value(&[]));
        // 2) d(penalty)/d(weight) from double backward vs central differences of the penalty.
        let (p, _) = gradient_penalty(d, &x, 10.0, 1.0).unwrap();
        let wt = conv.ws.shallow_clone();
        let grad_w = Tensor::run_backward(&[&p], &[&wt], false, false).remove(0);
        for idx in [0i64, 4, 9, 17] {
            let flat = wt.view([-1]);
            let orig = flat.double_value(&[idx]);
            let pen_at = |v: f64| {
                tch::no_grad(|| {
                    let _ = flat.get(idx).fill_(v);
                });
                let (p, _) = gradient_penalty(d, &x, 10.0, 1.0).unwrap();
                p.double_value(&[])
            };
            let fd = (pen_at(orig + h) - pen_at(orig - h)) / (2.0 * h);
            pen_at(orig);
            let an = grad_w.view([-1]).double_value(&[idx]);
            assert!((an - fd).abs() < 1e-5 * (1.0 + fd.abs()), "weight {idx}: autograd {an} vs finite differences {fd}");
        }
    }

    fn stats(v: &[f64]) -> (f64, f64) {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let s = (v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64).sqrt();
        (m, s)
    }

    #[test]
    fn perturbation_statistics_match_c_sigma_moments() {
        // Without interpolation, x_p − x = c·σ·u: mean c·σ·E[u], std c·σ·std(u).
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = 256;
        let len = 784;
        let x: Vec<f32> = (0..n * len).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect();
        let s = sigma(&x, n, Sigma::Batch)[0] as f64;
        assert!((s - (4.0f64 / 12.0).sqrt()).abs() < 0.01, "σ of U[-1,1) is 0.577, got {s}");
        for noise in [Noise::Uniform, Noise::Symmetric, Noise::Gaussian] {
            let p = Perturb { c: 0.5, sigma: Sigma::Batch, noise, interpolate: false };
            let xp = perturb(&x, n, &p, &mut rng);
            let d: Vec<f64> = xp.iter().zip(&x).map(|(a, b)| (*a - *b) as f64).collect();
            let (m, sd) = stats(&d);
            let (eu, su) = noise.moments();
            assert!((m - 0.5 * s * eu).abs() < 0.003, "{noise:?}: mean {m} vs {}", 0.5 * s * eu);
            assert!((sd - 0.5 * s * su).abs() < 0.003, "{noise:?}: std {sd} vs {}", 0.5 * s * su);
        }
        // With interpolation, x̂ − x = α·c·σ·u with α ~ U[0,1) per sample: mean c·σ·E[α]·E[u].
        let p = Perturb::default();
        let xh = perturb(&x, n, &p, &mut rng);
        let d: Vec<f64> = xh.iter().zip(&x).map(|(a, b)| (*a - *b) as f64).collect();
        let (m, _) = stats(&d);
        assert!((m - 0.5 * s * 0.5 * 0.5).abs() < 0.01, "interpolated mean {m}");
        assert!(d.iter().all(|&v| v >= 0.0 && v < 0.5 * s + 1e-6), "one-sided U[0,1) keeps x̂ − x in [0, cσ)");
        // α is per sample: within one sample, (x̂ − x)/u is constant, so the ratio of max to the
        // bound c·σ differs between samples but all elements of a sample share α.
        let per_sample_max: Vec<f64> = d.chunks(len).map(|c| c.iter().cloned().fold(0.0, f64::max)).collect();
        let (_, spread) = stats(&per_sample_max);
        assert!(spread > 0.02, "α should differ between samples");
    }

    #[test]
    fn pixel_sigma_is_per_position() {
        // Two samples, two positions: position 0 varies (0 and 2 → σ = √2), position 1 constant.
        let s = sigma(&[0.0, 5.0, 2.0, 5.0], 2, Sigma::Pixel);
        assert!((s[0] - 2f32.sqrt()).abs() < 1e-6);
        assert_eq!(s[1], 0.0);
        let b = sigma(&[0.0, 5.0, 2.0, 5.0], 2, Sigma::Batch);
        assert_eq!(b.len(), 1);
    }

    #[test]
    fn sigma_of_split_batches_from_added_sums_equals_sigma_of_the_whole() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let (n, len) = (64, 50);
        let x: Vec<f32> = (0..n * len).map(|_| rng.random::<f32>() * 1.6 - 0.9).collect();
        for mode in [Sigma::Batch, Sigma::Pixel] {
            // The two-pass textbook formula, in f64, as the reference.
            let reference: Vec<f64> = match mode {
                Sigma::Batch => {
                    let v: Vec<f64> = x.iter().map(|&a| a as f64).collect();
                    vec![stats(&v).1]
                }
                Sigma::Pixel => (0..len).map(|j| stats(&(0..n).map(|i| x[i * len + j] as f64).collect::<Vec<_>>()).1).collect(),
            };
            let whole = sigma(&x, n, mode);
            assert_eq!(whole.len(), reference.len());
            for (a, b) in whole.iter().zip(&reference) {
                assert!((*a as f64 - b).abs() < 1e-6, "{mode:?}: {a} vs {b}");
            }
            // Four "ranks" of 16 samples: add their sums, as the all-reduce does.
            let mut sums = vec![0f64; sigma_sums(&x[..16 * len], 16, mode).len()];
            for part in x.chunks(16 * len) {
                for (t, v) in sums.iter_mut().zip(sigma_sums(part, 16, mode)) {
                    *t += v;
                }
            }
            let split = sigma_from_sums(&sums, mode);
            for (a, b) in split.iter().zip(&whole) {
                assert!((a - b).abs() <= 1e-6 * b.abs(), "{mode:?}: {a} vs {b}");
            }
        }
        // One sample: no spread to measure, σ = 0 (not NaN).
        assert_eq!(sigma(&[0.5, 0.25], 1, Sigma::Pixel), vec![0.0, 0.0]);
    }

    #[test]
    fn wgan_gp_points_lie_between_real_and_fake() {
        let x = Tensor::randn([6, 2, 3, 3], (Kind::Float, Device::Cpu));
        let f = Tensor::randn([6, 2, 3, 3], (Kind::Float, Device::Cpu));
        let eps = Tensor::rand([6], (Kind::Float, Device::Cpu));
        let xh = interpolate(&x, &f, &eps).unwrap();
        // x̂ − f = ε (x − f) for every element of sample i.
        let lhs = (&xh - &f).flatten(1, -1);
        let rhs = (&x - &f).flatten(1, -1) * eps.view([6, 1]);
        assert!((lhs - rhs).abs().max().double_value(&[]) < 1e-6);
    }
}
