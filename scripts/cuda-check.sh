#!/usr/bin/env bash
# Compile-checks the `cuda` feature on a machine without a GPU or a system CUDA toolkit,
# using NVIDIA's toolkit wheels from PyPI (pinned to 13.4: cudarc 0.19 rejects 13.5).
# About 6 minutes cold on 2 cores (nvcc builds Candle's kernels), 368 MB of wheels; kept out
# of the default test command. Usage: scripts/cuda-check.sh [extra cargo args]
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.venv-cuda
if [ ! -x "$venv/bin/nvcc-ok" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "cuda-toolkit[nvcc,cccl]==13.4.3"
    touch "$venv/bin/nvcc-ok"
fi
CUDA_HOME=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"   # required without nvidia-smi; 90 = H100/H200
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
nvcc --version | tail -n 2
cargo check --release -p la-cli --features cuda "$@"
echo "cuda feature: compiles (checked, not linked or run)"
