#!/usr/bin/env bash
# Reads a run's TensorBoard events with the `tensorboard` package itself (pip, in a venv)
# and checks them against the run's epochs.csv: the format la-train writes by hand is the
# one TensorBoard reads. Outside the default test command (a download). Usage:
#   scripts/check-tensorboard.sh
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-tensorboard
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q tensorboard
fi
cargo build --release -q -p la-cli
run=$(mktemp -d)
trap 'rm -rf "$run"' EXIT
./target/release/la-cli train --width 0.0625 --epochs 2 --tensorboard \
    --runs-dir "$run" --name tb > /dev/null 2>&1
"$venv/bin/python" - "$run/tb" <<'PY'
import csv, glob, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
run = sys.argv[1]
acc = EventAccumulator(run)
acc.Reload()
tags = acc.Tags()["scalars"]
rows = list(csv.DictReader(open(f"{run}/epochs.csv")))
val = [e.value for e in acc.Scalars("epoch/val_top1")]
want = [float(r["val_top1"]) for r in rows]
assert len(val) == len(want) and all(abs(a - b) < 1e-5 for a, b in zip(val, want)), (val, want)
steps = acc.Scalars("train/loss")
print(f"tensorboard reads {len(tags)} scalar tags, {len(steps)} steps of train/loss; "
      f"epoch/val_top1 {['%.4f' % v for v in val]} = epochs.csv")
PY
