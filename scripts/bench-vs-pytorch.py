#!/usr/bin/env python3
"""Every benchmark row of docs/performance.md, each peer run in turn as interleaved pairs
(PyTorch, la-cli, plain Candle, PyTorch, la-cli, plain Candle, ...) so that the machine's
drift falls on all of them alike. Prints a markdown table: median images/s of each peer,
the median of the per-pair ratios to PyTorch with the lowest and highest, la-cli's GFLOP/s
and its share of the CPU's peak, and each peer's peak RSS.

Run through scripts/bench-vs-pytorch.sh, which builds la-cli first. Reads PAIRS (default 5),
THREADS (default 2) and ROWS (comma-separated row keys, default all) from the environment.

DEVICE=cuda runs the GPU rows instead (docs/gpu.md; scripts/gpu-check.sh --run does, with the
la-cli it carries in LA): the rows of the GPU issue's table in each of PRECISIONS (default
fp32,tf32,bf16; fp32 is PyTorch with TF32 off, tf32 with TF32 in convs and matmuls, bf16
autocast with channels-last), PyTorch's explicit-matrix module and, on the attention rows, its
SDPA form beside la-cli, with each side's peak GPU memory.

Peers: PyTorch is bench/reference (fp32, the same model, batch and thread count; the bf16
rows run it under bf16 autocast with channels-last tensors, and la-cli with --precision bf16); plain
Candle is la-cli with LA_KERNELS=generic, what a Candle user gets without our kernels; burn
is bench/burn-vgg on burn's two CPU backends (ndarray and Flex), plain VGG16 only, and runs
where it has been built (cargo build --release --manifest-path bench/burn-vgg/Cargo.toml).
"""
import os
import re
import statistics as st
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

LA = os.environ.get("LA", "target/release/la-cli")
BURN = "bench/burn-vgg/target/release/burn-vgg"
# A peer whose first run takes longer than this runs only once: burn ndarray's training step
# alone takes over a minute, and a ratio of 0.01x needs no second pair to be believed.
SLOW_S = 120
# Column order of the table; PyTorch is the yardstick of every ratio.
PEERS = {"torch": "PyTorch", "torch-sdpa": "PyTorch SDPA", "la": "la-cli",
         "generic": "plain Candle (LA_KERNELS=generic)", "burn-ndarray": "burn ndarray", "burn-flex": "burn Flex"}


@dataclass
class Row:
    key: str
    name: str
    torch: list | None  # arguments after the Python interpreter
    la: list  # arguments after la-cli
    generic: bool = True  # also run plain Candle (LA_KERNELS=generic)
    burn: list | None = None  # bench/burn-vgg's arguments, for plain VGG16 rows
    epoch: bool = False  # a whole run timed from process start to exit, not a bench
    sdpa: bool = False  # also run PyTorch with its attention through SDPA

    def peers(self):
        burn = self.burn is not None and os.path.exists(BURN)
        on = {"torch": self.torch is not None, "torch-sdpa": self.sdpa and self.torch is not None,
              "la": True, "generic": self.generic, "burn-ndarray": burn, "burn-flex": burn}
        return [p for p in PEERS if on[p]]


def bench_row(key, name, script, torch_args, la_args, generic=True, burn=False):
    torch = None if script is None else [f"bench/reference/{script}", *torch_args.split()]
    # burn-vgg reads the reference scripts' options.
    return Row(key, name, torch, ["bench", *la_args.split(), "--no-breakdown"], generic,
               torch[1:] if burn else None)


