#!/usr/bin/env bash
# The GPU checks, for a session that is lent a device machine (see the device tool's README):
# the CuPy test modules, the theorem checks on the GPU, and the GPU benchmarks next to the CPU
# ones measured in the same run. Writes everything under $OUT (default ./gpu_out).
# Usage on the device: bash benchmarks/run_gpu.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export MPLBACKEND=Agg HYPOTHESIS_PROFILE=ci
python3 -c "import cupy; print('cupy', cupy.__version__, cupy.cuda.runtime.getDeviceCount(), 'device(s)')" \
  > "$OUT/cupy.txt" 2>&1
python3 -m pytest -q tests/test_cupy.py tests/test_checks.py tests/test_correlation.py \
  tests/test_backend.py -rs > "$OUT/pytest_gpu.txt" 2>&1
python3 -m kfc_ref check --device gpu --json > "$OUT/check_gpu.json" 2> "$OUT/check_gpu.err"
for dev in gpu cpu; do
  python3 -m kfc_ref bench conv --device $dev --json > "$OUT/bench_conv_$dev.json" 2>&1
  python3 -m kfc_ref bench curvature --device $dev --json > "$OUT/bench_curvature_$dev.json" 2>&1
done
python3 -m kfc_ref bench optim --device gpu > "$OUT/bench_optim_gpu.txt" 2>&1
echo "results in $OUT"
