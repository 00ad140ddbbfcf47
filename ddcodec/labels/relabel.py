"""`ddcodec relabel`: give an existing bundle new labels (another teacher, online, soft or hard) or another number
of variants without encoding it again; the codes, seeds and each variant's regenerated images stay exactly the same.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from typing import Any

from ..bundle import Bundle, write_bundle
from . import softlabels

LABEL_KEYS = ("labels", "teacher", "temperature", "soft_k", "soft_quant")


def relabel(bundle: Bundle, opts: softlabels.LabelOptions,
            device: str = "cpu") -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The bundle's manifest and payloads with its labels replaced by `opts` (same items, `opts.variants` variants)."""
    if opts.kind != "hard":
        opts = replace(opts, teacher=softlabels.resolve_teacher(opts.teacher, _raw_classes(bundle)))
    manifest = {k: v for k, v in bundle.manifest.items() if k not in ("fingerprints", "manifest_sha256")}
    manifest["payloads"] = {}
    # a variant's images are a pure function of (seed, item, variant), so planning more or fewer keeps the others
    manifest["variants"] = opts.variants
    old = bundle.manifest["labels"]
    payloads = {name: t for name, t in bundle.payloads.items() if name not in ("reference", old.get("payload"))}
    params = {k: v for k, v in manifest["method"]["params"].items() if k not in LABEL_KEYS}
    params.update(opts.record(), relabelled_from=bundle.digest())
    manifest["method"] = {**manifest["method"], "params": params}
    teacher = softlabels.open_teacher(opts.teacher, device) if opts.kind == "soft" else None
    return softlabels.attach_labels(manifest, payloads, opts, teacher, device=device)


def _raw_classes(bundle: Bundle) -> list[str]:
    """The class names as the teachers know them (the dataset's raw names when the encode recorded them)."""
    from ..data import readable_names
    from .teachers import TEACHERS
    names = bundle.class_names
    for spec in TEACHERS.values():
        if readable_names(list(spec.classes)) == names:
            return list(spec.classes)
    return names


def cmd_relabel(args: argparse.Namespace) -> int:
    """`ddcodec relabel BUNDLE --out OUT`: the same bundle with new labels, written atomically."""
    import torch
    from ..cli import human_bytes
    if args.threads:
        torch.set_num_threads(args.threads)
    bundle = Bundle.open(args.bundle[0] if len(args.bundle) == 1 else args.bundle)
    opts = softlabels.label_options(args, bundle.variants, kind="soft")
    manifest, payloads = relabel(bundle, opts, device=args.device or "cpu")
    out = write_bundle(args.out, manifest, payloads, overwrite=args.overwrite)
    lab = out.manifest["labels"]
    what = lab["kind"] if "online_teacher" not in lab else f"online ({lab['online_teacher']['name']})"
    if lab["kind"] == "soft":
        what += f" ({lab['teacher']['name']}, {human_bytes(out.bytes_by_part()[lab['payload']])})"
    print(f"wrote {args.out}: {out.manifest['method']['name']}, {out.num_items} items, labels {what}, "
          f"{human_bytes(sum(out.bytes_by_part().values()))}")
    return 0


def register(subparsers: Any) -> None:
    """Add `ddcodec relabel` to the main CLI."""
    p = subparsers.add_parser("relabel", help="replace a bundle's labels (teacher, soft, online or hard) or its variant count; images unchanged")
    p.add_argument("bundle", nargs="+", help="bundle directory or shard URL(s)")
    p.add_argument("--out", required=True, help="bundle directory to write (may be the input with --overwrite)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    softlabels.add_arguments(p, variants_default="the bundle's")
    p.set_defaults(func=cmd_relabel)
