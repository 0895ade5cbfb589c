//! The adversarial losses of the discriminator and the generator.
//!
//! `d` is D's raw output per sample, `[B, 1]` `f32`, with no sigmoid: a logit for
//! [`Loss::Logistic`], a critic value for [`Loss::Wasserstein`] and [`Loss::Hinge`], a score
//! for [`Loss::LeastSquares`], and the loss function L_θ (through a softplus) for
//! [`Loss::LossSensitive`]. `r` = D(x) on a real batch, `f` = D(G(z)) on a generated one; every
//! E[·] is a mean over the batch. Each loss returns a scalar `f32` tensor to minimise.
//!
//! | D loss | L_D | generator loss(es) L_G |
//! |---|---|---|
//! | `Logistic` (Goodfellow et al. 2014, eq. 1) | E softplus(−r) + E softplus(f) | `NonSaturating`: E softplus(−f); `Minimax`: −E softplus(f) |
//! | `Wasserstein` (Arjovsky et al. 2017, eq. 3) | E f − E r | `Wasserstein`: −E f |
//! | `Hinge` (Lim & Ye 2017; Miyato et al. 2018, eq. 16) | E relu(1 − r) + E relu(1 + f) | `Hinge`: −E f |
//! | `LeastSquares` (Mao et al. 2017, eq. 2 with a = 0, b = c = 1) | ½E (r − 1)² + ½E f² | `LeastSquares`: ½E (f − 1)² |
//! | `LossSensitive` (Qi 2017, eqs. 5–6) | γ·E L(x) + E (Δ(x, G(z)) + L(x) − L(G(z)))₊ | `LossSensitive`: E L(G(z)) |

use crate::core::problem::Problem;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// Settings of the loss-sensitive GAN (Qi 2017, "Loss-Sensitive Generative Adversarial
/// Networks on Lipschitz Densities", arXiv:1701.06264).
///
/// The form implemented is the one of the paper's eqs. (5)–(6) as the author's released code
/// (`lsgan.lua`) computes it, with one change: L = softplus(D) where the code has max(0, D).
/// Both make L ≥ 0 as the paper requires, but with max(0, ·) a batch whose D(G(z)) are all
/// negative (which happens at the very first step with pipe's DCGAN D) gives neither D nor G
/// any gradient through L(G(z)), and training never starts.
///
/// ```text
/// L(x)       = softplus(D(x)) = ln(1 + e^D(x))   the loss function, > 0
/// Δ(x, G(z)) = τ · ‖x − G(z)‖₁                     margin: L1 distance over all C·H·W values,
///                                                  real and generated samples paired by index
/// L_D = γ · E L(x) + E max(0, Δ(x, G(z)) + L(x) − L(G(z)))
/// L_G = E L(G(z))
/// ```
///
/// The paper's λ weighs the hinge against E L(x); here the hinge has weight 1 and γ = 1/λ
/// weighs E L(x), as in the code (which uses γ = 0: the paper's theorem lets that term go for
/// the unconditional model). The Lipschitz condition the paper relies on is imposed by weight
/// decay on D: set `weight_decay` of d_step's optimiser (the code suggests 5e-5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LossSensitiveConfig {
    /// τ, the scale of the L1 margin Δ (per unit of summed absolute difference, images in
    /// [−1, 1]). Default 0.0002 (the released code's `lambda`). Must be ≥ 0.
    pub margin: f64,
    /// γ, the weight of E L(x) on real data. Default 0. Must be ≥ 0.
    pub gamma: f64,
}

impl Default for LossSensitiveConfig {
    fn default() -> Self {
        LossSensitiveConfig { margin: 2e-4, gamma: 0.0 }
    }
}

/// The discriminator's loss (d_step's `loss`); it also fixes what D's output means.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema, Default)]
pub enum Loss {
    /// Binary cross-entropy on D's logit: E softplus(−D(x)) + E softplus(D(G(z))) (Goodfellow
    /// et al. 2014). DRAGAN's loss. The default.
    #[default]
    Logistic,
    /// The Wasserstein critic loss E D(G(z)) − E D(x) (Arjovsky et al. 2017); needs a
    /// Lipschitz constraint on D: weight clipping or a gradient penalty.
    Wasserstein,
    /// E max(0, 1 − D(x)) + E max(0, 1 + D(G(z))) (Lim & Ye 2017; Miyato et al. 2018).
    Hinge,
    /// Least squares (LSGAN, Mao et al. 2017, with targets a = 0 for fake, b = 1 for real):
    /// ½E (D(x) − 1)² + ½E D(G(z))².
    LeastSquares,
    /// The loss-sensitive GAN (Qi 2017): see [`LossSensitiveConfig`].
    LossSensitive(LossSensitiveConfig),
}

