#!/usr/bin/env bash
# The one GPU check of irno (see shared GPU.md): on a bare GPU machine with no network it builds the
# extension with CUDA, runs the GPU tests, the op benchmarks and the end-to-end IRNO benchmark, and
# leaves logs + CSVs + the steps plot in $OUT (8 files at most).
#   OUT=/tmp/out bash benchmarks/gpu_check.sh
# Finishes well inside 8 minutes; the last thing printed is a short summary table.
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
git rev-parse --short HEAD 2>/dev/null | sed 's/^/commit /' | tee -a "$OUT/device.txt"

log "build (IRNO_CUDA=1, arch of this device)"
ARCH=$("$PY" -c "import torch; c=torch.cuda.get_device_capability(); print(f'{c[0]}.{c[1]}')")
t0=$(date +%s)
IRNO_CUDA=1 TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS=16 \
  "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$OUT/build.log" 2>&1
rc=$?
log "build rc=$rc in $(( $(date +%s) - t0 )) s"
if [ $rc -ne 0 ]; then tail -40 "$OUT/build.log"; exit $rc; fi
"$PY" -c "import irno_kernels as ik; print(ik.build_info()); print(ik.backends())" 2>&1 | tee -a "$OUT/device.txt"

log "pytest -m gpu"
timeout 130 "$PY" -m pytest -m gpu -q --no-header -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"

log "op benchmarks"
rm -f "$OUT/bench_ops.csv"
timeout 130 "$PY" benchmarks/bench_ops.py --device cuda --csv "$OUT/bench_ops.csv" > "$OUT/bench_ops.log" 2>&1
log "bench rc=$?"

log "IRNO benchmark (plain vs irno vs graphed vs graphed+bf16)"
rm -f "$OUT/bench_irno.csv" "$OUT/bench_irno.png"
timeout 140 "$PY" benchmarks/bench_irno.py --device cuda --csv "$OUT/bench_irno.csv" --plot "$OUT/bench_irno.png" \
  > "$OUT/bench_irno.log" 2>&1
log "bench_irno rc=$? (1: a variant disagreed with plain or raised; 124: timeout)"
grep -E "agreement|FAILED" "$OUT/bench_irno.log" | cut -c1-200 | head -12

log "summary (speed-up over the reference, median of CUDA-event timings)"
"$PY" - "$OUT/bench_ops.csv" <<'PYEOF'
import csv, sys
try:
    rows = list(csv.DictReader(open(sys.argv[1])))
except OSError:
    sys.exit("no benchmark rows")
print(f"{'op':26s} {'shape':24s} {'mode':6s} {'provider':9s} {'ms':>9s} {'GB/s':>8s} {'roof':>5s} {'x ref':>6s}")
for r in rows:
    if r["provider"] == "reference":
        continue
    print(f"{r['op']:26s} {r['shape']:24s} {r['mode']:6s} {r['provider']:9s} {float(r['median_ms']):9.3f} "
          f"{float(r['GB_s']):8.1f} {r['roofline_frac']:>5s} {r['speedup_vs_ref']:>6s}")
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
tail -3 "$OUT/pytest_gpu.log"
