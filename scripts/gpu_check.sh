#!/usr/bin/env bash
# The one prepared check of pipe's GPU path, for the lent GPU machine (it builds nothing there).
#
# Here (the CPU machine):   scripts/gpu_pack.sh
#   builds target/gpu/: a stripped `pipe` without the video encoder (the GPU machine has no
#   FFmpeg), linked against this venv's torch 2.11.0 (cu130), plus the MNIST digits and the
#   illustrations it trains on.
# There, through the device tool, from the repository root, carrying target/gpu:
#   scripts/gpu_check.sh
# It finds the device's own torch (python3), sets LD_LIBRARY_PATH to its lib folder and to
# nvidia/cu13/lib, and in under 8 minutes:
#   (a) confirms CUDA is visible (`pipe devices`);
#   (b) trains the MNIST MLP 10 steps eagerly and 10 steps with CUDA graphs (fp32, same seed)
#       and checks every weight agrees within 1e-5 relative (`pipe compare`);
#   (c) trains it 2,000 steps in fp32 and in bf16 and checks the loss curves agree (mean of
#       d_loss and g_loss over the last 1,000 steps within 20% of each other);
#   (d) `pipe bench --device cuda` for the MLP at batch 64 and the DCGAN at 64 and 256, each
#       against PyTorch eager and tuned (+ CUDA graph + bf16) in the same run;
#   (e) trains the illustration pipeline 60 s at batch 64 and 60 s at batch 256 and reads
#       d_step's input wait from stats.json;
#   (f) the data-parallel path on NCCL: one rank (WORLD_SIZE=1; one GPU allows no more), 50
#       steps, every weight within 1e-5 of the eager single-process run of (b)'s settings;
#   (g) prints one table and writes it, with every log, under $OUT (default target/gpu/out).
# Exit status: 0 when every check passed; 1 when one failed; 2 when no CUDA device is visible
# (after the CPU-side part: the checks of (b) and (f) on the CPU, with Gloo for (f)).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="${OUT:-$root/target/gpu/out}"
mkdir -p "$out"
pack="$root/target/gpu"
pipe="${PIPE:-$pack/pipe}"  # PIPE=target/release/pipe: a dry run on the build machine
table="$out/gpu_check.md"
log() { printf '\033[1mgpu_check:\033[0m %s\n' "$*" >&2; }
row() { printf '| %s | %s | %s |\n' "$1" "$2" "$3" >>"$table"; }
failed=0

if [ ! -x "$pipe" ]; then
  echo "gpu_check: $pipe is missing: run scripts/gpu_pack.sh on the build machine and carry target/gpu" >&2
  exit 1
fi
# The device's own torch (same 2.11.0 build as the venv pipe was linked against).
py="${PYTHON:-python3}"
torch_dir="$("$py" -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null || true)"
if [ -n "$torch_dir" ]; then
  site="$(dirname "$torch_dir")"
  export LD_LIBRARY_PATH="$torch_dir/lib:$site/nvidia/cu13/lib:$site/nvidia/nccl/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# The pipelines read data/...: on the GPU machine that is the carried copy.
[ -e data ] || ln -s target/gpu/data data

{
  echo "# pipe GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "| check | result | figures |"
  echo "|---|---|---|"
} >"$table"

# (a) CUDA visible?
"$pipe" devices >"$out/devices.txt" 2>&1
cat "$out/devices.txt" >&2
if grep -q '^cuda:0' "$out/devices.txt"; then
  dev=cuda
  row "(a) CUDA visible" pass "$(grep '^cuda:0' "$out/devices.txt" | head -n1)"
else
  dev=cpu
  row "(a) CUDA visible" FAIL "no CUDA device: $(tail -n1 "$out/devices.txt")"
  log "no CUDA device visible: running the CPU-side part only"
fi

run() { # run NAME MAX_STEPS SETTINGS... : trains the MNIST MLP into $out/NAME
  local name="$1" steps="$2"
  shift 2
  local sets=()
  for s in "$@"; do sets+=(--set "$s"); done
  "$pipe" run pipelines/mnist_mlp.ron --device "$dev" --out "$out/$name" --overwrite --max-steps "$steps" \
    --checkpoint-every "$steps" --set log_every=1 "${sets[@]}" >"$out/$name.log" 2>&1
}

