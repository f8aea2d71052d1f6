#!/usr/bin/env bash
# tests/gpu.sh: everything a GPU is wanted for, measured in one go and run first, whole, whenever one
# is available (the script fits in 8 minutes on one H100/H200):
#
#   bash tests/gpu.sh [--out DIR] [--budget SECONDS]   on the GPU (DIR: $OUT if set, else gpu_out)
#   bash tests/gpu.sh --dry-run --out DIR              the same steps on the CPU, preset tiny
#
# Steps, most wanted first: tests/test_speed.py (its CUDA test included); `bench` of the `paper` preset at
# 128^2: scoring at K = T = 10 and 2 in NCHW, training at batch 32 and at the largest batch that fits,
# all eager; then compiled; scoring in channels_last (eager); the exported program if `export` exists.
# Every scoring `bench` times, in one run, the U-Net before the contiguous attention and eager in bf16
# autocast and fp32; the eager steps add it with its weights in bf16 (--bf16-weights), the compiled ones
# compiled in both precisions (--compile) and as CUDA graph replays (--graphs); `bench --train --compile`
# trains eager and compiled. Peak memory comes with every step.
#
# After each step its figures, command, status and seconds are appended to DIR/gpu.json and DIR/gpu.md
# (both rewritten whole, atomically), so a GPU that goes away mid-run loses only the step it was in; the
# steps' output goes to DIR/gpu.log. Each step runs under its own time limit, cut to what is left of
# --budget, and one that fails or hangs is recorded as such and the next one starts.
# --dry-run: preset tiny at 16^2 on the CPU, one thread, few images, and torch.compile the identity, so
# the "compiled" variants run eagerly through the same wrappers (a CPU's inductor takes minutes to
# compile; tests/test_speed.py checks compiled against eager): it checks that every step runs and writes
# its figures (tests/test_gpu_script.py), not what they are. Only the variants' tests run (the CUDA one
# is skipped). About a minute of CPU time (BENCHMARKS.md, "GPU script").
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUTDIR=${OUT:-gpu_out}
DRY=0
BUDGET=470
while (( $# )); do
  case $1 in
    --dry-run) DRY=1 ;;
    --out) OUTDIR=${2:?--out needs a folder}; shift ;;
    --budget) BUDGET=${2:?--budget needs seconds}; shift ;;
    *) echo "tests/gpu.sh: $1: unknown argument (--dry-run, --out DIR, --budget SECONDS)" >&2; exit 2 ;;
  esac
  shift
done
[[ $BUDGET =~ ^[0-9]+$ ]] || { echo "tests/gpu.sh: --budget: $BUDGET is not a whole number of seconds" >&2; exit 2; }
mkdir -p "$OUTDIR" || exit 2
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
FIG=$WORK/figures.json
LOG=$OUTDIR/gpu.log
: >"$LOG"
rm -f "$OUTDIR/gpu.json" "$OUTDIR/gpu.md"
DEADLINE=$(( $(date +%s) + BUDGET ))

