#!/usr/bin/env bash
# Set up on first use (system packages, libtorch 2.11.0 in a venv, data, release build), then
# train a convolutional GAN on the illustrations with DRAGAN on the CPU:
# pipelines/irasutoya_small.ron (32×32 RGB, 2,500 generator steps; about 10 minutes on 2 cores).
# Extra arguments go to `pipe run` (e.g. --max-steps 500, --device cuda).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh"
cd "$root"
exec target/release/pipe run pipelines/irasutoya_small.ron "$@"
