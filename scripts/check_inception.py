#!/usr/bin/env python3
"""Check pipe's Inception features against PyTorch running the same TorchScript file.

    .venv/bin/python scripts/check_inception.py [N]

Takes N (default 16) illustrations from data/illustrations, computes their pool3 features with
`target/release/examples/inception_features` (pipe's preprocessing and tch), then with PyTorch:
torch.jit.load(data/inception/inception_fid.pt), input (u8 - 128) / 128 resized to 299x299 by
F.interpolate(mode="bilinear", align_corners=False). Prints the largest relative error
(|a - b| / max|b| per image, then the max over images) and exits 1 above 1e-4.
"""
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

root = pathlib.Path(__file__).resolve().parent.parent
n = int(sys.argv[1]) if len(sys.argv) > 1 else 16
files = sorted((root / "data" / "illustrations").glob("*.png"))[:: 97][:n]
exe = root / "target" / "release" / "examples" / "inception_features"
if not exe.exists():
    subprocess.run(["cargo", "build", "--release", "--example", "inception_features"], cwd=root, check=True)
with tempfile.TemporaryDirectory() as tmp:
    out = pathlib.Path(tmp) / "pipe.npy"
    subprocess.run([str(exe), str(out), *map(str, files)], cwd=root, check=True)
    ours = np.load(out)

from PIL import Image  # noqa: E402  (in the venv: pip install pillow if missing)

imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])  # N,H,W,3 u8
x = torch.from_numpy(imgs).permute(0, 3, 1, 2).float()
x = (x - 128.0) / 128.0
x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
net = torch.jit.load(str(root / "data" / "inception" / "inception_fid.pt"), map_location="cpu").eval()
with torch.no_grad():
    ref = net(x).reshape(len(files), -1).numpy()
rel = np.abs(ours - ref).max(axis=1) / np.abs(ref).max(axis=1)
print(f"{len(files)} images, features {ref.shape}: max relative error {rel.max():.3e} (mean {rel.mean():.3e})")
sys.exit(0 if rel.max() < 1e-4 else 1)
