#!/usr/bin/env bash
# The GPU check, in two halves (docs/gpu.md says when and how to call them):
#
#   scripts/gpu-check.sh --prepare   here, without a GPU: builds la-cli with `--features cuda,nccl`
#       against NVIDIA's CUDA 13.0 toolkit, cuDNN 9.19 and NCCL wheels from PyPI (the GPU machine's driver is CUDA
#       13.0, and PTX from a newer nvcc does not load on an older driver), strips it and puts
#       it, compresses it to gpu-check/la-cli.gz (ignored by git), the folder that travels.
#   scripts/gpu-check.sh --run       on the GPU machine (no Rust, no network): puts the CUDA
#       libraries of its Python's nvidia wheels on LD_LIBRARY_PATH and runs, each stage with
#       its own time limit, under 8 minutes in all (GPU_CHECK_STAGES picks, default
#       selftest,bench):
#       selftest: `la-cli selftest --device cuda`: every op's generic form and CUDA kernels
#         (cuDNN's conv, the own kernels) on the GPU against the fast CPU kernels, a training
#         step of VGG16_bn + each attention kind in both forms, a training step whose
#         gradients NCCL sums over a one-rank communicator, the default digits run on the CPU
#         and on the GPU in f32 and tf32, and the `la-cli bench` rows on the GPU;
#       bench: scripts/bench-vs-pytorch.py with DEVICE=cuda: la-cli against PyTorch (the
#         explicit module and SDPA) on the GPU issue's rows in PRECISIONS (default fp32,tf32;
#         bf16 adds PyTorch's bf16 rows, la-cli's being still an error on CUDA), one table
#         with the ratios and each side's peak GPU memory (bench.md);
#       kernels: scripts/gpu-kernels.py: ncu's launches and kernel times of one training step.
#       Logs go to $OUT (when set) or gpu-check/.
#
# ../shared/CUDA.md has the background (stub libcuda, unversioned library links).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out_dir="$root/gpu-check"
toolkit_version="${CUDA_TOOLKIT_VERSION:-13.0.2}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"   # 90 = H100/H200 (sm_90)

