#!/usr/bin/env bash
# PyTorch interop (outside the default test command: PyTorch is a large download). Trains
# three models briefly with la-cli on the built-in digits: plain VGG11_bn and VGG11 (width 1,
# the ImageNet head, which torchvision and timm build) and la-cli's default VGG16_bn at width
# 0.25 with softmax attention. Exports them with `la-cli export` in every layout that can
# hold them, loads each with load_state_dict(strict=True) in torchvision, timm or the
# article's model (bench/reference/seed_model.py), and compares the logits on one image
# with `la-cli predict`'s within 1e-4 of the largest logit.
# Prints a markdown table (docs/results.md has it).
# Usage: scripts/check-pytorch-interop.sh [python]   (default: .venv-torch/bin/python, made here if missing)
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-.venv-torch/bin/python}
if [ ! -x "$py" ]; then
    python3 -m venv .venv-torch
    .venv-torch/bin/pip install -q torch torchvision timm safetensors numpy pillow
    py=.venv-torch/bin/python
fi
cargo build --release -q -p la-cli
la=target/release/la-cli
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
$py scripts/pytorch-interop.py image "$work/picture.png"
# --val-fraction 0.95: 89 training digits, one step of training for the plain model (enough to move
# every tensor, BatchNorm statistics included, off its initial value; 5 steps for the
# attention model, whose output projections start at random rather than zero).
train() { # name, flags...
    local name=$1; shift
    $la train --data digits --val-fraction 0.95 --epochs 1 --runs-dir "$work" --name "$name" "$@" \
        > "$work/$name.log" 2>&1 || { cat "$work/$name.log"; exit 1; }
}
train plain --arch vgg11 --bn --width 1 --head imagenet --attention none --batch-size 64
train plain-nobn --arch vgg11 --bn false --width 1 --head imagenet --attention none --batch-size 64
train attention --hidden 64 --zero-init-attention false --batch-size 16
echo "| layout | PyTorch model | tensors | largest logit | largest difference | |"
echo "|---|---|---|---|---|---|"
status=0
check() { # run, layout
    local weights="$work/$1/best.safetensors" export="$work/$1-$2.safetensors"
    $la export --weights "$weights" --format "$2" --out "$export" > /dev/null
    $la predict --weights "$weights" --image "$work/picture.png" --json > "$work/$1.json"
    $py scripts/pytorch-interop.py compare "$2" "$weights" "$export" "$work/picture.png" "$work/$1.json" || status=1
}
check plain torchvision
check plain timm
check plain article
check plain-nobn torchvision
check plain-nobn timm
check attention article
# What cannot be exported says so and writes nothing.
if $la export --weights "$work/attention/best.safetensors" --format torchvision --out "$work/no.safetensors" 2> "$work/refused.log"; then
    echo "FAIL: an attention model was exported to torchvision's layout"; status=1
elif [ -e "$work/no.safetensors" ]; then
    echo "FAIL: a refused export left a file"; status=1
else
    echo; echo "refused as it should be: $(cat "$work/refused.log")"
fi
exit $status
