#!/usr/bin/env bash
# Every measured figure of the closing notes, on this machine's CPU, in one run.
# Usage: bash benchmarks/run_cpu.sh CIFAR_DIR OUT_DIR   (CIFAR_DIR holds cifar-10-batches-bin;
# the official binary version from https://www.cs.toronto.edu/~kriz/cifar.html, unpacked).
# Takes about an hour on 2 cores. Results: OUT_DIR/*.txt, *.json and the run folders.
set -euo pipefail
CIFAR=${1:?CIFAR_DIR}
OUT=${2:?OUT_DIR}
mkdir -p "$OUT"
py() { echo "+ python3 $*" >> "$OUT/commands.txt"; python3 "$@"; }

# Issue 2: conv net throughput vs the machine's matmul rate (batch 128, float32).
py -m kfc_ref bench conv --json > "$OUT/bench_conv.json"
# Issue 3: KFC statistics vs one gradient (batch 512) and the exact Fisher of a tiny net.
py -m kfc_ref bench curvature --json > "$OUT/bench_curvature.json"
# Issue 4 (overhead, amortised per iteration): KFC-pre vs SGD at batch 512.
py -m kfc_ref bench optim > "$OUT/bench_optim.txt"
# Issue 4 (overhead, real epochs): one epoch of a 10,240-image CIFAR-10 subset at batch 512.
for opt in sgd kfc-pre; do
  py -m kfc_ref train --optimizer $opt --lr 0.003 --data cifar10 --data-dir "$CIFAR" \
     --max-train 10240 --max-test 1000 --batch-size 512 --epochs 1 --eval-every 1000 \
     --quiet --out "$OUT/epoch_$opt" > "$OUT/epoch_$opt.txt"
done
# Issue 4 (iterations): both methods at batch 1,000 on a 5,000-image CIFAR-10 subset with the
# small net, each at its best rate from a short sweep; updates to 10% training error.
py -m kfc_ref bench speedup iterations --data cifar10 --data-dir "$CIFAR" --arch small \
   --max-train 5000 --max-test 1000 --batch-size 1000 --rates 0.3,0.1,0.03,0.01,0.003,0.001 \
   --sweep-iters 15 --max-iters 500 --eval-every 5 --target 0.10 --out "$OUT/iterations" \
   > "$OUT/iterations.json"
# Issue 4 (wall-clock): the paper's net and batch sizes (SGD 128, KFC-pre 512) on a
# 10,000-image subset, rates from short sweeps, 4 minutes each.
for triple in "sgd 128 0.1,0.03,0.01" "kfc-pre 512 0.01,0.003"; do
  set -- $triple
  py -m kfc_ref sweep --optimizer $1 --data cifar10 --data-dir "$CIFAR" --max-train 10000 \
     --max-test 1000 --batch-size $2 --iters 20 --rates $3 \
     --out "$OUT/wc_sweep_$1" > "$OUT/wc_sweep_$1.txt"
done
best() { python3 -c "import csv,sys; print([r['lr'] for r in csv.DictReader(open(sys.argv[1])) if r['best']=='1'][0])" "$1"; }
py -m kfc_ref bench speedup wallclock --data cifar10 --data-dir "$CIFAR" --max-train 10000 \
   --max-test 1000 --seconds 240 \
   --lr-sgd "$(best "$OUT/wc_sweep_sgd/sweep.csv")" --lr-kfc "$(best "$OUT/wc_sweep_kfc-pre/sweep.csv")" \
   --out "$OUT/wallclock" > "$OUT/wallclock.json"
echo "done: $OUT"
