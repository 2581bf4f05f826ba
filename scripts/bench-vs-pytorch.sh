#!/usr/bin/env bash
# Side-by-side images/s of la-cli and the PyTorch reference (bench/reference), same model,
# batch and thread count, measured in one run on this machine. Prints a markdown table.
# Usage: scripts/bench-vs-pytorch.sh [python]   (default: .venv-torch/bin/python)
# THREADS (default 2) and PAIRS (linear-attention pairs, default 3) are read from the environment.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv-torch/bin/python}
threads=${THREADS:-2}
cargo build --release -q -p la-cli
la=target/release/la-cli
rate() { grep '^images/s:' | tail -n 1 | awk '{print $2}' || true; }
rss() { grep '^peak RSS:' | tail -n 1 | awk '{print $3}' || true; }

row() { # name, torch args, la args
    local name=$1 targs=$2 largs=$3 t l tr lr
    t=$($py bench/reference/$targs --threads "$threads" 2>&1 || true)
    l=$($la bench $largs --threads "$threads" --no-breakdown 2>&1 || true)
    tr=$(echo "$t" | rate); lr=$(echo "$l" | rate)
    ratio=$(python3 -c "print(f'{float(\"$lr\")/float(\"$tr\"):.2f}x' if '$tr' and '$lr' else 'n/a')")
    cell() { # output, rate: "rate (rss GiB)", or why there is none
        local r; r=$(echo "$1" | rss)
        if [ -n "$2" ]; then echo "$2 (${r:-?} GiB)"
        elif echo "$1" | grep -q '^refusing'; then echo "refuses: $(echo "$1" | grep -o 'needs ~[^)]*GiB' | head -n 1)"
        else echo "fails"; fi
    }
    echo "| $name | $(cell "$t" "$tr") | $(cell "$l" "$lr") | $ratio |"
}

echo "| benchmark (threads=$threads) | PyTorch images/s (peak RSS) | la-cli images/s (peak RSS) | la / PyTorch |"
echo "|---|---|---|---|"
row "train VGG16, cifar head, 32x32, batch 64" \
    "bench_train.py --model vgg16 --head compact --size 32 --batch 64 --steps 5" \
    "--mode train --attention none --head cifar --classes 100 --size 32 --batch 64 --steps 5"
row "train VGG16 + softmax attention, cifar head, 32x32, batch 64" \
    "bench_train.py --model vgg16_la --head compact --size 32 --batch 64 --steps 5" \
    "--mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64 --steps 5"
row "inference VGG16, 224x224, batch 1" \
    "bench_infer.py --model vgg16 --head imagenet --num-classes 1000 --size 224 --batch 1 --steps 5" \
    "--mode infer --attention none --head imagenet --classes 1000 --size 224 --batch 1 --steps 5"
row "inference VGG16 + softmax attention, 224x224, batch 1" \
    "bench_infer.py --model vgg16_la --head imagenet --num-classes 1000 --size 224 --batch 1 --steps 1 --warmup 0" \
    "--mode infer --attention softmax --head imagenet --classes 1000 --size 224 --batch 1 --steps 1 --warmup 0"
echo
echo "VGG16 + linear attention against plain VGG16 (la-cli, inference, 224x224, batch 1;"
echo "${PAIRS:-3} alternating pairs of 10 steps: median and fastest step of each run):"
steps() { grep -oP 'median \K[0-9.]+|min \K[0-9.]+' | paste -sd' '; }
pairs=""
for _ in $(seq "${PAIRS:-3}"); do
    p=$($la bench --mode infer --attention none --size 224 --batch 1 --steps 10 --threads "$threads" --no-breakdown | steps)
    l=$($la bench --mode infer --attention linear --size 224 --batch 1 --steps 10 --threads "$threads" --no-breakdown | steps)
    pairs="$pairs $p $l"
    python3 -c "
p, l = [float(v) for v in '$p'.split()], [float(v) for v in '$l'.split()]
print(f'plain {p[0]:.3f} s (fastest {p[1]:.3f}), linear {l[0]:.3f} s (fastest {l[1]:.3f}): '
      f'linear is {100 * (l[0] / p[0] - 1):.1f} % slower by medians, {100 * (l[1] / p[1] - 1):.1f} % by fastest steps')"
done
# One figure per run: the median over the pairs, which a single noisy run moves less.
python3 -c "
import statistics as st
v = [float(x) for x in '$pairs'.split()]
pairs = [v[i:i + 4] for i in range(0, len(v), 4)]
by_median = st.median(l[0] / p[0] - 1 for p, l in ((q[:2], q[2:]) for q in pairs))
by_fastest = st.median(l[1] / p[1] - 1 for p, l in ((q[:2], q[2:]) for q in pairs))
print(f'over {len(pairs)} pairs: linear is {100 * by_median:.1f} % slower (median of the pairs, by medians), '
      f'{100 * by_fastest:.1f} % by fastest steps')"
