#!/usr/bin/env python3
"""Write the FID/KID reference fixtures that pipe's Rust tests compare against.

Run once (the outputs are committed):

    .venv/bin/pip install scipy   # not needed by pipe itself
    .venv/bin/python scripts/fid_reference.py

Writes tests/fixtures/fid/:
  real.npy, fake.npy   float64 feature sets [300, 64] from two different Gaussians
  kid_subsets.npy      int64 [10, 2, 100]: for each KID subset, the row indices into real and fake
  probs.npy            float64 [300, 10] class probabilities (softmax rows)
  expected.json        FID (scipy.linalg.sqrtm, as pytorch-fid computes it), KID (mean, std) and
                       the Inception-Score-style score of probs (10 splits, scipy.stats.entropy)

FID = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)), covariances with N - 1 (np.cov).
KID = unbiased MMD^2 with k(x, y) = (x.y / d + 1)^3, mean and std (ddof=1) over the subsets.
IS = exp(mean KL(p(y|x) || p(y))) per split, mean and std (ddof=0) over 10 consecutive splits.
"""
import json
import pathlib

import numpy as np
import scipy.linalg
import scipy.stats

out = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "fid"
out.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(20261129)
n, d = 300, 64
a = rng.normal(size=(d, d)) / np.sqrt(d)
b = rng.normal(size=(d, d)) / np.sqrt(d)
real = rng.normal(size=(n, d)) @ a.T
fake = rng.normal(size=(n, d)) @ (0.8 * a + 0.3 * b).T + 0.1


def fid(x, y):
    mu1, mu2 = x.mean(0), y.mean(0)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def mmd2(x, y):
    m = x.shape[0]
    k = lambda p, q: (p @ q.T / x.shape[1] + 1.0) ** 3
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float(
        (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        - 2.0 * kxy.sum() / (m * m)
    )


subsets = np.stack([np.stack([rng.choice(n, 100, replace=False), rng.choice(n, 100, replace=False)]) for _ in range(10)])
values = [mmd2(real[i], fake[j]) for i, j in subsets]
# Class probabilities: sharp for most rows, with some classes more frequent than others.
logits = rng.normal(size=(n, 10)) * 3.0 + np.linspace(0.0, 1.0, 10)
probs = np.exp(logits - logits.max(1, keepdims=True))
probs /= probs.sum(1, keepdims=True)


def inception_score(p, splits=10):
    part = p.shape[0] // splits
    scores = []
    for k in range(splits):
        q = p[k * part:(k + 1) * part]
        py = q.mean(0)
        scores.append(np.exp(np.mean([scipy.stats.entropy(row, py) for row in q])))
    return float(np.mean(scores)), float(np.std(scores))  # np.std: ddof=0, as improved-gan


is_mean, is_std = inception_score(probs)
expected = {
    "fid": fid(real, fake),
    "fid_same": fid(real, real),
    "kid_mean": float(np.mean(values)),
    "kid_std": float(np.std(values, ddof=1)),
    "is_mean": is_mean,
    "is_std": is_std,
    "scipy": scipy.__version__,
    "numpy": np.__version__,
}
np.save(out / "real.npy", real)
np.save(out / "fake.npy", fake)
np.save(out / "kid_subsets.npy", subsets.astype(np.int64))
np.save(out / "probs.npy", probs)
(out / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")
print(json.dumps(expected, indent=2))