# (b) eager vs graph, fp32, 10 steps from the same seed.
if [ "$dev" = cuda ]; then b_mode=Graph; else b_mode=Eager; fi
if run b_eager 10 execution=Eager precision=Fp32 && run b_graph 10 execution=$b_mode precision=Fp32; then
  if "$pipe" compare "$out/b_eager" "$out/b_graph" --weights-tol 1e-5 >"$out/b_compare.txt" 2>&1; then
    row "(b) eager vs ${b_mode,,}, fp32, 10 steps" pass "$(grep -m1 'weights' "$out/b_compare.txt")"
  else
    row "(b) eager vs ${b_mode,,}, fp32, 10 steps" FAIL "$(tail -n1 "$out/b_compare.txt")"
    failed=1
  fi
else
  row "(b) eager vs ${b_mode,,}, fp32, 10 steps" FAIL "a run failed: see b_eager.log, b_graph.log"
  failed=1
fi

# (f) one data-parallel rank (NCCL on CUDA, Gloo on the CPU) against a single process.
if [ "$dev" = cuda ]; then f_backend=NCCL; else f_backend=Gloo; fi
f_port="$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 29517)"
if run f_single 50 execution=Eager precision=Fp32 &&
  RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT="$f_port" run f_rank 50 execution=Eager precision=Fp32; then
  if "$pipe" compare "$out/f_single" "$out/f_rank" --weights-tol 1e-5 >"$out/f_compare.txt" 2>&1; then
    row "(f) 1 rank on $f_backend vs 1 process, 50 steps" pass "$(grep -m1 'weights' "$out/f_compare.txt")"
  else
    row "(f) 1 rank on $f_backend vs 1 process, 50 steps" FAIL "$(tail -n1 "$out/f_compare.txt")"
    failed=1
  fi
else
  row "(f) 1 rank on $f_backend vs 1 process" FAIL "a run failed: see f_single.log, f_rank.log"
  failed=1
fi

if [ "$dev" != cuda ]; then
  cat "$table"
  exit 2
fi

# (c) bf16 vs fp32 over 2,000 steps.
if run c_fp32 2000 precision=Fp32 && run c_bf16 2000 precision=Bf16; then
  if "$pipe" compare "$out/c_fp32" "$out/c_bf16" --loss-tol 0.2 --loss-from 1000 >"$out/c_compare.txt" 2>&1; then
    row "(c) bf16 vs fp32, MLP, 2000 steps" pass "$(grep -m1 'loss' "$out/c_compare.txt")"
  else
    row "(c) bf16 vs fp32, MLP, 2000 steps" FAIL "$(tail -n1 "$out/c_compare.txt")"
    failed=1
  fi
else
  row "(c) bf16 vs fp32, MLP, 2000 steps" FAIL "a run failed: see c_fp32.log, c_bf16.log"
  failed=1
fi

# (d) speed against PyTorch in the same run.
for case in "mlp 64" "dcgan 64" "dcgan 256"; do
  set -- $case
  f="$out/d_bench_$1_$2.txt"
  if "$pipe" bench --device cuda --arch "$1" --batch "$2" --python "$py" >"$f" 2>&1; then
    row "(d) bench $1 b$2 (steps/s)" done "$(grep -E '^  (pipe|pytorch)' "$f" | awk '{$1=$1; print}' | paste -sd ';' -)"
  else
    row "(d) bench $1 b$2" FAIL "$(tail -n1 "$f")"
    failed=1
  fi
done

# (e) the illustration pipeline, 60 s at each batch size: d_step's input wait.
for b in 64 256; do
  name="e_irasutoya_b$b"
  timeout -s INT 60 "$pipe" run pipelines/irasutoya.ron --device cuda --out "$out/$name" --overwrite --stats \
    --set "loader.batch=$b" >"$out/$name.log" 2>&1
  wait_in="$("$py" -c 'import json,sys
s=json.load(open(sys.argv[1]))
s=s["stages"] if isinstance(s,dict) else s
d=[x for x in s if x["stage"]=="d_step"][0]
print(f"{100*d[\"waiting_for_input\"]:.1f}% input wait, {d[\"items_in\"]} batches in {d[\"seconds\"]:.0f} s")' "$out/$name/stats.json" 2>/dev/null)"
  if [ -n "$wait_in" ]; then
    row "(e) illustrations b$b, d_step" done "$wait_in"
  else
    row "(e) illustrations b$b" FAIL "no stats.json: see $name.log"
    failed=1
  fi
done

cat "$table"
exit $failed
