#!/usr/bin/env bash
# Train the shipped CPU pipelines at their budgets, score them, and print the quality table.
#
#   scripts/quality.sh [--quick] [--seeds 0,1,2] [--inception auto|all|none] [--inception-n N] [--docs]
#                      [--append] [--score-only] [PIPELINE...]
#
# PIPELINE: names under pipelines/ (mnist_mlp, mnist_dcgan, fashion_dcgan, irasutoya_small; the
# default is all four). Each one is trained from scratch on the CPU with `pipe run` (its own
# max_steps), timed as a whole process, then scored with `pipe eval` on 10,000 generated samples
# (the EMA generator where the pipeline keeps one):
#   - LeNet FID, KID and IS-style score (MNIST-like pipelines: the classifier set-up trained),
#   - Inception FID and KID (the FID of papers; about 20 minutes per 10,000 images per side on
#     2 cores, the real side cached after the first time). `--inception auto` (default) scores
#     the pipelines whose target is an Inception FID (mnist_dcgan, fashion_dcgan,
#     irasutoya_small); `all` adds mnist_mlp; `none` skips it.
# The MNIST pipelines run over three seeds (0, 1, 2) and the table adds their mean ± std;
# `--seeds` sets the seeds of every pipeline.
# `--quick`: a smoke run of a few minutes (100 steps, 500 LeNet and 100 Inception samples, one
# seed), to check the script and the pipelines, not the pictures.
# `--docs`: copy each pipeline's last grid (first seed) to docs/grids/NAME.png (not with --quick).
# `--append`: keep the rows already in results.tsv (a row for the same pipeline and seed is
# replaced), so seeds trained by separate invocations, for example two at a time with
# OMP_NUM_THREADS=1, land in one table with their mean ± std.
# `--score-only`: train nothing; score the finished runs/quality/NAME-sSEED again (for example
# with a larger --inception-n), keeping the seconds its training took (NAME-sSEED.seconds).
# A run that fails is reported with the end of its log and the script goes on with the next.
#
# Outputs: runs/quality/NAME-sSEED/ (the runs, train.log, eval-*.json), runs/quality/results.tsv
# (one row per run of this invocation) and runs/quality/results.md (the table, also printed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

quick=0; seeds=""; inception=auto; n_incep=10000; docs=0; append=0; score_only=0; names=()
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1 ;;
    --seeds) seeds="${2:?--seeds needs a list such as 0,1,2}"; shift ;;
    --inception) inception="${2:?--inception needs auto, all or none}"; shift ;;
    --inception-n) n_incep="${2:?--inception-n needs a number of samples}"; shift
                   [[ "$n_incep" =~ ^[1-9][0-9]*$ ]] || { echo "quality.sh: --inception-n $n_incep: expected a positive whole number" >&2; exit 2; } ;;
    --docs) docs=1 ;;
    --append) append=1 ;;
    --score-only) score_only=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "quality.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) names+=("$1") ;;
  esac
  shift
done
case "$inception" in auto|all|none) ;; *) echo "quality.sh: --inception $inception: expected auto, all or none" >&2; exit 2 ;; esac
[ $quick = 1 ] && [ $docs = 1 ] && { echo "quality.sh: --docs takes the grids of full runs, not --quick ones" >&2; exit 2; }
[ ${#names[@]} -gt 0 ] || names=(mnist_mlp mnist_dcgan fashion_dcgan irasutoya_small)

# Per pipeline: real data for the scores | LeNet classifier ("-": none) | Inception under auto | seeds.
spec_of() {
  case "$1" in
    mnist_mlp)       echo "data/mnist|data/lenet/mnist.safetensors|0|0,1,2" ;;
    mnist_dcgan)     echo "data/mnist|data/lenet/mnist.safetensors|1|0,1,2" ;;
    fashion_dcgan)   echo "data/fashion-mnist/t10k-images-idx3-ubyte.gz|data/lenet/fashion-mnist.safetensors|1|0" ;;
    irasutoya_small) echo "data/illustrations|-|1|0" ;;
    *) return 1 ;;
  esac
}
for n in "${names[@]}"; do
  [ -f "pipelines/$n.ron" ] || { echo "quality.sh: pipelines/$n.ron: no such pipeline" >&2; exit 2; }
  spec_of "$n" >/dev/null || { echo "quality.sh: $n: no quality settings (known: mnist_mlp mnist_dcgan fashion_dcgan irasutoya_small)" >&2; exit 2; }
