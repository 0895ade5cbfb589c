//! Sample-quality scores on feature vectors: Fréchet Inception Distance (FID) and Kernel
//! Inception Distance (KID), in float64 on the CPU; and an Inception-Score-style score on class
//! probabilities ([`inception_score`]).
//!
//! **FID** (Heusel et al. 2017, eq. 6): for Gaussians fitted to two feature sets,
//! `FID = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½)`. The trace of the matrix square root is computed
//! the symmetric way: `S = Σ₁^½` from the eigendecomposition of the symmetric Σ₁ (eigenvalues
//! clipped at 0), then `Tr((Σ₁Σ₂)^½) = Σᵢ √λᵢ(S Σ₂ S)`, the eigenvalues of the symmetric PSD
//! matrix `S Σ₂ S` (similar to Σ₁Σ₂, so it has the same eigenvalues). No eigen- or square-root
//! routine ever sees the non-symmetric product Σ₁Σ₂. Covariances use the unbiased estimator
//! (divide by N − 1), as numpy's `np.cov` and pytorch-fid do.
//!
//! **KID** (Bińkowski et al. 2018, eq. 3 and §2.2): the unbiased estimate of the squared MMD
//! with the cubic polynomial kernel `k(x, y) = (xᵀy / d + 1)³`,
//! `MMD²ᵤ = Σ_{i≠j} k(xᵢ,xⱼ)/(m(m−1)) + Σ_{i≠j} k(yᵢ,yⱼ)/(m(m−1)) − 2 Σ_{i,j} k(xᵢ,yⱼ)/m²`,
//! averaged over random subsets of `m` samples of each set (default 100 subsets of 1000, fewer
//! samples when there are fewer), reported as mean ± standard deviation over the subsets.

use crate::quality::QualityError;
use rand::seq::index::sample;
use rand::SeedableRng;
use tch::{Device, Kind, Tensor};

/// Mean and covariance of a feature set: μ `[d]`, Σ `[d, d]`, both float64 on the CPU.
#[derive(Debug)]
pub struct Stats {
    pub mu: Tensor,
    pub sigma: Tensor,
    /// Number of feature vectors they were computed from.
    pub n: usize,
}

/// Statistics of `features` `[N, d]` (any float kind, any device): μ and the unbiased
/// covariance (N − 1 in the denominator). Errors: fewer than 2 rows, or not 2-D
/// ([`QualityError::FeatureShape`]).
pub fn stats(features: &Tensor) -> Result<Stats, QualityError> {
    let f = features.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double))?;
    let size = f.size();
    if size.len() != 2 || size[0] < 2 {
        return Err(QualityError::FeatureShape(size));
    }
    let n = size[0];
    let mu = f.f_mean_dim(0, false, Kind::Double)?;
    let centred = (&f - &mu.unsqueeze(0)).contiguous();
    let sigma = centred.tr().matmul(&centred) / (n - 1) as f64;
    Ok(Stats { mu, sigma, n: n as usize })
}

/// Symmetric part `(A + Aᵀ)/2`: removes rounding asymmetry before an eigendecomposition.
fn sym(a: &Tensor) -> Tensor {
    (a + a.tr()) * 0.5
}

/// FID between two Gaussians (see the module docs for the method), ≥ 0: rounding can take it
/// a hair below 0 for identical statistics, which is reported as 0. Errors: different
/// dimensions ([`QualityError::FeatureSizes`]), or an eigendecomposition that fails
/// ([`QualityError::Linalg`]) or a result that is not finite ([`QualityError::FidNotFinite`]),
/// on non-finite input.
pub fn fid(a: &Stats, b: &Stats) -> Result<f64, QualityError> {
    if a.mu.size() != b.mu.size() {
        return Err(QualityError::FeatureSizes(a.mu.size(), b.mu.size()));
    }
    let diff = &a.mu - &b.mu;
    let mean_term = diff.dot(&diff).double_value(&[]);
    let (l1, v1) =
        sym(&a.sigma).f_linalg_eigh("L").map_err(|source| QualityError::Linalg { what: "eigendecomposition of Σ₁", source })?;
    let s = v1.matmul(&Tensor::diag_embed(&l1.clamp_min(0.0).sqrt(), 0, -2, -1)).matmul(&v1.tr());
    let m = sym(&s.matmul(&b.sigma).matmul(&s));
    let lm = m.f_linalg_eigvalsh("L").map_err(|source| QualityError::Linalg { what: "eigenvalues of Σ₁^½Σ₂Σ₁^½", source })?;
    let tr_sqrt = lm.clamp_min(0.0).sqrt().sum(Kind::Double).double_value(&[]);
    let tr = a.sigma.trace().double_value(&[]) + b.sigma.trace().double_value(&[]);
    let v = mean_term + tr - 2.0 * tr_sqrt;
    if !v.is_finite() {
        return Err(QualityError::FidNotFinite);
    }
    Ok(v.max(0.0))
}

