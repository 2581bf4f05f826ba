#!/usr/bin/env python3
"""Training parity with PyTorch: the model, the initial weights and the 20 SGD steps on
la-cli's own batches. Run by scripts/check-pytorch-training.sh, which explains the steps.

  la-args                      prints the recipe as la-cli train options, one a line.
  init OUT                     VGG16_bn at width 0.25 with the article's softmax attention
                               (bench/reference/seed_model.py, mode="intended") and a global-pool
                               head, seeded, as a state dict in the article's layout.
  compare INIT BATCHES METRICS FINAL  trains from INIT on BATCHES (la-cli --dump-batches) with
                               the recipe below and compares each step's loss with METRICS
                               (la-cli's metrics.jsonl) and the final weights with FINAL
                               (la-cli export --format article of the run's last.safetensors).
"""
import json
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench", "reference"))
from seed_model import LinearAttention, init_torchvision_  # noqa: E402

# The recipe: the one description of the run, printed for la-cli by `la-args` and used by
# `compare`. 5,680 Fashion-MNIST images at 32 px in 20 unshuffled batches of 284, one epoch.
# The rate is small on purpose. ReLU masks and max-pool picks are discontinuous: a difference
# of one rounding in a pre-activation near zero, or between two near-equal values in a pool
# window, flips a unit on or off, and hundreds flip in each step of two runs that differ only
# by rounding. Each flip changes that step's gradient by far more than a rounding, and the
# gap grows with the rate: PyTorch float64 against itself with the initial weights moved by
# 1e-7 parts by 1e-4 in the loss after 20 steps at 2e-4 on the digits (2.5e-8 with a smooth
# Softplus in place of ReLU), and PyTorch float32 against float64 by 1e-2 within five steps at
# 0.05. At 1e-4 with batches of 284 PyTorch float32 stays within 1e-6 of float64, so two
# correct implementations can meet the limits; the run prints that floor.
RECIPE = dict(data="fashion-mnist", train_subset=5680, size=32, batch_size=284, epochs=1,
              lr=1e-4, momentum=0.9, nesterov=True, weight_decay=5e-4, warmup_epochs=0.25,
              label_smoothing=0.1)
STEPS = RECIPE["train_subset"] // RECIPE["batch_size"] * RECIPE["epochs"]
# PyTorch runs with one term of the recipe switched off: each must land further from la-cli
# than PyTorch with the whole recipe does, or the check could not tell that la-cli applies it.
WITHOUT = {"Nesterov": dict(nesterov=False), "weight decay": dict(weight_decay=0.0),
           "label smoothing": dict(label_smoothing=0.0), "warm-up": dict(warmup_epochs=0.0)}
TOLD_APART = 3.0
# How closely la-cli's weight decay must match the recipe's: the shrink of la-cli's decayed
# weights against PyTorch without decay, relative to the shrink the recipe predicts.
DECAY_TOL = 0.1
WIDTHS = [16, 16, "M", 32, 32, "M", 64, 64, 64, "M", 128, 128, 128, "M", 128, 128, 128, "M"]
CLASSES = 10
LOSS_TOL, WEIGHT_TOL = 1e-4, 1e-3


class Vgg(nn.Module):
    """torchvision's vgg16_bn layout with an attention module before each max-pool."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in WIDTHS:
            if v == "M":
                layers += [LinearAttention(c, reduction=8, mode="intended"), nn.MaxPool2d(2, 2)]
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(c, CLASSES))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def decayed(tensor):
    """Weight decay falls on conv and linear weights, not on biases or BatchNorm."""
    return tensor.ndim > 1


def state(model):
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
            if not k.endswith("num_batches_tracked")}


def lr_at(step, recipe=RECIPE):
    """la-train's cosine schedule per optimiser step, with linear warm-up (LrSchedule::lr_at)."""
    spe = STEPS // recipe["epochs"]
    t = min(step / STEPS, 1.0)
    lr = recipe["lr"] * 0.5 * (1.0 + math.cos(math.pi * t))
    if step / spe < recipe["warmup_epochs"]:
        lr *= (step + 1) / (recipe["warmup_epochs"] * spe)
    return lr


def la_args():
    """The recipe as la-cli train options; the caller adds the paths."""
    r = RECIPE
    for option in ["--data", r["data"], "--train-subset", r["train_subset"], "--size", r["size"],
                   "--batch-size", r["batch_size"], "--epochs", r["epochs"], "--shuffle", "false",
                   "--augment", "none", "--pretrained-lr-scale", 1, "--optimizer", "sgd",
                   "--lr", r["lr"], "--momentum", r["momentum"], "--weight-decay", r["weight_decay"],
                   "--schedule", "cosine", "--warmup-epochs", r["warmup_epochs"],
                   "--label-smoothing", r["label_smoothing"]] + (["--nesterov"] if r["nesterov"] else []):
        print(option)