done

"$root/scripts/setup.sh"
pipe="$root/target/release/pipe"
out="runs/quality"; [ $quick = 1 ] && out="runs/quality-quick"
mkdir -p "$out"
tsv="$out/results.tsv"
header='pipeline\tseed\tsteps\tseconds\tinception_n\tinception_fid\tinception_kid\tlenet_fid\tlenet_kid\tis'
[ $append = 1 ] && [ -s "$tsv" ] || printf "$header\n" > "$tsv"
# add_row NAME SEED FIELDS...: one row per pipeline and seed, replacing an earlier one (--append).
add_row() {
  (
    flock 9  # two invocations with --append may finish a run at the same moment
    local tmp; tmp=$(mktemp "$tsv.XXXXXX")
    awk -F'\t' -v n="$1" -v s="$2" 'NR == 1 || !($1 == n && $2 == s)' "$tsv" > "$tmp"
    local IFS=$'\t'; printf '%s\n' "$*" >> "$tmp"
    mv "$tmp" "$tsv"
  ) 9>"$tsv.lock"
}

n_lenet=10000
[ $quick = 1 ] && { n_lenet=500; n_incep=100; }

json_get() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); v=d.get(sys.argv[2]); print(v[0] if isinstance(v,list) else v)' "$1" "$2"; }