ROWS = [
    bench_row("train", "train VGG16, cifar head, 32x32, batch 64",
              "bench_train.py", "--model vgg16 --head compact --size 32 --batch 64 --steps 5",
              "--mode train --attention none --head cifar --classes 100 --size 32 --batch 64 --steps 5", burn=True),
    bench_row("train-softmax", "train VGG16 + softmax attention, cifar head, 32x32, batch 64",
              "bench_train.py", "--model vgg16_la --head compact --size 32 --batch 64 --steps 5",
              "--mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64 --steps 5"),
    # bf16 on both sides: PyTorch's autocast + channels-last (oneDNN) against --precision bf16.
    bench_row("train-bf16", "train VGG16, cifar head, 32x32, batch 64, bf16",
              "bench_train.py", "--model vgg16 --head compact --size 32 --batch 64 --steps 5 --precision bf16",
              "--mode train --attention none --head cifar --classes 100 --size 32 --batch 64 --steps 5 "
              "--precision bf16", generic=False),
    bench_row("train-softmax-bf16", "train VGG16 + softmax attention, cifar head, 32x32, batch 64, bf16",
              "bench_train.py", "--model vgg16_la --head compact --size 32 --batch 64 --steps 5 --precision bf16",
              "--mode train --attention softmax --head cifar --classes 100 --size 32 --batch 64 --steps 5 "
              "--precision bf16", generic=False),
    bench_row("infer", "inference VGG16, 224x224, batch 1",
              "bench_infer.py", "--model vgg16 --head imagenet --num-classes 1000 --size 224 --batch 1 --steps 5",
              "--mode infer --attention none --head imagenet --classes 1000 --size 224 --batch 1 --steps 5", burn=True),
    # The generic softmax at 224 holds 50,176 x 50,176 scores per block-1 image (10 GB): left out.
    bench_row("infer-softmax", "inference VGG16 + softmax attention, 224x224, batch 1",
              "bench_infer.py",
              "--model vgg16_la --head imagenet --num-classes 1000 --size 224 --batch 1 --steps 1 --warmup 0",
              "--mode infer --attention softmax --head imagenet --classes 1000 --size 224 --batch 1 "
              "--steps 1 --warmup 0", generic=False),
    # PyTorch would need about 80 GiB for the block-1 scores of 8 images: la-cli only.
    bench_row("train-softmax-224", "train VGG16 + softmax attention, cifar head, 224x224, batch 8",
              None, "",
              "--mode train --attention softmax --head cifar --classes 100 --size 224 --batch 8 "
              "--steps 1 --warmup 0", generic=False),
    Row("epoch", "one Fashion-MNIST epoch end to end: VGG16_bn width 0.25 + softmax attention, "
        "batch 64, crop + flip, then validation (s, process start to exit)",
        ["bench/reference/train_fashion_mnist.py", "--data-dir", "/usr/share/datasets/fashion-mnist",
         "--batch", "64", "--epochs", "1"],
        ["train", "--data", "fashion-mnist", "--data-dir", "/usr/share/datasets/fashion-mnist",
         "--width", "0.25", "--attention", "softmax", "--batch-size", "64", "--epochs", "1"],
        generic=False, epoch=True),
]


def gpu_rows(precisions):
    """The GPU issue's rows, each in every precision: la-cli on CUDA against PyTorch on CUDA
    (and its SDPA form on the attention rows)."""
    base = [
        ("train", "train VGG16, cifar head, 32x32, batch 64", "train", "none", "cifar", 32, 64, 20),
        ("train-softmax", "train VGG16 + softmax attention, 32x32, batch 64", "train", "softmax", "cifar", 32, 64, 20),
        ("train-b256", "train VGG16, cifar head, 32x32, batch 256", "train", "none", "cifar", 32, 256, 10),
        ("train-softmax-b256", "train VGG16 + softmax attention, 32x32, batch 256", "train", "softmax", "cifar",
         32, 256, 10),
        ("train-224", "train VGG16, ImageNet head, 224x224, batch 32", "train", "none", "imagenet", 224, 32, 5),
        ("infer-224", "inference VGG16, 224x224, batch 1", "infer", "none", "imagenet", 224, 1, 20),
        ("infer-softmax-224", "inference VGG16 + softmax attention, 224x224, batch 1", "infer", "softmax",
         "imagenet", 224, 1, 5),
        ("train-softmax-224", "train VGG16 + softmax attention, cifar head, 224x224, batch 1", "train", "softmax",
         "cifar", 224, 1, 5),
    ]
    rows = []
    for key, name, mode, attention, head, size, batch, steps in base:
        for precision in precisions:
            classes = 1000 if head == "imagenet" else 100
            model = "vgg16_la" if attention == "softmax" else "vgg16"
            torch_head = "imagenet" if head == "imagenet" else "compact"
            script = "bench_train.py" if mode == "train" else "bench_infer.py"
            # The explicit module at 224 needs about 20 (inference) to 40 GiB (training).
            torch_args = (f"--model {model} --head {torch_head} --num-classes {classes} --size {size} "
                          f"--batch {batch} --steps {steps} --warmup 3 --device cuda --precision {precision} "
                          f"--max-attn-gib 70")
            la_args = (f"--mode {mode} --attention {attention} --head {head} --classes {classes} --size {size} "
                       f"--batch {batch} --steps {steps} --warmup 3 --device cuda --precision {precision}")
            row = bench_row(f"{key}-{precision}", f"{name}, {precision}", script, torch_args, la_args,
                            generic=False)
            row.sdpa = attention == "softmax"
            rows.append(row)
    return rows


@dataclass
class Run:
    rate: float | None = None  # images/s, or 1 / seconds for an epoch row
    seconds: float | None = None
    rss_gib: float | None = None
    gpu_gib: float | None = None  # peak GPU memory of tensors and workspaces
    gflops: float | None = None
    peak_share: float | None = None  # percent
    top1: float | None = None
    why_not: str = ""
    wall: float = 0.0  # seconds from start to exit


