"""Plot a results table as an SVG: student top-1 (mean ± std over seeds) against the bytes shipped, log scale.

No plotting library is needed; the SVG is written by hand.

    python tools/plot_results.py docs/results/cifar10-ipc10-convnet3/*.json --out docs/results/cifar10-ipc10-convnet3.svg
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from eval_table import augmentation  # tools/ is on sys.path when this script runs

W, H, LEFT, RIGHT, TOP, BOTTOM = 720, 420, 70, 200, 40, 55
COLOURS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666", "#1f78b4")


def point(r: dict[str, Any]) -> tuple[str, float, float, float]:
    """(label, bytes, mean %, std %) of one report."""
    if r["kind"] == "bundle":
        b = r["bundle"]
        name = "ld3m-" + b["method_params"].get("loss", "") if b["method"] == "ld3m" else b["method"]
        aug = augmentation(r["train"])
        aug = f" ({aug})" if aug != "crop" else ""
        return f"{name} bundle{aug}", float(b["bytes"]), 100 * r["mean"], 100 * r["std"]
    d = r["data"]
    name = "full data (pixels)" if r["kind"] == "real-full" else "random real (pixels)"
    return name, float(d["pixel_bytes_uint8"]), 100 * r["mean"], 100 * r["std"]


def svg(points: list[tuple[str, float, float, float]], title: str) -> str:
    """The SVG document for `points`."""
    lo = math.floor(math.log10(min(p[1] for p in points)))
    hi = math.ceil(math.log10(max(p[1] for p in points)))
    top = min(100.0, 10 * math.ceil(max(p[2] + p[3] for p in points) / 10))
    x = lambda b: LEFT + (math.log10(b) - lo) / max(1, hi - lo) * (W - LEFT - RIGHT)  # noqa: E731
    y = lambda a: TOP + (1 - a / top) * (H - TOP - BOTTOM)  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2 - RIGHT / 2}" y="22" text-anchor="middle" font-size="14">{title}</text>']
    for e in range(lo, hi + 1):
        out.append(f'<line x1="{x(10 ** e):.1f}" y1="{TOP}" x2="{x(10 ** e):.1f}" y2="{H - BOTTOM}" stroke="#ddd"/>')
        out.append(f'<text x="{x(10 ** e):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">1e{e}</text>')
    for a in range(0, int(top) + 1, 10):
        out.append(f'<line x1="{LEFT}" y1="{y(a):.1f}" x2="{W - RIGHT}" y2="{y(a):.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y(a) + 4:.1f}" text-anchor="end">{a}</text>')
    out.append(f'<text x="{(LEFT + W - RIGHT) / 2}" y="{H - 12}" text-anchor="middle">bytes shipped (log scale)</text>')
    out.append(f'<text x="18" y="{(TOP + H - BOTTOM) / 2}" text-anchor="middle" '
               f'transform="rotate(-90 18 {(TOP + H - BOTTOM) / 2})">test top-1 % (mean ± std)</text>')
    for i, (name, b, m, s) in enumerate(points):
        c = COLOURS[i % len(COLOURS)]
        out.append(f'<line x1="{x(b):.1f}" y1="{y(m - s):.1f}" x2="{x(b):.1f}" y2="{y(m + s):.1f}" stroke="{c}" stroke-width="2"/>')
        out.append(f'<circle cx="{x(b):.1f}" cy="{y(m):.1f}" r="5" fill="{c}"/>')
        out.append(f'<circle cx="{W - RIGHT + 16}" cy="{TOP + 8 + 18 * i}" r="5" fill="{c}"/>')
        out.append(f'<text x="{W - RIGHT + 26}" y="{TOP + 12 + 18 * i}">{name}: {m:.1f}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--title", default=None)
    a = p.parse_args(argv)
    reports = [json.loads(Path(f).read_text()) for f in a.reports]
    title = a.title or f"{reports[0]['student']}, {reports[0]['test']['images']} real test images"
    Path(a.out).write_text(svg([point(r) for r in reports], title))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