def init(out):
    torch.manual_seed(0)
    model = Vgg()
    init_torchvision_(model)
    save_file(state(model), out)
    print(f"initial weights ({sum(p.numel() for p in model.parameters()):,} parameters) -> {out}")


def train(init_path, batches, dtype, recipe=RECIPE):
    """PyTorch's steps in `dtype`: each step's loss and the final state dict."""
    model = Vgg()
    missing = model.load_state_dict(load_file(init_path), strict=False)
    assert not missing.unexpected_keys and all(k.endswith("num_batches_tracked") for k in missing.missing_keys), missing
    model = model.to(dtype).train()
    decay = [p for p in model.parameters() if decayed(p)]
    no_decay = [p for p in model.parameters() if not decayed(p)]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe["weight_decay"]},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe["lr"], momentum=recipe["momentum"], nesterov=recipe["nesterov"])
    losses = []
    for step in range(STEPS):
        x, y = batches[f"images.{step}"].to(dtype), batches[f"labels.{step}"]
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=recipe["label_smoothing"])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.double() for k, v in state(model).items()}


def relative(a, b):
    return abs(a - b) / abs(b)


def weight_errors(a, b, initial):
    """Largest difference of a tensor of `a` from `b` relative to the tensor's largest value
    in `b` (at least 1e-3: the conv biases before a BatchNorm and the key biases of softmax
    attention get no gradient, stay at zero up to rounding, and have no scale of their own),
    and relative to the largest change training made to it (the stricter measure at a small
    rate; tensors that moved less than 1e-5 are left out). Each with the tensor's name."""
    of_value, of_change = (0.0, ""), (0.0, "")
    for name, t in b.items():
        d = (a[name] - t).abs().max().item()
        change = (t - initial[name]).abs().max().item()
        of_value = max(of_value, (d / max(t.abs().max().item(), 1e-3), name))
        if change > 1e-5:
            of_change = max(of_change, (d / change, name))
    return of_value, of_change


def shrink(a, b):
    """How much smaller the decayed tensors (conv and linear weights) of `a` are than those of
    `b`: the least-squares factor s in a = (1 - s) b, over all of them together. Weight decay's
    own signature: it scales each decayed weight down, by 2.4e-6 over the whole run here,
    which the largest-difference measures cannot see under the rounding floor, while rounding
    and flipped ReLUs, uncorrelated with the weights, average out over a million of them."""
    names = [k for k, t in b.items() if decayed(t)]
    return -sum(((a[k] - b[k]) * b[k]).sum().item() for k in names) / sum(
        (b[k] * b[k]).sum().item() for k in names)


def predicted_shrink(recipe=RECIPE):
    """The shrink weight decay alone makes over the run: each step moves a weight by the rate
    times the decay times the momentum buffer's gain (and once more under Nesterov)."""
    total, buffer = 0.0, 0.0
    for step in range(STEPS):
        buffer = recipe["momentum"] * buffer + 1.0
        gain = 1.0 + recipe["momentum"] * buffer if recipe["nesterov"] else buffer
        total += lr_at(step, recipe) * recipe["weight_decay"] * gain
    return total


