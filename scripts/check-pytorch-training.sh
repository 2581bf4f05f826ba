#!/usr/bin/env bash
# Training parity with PyTorch (outside the default test command: PyTorch is a large
# download). From the same initial weights (made by PyTorch, imported by la-cli) and the
# same batches (la-cli's own, written with --dump-batches, unshuffled and unaugmented),
# 20 steps of SGD (momentum 0.9, Nesterov, weight decay off biases and BatchNorm, cosine
# schedule with warm-up, label smoothing) on 5,680 Fashion-MNIST images in batches of 284,
# in la-cli and in PyTorch; the losses must agree within 1e-4 (relative) at every step and
# the final weights within 1e-3; PyTorch with any one term of the recipe switched off must
# land measurably further away, and la-cli's decayed weights must end smaller than PyTorch's
# without decay by what the recipe's decay predicts (within 10%). The recipe is written once, in
# scripts/pytorch-training-parity.py (RECIPE, printed for la-cli by its `la-args`), which
# also says why the rate is small. Prints markdown tables (docs/results.md has them).
# Usage: scripts/check-pytorch-training.sh [python]   (default: .venv-torch/bin/python,
# made here if missing; THREADS (default 2) and FASHION_MNIST (default
# /usr/share/datasets/fashion-mnist, installed there with apt-get if missing) from the environment)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv-torch/bin/python}
if [ ! -x "$py" ]; then
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install -q torch torchvision safetensors numpy pillow
    py=.venv-torch/bin/python
fi
data=${FASHION_MNIST:-/usr/share/datasets/fashion-mnist}
if [ ! -e "$data/train-images-idx3-ubyte.gz" ] && [ -z "${FASHION_MNIST:-}" ]; then
    sudo=$(command -v sudo || true)
    ($sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist) > /dev/null
fi
[ -e "$data/train-images-idx3-ubyte.gz" ] || { echo "error: no Fashion-MNIST in $data (train-images-idx3-ubyte.gz missing)" >&2; exit 1; }
threads=${THREADS:-2}
cargo build --release -q -p la-cli
la=target/release/la-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py scripts/pytorch-training-parity.py init "$work/init.safetensors"
mapfile -t recipe < <($py scripts/pytorch-training-parity.py la-args)
$la train "${recipe[@]}" --data-dir "$data" --weights "$work/init.safetensors" \
    --dump-batches "$work/batches.safetensors" --threads "$threads" \
    --runs-dir "$work" --name parity > "$work/train.log" 2>&1 || { cat "$work/train.log"; exit 1; }
$la export --weights "$work/parity/last.safetensors" --format article --out "$work/final.safetensors" > /dev/null
THREADS=$threads $py scripts/pytorch-training-parity.py compare "$work/init.safetensors" \
    "$work/batches.safetensors" "$work/parity/metrics.jsonl" "$work/final.safetensors"
