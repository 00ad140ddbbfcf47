"""Make ddcodec/assets/samples/cifar10.tar: a seeded per-class subset of the shared CIFAR-10 JPEG tar.

Rule: for each split and class, sort the member names, shuffle them with numpy's PCG64 seeded by
(seed, split index, class index), keep the first N (200 train, 100 test), and store them sorted. The
JPEG bytes are copied unchanged. The tar is deterministic (sorted, USTAR, mtime 0, uid/gid 0, mode 0644),
so the same input gives the same bytes (plain tar, 4.63 MB at the defaults; --gzip gives about 1 MB).

    python tools/make_sample.py --src ../shared/datasets/cifar10.tar --out ddcodec/assets/samples/cifar10.tar
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import sys
import tarfile
from pathlib import Path

import numpy as np

SPLITS = ("train", "test")


def pick(names: dict[tuple[str, str], list[str]], per_split: dict[str, int], seed: int) -> list[str]:
    """The chosen member names, by the seeded rule in the module docstring."""
    classes = sorted({c for _, c in names})
    chosen = []
    for si, split in enumerate(SPLITS):
        for ci, cls in enumerate(classes):
            pool = sorted(names.get((split, cls), []))
            if len(pool) < per_split[split]:
                sys.exit(f"{split}/{cls} has {len(pool)} images, fewer than {per_split[split]}")
            rng = np.random.Generator(np.random.PCG64([seed, si, ci]))
            chosen.extend(sorted(pool[i] for i in rng.permutation(len(pool))[:per_split[split]]))
    return chosen


def make(src: Path, out: Path, train: int, test: int, seed: int, compress: bool = False) -> str:
    """Write the sample tar; returns its sha256."""
    with tarfile.open(src) as tar:
        members = {m.name: m for m in tar if m.isfile() and len(m.name.split("/")) == 3 and m.name.split("/")[0] in SPLITS}
        names: dict[tuple[str, str], list[str]] = {}
        for n in members:
            split, cls, _ = n.split("/")
            names.setdefault((split, cls), []).append(n)
        chosen = pick(names, {"train": train, "test": test}, seed)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
            for n in chosen:
                data = tar.extractfile(members[n]).read()
                info = tarfile.TarInfo(n)
                info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
                dst.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if compress:
        gz = io.BytesIO()
        with gzip.GzipFile(fileobj=gz, mode="wb", compresslevel=9, mtime=0, filename="") as f:
            f.write(raw)
        raw = gz.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(raw)
    tmp.replace(out)
    print(f"wrote {out}: {len(chosen)} images ({train}/class train, {test}/class test), {len(raw) / 1e6:.2f} MB")
    return hashlib.sha256(raw).hexdigest()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--src", default="../shared/datasets/cifar10.tar")
    p.add_argument("--out", default="ddcodec/assets/samples/cifar10.tar")
    p.add_argument("--train", type=int, default=200, help="train images per class")
    p.add_argument("--test", type=int, default=100, help="test images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gzip", action="store_true", help="gzip-compress the tar (tarfile reads it transparently)")
    a = p.parse_args()
    print("sha256", make(Path(a.src), Path(a.out), a.train, a.test, a.seed, a.gzip))


if __name__ == "__main__":
    main()