if (( DRY )); then
  FM=("$PY" -c 'import runpy, sys, torch
torch.compile = lambda model, **kw: model  # dry run: the compiled variants run eagerly, through the same wrappers
sys.argv[0] = "flow_mismatch.py"
runpy.run_path("flow_mismatch.py", run_name="__main__")')
  export OMP_NUM_THREADS=1  # tiny tensors: one thread, no slow-down when the CPU is shared
  DEVICE=cpu SIZE=16
  ON=(--device cpu --preset tiny --image-size $SIZE)
  K10=(--images 1 --repeats 1 --max-batch 32) K2=(--images 2 --repeats 1 --max-batch 32) TRAIN=(--images 8 --repeats 1)
  TESTS=(tests/test_speed.py -k "bf16_weights or graphed")
else
  FM=("$PY" flow_mismatch.py)
  DEVICE=cuda SIZE=128
  ON=(--device cuda --preset paper --image-size $SIZE)
  K10=(--images 10 --repeats 3) K2=(--images 128 --repeats 3) TRAIN=(--images 32 --repeats 3)
  TESTS=(tests/test_speed.py)
fi
SCORE=(bench "${ON[@]}" --no-naive --json "$FIG")

record() {  # record NAME STATUS MILLISECONDS COMMAND: appends the step (and $FIG's figures, if written) to gpu.json/md
  "$PY" - "$OUTDIR" "$FIG" "$DRY" "$@" <<'PY'
import json, os, sys, time
from pathlib import Path
out, fig, dry, name, status, ms, command = sys.argv[1:]
path = Path(out) / "gpu.json"
run = json.loads(path.read_text()) if path.exists() else dict(
    dry_run=dry == "1", started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), steps=[])
figures = json.loads(Path(fig).read_text()) if os.path.exists(fig) else {}
if figures:
    os.remove(fig)  # this step's, no other's
run["steps"].append(dict(name=name, status=status, seconds=round(int(ms) / 1e3, 1), command=command, figures=figures))


def value(v):
    return f"{v:.4g}" if isinstance(v, float) else str(v)


md = [f"# tests/gpu.sh{' --dry-run' if run['dry_run'] else ''}, started {run['started']}", "",
      "| step | status | seconds | command |", "|---|---|---|---|"]
md += [f"| {s['name']} | {s['status']} | {s['seconds']} | `{s['command']}` |" for s in run["steps"]]
for s in run["steps"]:
    f = s["figures"]
    if not f:
        continue
    md += ["", f"## {s['name']}", ""]
    variants = [k[:-4] for k in f if k.endswith("_fps") and k[:-4] not in ("batched", "naive")]
    if f.get("mode") == "score":  # a row per variant of the U-Net
        md += ["| variant | U-Net forward, ms | scorer, images/s | latency, ms | scorer vs before | compile, s |",
               "|---|---|---|---|---|---|"]
        md += [f"| {v} | {value(f[v + '_forward_ms'])} | {value(f[v + '_fps'])} | {value(f[v + '_latency_ms'])} | "
               f"{value(f.get(v + '_scorer_vs_before', 1.0))} | {value(f.get(v + '_compile_s', ''))} |" for v in variants]
        md.append("")
    md += ["| figure | value |", "|---|---|"]
    md += [f"| {k} | {value(v)} |" for k, v in f.items() if not isinstance(v, (dict, list))]
for name, text in (("gpu.json", json.dumps(run, indent=1)), ("gpu.md", "\n".join(md) + "\n")):
    tmp = Path(out) / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, Path(out) / name)  # whole or not at all
PY
}

within() {  # within COMMAND...: COMMAND, stopped (exit 124) when the step's time is up
  local left=$(( STEP_END - $(date +%s) ))
  (( left > 0 )) || return 124
  timeout -k 10 "$left" "$@"
}

step() {  # step NAME LIMIT COMMAND...: COMMAND (a function here runs its commands `within`) under
  local name=$1 limit=$2 left rc t0 status shown  # min(LIMIT, what is left of the budget) seconds, then recorded
  shift 2
  left=$(( DEADLINE - $(date +%s) ))
  rm -f "$FIG"
  if (( left < 15 )); then
    record "$name" "skipped: budget spent" 0 "${*//"${FM[*]}"/flow_mismatch.py}"
    return
  fi
  (( limit > left )) && limit=$left
  STEP_END=$(( $(date +%s) + limit ))
  shown="$*"
  shown=${shown//"${FM[*]}"/flow_mismatch.py}  # the dry run's wrapper, by name
  shown=${shown//"$FIG"/STEP.json}
  echo "=== $name: $shown (limit ${limit} s)" >>"$LOG"
  t0=$(date +%s%N)
  if declare -F "$1" >/dev/null; then "$@"; else within "$@"; fi >>"$LOG" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|137) status="timed out after ${limit} s" ;;
    *) status="failed (exit $rc)" ;;
  esac
  record "$name" "$status" $(( ($(date +%s%N) - t0) / 1000000 )) "$shown"
  echo "tests/gpu.sh: $name: $status" >&2
}

