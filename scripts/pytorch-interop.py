#!/usr/bin/env python3
"""Loads la-cli's exports in PyTorch and compares their logits with la-cli's own.
Run by scripts/check-pytorch-interop.sh, which makes the models and the exports.

  image OUT.png                       a 32x32 RGB test picture (already the models' input size,
                                      so la-cli only scales and normalises it)
  compare LAYOUT WEIGHTS EXPORT IMAGE PREDICT_JSON
                                      builds LAYOUT's model (torchvision, timm, or the article's
                                      Sequential with bench/reference/seed_model.py's attention), load_state_dict(strict=True)
                                      of EXPORT, and compares its logits on IMAGE with la-cli's
                                      (PREDICT_JSON, from `la-cli predict --json`); WEIGHTS is the
                                      la-cli file, for its normalisation
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

TOL = 1e-4
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench", "reference"))


def image(out):
    y, x = np.mgrid[0:32, 0:32]
    rgb = np.stack([(x * 8) % 256, (y * 8) % 256, ((x + y) * 5 + 60) % 256], axis=-1)
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(out)


def build(layout, metadata):
    classes = int(metadata["num_classes"])
    if layout == "torchvision":
        import torchvision
        return getattr(torchvision.models, metadata["builder"])(num_classes=classes)
    if layout == "timm":
        import timm
        return timm.create_model(metadata["builder"], num_classes=classes, pretrained=False)
    return article_model(json.loads(metadata["config"]))


def article_model(config):
    """The article's Sequential for la-vgg's config (the JSON the export carries): per block
    its convs (each with BatchNorm when the config has it) and ReLUs, the attention module
    where the config puts one (softmax, the article's LinearAttention in mode "intended"),
    a max-pool; then torchvision's avgpool and classifier (Linear, ReLU, Dropout per hidden
    layer)."""
    import torch.nn as nn
    from seed_model import LinearAttention

    sites = config.get("attention") or {}
    layers, c = [], config.get("in_channels", 3)
    for i, widths in enumerate(config["blocks"]):
        for w in widths:
            layers.append(nn.Conv2d(c, w, 3, padding=1))
            if config.get("batch_norm"):
                layers.append(nn.BatchNorm2d(w))
            layers.append(nn.ReLU(inplace=True))
            c = w
        if i in sites.get("blocks", []):
            assert sites["config"]["kind"] == "softmax", sites
            layers.append(LinearAttention(c, reduction=sites["config"]["reduction"], mode="intended"))
        layers.append(nn.MaxPool2d(2, 2))
    head = config["head"]
    classifier, n = [], c * head["pool"] ** 2
    for h in head["hidden"]:
        classifier += [nn.Linear(n, h), nn.ReLU(True), nn.Dropout(head["dropout"])]
        n = h
    classifier.append(nn.Linear(n, config["num_classes"]))

    class Article(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.avgpool = nn.AdaptiveAvgPool2d(head["pool"])
            self.classifier = nn.Sequential(*classifier)

        def forward(self, x):
            return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))

    return Article()


def compare(layout, weights, export, picture, predict_json):
    with safe_open(weights, "pt") as f:
        norm = json.loads(f.metadata()["normalization"])
    with safe_open(export, "pt") as f:
        metadata = f.metadata()
    model = build(layout, metadata)
    model.load_state_dict(load_file(export), strict=True)
    model.eval()
    pixels = torch.from_numpy(np.asarray(Image.open(picture).convert("RGB"), dtype=np.float32) / 255.0)
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    x = ((pixels - mean) / std).permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        theirs = model(x)[0].double()
    ours = torch.tensor(json.load(open(predict_json))[0]["logits"], dtype=torch.float64)
    diff = (theirs - ours).abs().max().item()
    scale = ours.abs().max().item()
    ok = diff <= TOL * max(scale, 1e-12)
    name = metadata["builder"] if layout in ("torchvision", "timm") else f"article Sequential ({metadata.get('builder') or 'with attention'})"
    print(f"| {layout} | {name} | {len(load_file(export))} | "
          f"{scale:.4f} | {diff:.1e} | {'ok' if ok else 'FAIL'} |")
    return 0 if ok else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["image"] and len(sys.argv) == 3:
        image(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 7:
        sys.exit(compare(*sys.argv[2:]))
    else:
        sys.exit(__doc__)
