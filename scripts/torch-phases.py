"""Forward, backward and SGD time of the PyTorch reference's training step (VGG16, compact
head, 32x32, batch 64, 2 threads), to set against `la-cli bench --mode train`'s phases.

Usage (from the repository root): .venv-torch/bin/python scripts/torch-phases.py
"""
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench", "reference"))
import seed_model as sm  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
model = sm.VGG(sm.VGG16_CFG, num_classes=100, attention=False, mode="intended", compact_head=True).train()
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
loss_fn = nn.CrossEntropyLoss()
x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 100, (64,))
for step in range(8):
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss = loss_fn(model(x), y)
    t1 = time.perf_counter()
    loss.backward()
    t2 = time.perf_counter()
    opt.step()
    t3 = time.perf_counter()
    label = "warmup" if step < 2 else "step"
    print(f"{label} {step}: forward {t1 - t0:.3f} s, backward {t2 - t1:.3f} s, SGD {t3 - t2:.3f} s")