for n in "${names[@]}"; do
  IFS='|' read -r real lenet incep_auto default_seeds <<<"$(spec_of "$n")"
  [ $quick = 1 ] && default_seeds=0
  run_seeds="${seeds:-$default_seeds}"
  use_incep=0
  case "$inception" in all) use_incep=1 ;; auto) use_incep=$incep_auto ;; esac
  for seed in ${run_seeds//,/ }; do
    dir="$out/$n-s$seed"
    args=(run "pipelines/$n.ron" --device cpu --out "$dir" --overwrite --set "seed=$seed")
    [ $quick = 1 ] && args+=(--max-steps 100)
    [ $quick = 1 ] && grep -q 'kind: Eval(' "pipelines/$n.ron" && args+=(--set eval.n=200)
    if [ $score_only = 1 ]; then
      [ -f "$dir.seconds" ] && [ -f "$dir/metrics.csv" ] || {
        echo "quality: --score-only: $dir has no finished run (no $dir.seconds); train it first" >&2
        add_row "$n" "$seed" failed "" "" "" "" "" "" ""; continue; }
      secs=$(cat "$dir.seconds")
    else
      echo "quality: training $n (seed $seed) → $dir (log: $dir.log)" >&2
      t0=$(date +%s.%N)
      if ! "$pipe" "${args[@]}" 2>"$dir.log"; then
        echo "quality: $n (seed $seed) failed; the end of $dir.log:" >&2
        tail -n 5 "$dir.log" >&2
        add_row "$n" "$seed" failed "" "" "" "" "" "" ""
        continue
      fi
      tail -n 1 "$dir.log" >&2
      t1=$(date +%s.%N)
      secs=$(python3 -c "print(f'{$t1-$t0:.0f}')")
      echo "$secs" > "$dir.seconds"
    fi
    steps=$(tail -n 1 "$dir/metrics.csv" | cut -d, -f1)
    ifid=""; ikid=""; incep_n=""; lfid=""; lkid=""; is=""
    if [ "$lenet" != "-" ]; then
      echo "quality: LeNet scores of $n (seed $seed), $n_lenet samples" >&2
      "$pipe" eval --real "$real" --fake "$dir" --n "$n_lenet" --features lenet --classifier "$lenet" \
        --device cpu --json "$dir/eval-lenet.json" >/dev/null
      lfid=$(json_get "$dir/eval-lenet.json" fid); lkid=$(json_get "$dir/eval-lenet.json" kid_mean)
      is=$(json_get "$dir/eval-lenet.json" is_fake)
    fi
    if [ $use_incep = 1 ]; then
      echo "quality: Inception scores of $n (seed $seed), $n_incep samples (slow on a CPU)" >&2
      "$pipe" eval --real "$real" --fake "$dir" --n "$n_incep" --size 32 --device cpu --json "$dir/eval-inception.json" >/dev/null
      ifid=$(json_get "$dir/eval-inception.json" fid); ikid=$(json_get "$dir/eval-inception.json" kid_mean)
      incep_n="$(json_get "$dir/eval-inception.json" n_real)/$(json_get "$dir/eval-inception.json" n_fake)"
    fi
    add_row "$n" "$seed" "$steps" "$secs" "$incep_n" "$ifid" "$ikid" "$lfid" "$lkid" "$is"
    if [ $docs = 1 ] && [ "$seed" = "${run_seeds%%,*}" ]; then
      mkdir -p docs/grids
      last=$(ls "$dir/samples" | sort | tail -n 1)
      cp "$dir/samples/$last" "docs/grids/$n.png"
    fi
  done
done

# The table: one row per run, then mean ± std (population std over the seeds) per pipeline.
python3 - "$tsv" "$out/results.md" "$quick" <<'PY'
import csv, statistics as st, sys, datetime, platform, os
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
# In the order the pipelines first appear, each pipeline's seeds in order (--append replaces
# rows in place, so the file itself may be out of order).
first = {}
for i, r in enumerate(rows):
    first.setdefault(r["pipeline"], i)
rows.sort(key=lambda r: (first[r["pipeline"]], int(r["seed"]) if r["seed"].isdigit() else 0))
cols = ["inception_fid", "inception_kid", "lenet_fid", "lenet_kid", "is"]
def f(v, d=2):
    return "—" if v in ("", None) else f"{float(v):.{d}f}"
lines = [
    f"Quality table ({'quick smoke run, not a result' if sys.argv[3] == '1' else 'full runs'}), "
    f"{datetime.date.today()}, {os.cpu_count()} CPU cores ({platform.machine()}); LeNet scores on 10,000 samples per side "
    f"unless --quick, Inception scores on the real/generated counts in their column",
    "",
    "| pipeline | seed | steps | seconds | Inception n (real/generated) | Inception FID ↓ | Inception KID ↓ | LeNet FID ↓ | LeNet KID ↓ | LeNet IS ↑ |",
    "|---|---|---|---|---|---|---|---|---|---|",
]
for r in rows:
    if r['steps'] == 'failed':
        lines.append(f"| {r['pipeline']} | {r['seed']} | failed | | | | | | | |")
        continue
    lines.append(f"| {r['pipeline']} | {r['seed']} | {r['steps']} | {r['seconds']} | {r['inception_n'] or '—'} | {f(r['inception_fid'])} | {f(r['inception_kid'], 4)} | "
                 f"{f(r['lenet_fid'])} | {f(r['lenet_kid'], 4)} | {f(r['is'])} |")
by = {}
for r in rows:
    if r["steps"] != "failed":
        by.setdefault(r["pipeline"], []).append(r)
for name, rs in by.items():
    if len(rs) < 2:
        continue
    def mean_std(c):
        vals = [float(r[c]) for r in rs if r[c] != ""]
        d = 4 if c.endswith("kid") else (0 if c == "seconds" else 2)
        if not vals:
            return "—"
        if len(vals) == 1:  # scored on one seed only (e.g. Inception): no spread to show
            return f"{vals[0]:.{d}f} (1 seed)"
        some = "" if len(vals) == len(rs) else f" ({len(vals)} seeds)"
        return f"{st.mean(vals):.{d}f} ± {st.pstdev(vals):.{d}f}{some}"
    ns = ", ".join(sorted({r["inception_n"] for r in rs if r["inception_n"]})) or "—"
    cells = [mean_std("seconds"), ns] + [mean_std(c) for c in cols]
    lines.append(f"| **{name}** | mean ± std of {len(rs)} | {rs[0]['steps']} | " + " | ".join(cells) + " |")
text = "\n".join(lines) + "\n"
open(sys.argv[2], "w").write(text)
print(text)
PY
