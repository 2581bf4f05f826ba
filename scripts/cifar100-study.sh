#!/usr/bin/env bash
# The article's claim on its own data: CIFAR-100, VGG16 (ImageNet weights) with and without
# attention after every block, 3 seeds each, in the article's recipe and in a fast one.
# For a machine with a GPU and network access; it has not run on this project's machines
# (no CIFAR-100 is reachable from them, and no GPU), see docs/results.md.
#
#   scripts/cifar100-study.sh [--device cuda] [--recipe article|fast|both]
set -euo pipefail
cd "$(dirname "$0")/.."

device=cuda
recipe=both
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --recipe) recipe="$2"; shift 2 ;;
        *) echo "usage: $0 [--device cuda|cpu] [--recipe article|fast|both]" >&2; exit 2 ;;
    esac
done

features=()
if [ "$device" != cpu ]; then features=(--features cuda); fi
cargo build --release -p la-cli "${features[@]}"
la=target/release/la-cli

# Data and weights: CIFAR-100 (MD5-checked) and torchvision's VGG16 from the Hugging Face Hub.
$la data fetch cifar100 --dir data
[ -f weights/vgg16-none-imagenet.safetensors ] || cargo xtask fetch-weights --attention none

mkdir -p runs/cifar100-study
for r in article fast; do
    if [ "$recipe" != both ] && [ "$recipe" != "$r" ]; then continue; fi
    study="runs/cifar100-study/$r.toml"
    # The presets hold each recipe (epochs, lr, schedule, augmentation); the grid is the
    # article's question: no attention against its softmax module, and the O(N) kinds. The
    # article fine-tunes ImageNet weights (modules inserted as the identity); the fast
    # recipe (BatchNorm) trains from scratch.
    weights=""
    if [ "$r" = article ]; then weights='weights = "weights/vgg16-none-imagenet.safetensors"'; fi
    cat > "$study" <<TOML
seeds = [0, 1, 2]
preset = "cifar100-$r"
[base]
data-dir = "data/cifar-100-binary"
$weights
device = "$device"
[grid]
attention = ["none", "softmax", "linear", "efficient", "performer"]
TOML
    $la study --config "$study" --dir "runs/cifar100-study/$r"
done
echo "tables: runs/cifar100-study/*/study.md"
