#!/usr/bin/env bash
# The one GPU check of irno (see shared GPU.md): on a bare GPU machine with no network it builds the
# extension with CUDA, runs the GPU tests and the op benchmarks, and leaves logs + CSVs in $OUT.
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
timeout 240 "$PY" -m pytest -m gpu -q -x --no-header -p no:cacheprovider tests 2>&1 | tail -40 | tee "$OUT/pytest_gpu.log"

log "op benchmarks"
rm -f "$OUT/bench_ops.csv"
timeout 200 "$PY" benchmarks/bench_ops.py --device cuda --csv "$OUT/bench_ops.csv" > "$OUT/bench_ops.log" 2>&1
log "bench rc=$?"

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
tail -3 "$OUT/pytest_gpu.log"
