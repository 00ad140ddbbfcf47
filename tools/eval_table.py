"""Markdown table rows from `ddcodec eval` / `ddcodec eval-real` JSON reports (one row per report).

    python tools/eval_table.py docs/results/*.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HEADER = ("| training set | IPC | student | top-1 % (mean ± std, n) | bytes | soft-label bytes | epochs | augment | "
          "test images | student img/s | regen img/s |\n|---|---|---|---|---|---|---|---|---|---|---|")


def human(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


OPTIMIZERS = {"sgd": "SGD", "adam": "Adam", "adamw": "AdamW"}
TABLE_VARIANTS = 5  # d4m/dace variants that results_table.py plans by default


def method_settings(b: dict[str, Any]) -> str:
    """', 50 iterations, SGD lr 0.01' for an LD3M bundle (its optimisation settings differ between tables),
    ', factor 1' for patches at a factor other than the default 2 (', no selection' when every candidate image is
    kept with one crop, ', whole images' for crops of the whole image), ', rho 0.4' / ', strength 0.4' for dace / d4m
    at another noise level than their defaults (0.8 / 0.7), ', medoids' for d4m's `--prototype medoid`, ', 40 variants'
    for d4m / dace with another variant count than the tables' 5, and ', relabelled' for labels given by
    `ddcodec relabel`; else ''."""
    p = b["method_params"]
    if b["method"] == "ld3m":
        out = f", {p['iterations']} iterations, {OPTIMIZERS[p['optimizer']]} lr {p['lr_z']:g}"
    elif b["method"] in ("rded", "dace"):
        out = f", factor {p['factor']}" if p.get("factor", 2) != 2 else ""
        if p.get("candidates", 300) <= p.get("patches_per_class", 0) and p.get("num_crops", 5) == 1:
            out += ", no selection"  # every candidate image is kept, one crop each: a random real subset
        if list(p.get("crop_scale", [0.08, 1.0])) == [1.0, 1.0]:
            out += ", whole images"
    else:
        out = ""
    gen = b.get("generator_params", {})
    if b["method"] == "dace" and gen.get("rho", 0.8) != 0.8:
        out += f", rho {gen['rho']:g}"
    if b["method"] == "d4m" and gen.get("strength", 0.7) != 0.7:
        out += f", strength {gen['strength']:g}"
    if b["method"] == "d4m" and p.get("prototype") == "medoid":
        out += ", medoids"
    if b["method"] in ("d4m", "dace") and b.get("variants", TABLE_VARIANTS) != TABLE_VARIANTS:
        out += f", {b['variants']} variant" + ("s" if b["variants"] != 1 else "")
    return out + (", relabelled" if "relabelled_from" in p else "")


def recipe(t: dict[str, Any]) -> str:
    """', AdamW lr 0.001, wd 0.01, T 4' for a student recipe off the defaults (SGD lr 0.01, weight decay 5e-4, batch 64,
    the labels' temperature); else ''."""
    out = ""
    if t.get("optimizer", "sgd") != "sgd" or t.get("lr", 0.01) != 0.01:
        out += f", {OPTIMIZERS[t.get('optimizer', 'sgd')]} lr {t['lr']:g}"
    if t.get("weight_decay", 5e-4) != 5e-4:
        out += f", wd {t['weight_decay']:g}"
    if t.get("batch_size", 64) != 64:
        out += f", batch {t['batch_size']}"
    if t.get("temperature"):
        out += f", T {t['temperature']:g}"
    return out


def augmentation(t: dict[str, Any]) -> str:
    """'crop', 'rrc', 'rrc+cutmix', ..."""
    return (t.get("augment") or "crop") + (f"+{t['mix']}" if t.get("mix", "none") != "none" else "")


def row(r: dict[str, Any]) -> str:
    """One table row for one report."""
    if r["kind"] == "bundle":
        b = r["bundle"]
        method = b["method"] + (f"-{b['method_params']['loss']}" if b["method"] == "ld3m" else "")
        labels = r["labels"]["used"] + (f", online {r['labels']['online_teacher']}" if r["labels"].get("online_teacher") else "")
        what = f"{method} bundle ({b['generator']}, {labels}{method_settings(b)}{recipe(r['train'])})"
        ipc, size, soft = b["ipc"], human(b["bytes"]), human(b["soft_label_bytes"])
    else:
        d = r["data"]
        what = "real pixels, " + ("full split" if r["kind"] == "real-full" else f"random subset (seed {d['subset_seed']})")
        what += recipe(r["train"])
        ipc, size, soft = d["ipc"] or "all", f"{human(d['pixel_bytes_uint8'])} raw uint8", "–"
    acc = f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} (n={len(r['accuracy'])})"
    regen = f"{r['regen_images_per_s']:.0f}" if r.get("regen_images_per_s") else "–"
    student = f"{r['student_images_per_s']:.0f}" if r.get("student_images_per_s") else "–"
    return (f"| {what} | {ipc} | {r['student']} | {acc} | {size} | {soft} | {r['train']['epochs']} | "
            f"{augmentation(r['train'])} | {r['test']['images']} | {student} | {regen} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("reports", nargs="+", type=Path)
    p.add_argument("--commands", action="store_true", help="also list each row's command")
    args = p.parse_args()
    reports = [json.loads(path.read_text()) for path in args.reports]
    print(HEADER)
    for r in reports:
        print(row(r))
    if args.commands:
        print()
        for path, r in zip(args.reports, reports):
            if r.get("encode_command"):
                print(f"- `{path.name}`: `{r['encode_command']}` then `{r['command']}`")
            else:
                print(f"- `{path.name}`: `{r['command']}`")


if __name__ == "__main__":
    main()
