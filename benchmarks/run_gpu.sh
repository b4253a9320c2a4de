#!/usr/bin/env bash
# The GPU acceptance run (issue 12), for a machine with CuPy and an NVIDIA GPU:
#   pip install -r requirements-gpu.txt && bash benchmarks/run_gpu.sh
# Writes ONE folder, $OUT/gpu_acceptance/ (default ./gpu_acceptance/), holding summary.json
# (per step: status, seconds, numbers) and log.txt.  Exits non-zero if any step failed.
# Steps and budgets: benchmarks/gpu_acceptance.py (about 5-8 minutes on one modern GPU).
# A dry run of every step on the CPU: bash benchmarks/run_gpu.sh --dry-run
set -euo pipefail
cd "$(dirname "$0")/.."
export MPLBACKEND=Agg HYPOTHESIS_PROFILE=ci
exec python3 benchmarks/gpu_acceptance.py "$@"
