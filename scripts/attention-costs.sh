#!/usr/bin/env bash
# Run 3 of docs/results.md: what each attention kind costs VGG16_bn (width 0.25, 10 classes,
# CIFAR head) at 32, 64, 128 and 224 pixels: parameters and MACs (`la-cli summary`), and
# training and inference images/s and peak memory (`la-cli bench`, one process per row, so
# the peak RSS is that configuration's own). Prints a markdown table.
#
#   scripts/attention-costs.sh [--threads 2] [--sizes "32 64 128 224"]
set -euo pipefail
cd "$(dirname "$0")/.."
threads=2
sizes="32 64 128 224"
kinds="none softmax linear efficient relu-linear performer linformer"
while [ $# -gt 0 ]; do
    case "$1" in
        --threads) threads="$2"; shift 2 ;;
        --sizes) sizes="$2"; shift 2 ;;
        --kinds) kinds="$2"; shift 2 ;;
        *) echo "usage: $0 [--threads N] [--sizes \"32 64\"] [--kinds \"none softmax\"]" >&2; exit 2 ;;
    esac
done
cargo build --release -q -p la-cli
la=target/release/la-cli
model=(--bn --width 0.25 --head cifar --classes 10)

# A batch that keeps every row within seconds: the quadratic kind at 224 pixels is the slowest.
batch_for() {
    case "$1" in 32) echo 64 ;; 64) echo 32 ;; 128) echo 8 ;; *) echo 4 ;; esac
}

echo "| kind | size | params | GMACs | of which N^2 | train img/s | train peak GiB | infer img/s | infer peak GiB |"
echo "|---|---|---|---|---|---|---|---|---|"
for size in $sizes; do
    for kind in $kinds; do
        summary=$($la summary --attention "$kind" "${model[@]}" --size "$size")
        params=$(echo "$summary" | sed -n 's/^total parameters: //p')
        gmacs=$(echo "$summary" | sed -n 's/^total MACs: .*(\(.*\) GMAC)/\1/p')
        quadratic=$(echo "$summary" | sed -n 's/.*of which N^2 terms: \(.*\) GMAC/\1/p')
        batch=$(batch_for "$size")
        row="| $kind | $size | $params | $gmacs | $quadratic |"
        for mode in train infer; do
            out=$($la bench --attention "$kind" "${model[@]}" --size "$size" --mode "$mode" \
                --batch "$batch" --steps 3 --warmup 1 --threads "$threads" --no-breakdown)
            rate=$(echo "$out" | sed -n 's/^images\/s: //p')
            peak=$(echo "$out" | sed -n 's/^peak RSS: \(.*\) GiB/\1/p')
            row="$row $rate | $peak |"
        done
        echo "$row"
    done
done