prepare() {
    cd "$root"
    local venv=".venv-cuda-$toolkit_version"
    # The marker names the wheel set, so an older venv gets the newer wheels.
    if [ ! -e "$venv/.complete-cudnn-nccl" ]; then
        python3 -m venv "$venv"
        # nvcc's own dependencies (nvvm, crt) are not pinned by the meta-package: a newer one
        # writes PTX that this release's ptxas (and driver) refuse.
        local minor="${toolkit_version%.*}"
        # cuDNN for la-kernels' convolutions, pinned to the GPU machine's 9.19, and NCCL for
        # the `nccl` feature (cudarc links both: libcudnn.so.9, libnccl.so.2; the GPU
        # machine's own copies load at run time).
        "$venv/bin/pip" install -q "cuda-toolkit[nvcc,cudart,cccl,cublas,curand,nvrtc]==$toolkit_version" \
            "nvidia-nvvm==$minor.*" "nvidia-cuda-crt==$minor.*" "nvidia-cudnn-cu13==9.19.*" \
            "nvidia-nccl-cu13"
        touch "$venv/.complete-cudnn-nccl"
    fi
    local cu13
    cu13=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
    # A toolkit-shaped folder: the wheels lack the unversioned libX.so links that -lX needs,
    # and PyPI has no libcuda.so (the driver), so a stub stands in for linking.
    local home="$root/target/cuda-home-$toolkit_version"
    mkdir -p "$home/lib64/stubs"
    for d in bin include nvvm; do ln -sfn "$cu13/$d" "$home/$d"; done
    local nv; nv=$(dirname "$cu13")
    for lib in "$cu13"/lib/lib*.so.* "$nv"/cudnn/lib/libcudnn*.so.* "$nv"/nccl/lib/libnccl*.so.*; do
        local base; base=$(basename "$lib")
        ln -sf "$lib" "$home/lib64/$base"
        ln -sf "$lib" "$home/lib64/${base%%.so.*}.so"
    done
    export CUDA_HOME="$home" CUDA_PATH="$home"
    export PATH="$home/bin:$PATH"
    export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
    export CARGO_TARGET_DIR="$root/target/cuda"
    cargo fetch -q
    if [ ! -e "$home/lib64/stubs/libcuda.so" ]; then
        # Every cu* function that cudarc's driver bindings declare returns 34
        # (CUDA_ERROR_STUB_LIBRARY), as NVIDIA's own stub does. Only for linking: on the GPU
        # machine the real driver is found first.
        local sys
        sys=$(cargo metadata --format-version 1 --features la-cli/cuda 2>/dev/null \
            | python3 -c 'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
        sys="$(dirname "$sys")/src/driver/sys"
        grep -rhoE 'pub (unsafe )?fn cu[A-Za-z0-9_]+' "$sys" | sed -E 's/.*fn //' | sort -u \
            | awk '{print "int " $1 "(void) { return 34; }"}' > "$home/lib64/stubs/cuda_stub.c"
        gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$home/lib64/stubs/libcuda.so" "$home/lib64/stubs/cuda_stub.c"
        ln -sf libcuda.so "$home/lib64/stubs/libcuda.so.1"
    fi
    export LIBRARY_PATH="$home/lib64:$home/lib64/stubs:${LIBRARY_PATH:-}"
    export RUSTFLAGS="${RUSTFLAGS:-} -L $home/lib64 -L $home/lib64/stubs"
    nvcc --version | tail -n 2
    cargo build --release -p la-cli --features cuda,nccl
    mkdir -p "$out_dir"
    cp "$CARGO_TARGET_DIR/release/la-cli" "$out_dir/la-cli"
    strip "$out_dir/la-cli"
    # Smoke test here: with only the stub driver the binary must start and say there is no GPU.
    LD_LIBRARY_PATH="$home/lib64:$home/lib64/stubs" "$out_dir/la-cli" selftest --device cuda --quick \
        > "$out_dir/prepare-smoke.log" 2>&1 && { echo "unexpected: a CUDA device behind the stub"; exit 1; }
    grep -q -- '--device cuda' "$out_dir/prepare-smoke.log" || { cat "$out_dir/prepare-smoke.log"; exit 1; }
    # Candle's CUDA kernels travel as PTX text inside the binary (about 60 MB stripped), and
    # only 64 MiB travel with the repository: compressed, about 16 MB.
    gzip -9 -f "$out_dir/la-cli"
    ls -l "$out_dir"
    echo "prepared: carry gpu-check/ to the GPU machine and run scripts/gpu-check.sh --run there"
}

run() {
    cd "$root"
    local packed="$out_dir/la-cli.gz" bin=/tmp/la-cli-gpu log_dir="${OUT:-$out_dir}"
    [ -e "$packed" ] || { echo "error: $packed is missing: run scripts/gpu-check.sh --prepare first (here, with the repo)" >&2; exit 1; }
    gunzip -c "$packed" > "$bin" && chmod +x "$bin"
    mkdir -p "$log_dir"
    local nv
    nv=$(python3 -c 'import nvidia, os; print(list(nvidia.__path__)[0])' 2>/dev/null) \
        || { echo "error: this python3 has no NVIDIA CUDA wheels (nvidia/cu13/lib): is this the GPU machine?" >&2; exit 1; }
    # cudarc opens NCCL as `libnccl.so`, a link the nvidia-nccl wheel does not ship.
    local links=/tmp/la-cli-gpu-libs
    mkdir -p "$links"
    local nccl
    nccl=$(ls "$nv"/nccl/lib/libnccl.so.* 2>/dev/null | head -n 1 || true)
    [ -n "$nccl" ] && ln -sf "$nccl" "$links/libnccl.so"
    export LD_LIBRARY_PATH="$links:$nv/cu13/lib:$nv/cudnn/lib:$nv/nccl/lib:${LD_LIBRARY_PATH:-}"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    # Stages, each with its own time limit so that the whole call stays under 8 minutes:
    # selftest (every op and training step, NCCL, the digits runs, bench rows), bench (la-cli
    # against PyTorch on the GPU issue's rows, one table), kernels (ncu: launches and kernel
    # time of one training step; not in the default, ncu replays every kernel).
    local stages=",${GPU_CHECK_STAGES:-selftest,bench},"
    local status=0
    if [[ $stages == *,selftest,* ]]; then
        timeout "${SELFTEST_S:-240}" "$bin" selftest --device cuda 2>&1 | tee "$log_dir/selftest.log" \
            || status=$?
        echo "gpu-check: selftest exit status $status (log: $log_dir/selftest.log)"
    fi
    if [[ $stages == *,bench,* ]]; then
        # One pair a row: GPU timings are steady (medians of timed steps). fp32 and tf32 fit
        # the time limit; PRECISIONS=fp32,tf32,bf16 needs BENCH_S of about 300.
        DEVICE=cuda LA="$bin" PAIRS="${PAIRS:-1}" THREADS="${THREADS:-16}" LIMIT_S=120 \
            PRECISIONS="${PRECISIONS:-fp32,tf32}" \
            timeout "${BENCH_S:-210}" python3 "$root/scripts/bench-vs-pytorch.py" python3 \
            2> "$log_dir/bench.log" | tee "$log_dir/bench.md" || true
        echo "gpu-check: bench table in $log_dir/bench.md (progress in $log_dir/bench.log)"
    fi
    if [[ $stages == *,kernels,* ]]; then
        timeout "${KERNELS_S:-200}" python3 "$root/scripts/gpu-kernels.py" "$bin" --device cuda \
            --mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64 \
            2>&1 | tee "$log_dir/kernels.log" || true
    fi
    exit "$status"
}

case "${1:-}" in
    --prepare) prepare ;;
    --run) run ;;
    *) echo "usage: scripts/gpu-check.sh --prepare | --run" >&2; exit 2 ;;
esac
