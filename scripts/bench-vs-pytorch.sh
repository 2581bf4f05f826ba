#!/usr/bin/env bash
# Side by side on this machine: PyTorch (bench/reference), la-cli and plain Candle
# (la-cli with LA_KERNELS=generic), every row as interleaved pairs; prints a markdown table
# of medians and per-pair ratios (scripts/bench-vs-pytorch.py says what each cell holds).
# Usage: scripts/bench-vs-pytorch.sh [python]   (default: .venv-torch/bin/python)
# Environment: PAIRS (default 5), THREADS (default 2), ROWS (comma-separated keys of
# train, train-softmax, train-bf16, train-softmax-bf16, infer, infer-softmax,
# train-softmax-224, epoch, linear; default all).
# The epoch row reads Fashion-MNIST from /usr/share/datasets/fashion-mnist
# (apt-get install dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p la-cli
exec python3 scripts/bench-vs-pytorch.py "${1:-.venv-torch/bin/python}"
