#!/usr/bin/env bash
# The one GPU check of irno (see shared GPU.md): on a bare GPU machine with no network it builds the
# extension with CUDA, runs the GPU tests, the op benchmarks and the end-to-end IRNO benchmark, and
# leaves logs + CSVs + the steps plot in $OUT (8 files at most).
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Each step has its own timeout (all of them together: about 630 s, build included; at cb16083 the
# whole check took 500 s), so pass the device call a limit of at least 590 s; the last thing printed
# is a short summary table, and the steps' files are in $OUT even if the call is cut short.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
log() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

log "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  2>&1 | tee -a "$OUT/device.txt"
# the device's copy of the tree may carry a stale .git: pass IRNO_COMMIT=<hash> to record the right one
echo "commit ${IRNO_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}" | tee -a "$OUT/device.txt"

log "build (IRNO_CUDA=1, arch of this device)"
ARCH=$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
t0=$(date +%s)
IRNO_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ]; then
  # keep the run useful: without the CUDA kernels the Triton kernels and the benchmarks still run
  grep -E "error|Error" "$OUT/build.log" | head -20
  log "CUDA build failed: building without CUDA kernels (IRNO_CUDA=0) to test the rest"
  IRNO_CUDA=0 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >> "$OUT/build.log" 2>&1 || exit 1
fi
"$PY" -c "import irno_kernels as ik; print(ik.build_info()); print(ik.backends())" 2>&1 | tee -a "$OUT/device.txt"

log "pytest -m gpu (four processes side by side: most of the time goes to triton compiling kernels)"
# a test that runs past 90 s dumps every thread's stack into the log (faulthandler), so a slow or hung
# test shows where it is; the shards' logs are joined into one file ($OUT holds at most 8)
SHARDS=$(mktemp -d)
# (at cb16083 the graphed, graphed_train and models files in one shard ran past 170 s: now two shards;
# the triton, norm, pad and update files took 144 s together and test_triton.py has grown since (16-bit
# fields): norm and pad run with the rest, which took 50 s)
A="tests/test_graphed.py"
A2="tests/test_graphed_train.py tests/test_models.py"
B="tests/test_triton.py tests/test_update.py"
REST=$(ls tests/test_*.py | grep -v -x -F -e "${A// /$'\n'}" -e "${A2// /$'\n'}" -e "${B// /$'\n'}" | tr '\n' ' ')
# beside them (CPU work): registers and occupancy of the DFT kernels' configurations with this
# machine's triton, appended to bench_ops.log after the tuning sweep that times the same list
RESOURCES=$(mktemp)
timeout 160 "$PY" benchmarks/kernel_resources.py > "$RESOURCES" 2>&1 &
RESOURCES_PID=$!
i=0
PIDS=""
for files in "$A" "$A2" "$B" "$REST"; do
  # shellcheck disable=SC2086
  timeout 170 "$PY" -m pytest -m gpu -q --no-header --tb=short --durations=8 -p no:cacheprovider \
    -o faulthandler_timeout=90 $files > "$SHARDS/$i.log" 2>&1 &
  PIDS="$PIDS $!"
  i=$((i + 1))
