"""Bundle bytes against the same distilled set stored as PNG pixels plus fp16 FKD soft labels.

For each bundle, DistilledDataset regenerates every (item, variant); each image is quantised to uint8
(round(255 x)) and PNG-encoded on its own with PIL (`optimize=True`). The pixel alternative is those
PNG files plus full fp16 logits for every (item, variant): N x V x C x 2 bytes (FKD-style per-epoch soft
labels). The bundle's bytes are every file in its directory (manifest, payloads, reference thumbnails).

    ratio = bundle bytes / (PNG bytes + fp16 logits bytes)          (target: <= 0.1)

A bundle's labels grow with the variant count V and the rest does not, while the PNGs grow with V; so
the ratio is also extrapolated to other V (`--extrapolate`, default 10, 50, 300) from the measured
per-variant sizes, for bundles with more than one variant:

    ratio(V) = (fixed + labels / V_measured x V) / ((PNG / V_measured + N x C x 2) x V)

  python tools/bench_compression.py /tmp/ddbench/mem/{random,d4m,dace,rded,ld3m-dm} --threads 1 \\
      --json docs/results/bench-compression.json
"""

from __future__ import annotations

import argparse
import io
import json
import math
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ddcodec import DistilledDataset
from ddcodec.bundle import Bundle


def png_bytes(image: torch.Tensor) -> int:
    """Size of one (3, H, W) [0, 1] image as an optimised 8-bit RGB PNG."""
    arr = image.detach().cpu().float().mul(255).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr), "RGB").save(buf, format="PNG", optimize=True)
    return buf.tell()


def bundle_files(root: Path) -> dict[str, int]:
    """Bytes of every file in the bundle directory, by name."""
    return {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.is_file()}


def ratio_at(v: int, measured_v: int, fixed: int, labels: int, png: int, logits_per_variant: int) -> float:
    """Extrapolated bundle / (PNG + fp16 logits) at v variants, from sizes measured at measured_v."""
    bundle = fixed + labels / measured_v * v
    pixels = (png / measured_v + logits_per_variant) * v
    return bundle / pixels


def variants_for(target: float, measured_v: int, fixed: int, labels: int, png: int, logits_per_variant: int) -> int | None:
    """The fewest variants at which the extrapolated ratio is <= target (None if it never gets there)."""
    room = target * (png / measured_v + logits_per_variant) - labels / measured_v
    if room <= 0:
        return None
    v = max(1, math.ceil(fixed / room))
    while v > 1 and ratio_at(v - 1, measured_v, fixed, labels, png, logits_per_variant) <= target:
        v -= 1  # guard against float rounding in the ceil
    return v


def measure(path: Path, batch_size: int, extrapolate: list[int], target: float) -> dict[str, Any]:
    bundle = Bundle.open(path)
    m = bundle.manifest
    n, v, c = bundle.num_items, bundle.variants, bundle.num_classes
    ds = DistilledDataset(bundle, batch_size=batch_size, shuffle=False)
    png, images = 0, 0
    t = time.perf_counter()
    for epoch in range(v):
        ds.set_epoch(epoch)
        for batch, _, _ in ds:
            png += sum(png_bytes(img) for img in batch)
            images += len(batch)
    seconds = time.perf_counter() - t
    assert images == n * v, (images, n, v)
    files = bundle_files(path)
    total = sum(files.values())
    lab = m["labels"]
    labels = m["payloads"][lab["payload"]]["bytes"] if lab["kind"] == "soft" else 0
    logits = n * v * c * 2
    h, w = m["image"]["size"]
    row: dict[str, Any] = {
        "bundle": str(path), "method": m["method"]["name"], "items": n, "variants": v, "classes": c,
        "image_size": [h, w], "labels_kind": lab["kind"], "bundle_bytes": total, "bundle_files": files,
        "labels_bytes": labels, "png_bytes": png, "png_bytes_per_image": png / images,
        "raw_uint8_bytes": images * 3 * h * w, "fp16_logits_bytes": logits,
        "ratio_vs_png_plus_logits": total / (png + logits), "ratio_vs_png_only": total / png,
        "regenerate_seconds": seconds,
    }
    if v > 1:
        sizes = (v, total - labels, labels, png, n * c * 2)
        row["extrapolated_ratio_vs_png_plus_logits"] = {str(x): ratio_at(x, *sizes) for x in extrapolate}
        row["variants_for_target"] = {"target": target, "variants": variants_for(target, *sizes)}
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundles", nargs="+")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--extrapolate", type=int, nargs="*", default=[10, 50, 300])
    ap.add_argument("--target", type=float, default=0.1, help="report the fewest variants reaching this ratio")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for b in args.bundles:
        row = measure(Path(b), args.batch_size, args.extrapolate, args.target)
        print(f"{row['method']:>6} N={row['items']} V={row['variants']}: bundle {row['bundle_bytes']:,} B, "
              f"PNG {row['png_bytes']:,} B + fp16 logits {row['fp16_logits_bytes']:,} B -> "
              f"ratio {row['ratio_vs_png_plus_logits']:.3f}", flush=True)
        rows.append(row)
    result = {"command": "python tools/bench_compression.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "threads": torch.get_num_threads(), "png": "PIL 8-bit RGB, optimize=True, one file per (item, variant)",
              "bundles": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
