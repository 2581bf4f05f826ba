#!/usr/bin/env python3
"""Where a training step's GPU time goes, and how many kernels it launches: runs `la-cli bench`
under Nsight Compute (ncu, one metric: each kernel's duration) twice, with one and with two
timed steps after one warm-up step, so that the difference is exactly one step (the warm-up's
cuDNN algorithm search, which launches many kernels, cancels out).

Usage (on the GPU machine; scripts/gpu-check.sh --run calls it as its `kernels` stage):
  scripts/gpu-kernels.py LA_CLI [bench arguments...]
Prints the launches of one step and the kernels of the two-step run by total time.
"""
import collections
import csv
import subprocess
import sys


def profile(la_cli, args, steps):
    cmd = ["ncu", "--csv", "--metrics", "gpu__time_duration.sum", la_cli, "bench", *args,
           "--warmup", "1", "--steps", str(steps), "--no-breakdown"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"ncu failed ({out.returncode}): {out.stderr.strip()[-500:]}")
    # ncu's CSV rows start with a quote; la-cli's own output and ncu's ==PROF== lines do not.
    rows = list(csv.DictReader(line for line in out.stdout.splitlines() if line.startswith('"')))
    durations = collections.defaultdict(list)
    for r in rows:
        if r.get("Metric Name") == "gpu__time_duration.sum":
            value = float(r["Metric Value"].replace(",", ""))
            scale = {"nsecond": 1e-3, "usecond": 1.0, "msecond": 1e3}.get(r.get("Metric Unit"), 1.0)
            durations[r["Kernel Name"]].append(value * scale)
    return durations


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    la_cli, args = sys.argv[1], sys.argv[2:]
    one = profile(la_cli, args, 1)
    two = profile(la_cli, args, 2)
    launches = sum(len(v) for v in two.values()) - sum(len(v) for v in one.values())
    step_us = sum(sum(v) for v in two.values()) - sum(sum(v) for v in one.values())
    print(f"bench {' '.join(args)}: {launches} kernel launches a step, {step_us / 1e3:.2f} ms of kernel time")
    extra = {k: two[k][len(one.get(k, [])):] for k in two}
    total = sum(sum(v) for v in extra.values()) or 1.0
    print("the step's kernels by time (us, share, launches):")
    for name, times in sorted(extra.items(), key=lambda kv: -sum(kv[1]))[:25]:
        if times:
            print(f"  {sum(times):10.1f} {100 * sum(times) / total:5.1f} % {len(times):5d}  {name[:110]}")


if __name__ == "__main__":
    main()