done
rc=0
for job in $PIDS; do wait "$job" || rc=$?; done
wait "$RESOURCES_PID"
log "pytest rc=$rc (124: timeout; a shard's last nonzero status)"
for f in "$SHARDS"/*.log; do echo "=== shard $(basename "$f" .log)"; cat "$f"; done > "$OUT/pytest_gpu.log"
rm -rf "$SHARDS"
grep -E "^(FAILED|ERROR)|Timeout \(" "$OUT/pytest_gpu.log" | cut -c1-220 | head -20
grep -E "^(=+ )?[0-9]+ (passed|failed|skipped|error|deselected)" "$OUT/pytest_gpu.log"

log "op benchmarks"
rm -f "$OUT/bench_ops.csv"
timeout 140 "$PY" benchmarks/bench_ops.py --device cuda --csv "$OUT/bench_ops.csv" > "$OUT/bench_ops.log" 2>&1
log "bench rc=$?"

log "IRNO benchmark (plain vs irno vs graphed vs graphed+bf16)"
rm -f "$OUT/bench_irno.csv" "$OUT/bench_irno.png"
timeout 150 "$PY" benchmarks/bench_irno.py --device cuda --csv "$OUT/bench_irno.csv" --plot "$OUT/bench_irno.png" \
  > "$OUT/bench_irno.log" 2>&1
log "bench_irno rc=$? (1: a variant disagreed with plain or raised; 124: timeout)"
grep -E "agreement|FAILED" "$OUT/bench_irno.log" | cut -c1-200 | head -12

# (benchmarks/profile_ops.py, the kernels behind the unmet op targets, ran here up to cb16083; its
# output is in those runs' bench_ops.log. Its time now goes to the tuning sweep.)
log "tuning sweep: the Triton DFT kernels' launch configurations, the mixing kernel's settings (appended to bench_ops.log)"
echo "=== benchmarks/tune_dft.py" >> "$OUT/bench_ops.log"
timeout 90 "$PY" benchmarks/tune_dft.py >> "$OUT/bench_ops.log" 2>&1
log "tune_dft rc=$? (1: a configuration disagreed with the current one; 124: timeout)"
sed -n '/^best per kernel/,$p' "$OUT/bench_ops.log" | head -8
{ echo "=== benchmarks/kernel_resources.py"; grep -v -i "warn" "$RESOURCES"; } >> "$OUT/bench_ops.log"
rm -f "$RESOURCES"

log "profile: where one eager inference call spends its time (256x256 B1 fp32)"
timeout 40 "$PY" benchmarks/profile_irno.py --batch 1 --top 8 2>&1 | grep -v -E "USDT|profiler_st|_warn_once|UserWarning" \
  | tee -a "$OUT/bench_irno.log"

log "summary (speed-up over the reference, median of CUDA-event timings)"
"$PY" - "$OUT/bench_ops.csv" <<'PYEOF'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit("no benchmark rows")
# one line per (op, shape, mode): the reference's time, then each provider's speed-up (roofline fraction)
lines = {}
for r in rows:
    key = (r["op"], r["shape"], r["mode"])
    lines.setdefault(key, []).append(r)
print(f"{'op':22s} {'shape':22s} {'mode':6s} {'ref ms':>8s}  provider: x ref (fraction of copy bandwidth)")
for (op, shape, mode), rs in lines.items():
    ref = [r for r in rs if r["provider"] == "reference"]
    parts = [f"{r['provider']} x{r['speedup_vs_ref']} ({r['roofline_frac']})" for r in rs if r["provider"] != "reference"]
    ref_ms = f"{float(ref[0]['median_ms']):8.3f}" if ref else "       -"
    print(f"{op[:22]:22s} {shape[:22]:22s} {mode:6s} {ref_ms}  " + ", ".join(parts))
PYEOF

log "summary: IRNO end to end, speed-up over plain PyTorch (K=6; err = rel. L2 vs plain)"
"$PY" - "$OUT/bench_irno.csv" <<'PYEOF'
import csv, sys
import numpy as np
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit("no bench_irno rows")
print(f"{'kind':5s} {'case':20s} {'variant':13s} {'ms':>9s} {'TFLOP/s':>7s} {'x plain':>7s} {'err':>8s}")
for r in rows:
    if r["kind"] in ("infer", "train"):
        ms = f"{float(r['median_ms']):9.3f}" if r["median_ms"] else "   failed"
        print(f"{r['kind']:5s} {r['case']:20s} {r['variant']:13s} {ms} {r['TFLOP_s']:>7s} "
              f"{r['speedup_vs_plain']:>7s} {r['rel_err_vs_plain']:>8s}")
fits = []
for v in ("plain", "irno", "graphed", "graphed+bf16"):
    pts = [(float(r["steps"]), float(r["median_ms"])) for r in rows
           if r["kind"] == "sweep" and r["variant"] == v and r["median_ms"]]
    if len(pts) > 1:
        s, t = np.array(pts).T
        fits.append(f"{v} {np.polyfit(s, t, 1)[0]:.3f}")
print("ms per step (fit over the steps sweep): " + ", ".join(fits))
PYEOF


log "targets of issues 5 and 6 (ratios from this run's CSVs)"
"$PY" benchmarks/targets.py "$OUT/bench_ops.csv" "$OUT/bench_irno.csv"
