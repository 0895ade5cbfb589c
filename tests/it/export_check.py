"""Check a `pipe export` folder against pipe's own outputs (run by tests/it/export.rs).

usage: export_check.py MODELS_DIR EXPORT_DIR REFERENCE.safetensors GRID_OUT.safetensors

MODELS_DIR holds pipe_models.py; REFERENCE holds latents `z{n}` and pipe's images `x{n}` for
each batch size n, and pipe's discriminator logits `d{n}` on `x{n}`. Loads
generator.safetensors (strict, through pipe_models.load_generator), generator.pt
(torch.jit.load) and discriminator.safetensors, runs them on the same inputs and prints one
JSON object: the largest |difference| per file and batch size, the output shapes and ranges,
and the generator's metadata. It also runs both generators on the latents of
grid_latents.safetensors and writes their images, `x` (safetensors) and `x_ts` (TorchScript),
to GRID_OUT, and reports that file's metadata (`grid_meta`).
"""

import json
import sys

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

models_dir, export_dir, reference, grid_out = sys.argv[1:5]
sys.path.insert(0, models_dir)
import pipe_models  # noqa: E402

torch.set_grad_enabled(False)
ref = load_file(reference)
g = pipe_models.load_generator(f"{export_dir}/generator.safetensors")
d = pipe_models.load_discriminator(f"{export_dir}/discriminator.safetensors")
ts = torch.jit.load(f"{export_dir}/generator.pt")
with safe_open(f"{export_dir}/generator.safetensors", framework="pt") as f:
    meta = f.metadata()

report = {"safetensors": {}, "torchscript": {}, "discriminator": {}, "shape": {}, "range": {}, "meta": meta}
for key in sorted(k for k in ref if k.startswith("z")):
    n = key[1:]
    z, want = ref[key], ref[f"x{n}"]
    a, b = g(z), ts(z)
    report["safetensors"][n] = (a - want).abs().max().item()
    report["torchscript"][n] = (b - want).abs().max().item()
    report["shape"][n] = [list(a.shape), list(b.shape)]
    report["range"][n] = [min(a.min().item(), b.min().item()), max(a.max().item(), b.max().item())]
    if f"d{n}" in ref:
        report["discriminator"][n] = (d(want) - ref[f"d{n}"]).abs().max().item()
z = load_file(f"{export_dir}/grid_latents.safetensors")["z"]
save_file({"x": g(z).contiguous(), "x_ts": ts(z).contiguous()}, grid_out)
with safe_open(f"{export_dir}/grid_latents.safetensors", framework="pt") as f:
    report["grid_meta"] = f.metadata()
print(json.dumps(report))
