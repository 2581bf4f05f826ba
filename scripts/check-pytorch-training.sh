#!/usr/bin/env bash
# Training parity with PyTorch (outside the default test command: PyTorch is a large
# download). From the same initial weights (made by PyTorch, imported by la-cli) and the
# same batches (la-cli's own, written with --dump-batches, unshuffled and unaugmented),
# 20 steps of SGD (rate 2e-4, momentum 0.9, Nesterov, weight decay 5e-4 off biases and BatchNorm,
# cosine schedule with 5 warm-up steps, label smoothing 0.1) on the built-in digits, in
# la-cli and in PyTorch; the losses must agree within 1e-4 (relative) at every step and
# the final weights within 1e-3. Prints a markdown table (docs/results.md has it).
# Usage: scripts/check-pytorch-training.sh [python]   (default: .venv-torch/bin/python,
# made here if missing; THREADS (default 2) is read from the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv-torch/bin/python}
if [ ! -x "$py" ]; then
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install -q torch torchvision safetensors numpy pillow
    py=.venv-torch/bin/python
fi
threads=${THREADS:-2}
cargo build --release -q -p la-cli
la=target/release/la-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py scripts/pytorch-training-parity.py init "$work/init.safetensors"
# 1,438 training digits in batches of 71: 20 full batches, one epoch (--batch-size and
# --warmup-epochs 0.25 give the script's steps_per_epoch 20 and 5 warm-up steps).
$la train --data digits --weights "$work/init.safetensors" --pretrained-lr-scale 1 \
    --epochs 1 --batch-size 71 --shuffle false --augment none \
    --optimizer sgd --lr 2e-4 --momentum 0.9 --nesterov --weight-decay 5e-4 \
    --schedule cosine --warmup-epochs 0.25 --label-smoothing 0.1 \
    --dump-batches "$work/batches.safetensors" --threads "$threads" \
    --runs-dir "$work" --name parity > "$work/train.log" 2>&1 || { cat "$work/train.log"; exit 1; }
$la export --weights "$work/parity/last.safetensors" --format article --out "$work/final.safetensors" > /dev/null
THREADS=$threads $py scripts/pytorch-training-parity.py compare "$work/init.safetensors" \
    "$work/batches.safetensors" "$work/parity/metrics.jsonl" "$work/final.safetensors"