/// The generator's loss (g_step's `loss`). Each goes with one or two D losses
/// ([`GLoss::pairs_with`]); by default g_step uses [`Loss::generator_default`] of d_step's loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum GLoss {
    /// E softplus(−D(G(z))) = −E log σ(D(G(z))) (Goodfellow et al. 2014, §3: "maximise log D(G(z))").
    /// For `Logistic`.
    NonSaturating,
    /// The original minimax loss E log(1 − σ(D(G(z)))) = −E softplus(D(G(z))) (Goodfellow et al.
    /// 2014, eq. 1). Saturates when D rejects the samples confidently. For `Logistic`.
    Minimax,
    /// −E D(G(z)) (Arjovsky et al. 2017). For `Wasserstein`.
    Wasserstein,
    /// −E D(G(z)), as for `Wasserstein` (Miyato et al. 2018, eq. 17). For `Hinge`.
    Hinge,
    /// ½E (D(G(z)) − 1)² (Mao et al. 2017, eq. 2 with c = 1). For `LeastSquares`.
    LeastSquares,
    /// E L(G(z)) = E softplus(D(G(z))) (Qi 2017, eq. 6). For `LossSensitive`.
    LossSensitive,
}

impl Loss {
    /// The name as written in RON.
    pub fn name(&self) -> &'static str {
        match self {
            Loss::Logistic => "Logistic",
            Loss::Wasserstein => "Wasserstein",
            Loss::Hinge => "Hinge",
            Loss::LeastSquares => "LeastSquares",
            Loss::LossSensitive(_) => "LossSensitive",
        }
    }

    /// The generator loss that goes with this D loss when g_step does not name one.
    pub fn generator_default(&self) -> GLoss {
        match self {
            Loss::Logistic => GLoss::NonSaturating,
            Loss::Wasserstein => GLoss::Wasserstein,
            Loss::Hinge => GLoss::Hinge,
            Loss::LeastSquares => GLoss::LeastSquares,
            Loss::LossSensitive(_) => GLoss::LossSensitive,
        }
    }

    /// Check the values, naming the field at fault.
    pub fn problems(&self) -> Vec<Problem> {
        let mut errs = vec![];
        if let Loss::LossSensitive(c) = self {
            for (n, v) in [("margin", c.margin), ("gamma", c.gamma)] {
                if !(v >= 0.0 && v.is_finite()) {
                    errs.push(Problem::new(n, format!("loss LossSensitive: `{n}` must be a finite number ≥ 0, got {v}")));
                }
            }
        }
        errs
    }

    /// The discriminator's loss L_D (see the module table), a scalar `f32`.
    ///
    /// - `r`, `f`: D's outputs on the real and the generated batch, `[B, 1]` (any shape with
    ///   the batch first works for all but `LossSensitive`, which needs `[B, 1]` or `[B]`);
    /// - `x`, `fake`: the real and generated images `[B, C, H, W]` (used by `LossSensitive`'s
    ///   margin only; no gradient flows into `fake`).
    pub fn d_loss(&self, r: &Tensor, f: &Tensor, x: &Tensor, fake: &Tensor) -> Result<Tensor, tch::TchError> {
        let mean = |t: Tensor| t.f_mean(Kind::Float);
        match self {
            Loss::Logistic => Ok(mean(r.f_neg()?.f_softplus()?)? + mean(f.f_softplus()?)?),
            Loss::Wasserstein => Ok(mean(f.shallow_clone())? - mean(r.shallow_clone())?),
            Loss::Hinge => Ok(mean(r.f_neg()?.f_add_scalar(1.0)?.f_relu()?)? + mean(f.f_add_scalar(1.0)?.f_relu()?)?),
            Loss::LeastSquares => Ok((mean((r - 1.0).f_square()?)? + mean(f.f_square()?)?) * 0.5),
            Loss::LossSensitive(c) => {
                let (lr, lf) = (r.f_softplus()?.f_flatten(0, -1)?, f.f_softplus()?.f_flatten(0, -1)?);
                let delta =
                    (x - fake.f_detach()?).f_abs()?.f_flatten(1, -1)?.f_sum_dim_intlist(Some(&[1i64][..]), false, Kind::Float)? * c.margin;
                let hinge = mean((delta + &lr - lf).f_relu()?)?;
                Ok(hinge + mean(lr)? * c.gamma)
            }
        }
    }
}

