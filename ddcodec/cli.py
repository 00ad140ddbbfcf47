"""The ddcodec command line: encode | inspect | verify | preview | shard | demo (and plug-in commands)."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import DDCodecError

# Extra sub-commands contributed by other modules: name -> "module:register" where
# register(subparsers) adds the parser and sets `func`.
PLUGINS = ["ddcodec.prior.cli:register", "ddcodec.labels.cli:register", "ddcodec.labels.relabel:register",
           "ddcodec.eval.cli:register",
           "ddcodec.methods.experts:register"]


def _quiet() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings
    if not getattr(warnings.formatwarning, "_ddcodec", False):
        default = warnings.formatwarning

        def one_line(message, category, filename, lineno, line=None):  # ddcodec's own warnings: one line, no source
            if str(filename).startswith(str(Path(__file__).parent)):
                return f"ddcodec: warning: {message}\n"
            return default(message, category, filename, lineno, line)
        one_line._ddcodec = True  # type: ignore[attr-defined]
        warnings.formatwarning = one_line
    try:
        from diffusers.utils import logging as dlog
        dlog.set_verbosity_error()
    except Exception:
        pass


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# encode ------------------------------------------------------------------------------------
def cmd_encode(args: argparse.Namespace) -> int:
    from .methods import method_module
    from .parallel import barrier, init_from_env
    rank, world = init_from_env()
    _check_out(args.out, args.overwrite)
    barrier()  # every rank checks before rank 0 may write
    bundle = method_module(args.method).run(args)
    barrier()
    if rank != 0:
        return 0
    total = sum(bundle.bytes_by_part().values())
    print(f"wrote {args.out}: {bundle.manifest['method']['name']}, {bundle.num_items} items, "
          f"{bundle.num_classes} classes, {human_bytes(total)}")
    return 0


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise DDCodecError(f"{out} already exists", "choose another --out or pass --overwrite")


# inspect -----------------------------------------------------------------------------------
def inspect_summary(bundle: Any) -> dict[str, Any]:
    """The facts `ddcodec inspect` prints, as plain data."""
    m = bundle.manifest
    gen = m["generator"]
    parts = bundle.bytes_by_part()
    return {
        "source": bundle.source, "format_version": m["version"], "method": m["method"]["name"],
        "method_params": {k: v for k, v in m["method"]["params"].items() if k != "source_indices"},
        "items": bundle.num_items, "classes": bundle.class_names, "variants": bundle.variants,
        "image_size": m["image"]["size"], "seed": m["seed"],
        "labels": m["labels"].get("codec", {"name": "hard"}) | {"kind": m["labels"]["kind"], "teacher": _teacher(m["labels"]),
                                                                 "top1_is_class": m["labels"].get("teacher", {}).get("top1_is_class")},
        "generator": {"source": gen["model"]["source"], "pipeline": gen["pipeline"], "dtype": gen["dtype"],
                      "scheduler": gen["scheduler"].get("class"), "params": gen["params"],
                      "micro_batch": gen["micro_batch"], "components": gen["model"]["components"]},
        "bytes": parts, "total_bytes": sum(parts.values()),
        "fingerprints": len(m.get("fingerprints", {}).get("entries", [])),
    }


def _teacher(labels: dict[str, Any]) -> str | None:
    """The teacher a bundle's labels come from: stored soft labels' or the one the consumer runs online."""
    return (labels.get("teacher") or labels.get("online_teacher") or {}).get("name")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    s = inspect_summary(Bundle.open(_source(args.bundle)))
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    print(f"bundle     {s['source']} (format v{s['format_version']})")
    print(f"method     {s['method']}  {json.dumps(s['method_params'])}")
    print(f"items      {s['items']} in {len(s['classes'])} classes, {s['variants']} variant(s), "
          f"{s['image_size'][0]}x{s['image_size'][1]} px, seed {s['seed']}")
    print(f"classes    {', '.join(s['classes'])}")
    print(f"labels     {s['labels']['kind']}" + (f" ({s['labels']['name']}, k={s['labels'].get('k')}, "
                                                   f"{s['labels'].get('quant')})" if s['labels']['kind'] == 'soft' else "")
          + (f", {'online ' if s['labels']['kind'] == 'hard' else ''}teacher {s['labels']['teacher']}"
             if s['labels']['teacher'] else "")
          + (f", top-1 is the item's class on {s['labels']['top1_is_class']:.1%}"
             if s['labels'].get('top1_is_class') is not None else ""))
    g = s["generator"]
    print(f"generator  {g['source']}  pipeline={g['pipeline']} dtype={g['dtype']} scheduler={g['scheduler']} "
          f"params={json.dumps(g['params'])}")
    print("bytes      " + ", ".join(f"{k} {human_bytes(v)}" for k, v in s["bytes"].items())
          + f"; total {human_bytes(s['total_bytes'])}")
    print(f"reference  {s['fingerprints']} fingerprinted image(s)")
    return 0


# verify ------------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace) -> int:
    import torch
    from .bundle import Bundle
    from .bundle.fingerprint import verify_fingerprints
    bundle = Bundle.open(_source(args.bundle))
    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}.get(args.dtype) if args.dtype else None
    r = verify_fingerprints(bundle, device=args.device, dtype=dtype, tolerance=args.tolerance,
                            allow_different_weights=args.allow_different_weights)
    if r["checked"] == 0:
        print(f"FAIL: {r['reason']}")
        return 1
    how = "bitwise identical" if r["bitwise"] else f"max difference {r['max_diff']:.3g} (tolerance {r['tolerance']:.3g})"
    print(f"{'PASS' if r['passed'] else 'FAIL'}: payload checksums ok; {r['checked']} reference image(s) regenerated, "
          f"{r['matching_digests']}/{r['checked']} digests match, {how}")
    return 0 if r["passed"] else 1


# preview -----------------------------------------------------------------------------------
def cmd_preview(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .generators.pipelines import build_pipeline
    from .preview import preview_grid, save_png
    bundle = Bundle.open(_source(args.bundle))
    class_ids = bundle.items["class_ids"].tolist()
    picks = []
    for c in range(bundle.num_classes):
        picks.extend([i for i, k in enumerate(class_ids) if k == c][:args.per_class])
    pipe = build_pipeline(bundle.manifest, bundle.items, device=args.device,
                          allow_different_weights=args.allow_different_weights)
    images = pipe(picks, args.epoch % bundle.variants)
    grid = preview_grid(images, [class_ids[i] for i in picks], bundle.class_names, args.per_class)
    save_png(grid, args.out)
    print(f"wrote {args.out}: {len(picks)} images, {grid.width}x{grid.height} px")
    return 0


# shard -------------------------------------------------------------------------------------
def cmd_shard(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .bundle.shards import write_shards
    bundle = Bundle.open(_source(args.bundle))
    paths = write_shards(bundle, args.out, args.items_per_shard)
    last = paths[-1].name
    print(f"wrote {len(paths)} shard(s) to {args.out}: {paths[0].name}" + (f" .. {last}" if len(paths) > 1 else ""))
    return 0


# demo --------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    """The README's main job: encode the shipped sample, inspect it, write a preview."""
    from .generators.prior import DEFAULT_PRIOR
    out = os.path.abspath(args.out)
    bundle_dir = os.path.join(out, "bundle")
    if args.generator == "builtin:default" and not (DEFAULT_PRIOR / "model_index.json").exists():
        print("note: the embedded default prior is not installed; using the tiny random-weight prior")
        args.generator = "builtin:tiny"
    ns = argparse.Namespace
    run = [
        (cmd_encode, ns(method=args.method, data=args.data, split="train", ipc=args.ipc, out=bundle_dir, seed=0,
                        generator=args.generator, image_size=None, overwrite=True, micro_batch=16,
                        encode_batch_size=64,
                        **_method_defaults(args.method))),
        (cmd_inspect, ns(bundle=[bundle_dir], json=False)),
        (cmd_verify, ns(bundle=[bundle_dir], device="cpu", dtype=None, tolerance=None, allow_different_weights=False)),
        (cmd_preview, ns(bundle=[bundle_dir], out=os.path.join(out, "preview.png"), per_class=8, epoch=0,
                         device="cpu", allow_different_weights=False)),
    ]
    for fn, a in run:
        print(f"$ ddcodec {fn.__name__[4:]} ...", flush=True)
        rc = fn(a)
        if rc:
            return rc
    return 0