tests() {  # the tests, their counts as figures
  local rc
  within "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}" --junitxml="$WORK/junit.xml"
  rc=$?
  "$PY" - "$WORK/junit.xml" "$FIG" <<'PY'
import json, sys
import xml.etree.ElementTree as ET  # pytest's own report of the run just made
s = ET.parse(sys.argv[1]).getroot().find("testsuite")
n = {k: int(s.get(k)) for k in ("tests", "failures", "errors", "skipped")}
json.dump(dict(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"], seconds=float(s.get("time"))),
          open(sys.argv[2], "w"))
PY
  return $rc
}

exported() {  # the exported program against the checkpoint it came from, by `score` on the same images
  local data=$WORK/data/weave run=$WORK/run t0 t1 t2
  within "$PY" -c "import flow_mismatch as fm, pathlib
fm.make_demo_dataset(pathlib.Path('$WORK/data'), size=$SIZE, n_train=8, n_test=8)" &&
  within "${FM[@]}" train --data "$data" --out "$run" "${ON[@]}" --steps 2 --batch-size 4 --calib-fraction 0 &&
  t0=$(date +%s.%N) && within "${FM[@]}" export --ckpt "$run/ckpt.pt" --data "$data/test/good" --out "$WORK/scorer.pt2" \
    -K 10 -T 10 &&
  t1=$(date +%s.%N) && within "${FM[@]}" score --ckpt "$run/ckpt.pt" "$data/test/good" --out "$WORK/s1" -K 10 -T 10 \
    --device "$DEVICE" &&
  t2=$(date +%s.%N) && within "${FM[@]}" score --ckpt "$WORK/scorer.pt2" "$data/test/good" --out "$WORK/s2" -K 10 -T 10 \
    --device "$DEVICE" &&
  "$PY" - "$FIG" "$t0" "$t1" "$t2" "$(date +%s.%N)" "$(stat -c %s "$WORK/scorer.pt2")" <<'PY'
import json, sys
t0, t1, t2, t3, size = map(float, sys.argv[2:])
json.dump(dict(export_s=t1 - t0, pt2_bytes=int(size), score_ckpt_s=t2 - t1, score_pt2_s=t3 - t2,
               pt2_vs_ckpt=(t2 - t1) / (t3 - t2)), open(sys.argv[1], "w"))
PY
}

"$PY" -c "import torch, json, sys; json.dump(dict(torch=torch.__version__, cuda=torch.version.cuda,
device=torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'), open(sys.argv[1], 'w'))" "$FIG" \
  && record machine ok 0 "torch and device"
# Eager first (no compile to wait for), then the compiled variants, a few compiles a step (each cold on a
# fresh machine: a step that runs out of time loses only its own figures; inductor's on-disk cache makes
# the second step's compiles short), then the other layout, then the export.
step tests 90 tests
step score_k10_nchw 75 "${FM[@]}" "${SCORE[@]}" --bf16-weights -K 10 -T 10 "${K10[@]}" --layout nchw
step score_k2_nchw 45 "${FM[@]}" "${SCORE[@]}" --bf16-weights -K 2 -T 2 "${K2[@]}" --layout nchw
step train 60 "${FM[@]}" bench "${ON[@]}" --train "${TRAIN[@]}" --json "$FIG"
step score_k10_nchw_compiled 180 "${FM[@]}" "${SCORE[@]}" --compile -K 10 -T 10 "${K10[@]}" --layout nchw
step score_k10_nchw_graphs 120 "${FM[@]}" "${SCORE[@]}" --graphs -K 10 -T 10 "${K10[@]}" --layout nchw
step score_k2_nchw_compiled 60 "${FM[@]}" "${SCORE[@]}" --compile --graphs -K 2 -T 2 "${K2[@]}" --layout nchw
step train_compiled 180 "${FM[@]}" bench "${ON[@]}" --train --compile "${TRAIN[@]}" --json "$FIG"
step score_k10_channels_last 75 "${FM[@]}" "${SCORE[@]}" --bf16-weights -K 10 -T 10 "${K10[@]}" --layout channels_last
step score_k2_channels_last 45 "${FM[@]}" "${SCORE[@]}" --bf16-weights -K 2 -T 2 "${K2[@]}" --layout channels_last
if "$PY" flow_mismatch.py export --help >/dev/null 2>&1; then
  step export 60 exported
else
  record export "skipped: flow_mismatch.py has no export command" 0 "flow_mismatch.py export --help"
fi
echo "tests/gpu.sh: figures in $OUTDIR/gpu.json and $OUTDIR/gpu.md, output in $LOG" >&2
