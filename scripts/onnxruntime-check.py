#!/usr/bin/env python3
"""Runs ONNX models with onnxruntime and compares their logits with la-vgg's: for each
CASE.onnx in DIR, CASE.input.bin (f32, shapes in CASE.json) through the graph against
CASE.logits.bin. Prints one line per case; exits 1 if any differs by more than the
tolerance, relative to the largest logit. Used by crates/la-vgg/tests/onnx.rs.

Usage: onnxruntime-check.py DIR [TOL]
"""
import glob
import json
import os
import sys

import numpy as np
import onnxruntime as ort


def main(folder, tol=1e-4):
    failed = 0
    cases = sorted(glob.glob(os.path.join(folder, "*.onnx")))
    if not cases:
        sys.exit(f"{folder}: no .onnx files")
    for path in cases:
        base = path[: -len(".onnx")]
        shapes = json.load(open(base + ".json"))
        x = np.fromfile(base + ".input.bin", dtype="<f4").reshape(shapes["input"])
        ours = np.fromfile(base + ".logits.bin", dtype="<f4").reshape(shapes["logits"])
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        (theirs,) = session.run(["logits"], {"input": x})
        diff = float(np.abs(theirs - ours).max())
        scale = max(float(np.abs(ours).max()), 1e-12)
        ok = diff <= tol * scale
        failed += not ok
        print(f"{os.path.basename(base)}: largest logit {np.abs(ours).max():.4f}, "
              f"largest difference {diff:.1e} {'ok' if ok else 'FAIL'} (onnxruntime {ort.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], *(float(v) for v in sys.argv[2:])))
