"""One epoch of Fashion-MNIST as a PyTorch user writes it: what `la-cli train --data
fashion-mnist --width 0.25 --epochs 1` does. scripts/bench-vs-pytorch.sh times both from
the start of the process to its end (importing torch, loading, training and validating).

VGG16_bn at a quarter of the widths, softmax attention (the article's module, `intended`
form) after the last conv of each block, global-average-pool head; torchvision transforms
(bilinear resize to 32, RandomCrop(32, padding 4), horizontal flip) in a DataLoader with
worker processes; SGD with momentum 0.9, weight decay 5e-4, a cosine rate over the epoch;
validation on the 10,000 test images.

Example:
  python3 train_fashion_mnist.py --data-dir /usr/share/datasets/fashion-mnist --threads 2

Each epoch prints its training images/s and validation top-1.
"""
import argparse
import gzip
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import seed_model as sm  # noqa: E402

MEAN, STD = 0.2860, 0.3530  # la-core's Normalize::FASHION_MNIST
VGG16_BN_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def read_idx(path: str) -> np.ndarray:
    """An IDX file (gzip'd or not) as a numpy array of its dims."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


class FashionMnist(Dataset):
    def __init__(self, root: str, split: str, transform):
        prefix = "train" if split == "train" else "t10k"
        self.images = torch.from_numpy(read_idx(os.path.join(root, f"{prefix}-images-idx3-ubyte.gz")).copy())
        self.labels = torch.from_numpy(read_idx(os.path.join(root, f"{prefix}-labels-idx1-ubyte.gz")).astype(np.int64))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.transform(self.images[i].unsqueeze(0))  # [1, 28, 28] uint8
        return image.expand(3, -1, -1), self.labels[i]


def vgg16_bn_attention(width: float, classes: int) -> nn.Module:
    layers, c = [], 3
    for v in VGG16_BN_CFG:
        if v == "M":
            layers += [sm.LinearAttention(c, mode="intended"), nn.MaxPool2d(2, 2)]
        else:
            out = int(v * width)
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            c = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--width", type=float, default=0.25)
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    normalize = [v2.ToDtype(torch.float32, scale=True), v2.Normalize([MEAN], [STD])]
    train_tf = v2.Compose([v2.Resize(args.size, antialias=True), v2.RandomCrop(args.size, padding=args.size // 8),
                           v2.RandomHorizontalFlip(), *normalize])
    eval_tf = v2.Compose([v2.Resize(args.size, antialias=True), *normalize])
    train = DataLoader(FashionMnist(args.data_dir, "train", train_tf), batch_size=args.batch, shuffle=True,
                       drop_last=True, num_workers=args.workers, persistent_workers=args.workers > 0)
    val = DataLoader(FashionMnist(args.data_dir, "test", eval_tf), batch_size=args.batch,
                     num_workers=args.workers)

    model = vgg16_bn_attention(args.width, 10)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    total_steps = args.epochs * len(train)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total_steps)))
    loss_fn = nn.CrossEntropyLoss()
    nparam = sum(p.numel() for p in model.parameters())
    print(f"vgg16_bn width {args.width} + softmax attention: {nparam:,} parameters; {len(train.dataset)} training / "
          f"{len(val.dataset)} validation images; threads={torch.get_num_threads()} workers={args.workers} "
          f"torch={torch.__version__}", flush=True)

    for epoch in range(args.epochs):
        model.train()
        start, seen, loss_sum = time.perf_counter(), 0, 0.0
        for x, y in train:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            seen += len(y)
            loss_sum += loss.item() * len(y)
        train_s = time.perf_counter() - start
        model.eval()
        correct = 0
        with torch.inference_mode():
            for x, y in val:
                correct += (model(x).argmax(1) == y).sum().item()
        print(f"epoch {epoch + 1}: train loss {loss_sum / seen:.4f}, {seen / train_s:.1f} images/s; "
              f"val top-1 {100 * correct / len(val.dataset):.2f} %", flush=True)


if __name__ == "__main__":
    main()