def _method_defaults(method: str) -> dict[str, Any]:
    """Defaults of a method's own options, as argparse would fill them."""
    from .methods import method_module
    p = argparse.ArgumentParser(conflict_handler="resolve")
    method_module(method).add_arguments(p)
    return vars(p.parse_args([]))


def _source(paths: list[str]) -> Any:
    return paths[0] if len(paths) == 1 else paths


# parser ------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from .methods import METHODS, method_module
    p = argparse.ArgumentParser(prog="ddcodec", description="Distilled datasets as compact, regenerable bundles.")
    p.add_argument("--version", action="version", version=f"ddcodec {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    e = sub.add_parser("encode", help="distil a dataset into a bundle", conflict_handler="resolve")
    e.add_argument("--method", required=True, choices=sorted(METHODS))
    e.add_argument("--data", required=True, help="dataset .tar, ImageFolder dir, 'sample:cifar10', or torchvision name")
    e.add_argument("--split", default="train")
    e.add_argument("--ipc", type=int, required=True, help="items per class")
    e.add_argument("--out", required=True, help="bundle directory to write")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--generator", default="builtin:default", help="prior: builtin:default, builtin:cifar10-v2 (same VAE, longer-trained denoiser), "
                   "builtin:imagenette-64 (same VAE, a denoiser for Imagenette at 64 px), builtin:tiny, a path or hub id")
    e.add_argument("--image-size", type=int, default=None, help="square output size (default: the data's)")
    e.add_argument("--micro-batch", type=int, default=16, help="fixed regeneration micro-batch (bitwise determinism on CPU)")
    e.add_argument("--encode-batch-size", type=int, default=64,
                   help="fixed VAE/teacher chunk size; chunks are split across torchrun ranks")
    e.add_argument("--overwrite", action="store_true")
    for name in sorted(METHODS):
        method_module(name).add_arguments(e.add_argument_group(f"{name} options"))
    e.set_defaults(func=cmd_encode)

    i = sub.add_parser("inspect", help="summarise a bundle")
    i.add_argument("bundle", nargs="+", help="bundle directory or shard URL(s)")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    v = sub.add_parser("verify", help="regenerate reference images and compare fingerprints")
    v.add_argument("bundle", nargs="+")
    v.add_argument("--device", default="cpu")
    v.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None)
    v.add_argument("--tolerance", type=float, default=None)
    v.add_argument("--allow-different-weights", action="store_true")
    v.set_defaults(func=cmd_verify)

    pv = sub.add_parser("preview", help="write a labelled PNG grid of regenerated images")
    pv.add_argument("bundle", nargs="+")
    pv.add_argument("--out", required=True)
    pv.add_argument("--per-class", type=int, default=8)
    pv.add_argument("--epoch", type=int, default=0)
    pv.add_argument("--device", default="cpu")
    pv.add_argument("--allow-different-weights", action="store_true")
    pv.set_defaults(func=cmd_preview)

    s = sub.add_parser("shard", help="write the bundle as webdataset tar shards")
    s.add_argument("bundle", nargs="+")
    s.add_argument("--out", required=True)
    s.add_argument("--items-per-shard", type=int, default=1000)
    s.set_defaults(func=cmd_shard)

    d = sub.add_parser("demo", help="the main job: encode the shipped sample, inspect, verify, preview")
    d.add_argument("--out", default="ddcodec-demo")
    d.add_argument("--data", default="sample:cifar10")
    d.add_argument("--method", default="random", choices=sorted(METHODS))
    d.add_argument("--ipc", type=int, default=10)
    d.add_argument("--generator", default="builtin:default")
    d.set_defaults(func=cmd_demo)

    for spec in PLUGINS:
        mod, _, fn = spec.partition(":")
        try:
            register: Callable = getattr(importlib.import_module(mod), fn)
        except ImportError:
            continue
        register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _quiet()
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        args = build_parser().parse_args(argv)
        args.argv = argv
        return int(args.func(args) or 0)
    except DDCodecError as e:
        print(f"ddcodec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ddcodec: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