impl GLoss {
    /// The name as written in RON.
    pub fn name(self) -> &'static str {
        match self {
            GLoss::NonSaturating => "NonSaturating",
            GLoss::Minimax => "Minimax",
            GLoss::Wasserstein => "Wasserstein",
            GLoss::Hinge => "Hinge",
            GLoss::LeastSquares => "LeastSquares",
            GLoss::LossSensitive => "LossSensitive",
        }
    }

    /// Whether this generator loss makes sense with D trained by `d`: each reads D's output
    /// the way that D loss defines it (a logit, a critic value, a score, a loss).
    pub fn pairs_with(self, d: &Loss) -> bool {
        matches!(
            (self, d),
            (GLoss::NonSaturating | GLoss::Minimax, Loss::Logistic)
                | (GLoss::Wasserstein, Loss::Wasserstein)
                | (GLoss::Hinge, Loss::Hinge)
                | (GLoss::LeastSquares, Loss::LeastSquares)
                | (GLoss::LossSensitive, Loss::LossSensitive(_))
        )
    }

    /// The generator's loss L_G from `f` = D(G(z)) `[B, 1]` (see the module table), a scalar
    /// `f32`.
    pub fn g_loss(self, f: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            GLoss::NonSaturating => f.f_neg()?.f_softplus()?.f_mean(Kind::Float),
            GLoss::Minimax => f.f_softplus()?.f_mean(Kind::Float)?.f_neg(),
            GLoss::Wasserstein | GLoss::Hinge => f.f_mean(Kind::Float)?.f_neg(),
            GLoss::LeastSquares => Ok((f - 1.0).f_square()?.f_mean(Kind::Float)? * 0.5),
            GLoss::LossSensitive => f.f_softplus()?.f_mean(Kind::Float),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn t(v: &[f32]) -> Tensor {
        Tensor::from_slice(v).view([-1, 1])
    }
    fn val(t: Tensor) -> f64 {
        t.double_value(&[])
    }
    const R: [f32; 3] = [2.0, -0.5, 0.25];
    const F: [f32; 3] = [-1.5, 0.5, 3.0];
    fn sp(v: f64) -> f64 {
        (1.0 + v.exp()).ln()
    }
    fn mean(v: impl Iterator<Item = f64>) -> f64 {
        let v: Vec<f64> = v.collect();
        v.iter().sum::<f64>() / v.len() as f64
    }
    fn r64() -> impl Iterator<Item = f64> {
        R.iter().map(|&v| v as f64)
    }
    fn f64s() -> impl Iterator<Item = f64> {
        F.iter().map(|&v| v as f64)
    }

    #[test]
    fn d_losses_match_their_formulas() {
        let (r, f) = (t(&R), t(&F));
        let img = Tensor::zeros([3, 1, 2, 2], (Kind::Float, Device::Cpu));
        let d = |l: Loss| val(l.d_loss(&r, &f, &img, &img).unwrap());
        let want = mean(r64().map(|v| sp(-v))) + mean(f64s().map(sp));
        assert!((d(Loss::Logistic) - want).abs() < 1e-6);
        // E f − E r = (2.0/3) − (1.75/3)
        assert!((d(Loss::Wasserstein) - (2.0 - 1.75) / 3.0).abs() < 1e-6);
        // relu(1 − r) = [0, 1.5, 0.75]; relu(1 + f) = [0, 1.5, 4]
        assert!((d(Loss::Hinge) - (2.25 / 3.0 + 5.5 / 3.0)).abs() < 1e-6);
        // ½ mean (r − 1)² = ½ (1 + 2.25 + 0.5625)/3; ½ mean f² = ½ (2.25 + 0.25 + 9)/3
        assert!((d(Loss::LeastSquares) - 0.5 * (3.8125 / 3.0 + 11.5 / 3.0)).abs() < 1e-6);
        // At the targets the least-squares loss is 0, and it is 1 with D fooled both ways.
        let (ones, zeros) = (t(&[1.0, 1.0]), t(&[0.0, 0.0]));
        let im2 = Tensor::zeros([2, 1, 2, 2], (Kind::Float, Device::Cpu));
        assert!(val(Loss::LeastSquares.d_loss(&ones, &zeros, &im2, &im2).unwrap()).abs() < 1e-9);
        assert!((val(Loss::LeastSquares.d_loss(&zeros, &ones, &im2, &im2).unwrap()) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn loss_sensitive_uses_the_l1_margin_of_each_pair() {
        // Two pairs of 1×1×2 images: ‖x₀ − g₀‖₁ = |1 − 0| + |−1 − 1| = 3, ‖x₁ − g₁‖₁ = 0.5 + 0.5 = 1.
        let x = Tensor::from_slice(&[1.0f32, -1.0, 0.5, 0.5]).view([2, 1, 1, 2]);
        let g = Tensor::from_slice(&[0.0f32, 1.0, 0.0, 1.0]).view([2, 1, 1, 2]);
        let r = t(&[0.5, -2.0]);
        let f = t(&[1.0, 4.0]);
        let (lx, lg) = ([sp(0.5), sp(-2.0)], [sp(1.0), sp(4.0)]);
        let l = Loss::LossSensitive(LossSensitiveConfig { margin: 0.5, gamma: 0.0 });
        // Δ = [1.5, 0.5]: hinge max(0, 1.5 + L(x₀) − L(g₀)) > 0; max(0, 0.5 + L(x₁) − L(g₁)) = 0.
        let h0 = 1.5 + lx[0] - lg[0];
        assert!(h0 > 0.0 && 0.5 + lx[1] - lg[1] < 0.0);
        assert!((val(l.d_loss(&r, &f, &x, &g).unwrap()) - h0 / 2.0).abs() < 1e-6);
        // γ = 2 adds 2·E L(x).
        let l = Loss::LossSensitive(LossSensitiveConfig { margin: 0.5, gamma: 2.0 });
        assert!((val(l.d_loss(&r, &f, &x, &g).unwrap()) - (h0 / 2.0 + (lx[0] + lx[1]))).abs() < 1e-6);
        // G: E softplus(D(G(z))); L > 0 everywhere, so G gets a gradient even where D(G(z)) < 0.
        let fg = t(&[1.0, -3.0]).set_requires_grad(true);
        let gl = GLoss::LossSensitive.g_loss(&fg).unwrap();
        assert!((val(gl.shallow_clone()) - (sp(1.0) + sp(-3.0)) / 2.0).abs() < 1e-6);
        gl.backward();
        assert!(fg.grad().double_value(&[1, 0]) > 0.0);
        // No gradient flows into the generated images through the margin.
        let g2 = g.set_requires_grad(true);
        let loss = l.d_loss(&r, &f, &x, &g2).unwrap();
        assert!(!loss.requires_grad());
    }

    #[test]
    fn g_losses_match_their_formulas() {
        let f = t(&F);
        let g = |l: GLoss| val(l.g_loss(&f).unwrap());
        assert!((g(GLoss::NonSaturating) - mean(f64s().map(|v| sp(-v)))).abs() < 1e-6);
        // log(1 − σ(v)) = −softplus(v)
        let want = mean(f64s().map(|v| (1.0 - 1.0 / (1.0 + (-v).exp())).ln()));
        assert!((g(GLoss::Minimax) - want).abs() < 1e-6);
        assert!((g(GLoss::Wasserstein) + 2.0 / 3.0).abs() < 1e-6);
        assert!((g(GLoss::Hinge) + 2.0 / 3.0).abs() < 1e-6);
        // ½ mean (f − 1)² = ½ (6.25 + 0.25 + 4)/3
        assert!((g(GLoss::LeastSquares) - 0.5 * 10.5 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn pairs_and_defaults() {
        let ls = Loss::LossSensitive(LossSensitiveConfig::default());
        for d in [Loss::Logistic, Loss::Wasserstein, Loss::Hinge, Loss::LeastSquares, ls.clone()] {
            assert!(d.generator_default().pairs_with(&d), "{d:?}");
        }
        assert!(GLoss::Minimax.pairs_with(&Loss::Logistic));
        assert!(!GLoss::Minimax.pairs_with(&Loss::Wasserstein));
        assert!(!GLoss::Wasserstein.pairs_with(&Loss::Logistic));
        assert!(!GLoss::LeastSquares.pairs_with(&ls));
        assert!(Loss::LossSensitive(LossSensitiveConfig { margin: -1.0, gamma: 0.0 }).problems()[0].field == "margin");
    }
}