def compare(init_path, batches_path, metrics_path, final_path):
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    batches = load_file(batches_path)
    ours = [json.loads(line) for line in open(metrics_path)]
    ours = [m["loss"] for m in ours if m.get("type") == "step"]
    assert len(ours) == STEPS, f"la-cli logged {len(ours)} steps, expected {STEPS}"
    torch32, w32 = train(init_path, batches, torch.float32)
    torch64, w64 = train(init_path, batches, torch.float64)
    print("| step | lr | PyTorch f32 loss | la-cli loss | la-cli vs PyTorch f32 | PyTorch f32 vs f64 | la-cli vs PyTorch f64 |")
    print("|---|---|---|---|---|---|---|")
    for s_ in range(STEPS):
        print(f"| {s_ + 1} | {lr_at(s_):.2e} | {torch32[s_]:.7f} | {ours[s_]:.7f} | {relative(ours[s_], torch32[s_]):.1e} "
              f"| {relative(torch32[s_], torch64[s_]):.1e} | {relative(ours[s_], torch64[s_]):.1e} |")
    final = {k: v.double() for k, v in load_file(final_path).items()}
    initial = {k: v.double() for k, v in load_file(init_path).items()}
    assert set(final) == set(w32), f"tensor names differ: {sorted(set(final) ^ set(w32))[:6]}"
    worst_loss = max(relative(a, b) for a, b in zip(ours, torch32))
    (wv, wv_name), (wc, wc_name) = weight_errors(final, w32, initial)
    (fv, _), (fc, _) = weight_errors(w32, w64, initial)
    (tv, _), _ = weight_errors(final, w64, initial)
    absolute = max((final[k] - w32[k]).abs().max().item() for k in w32)
    absolute_floor = max((w32[k] - w64[k]).abs().max().item() for k in w32)
    floor_loss = max(relative(a, b) for a, b in zip(torch32, torch64))
    truth_loss = max(relative(a, b) for a, b in zip(ours, torch64))
    print()
    print(f"{STEPS} steps, batch {batches['images.0'].shape[0]}, {len(w32)} tensors incl. BatchNorm running statistics:")
    print(f"- losses: la-cli against PyTorch f32 at most {worst_loss:.1e} apart (relative; limit {LOSS_TOL:g}); "
          f"against PyTorch f64 {truth_loss:.1e}, where PyTorch f32 is {floor_loss:.1e} from f64")
    print(f"- final weights: la-cli against PyTorch f32 at most {wv:.1e} of the tensor's largest value "
          f"({wv_name}; limit {WEIGHT_TOL:g}), {wc:.1e} of the largest change training made ({wc_name}); "
          f"against PyTorch f64 {tv:.1e}, where PyTorch f32 is {fv:.1e} (and {fc:.1e} of the change) from f64; "
          f"in absolute terms la-cli and PyTorch f32 are at most {absolute:.1e} apart (PyTorch f32 and f64 {absolute_floor:.1e})")
    within_limits = worst_loss <= LOSS_TOL and wv <= WEIGHT_TOL

    print()
    print("How far la-cli is from PyTorch f32 runs with one term of the recipe switched off "
          f"(the check must tell each apart from the whole recipe: {TOLD_APART:g}x further in the losses, "
          "in the weights or in the shrink of the decayed weights):")
    print()
    print("| PyTorch f32 run | losses from la-cli | weights from la-cli (of the largest value) "
          "| (of the largest change) | la-cli's decayed weights smaller by | told apart |")
    print("|---|---|---|---|---|---|")
    ws = shrink(final, w32)
    print(f"| the whole recipe | {worst_loss:.1e} | {wv:.1e} | {wc:.1e} | {ws:.1e} | |")
    told_apart, shrinks = True, {}
    for term, change in WITHOUT.items():
        losses, weights = train(init_path, batches, torch.float32, {**RECIPE, **change})
        loss_gap = max(relative(a, b) for a, b in zip(ours, losses))
        (v, _), (c, _) = weight_errors(final, weights, initial)
        shrinks[term] = shrink(final, weights)
        apart = (loss_gap >= TOLD_APART * worst_loss or c >= TOLD_APART * wc
                 or abs(shrinks[term]) >= TOLD_APART * abs(ws))
        told_apart &= apart
        print(f"| without {term} | {loss_gap:.1e} | {v:.1e} | {c:.1e} | {shrinks[term]:.1e} | {'yes' if apart else 'NO'} |")
    predicted = predicted_shrink()
    decay_error = abs(shrinks["weight decay"] - predicted) / predicted
    decay_matches = decay_error <= DECAY_TOL
    print()
    print(f"- weight decay: la-cli's decayed weights end {shrinks['weight decay']:.4e} smaller than PyTorch's without decay; "
          f"the recipe's decay predicts {predicted:.4e} (the sum over steps of rate x decay x momentum gain), "
          f"{decay_error:.1e} apart (limit {DECAY_TOL:g})")
    print()
    if within_limits and told_apart and decay_matches:
        print("PASS: within the limits, every term of the recipe tells, and la-cli's weight decay is the recipe's")
        return 0
    failures = [reason for ok, reason in [(within_limits, "outside the limits"),
                                          (told_apart, "a term of the recipe does not tell"),
                                          (decay_matches, "la-cli's weight decay is not the recipe's")] if not ok]
    print("FAIL: " + "; ".join(failures))
    return 1


if __name__ == "__main__":
    if sys.argv[1:] == ["la-args"]:
        la_args()
    elif sys.argv[1:2] == ["init"] and len(sys.argv) == 3:
        init(sys.argv[2])
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 6:
        sys.exit(compare(*sys.argv[2:]))
    else:
        sys.exit(__doc__)