/// Unbiased MMD² with the cubic polynomial kernel between `x` `[m, d]` and `y` `[m, d]`
/// (float64).
pub fn mmd2_poly(x: &Tensor, y: &Tensor) -> f64 {
    let d = x.size()[1] as f64;
    let m = x.size()[0] as f64;
    let k = |a: &Tensor, b: &Tensor| (a.matmul(&b.tr()) / d + 1.0).pow_tensor_scalar(3);
    let (kxx, kyy, kxy) = (k(x, x), k(y, y), k(x, y));
    let off = |t: &Tensor| (t.sum(Kind::Double) - t.diagonal(0, 0, 1).sum(Kind::Double)).double_value(&[]);
    off(&kxx) / (m * (m - 1.0)) + off(&kyy) / (m * (m - 1.0)) - 2.0 * kxy.sum(Kind::Double).double_value(&[]) / (m * m)
}

/// KID over the given subsets: each pair holds the row indices of one subset of `x` and of
/// `y` (same length m ≥ 2). Returns (mean, standard deviation with N − 1) over the subsets
/// (std 0 for a single subset).
///
/// Errors: no subsets ([`QualityError::NoKidSubsets`]), a pair of subsets of different sizes or
/// fewer than 2 samples ([`QualityError::KidSubsetSizes`]).
pub fn kid_on_subsets(x: &Tensor, y: &Tensor, subsets: &[(Vec<i64>, Vec<i64>)]) -> Result<(f64, f64), QualityError> {
    let x = x.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double))?;
    let y = y.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double))?;
    if subsets.is_empty() {
        return Err(QualityError::NoKidSubsets);
    }
    let mut v = vec![];
    for (ix, iy) in subsets {
        if ix.len() != iy.len() || ix.len() < 2 {
            return Err(QualityError::KidSubsetSizes(ix.len(), iy.len()));
        }
        let xs = x.index_select(0, &Tensor::from_slice(ix));
        let ys = y.index_select(0, &Tensor::from_slice(iy));
        v.push(mmd2_poly(&xs, &ys));
    }
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    let std = if v.len() > 1 { (v.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    Ok((mean, std))
}

/// KID between `x` `[n, d]` and `y` `[n', d]`: `subsets` random subsets (indices drawn without
/// replacement from `seed`) of `min(subset_size, n, n')` samples each. Returns (mean, std).
///
/// Errors: fewer than 2 samples on a side ([`QualityError::KidTooFew`]).
pub fn kid(x: &Tensor, y: &Tensor, subsets: usize, subset_size: usize, seed: u64) -> Result<(f64, f64), QualityError> {
    let (n, m) = (x.size()[0] as usize, y.size()[0] as usize);
    let size = subset_size.min(n).min(m);
    if size < 2 {
        return Err(QualityError::KidTooFew(n, m));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let draws: Vec<(Vec<i64>, Vec<i64>)> = (0..subsets.max(1))
        .map(|_| {
            let a = sample(&mut rng, n, size).into_iter().map(|i| i as i64).collect();
            let b = sample(&mut rng, m, size).into_iter().map(|i| i as i64).collect();
            (a, b)
        })
        .collect();
    kid_on_subsets(x, y, &draws)
}

/// Inception-Score-style score (Salimans et al. 2016, §4): `exp(E_x KL(p(y|x) ‖ p(y)))` of class
/// probabilities `probs` `[N, K]` (rows sum to 1), with `p(y)` the mean of the rows, computed
/// on `splits` consecutive equal parts (the last rows dropped when N is not a multiple) and
/// reported as mean ± standard deviation over the parts (population form, dividing by the
/// number of parts, as `np.std` in the original code).
/// In [1, K]: 1 when every sample gets the same distribution, K when each is sure of one
/// class and all K classes are equally frequent. Float64; `0 · log 0` counts as 0.
///
/// Errors: not 2-D, or fewer rows than splits ([`QualityError::ProbsShape`]).
pub fn inception_score(probs: &Tensor, splits: usize) -> Result<(f64, f64), QualityError> {
    let p = probs.f_to_device(Device::Cpu).and_then(|t| t.f_to_kind(Kind::Double))?;
    let size = p.size();
    let splits = splits.max(1);
    if size.len() != 2 || (size[0] as usize) < splits {
        return Err(QualityError::ProbsShape { shape: size, splits });
    }
    let part = size[0] / splits as i64;
    let mut scores = vec![];
    for k in 0..splits as i64 {
        let q = p.narrow(0, k * part, part);
        let py = q.mean_dim(0, true, Kind::Double);
        // KL(q ‖ py) per row; terms with q = 0 are 0.
        let terms = (&q * (q.clamp_min(1e-300).log() - py.clamp_min(1e-300).log())).where_self(&q.gt(0.0), &q.zeros_like());
        let kl = terms.sum_dim_intlist(1, false, Kind::Double).mean(Kind::Double).double_value(&[]);
        scores.push(kl.exp());
    }
    let n = scores.len() as f64;
    let mean = scores.iter().sum::<f64>() / n;
    let std = (scores.iter().map(|s| (s - mean).powi(2)).sum::<f64>() / n).sqrt();
    Ok((mean, std))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: &[&[f64]]) -> Tensor {
        let d = rows[0].len() as i64;
        Tensor::from_slice(&rows.concat()).view([-1, d])
    }

    #[test]
    fn stats_are_mean_and_unbiased_covariance() {
        let s = stats(&t(&[&[1.0, 2.0], &[3.0, 2.0], &[5.0, 8.0]])).unwrap();
        assert_eq!(Vec::<f64>::try_from(&s.mu).unwrap(), vec![3.0, 4.0]);
        // x: deviations -2, 0, 2 → var 8/2 = 4; y: -2, -2, 4 → var 24/2 = 12; cov (4 + 0 + 8)/2 = 6.
        assert_eq!(Vec::<f64>::try_from(&s.sigma.view([-1])).unwrap(), vec![4.0, 6.0, 6.0, 12.0]);
        assert!(stats(&t(&[&[1.0, 2.0]])).is_err());
    }

    #[test]
    fn fid_of_diagonal_gaussians_matches_the_closed_form() {
        // Σ diagonal: FID = ‖μ₁−μ₂‖² + Σᵢ (a_i + b_i − 2√(a_i b_i)).
        let mk = |mu: &[f64], var: &[f64]| Stats {
            mu: Tensor::from_slice(mu),
            sigma: Tensor::diag_embed(&Tensor::from_slice(var), 0, -2, -1),
            n: 10,
        };
        let a = mk(&[0.0, 1.0, 2.0], &[1.0, 4.0, 0.25]);
        let b = mk(&[1.0, 1.0, 0.0], &[9.0, 1.0, 0.25]);
        let want = 1.0 + 4.0 + (1.0 + 9.0 - 6.0) + (4.0 + 1.0 - 4.0) + 0.0;
        assert!((fid(&a, &b).unwrap() - want).abs() < 1e-12, "{}", fid(&a, &b).unwrap());
        // Symmetric, and 0 for identical statistics.
        assert!((fid(&b, &a).unwrap() - want).abs() < 1e-12);
        assert!(fid(&a, &a).unwrap().abs() < 1e-12);
    }

    #[test]
    fn fid_of_rotated_full_covariances() {
        // Σ₂ = R Σ₁ Rᵀ with a rotation R: Tr((Σ₁Σ₂)^½) is known in 2-D only numerically, so
        // check against the eigenvalue identity on a non-commuting pair computed in closed form:
        // Σ₁ = diag(4, 1), Σ₂ = [[2, 1], [1, 2]] → S = diag(2, 1), SΣ₂S = [[8, 2], [2, 2]],
        // eigenvalues 5 ± √13, Tr(√·) = √(5+√13) + √(5−√13).
        let a = Stats { mu: Tensor::from_slice(&[0.0, 0.0]), sigma: t(&[&[4.0, 0.0], &[0.0, 1.0]]), n: 10 };
        let b = Stats { mu: Tensor::from_slice(&[0.0, 0.0]), sigma: t(&[&[2.0, 1.0], &[1.0, 2.0]]), n: 10 };
        let r13 = 13f64.sqrt();
        let want = 5.0 + 4.0 - 2.0 * ((5.0 + r13).sqrt() + (5.0 - r13).sqrt());
        assert!((fid(&a, &b).unwrap() - want).abs() < 1e-12);
        assert!((fid(&b, &a).unwrap() - want).abs() < 1e-12, "symmetric although Σ₁Σ₂ ≠ Σ₂Σ₁");
    }

    /// The fixtures of scripts/fid_reference.py (numpy/scipy): FID with scipy's sqrtm and KID on
    /// the same subsets, to 1e-6 relative.
    #[test]
    fn fid_and_kid_match_the_scipy_reference() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/fid");
        let real = Tensor::read_npy(dir.join("real.npy")).unwrap();
        let fake = Tensor::read_npy(dir.join("fake.npy")).unwrap();
        let subsets = Tensor::read_npy(dir.join("kid_subsets.npy")).unwrap();
        let want: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap()).unwrap();
        let rel = |got: f64, key: &str| {
            let w = want[key].as_f64().unwrap();
            assert!((got - w).abs() <= 1e-6 * w.abs(), "{key}: {got} vs scipy {w}");
        };
        let (a, b) = (stats(&real).unwrap(), stats(&fake).unwrap());
        rel(fid(&a, &b).unwrap(), "fid");
        assert!(fid(&a, &a).unwrap().abs() < 1e-9);
        let s = subsets.size();
        let pairs: Vec<(Vec<i64>, Vec<i64>)> = (0..s[0])
            .map(|i| (Vec::<i64>::try_from(subsets.get(i).get(0)).unwrap(), Vec::<i64>::try_from(subsets.get(i).get(1)).unwrap()))
            .collect();
        let (mean, std) = kid_on_subsets(&real, &fake, &pairs).unwrap();
        rel(mean, "kid_mean");
        rel(std, "kid_std");
        let probs = Tensor::read_npy(dir.join("probs.npy")).unwrap();
        let (mean, std) = inception_score(&probs, 10).unwrap();
        rel(mean, "is_mean");
        rel(std, "is_std");
    }

    #[test]
    fn inception_score_bounds() {
        // Each sample sure of one class, all 4 classes equally often: the score is K = 4.
        let eye = Tensor::eye(4, (Kind::Double, Device::Cpu)).repeat([5, 1]);
        let (m, s) = inception_score(&eye, 1).unwrap();
        assert!((m - 4.0).abs() < 1e-12 && s == 0.0, "{m} {s}");
        // Every sample the same distribution: 1.
        let same = Tensor::from_slice(&[0.1f64, 0.2, 0.3, 0.4]).repeat([20, 1]);
        assert!((inception_score(&same, 2).unwrap().0 - 1.0).abs() < 1e-12);
        // Sure, but always of the same class: 1 as well (no diversity).
        let one = Tensor::from_slice(&[0.0f64, 1.0, 0.0, 0.0]).repeat([20, 1]);
        assert!((inception_score(&one, 2).unwrap().0 - 1.0).abs() < 1e-12);
        assert!(inception_score(&one, 21).unwrap_err().to_string().contains("N ≥ 21"));
    }

    #[test]
    fn mmd_of_tiny_sets_by_hand() {
        // d = 1: k(x, y) = (xy + 1)³. x = {0, 1}, y = {1, 2}.
        // Kxx off-diagonal: 2·k(0,1) = 2·1 = 2 → 2/2 = 1. Kyy: 2·k(1,2) = 2·27 = 54 → 27.
        // Kxy: k(0,1) + k(0,2) + k(1,1) + k(1,2) = 1 + 1 + 8 + 27 = 37 → 2·37/4 = 18.5.
        let v = mmd2_poly(&t(&[&[0.0], &[1.0]]), &t(&[&[1.0], &[2.0]]));
        assert!((v - (1.0 + 27.0 - 18.5)).abs() < 1e-12, "{v}");
        let (mean, std) =
            kid_on_subsets(&t(&[&[0.0], &[1.0]]), &t(&[&[1.0], &[2.0]]), &[(vec![0, 1], vec![0, 1]), (vec![1, 0], vec![1, 0])]).unwrap();
        assert!((mean - 9.5).abs() < 1e-12 && std.abs() < 1e-12);
        // Two samples of one distribution: MMD² near 0 (unbiased, so it can be slightly
        // negative); of two distributions: clearly positive.
        tch::manual_seed(0);
        let x = Tensor::randn([400, 8], (Kind::Double, Device::Cpu));
        let y = Tensor::randn([400, 8], (Kind::Double, Device::Cpu));
        let (m, s) = kid(&x, &y, 20, 200, 1).unwrap();
        assert!(m.abs() < 3.0 * s, "{m} ± {s}");
        let (m2, _) = kid(&x, &(&y + 1.0), 20, 200, 1).unwrap();
        assert!(m2 > 10.0 * s.max(m.abs()), "{m2} vs {m} ± {s}");
    }
}
