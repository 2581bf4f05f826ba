#!/usr/bin/env bash
# Data-parallel training on this machine: 1 process x 2 threads against `mpirun -n 2` x 1
# thread, VGG16 (cifar head, no attention), 32x32, global batch 64, on 1,280 of the digits
# (20 steps an epoch), in interleaved pairs. Reports each side's second-epoch images/s (the
# whole job's), the median of the per-pair ratios with the lowest and highest, and the share
# of rank 0's time spent in the gradient all-reduce. Needs Open MPI (openmpi-bin,
# libopenmpi-dev, libclang-dev). PAIRS (default 3) is read from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
pairs=${PAIRS:-3}
cargo build --release -q -p la-cli --features mpi
la=target/release/la-cli
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
runs=$(mktemp -d)
trap 'rm -rf "$runs"' EXIT
args=(train --attention none --bn false --width 1 --head cifar --size 32 --batch-size 64 --train-subset 1280
      --epochs 2 --augment none --runs-dir "$runs")
rate() { grep -E '^epoch 2: train loss.* img/s$' | grep -oE '[0-9.]+ img/s$' | cut -d' ' -f1; }
share() { grep -oE '^gradient all-reduce on rank 0: .* \(([0-9.]+) %' | grep -oE '[0-9.]+ %' | cut -d' ' -f1; }
echo "| pair | 1 process x 2 threads, images/s | 2 ranks x 1 thread, images/s | ratio | all-reduce share of rank 0's time |"
echo "|---|---|---|---|---|"
ratios=()
for i in $(seq 1 "$pairs"); do
    # stderr alone: mpirun interleaves a rank's two streams.
    one=$("$la" "${args[@]}" --threads 2 --name "one-$i" 2>&1 >/dev/null | rate)
    out=$(mpirun --oversubscribe --bind-to core -n 2 "$la" "${args[@]}" --threads 1 --name "two-$i" 2>&1 >/dev/null)
    two=$(echo "$out" | rate)
    ratio=$(python3 -c "print(f'{$two / $one:.2f}')")
    ratios+=("$ratio")
    echo "| $i | $one | $two | ${ratio}x | $(echo "$out" | share) % |"
done
python3 - "${ratios[@]}" <<'PY'
import statistics, sys
r = [float(x) for x in sys.argv[1:]]
print(f"\nmedian ratio (2 ranks / 1 process) {statistics.median(r):.2f}x, lowest {min(r):.2f}x, highest {max(r):.2f}x over {len(r)} pairs")
PY
