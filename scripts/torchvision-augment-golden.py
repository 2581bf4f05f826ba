#!/usr/bin/env python3
"""Writes crates/la-data/tests/fixtures/torchvision_augment.safetensors: what torchvision
does to two uint8 images for every operation of TrivialAugmentWide/RandAugment at a range
of magnitudes, and both policies' magnitude tables. la-data's tests compare
la_data::AugmentOp and AutoAugment with it.

Usage: .venv-torch/bin/python scripts/torchvision-augment-golden.py   (see bench/reference/README.md)
"""
import math
import os
import sys

import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms import InterpolationMode, autoaugment

OUT = os.path.join(os.path.dirname(__file__), "..", "crates", "la-data", "tests", "fixtures",
                   "torchvision_augment.safetensors")


def image(h, w):
    """A deterministic picture with edges, gradients and every channel different."""
    y = torch.arange(h, dtype=torch.float64).view(h, 1).expand(h, w)
    x = torch.arange(w, dtype=torch.float64).view(1, w).expand(h, w)
    r = 127.5 + 127.5 * torch.sin(x / 3.0 + y / 5.0)
    g = (x * 255.0 / max(w - 1, 1)) * ((y // 4) % 2)
    b = 40.0 + 180.0 * (((x - w / 2) ** 2 + (y - h / 2) ** 2) < (min(h, w) / 3) ** 2)
    return torch.stack([r, g, b]).round().clamp(0, 255).to(torch.uint8)


def main():
    tensors = {}
    inputs = {"square": image(32, 32), "wide": image(24, 40)}
    wide = autoaugment.TrivialAugmentWide()
    rand = autoaugment.RandAugment()
    for name, img in inputs.items():
        tensors[f"input/{name}"] = img.permute(1, 2, 0).contiguous()
        h, w = img.shape[1:]
        for policy, space in (("wide", wide._augmentation_space(31)),
                              ("rand", rand._augmentation_space(31, (h, w)))):
            for op, (mags, signed) in space.items():
                if mags.ndim > 0:
                    tensors[f"table/{policy}/{name}/{op}"] = mags.to(torch.float32).contiguous()
        for op, (mags, signed) in wide._augmentation_space(31).items():
            picks = [0.0] if mags.ndim == 0 else [float(mags[i]) for i in (0, 3, 9, 16, 24, 30)]
            if signed:
                picks += [-m for m in picks if m != 0]
            for m in picks:
                out = autoaugment._apply_op(img, op, m, interpolation=InterpolationMode.NEAREST, fill=None)
                tensors[f"op/{name}/{op}/{m!r}"] = out.permute(1, 2, 0).contiguous()
        for deg in (7.5, 30.0, -45.0, 90.0):
            out = autoaugment._apply_op(img, "Rotate", deg, interpolation=InterpolationMode.NEAREST, fill=None)
            tensors[f"op/{name}/Rotate/{deg!r}"] = out.permute(1, 2, 0).contiguous()
    save_file(tensors, OUT, metadata={"torch": torch.__version__, "torchvision": torchvision.__version__})
    print(f"{len(tensors)} tensors, torchvision {torchvision.__version__} -> {os.path.normpath(OUT)}")


if __name__ == "__main__":
    sys.exit(main())
