#!/usr/bin/env python3
"""Fails when two top-level modules of one crate import each other, directly or through
others (`crate::a::...` in a, `crate::b::...` in b, or names that lib.rs re-exports).
A module's own files below it (`train.rs` and `train/defaults.rs`) are one module here: they
split one concept, and may use each other through `super::`.
Usage: scripts/import-cycles.py  (from anywhere; reads crates/*/src and xtask/src)."""
import glob
import os
import re
import sys

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
cycles = []
for crate in sorted(glob.glob(os.path.join(root, "crates", "*")) + [os.path.join(root, "xtask")]):
    src = os.path.join(crate, "src")
    lib = next((os.path.join(src, f) for f in ("lib.rs", "main.rs") if os.path.exists(os.path.join(src, f))), None)
    if lib is None:
        continue
    reexported = {}
    for m in re.finditer(r"pub use ([a-z_0-9]+)::\{?([^;]*)\}?;", open(lib).read()):
        for item in re.split(r"[,\s{}]+", m.group(2)):
            if item:
                reexported[item.split("::")[-1]] = m.group(1)
    modules = {}
    for path in glob.glob(os.path.join(src, "**", "*.rs"), recursive=True):
        rel = os.path.relpath(path, src)[:-3].replace(os.sep, "::")
        if rel in ("lib", "main"):
            continue
        top = rel.split("::")[0]
        code = "\n".join(l for l in open(path).read().split("\n") if not l.strip().startswith("//"))
        modules.setdefault(top, []).append(code)
    edges = {}
    for top, codes in modules.items():
        deps = set()
        for code in codes:
            names = [m.group(1) for m in re.finditer(r"crate::([A-Za-z_0-9]+)", code)]
            for m in re.finditer(r"use crate::\{([^}]*)\}", code):
                names += [i.split("::")[0] for i in re.split(r"[,\s]+", m.group(1)) if i]
            for name in names:
                dep = reexported.get(name, name)
                if dep in modules and dep != top:
                    deps.add(dep)
        edges[top] = deps
    seen = set()

    def walk(node, path):
        for nxt in sorted(edges.get(node, ())):
            if nxt in path:
                cycle = path[path.index(nxt):] + [nxt]
                key = frozenset(cycle)
                if key not in seen:
                    seen.add(key)
                    cycles.append(f"{os.path.relpath(crate, root)}: " + " -> ".join(cycle))
            elif len(path) < 12:
                walk(nxt, path + [nxt])

    for node in sorted(edges):
        walk(node, [node])

if cycles:
    print("import cycles between files of a crate:\n  " + "\n  ".join(cycles), file=sys.stderr)
    sys.exit(1)
print("no import cycles between the files of any crate")
