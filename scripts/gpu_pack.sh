#!/usr/bin/env bash
# Prepare target/gpu/ for scripts/gpu_check.sh on the lent GPU machine (which has torch but no
# Rust and no FFmpeg): a stripped `pipe` built without the video encoder, and copies of the
# data it trains on (MNIST digits, the LeNet features of the eval stage, the illustrations),
# about 35 MB in all (the device tool carries at most 64 MiB).
# Then, through the device tool: run `scripts/gpu_check.sh` carrying `target/gpu`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
[ -e .venv ] || scripts/setup.sh
# shellcheck source=env.sh
source scripts/env.sh
mkdir -p target/gpu/data
cargo build --release --quiet -p pipe --no-default-features
strip -o target/gpu/pipe target/release/pipe
# Put the ordinary binary (with the video encoder) back at target/release/pipe.
cargo build --release --quiet
for d in mnist lenet illustrations; do
  rm -rf "target/gpu/data/$d"
  cp -rL "data/$d" "target/gpu/data/$d"
done
if readelf -d target/gpu/pipe | grep -q 'libav'; then
  echo "gpu_pack: target/gpu/pipe still links FFmpeg (libav*): the GPU machine has none" >&2
  exit 1
fi
echo "target/gpu: $(du -sh target/gpu | cut -f1) (binary $(du -h target/gpu/pipe | cut -f1)); carry it and run scripts/gpu_check.sh"