def run(cmd, env):
    """Runs cmd (killed after LIMIT_S seconds, default 900); returns its output, exit code, wall
    seconds and peak RSS (GiB, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    timer = threading.Timer(float(os.environ.get("LIMIT_S", "900")), proc.kill)
    timer.start()
    out = proc.stdout.read()
    timer.cancel()
    # wait4 rather than wait: it also gives this child's own peak RSS.
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # so that Popen does not wait again
    return out, proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 2**20


def last_float(pattern, text):
    found = re.findall(pattern, text, re.M)
    return float(found[-1]) if found else None


def measure(row, peer, py, threads, workdir):
    env = dict(os.environ)
    env.pop("LA_KERNELS", None)
    if peer in ("torch", "torch-sdpa"):
        cmd = [py, *row.torch, "--threads", str(threads)]
        if peer == "torch-sdpa":
            cmd += ["--attention-impl", "sdpa"]
    elif peer.startswith("burn-"):
        mode = "infer" if "bench_infer.py" in row.torch[0] else "train"
        # Two timed steps after one warm-up: enough for burn, whose steps vary little.
        args = row.burn[:]
        args[args.index("--steps") + 1] = "2"
        cmd = [BURN, "--mode", mode, *args, "--warmup", "1", "--backend", peer.removeprefix("burn-"),
               "--threads", str(threads)]
    else:
        cmd = [LA, *row.la, "--threads", str(threads)]
        if peer == "generic":
            env["LA_KERNELS"] = "generic"
        if row.epoch:
            cmd += ["--runs-dir", workdir]
    out, code, seconds, rss = run(cmd, env)
    result = Run(rss_gib=rss, wall=seconds)
    if code != 0:
        if re.search(r"^refusing", out, re.M):
            need = re.search(r"needs ~[^)]*GiB", out)
            result.why_not = f"refuses ({need.group(0)})" if need else "refuses"
        else:
            tail = out.strip().splitlines()[-1:] or [""]
            result.why_not = "fails"
            print(f"  {peer} failed (exit {code}): {tail[0][:200]}", file=sys.stderr)
        return result
    if row.epoch:
        result.seconds = seconds
        result.rate = 1.0 / seconds
        result.top1 = last_float(r"val(?:idation)? top-1 ([0-9.]+) ?%", out)
    else:
        result.rate = last_float(r"^images/s: ([0-9.]+)", out)
        result.gflops = last_float(r"^GFLOP/s: ([0-9.]+)", out)
        result.peak_share = last_float(r"^GFLOP/s: [0-9.]+ \(([0-9.]+) % of", out)
        result.gpu_gib = last_float(r"^peak GPU memory: ([0-9.]+)", out)
        reported = last_float(r"^peak RSS: ([0-9.]+)", out)
        result.rss_gib = reported if reported is not None else rss
    return result


def median_of(runs, attr):
    values = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return st.median(values) if values else None


def ratio_cell(mine, theirs):
    """Median (lowest-highest) of the per-pair ratios mine/theirs, where both ran."""
    ratios = [m.rate / t.rate for m, t in zip(mine, theirs) if m.rate and t.rate]
    if not ratios:
        return "-"
    return f"{st.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def peer_cell(row, runs):
    if not runs:
        return "-"
    if all(r.rate is None for r in runs):
        return runs[0].why_not or "fails"
    rss = median_of(runs, "rss_gib")
    rss_text = f", {rss:.2f} GiB" if rss is not None else ""
    gpu = median_of(runs, "gpu_gib")
    if gpu is not None:
        rss_text = f", {gpu:.2f} GiB on the GPU"
    if row.epoch:
        top1 = median_of(runs, "top1")
        top1_text = f", val {top1:.1f} %" if top1 is not None else ""
        return f"{median_of(runs, 'seconds'):.1f} s{top1_text}{rss_text}"
    rate = median_of(runs, "rate")
    flops = median_of(runs, "gflops")
    share = median_of(runs, "peak_share")
    flops_text = ""
    if flops is not None:
        flops_text = f", {flops:.0f} GFLOP/s" + (f" = {share:.0f} % of peak" if share is not None else "")
    return f"{rate:.2f}{flops_text}{rss_text}"


def processor():
    info = open("/proc/cpuinfo").read()
    model = re.search(r"^model name\s*:\s*(.*)$", info, re.M)
    family = re.search(r"^cpu family\s*:\s*(.*)$", info, re.M)
    number = re.search(r"^model\s*:\s*(.*)$", info, re.M)
    flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16") if f in flags]
    return (f"{model.group(1) if model else '?'} (family {family.group(1) if family else '?'}, "
            f"model {number.group(1) if number else '?'}), {os.cpu_count()} CPUs, {' '.join(wanted)}")


def gpu():
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True)
    except FileNotFoundError:
        return "? (no nvidia-smi)"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "?"


def main():
    py = sys.argv[1] if len(sys.argv) > 1 else ".venv-torch/bin/python"
    pairs = int(os.environ.get("PAIRS", "5"))
    threads = int(os.environ.get("THREADS", "2"))
    keys = os.environ.get("ROWS")
    on_gpu = os.environ.get("DEVICE", "cpu") == "cuda"
    all_rows = gpu_rows(os.environ.get("PRECISIONS", "fp32,tf32,bf16").split(",")) if on_gpu else ROWS
    rows = [r for r in all_rows if keys is None or r.key in keys.split(",")]
    torch_version = subprocess.run([py, "-c", "import torch; print(f'{torch.__version__} (cuDNN {torch.backends.cudnn.version()})')"],
                                   capture_output=True, text=True).stdout.strip() or "not found"
    machine = f"GPU {gpu()}" if on_gpu else processor()
    print(f"{time.strftime('%Y-%m-%d')}, {machine}; threads={threads}, pairs={pairs}, "
          f"PyTorch {torch_version}, la-cli {LA}")
    print(flush=True)
    # Columns: the peers of any row; ratios of each against PyTorch, and la-cli's against
    # PyTorch's SDPA where that runs. Each row is printed as it completes, so a run cut short
    # (gpu-check's time limit) still leaves the rows it finished.
    columns = [p for p in PEERS if any(p in row.peers() for row in rows)]
    against = [(p, "torch") for p in columns if p != "torch"]
    if "torch-sdpa" in columns:
        against.append(("la", "torch-sdpa"))
    ratio_names = [f"{PEERS[a].split(' (')[0]} / {PEERS[b]}" for a, b in against]
    print(f"| row | {' | '.join(PEERS[p] for p in columns)} | {' | '.join(ratio_names)} |")
    print("|---" * (1 + len(columns) + len(against)) + "|", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-vs-pytorch-") as workdir:
        for row in rows:
            peers = row.peers()
            runs = {p: [] for p in PEERS}
            # A row of one peer has no ratio to steady: it runs once.
            for pair in range(pairs if len(peers) > 1 else 1):
                for peer in peers:
                    if pair > 0 and runs[peer] and runs[peer][0].wall > SLOW_S:
                        continue
                    r = measure(row, peer, py, threads, workdir)
                    runs[peer].append(r)
                    shown = f"{r.seconds:.1f} s" if r.seconds else (f"{r.rate:.2f}/s" if r.rate else r.why_not)
                    print(f"  {row.key} pair {pair + 1} {peer}: {shown}", file=sys.stderr, flush=True)
            cells = [peer_cell(row, runs[p]) for p in columns]
            ratios = [ratio_cell(runs[a], runs[b]) for a, b in against]
            print(f"| {row.name} | {' | '.join(cells)} | {' | '.join(ratios)} |", flush=True)
        print()
        print("Cells: median images/s (an epoch row: seconds and validation top-1), la-cli's GFLOP/s of "
              "direct-convolution work and, on the CPU, its share of the CPU's peak; peak RSS, or on a GPU "
              "the peak GPU memory of tensors and workspaces. Ratios: the median of "
              "the per-pair ratios of rates (the epoch row: of 1/seconds), lowest-highest in brackets; "
              "'-' where a peer does not run the row.")
        if not on_gpu and "linear" in (keys or "linear").split(","):
            print()
            linear_against_plain(pairs, threads)


def linear_against_plain(pairs, threads):
    """VGG16 + linear attention against plain VGG16, la-cli inference at 224x224, batch 1."""
    def median_step(attention):
        out, code, _, _ = run([LA, "bench", "--mode", "infer", "--attention", attention, "--size", "224",
                               "--batch", "1", "--steps", "10", "--threads", str(threads), "--no-breakdown"],
                              dict(os.environ, LA_KERNELS="fast"))
        return last_float(r"median ([0-9.]+)", out) if code == 0 else None

    slowdowns = []
    for pair in range(pairs):
        plain, linear = median_step("none"), median_step("linear")
        if plain and linear:
            slowdowns.append(linear / plain - 1)
            print(f"  linear pair {pair + 1}/{pairs}: plain {plain:.3f} s, linear {linear:.3f} s",
                  file=sys.stderr, flush=True)
    if slowdowns:
        print(f"VGG16 + linear attention against plain VGG16 (la-cli, inference 224x224, batch 1, median step "
              f"of 10, {len(slowdowns)} alternating pairs): {100 * st.median(slowdowns):.1f} % slower "
              f"(lowest {100 * min(slowdowns):.1f} %, highest {100 * max(slowdowns):.1f} %)")


if __name__ == "__main__":
    main()
