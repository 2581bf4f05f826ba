#!/usr/bin/env python3
"""Writes the first N Fashion-MNIST test images as 28x28 greyscale PNGs named
test<i>-label<label>.png, with the standard library only (no PIL).

    scripts/fashion-mnist-png.py [--data-dir /usr/share/datasets/fashion-mnist] [--count 2] [--out .]
"""
import argparse
import gzip
import os
import struct
import zlib


def png(path, width, height, rows):
    raw = b"".join(b"\x00" + bytes(r) for r in rows)

    def chunk(kind, body):
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--out", default=".")
    args = parser.parse_args()
    images = gzip.open(os.path.join(args.data_dir, "t10k-images-idx3-ubyte.gz")).read()
    labels = gzip.open(os.path.join(args.data_dir, "t10k-labels-idx1-ubyte.gz")).read()
    for i in range(args.count):
        pixels = images[16 + i * 784:16 + (i + 1) * 784]
        path = os.path.join(args.out, f"test{i}-label{labels[8 + i]}.png")
        png(path, 28, 28, [pixels[r * 28:(r + 1) * 28] for r in range(28)])
        print(path)


if __name__ == "__main__":
    main()
