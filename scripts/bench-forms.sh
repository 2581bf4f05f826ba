#!/usr/bin/env bash
# The fast CPU kernels against the device-generic form (LA_KERNELS=generic, the code CUDA
# builds run) on this machine's CPU: images/s and peak RSS of each row, the two forms one
# after the other. Usage: scripts/bench-forms.sh [threads]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-$(nproc)}"
cargo build --release -q -p la-cli
la=target/release/la-cli
pick() { grep "^$1" | tail -n 1 | awk '{print $NF == "GiB" ? $(NF-1) : $NF}' || true; }
row() { # name, la-cli bench args
    local name=$1 args=$2 fast generic
    fast=$($la bench $args --threads "$threads" --no-breakdown 2>&1 || true)
    generic=$(LA_KERNELS=generic $la bench $args --threads "$threads" --no-breakdown 2>&1 || true)
    local fr gr
    fr=$(echo "$fast" | pick 'images/s:'); gr=$(echo "$generic" | pick 'images/s:')
    ratio=$(python3 -c "print(f'{float(\"$fr\")/float(\"$gr\"):.1f}x' if '$fr' and '$gr' else 'n/a')")
    echo "| $name | ${fr:-fails} ($(echo "$fast" | pick 'peak RSS:') GiB) | ${gr:-fails} ($(echo "$generic" | pick 'peak RSS:') GiB) | $ratio |"
}
echo "| benchmark (threads=$threads) | fast images/s (peak RSS) | generic images/s (peak RSS) | fast / generic |"
echo "|---|---|---|---|"
row "train VGG16, cifar head, 32x32, batch 64" "--mode train --attention none --head cifar --classes 100 --size 32 --batch 64 --steps 3 --warmup 1"
row "train VGG16 + softmax attention, cifar head, 32x32, batch 64" "--mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64 --steps 3 --warmup 1"
row "inference VGG16, 224x224, batch 1" "--mode infer --attention none --head imagenet --classes 1000 --size 224 --batch 1 --steps 3 --warmup 1"
row "inference VGG16 + softmax attention, 224x224, batch 1" "--mode infer --attention softmax --head imagenet --classes 1000 --size 224 --batch 1 --steps 1 --warmup 0"
row "train VGG16 + softmax attention, 224x224, batch 1" "--mode train --attention softmax --head imagenet --classes 1000 --size 224 --batch 1 --steps 1 --warmup 0"
