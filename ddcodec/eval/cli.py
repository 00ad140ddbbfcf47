"""`ddcodec eval` (a bundle), `ddcodec eval-real` (real pixels: full split or random IPC subset), `ddcodec export-ddranking`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

from ..errors import DDCodecError
from .augment import MIXES, MODES
from .students import STUDENTS
from .train import LABEL_MODES, REPORT_KINDS, TrainConfig


def command_line(args: argparse.Namespace) -> str:
    """The command as typed: `ddcodec` plus the arguments."""
    return shlex.join(["ddcodec", *getattr(args, "argv", sys.argv[1:])])


def _threads(n: int | None) -> None:
    if n:
        import torch
        torch.set_num_threads(n)


def _config(args: argparse.Namespace) -> TrainConfig:
    if args.epochs < 1:
        raise DDCodecError(f"--epochs must be at least 1, not {args.epochs}")
    if args.seeds < 1:
        raise DDCodecError(f"--seeds must be at least 1, not {args.seeds}")
    if args.batch_size < 2:
        raise DDCodecError(f"--batch-size must be at least 2, not {args.batch_size}")
    return TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
                       augment=args.augment, mix=args.mix, temperature=args.temperature,
                       labels=getattr(args, "labels", "hard"), device=args.device, eval_batch=args.eval_batch)


def _check_report_path(path: str | None) -> None:
    """Refuse, before any training, a --json path that holds something other than an earlier eval report."""
    if not path:
        return
    p = Path(path)
    if p.is_dir():
        raise DDCodecError(f"--json {path} is a directory; give a file path")
    if not p.exists():
        return
    try:
        old = json.loads(p.read_text())
        ours = isinstance(old, dict) and old.get("kind") in REPORT_KINDS and str(old.get("command", "")).startswith("ddcodec ")
    except (OSError, UnicodeDecodeError, ValueError):
        ours = False
    if not ours:
        raise DDCodecError(f"--json {path} exists and is not a ddcodec eval report; refusing to replace it "
                           "(move it or pick another path)")


def _seeds(args: argparse.Namespace) -> list[int]:
    return list(range(args.first_seed, args.first_seed + args.seeds))


def _finish(report: dict[str, Any], args: argparse.Namespace, what: str) -> int:
    from ..bundle.atomic import atomic_write_json
    from ..cli import human_bytes
    acc = " ".join(f"{100 * a:.2f}" for a in report["accuracy"])
    print(f"{report['student']} on {what}: top-1 {100 * report['mean']:.2f} ± {100 * report['std']:.2f} % over "
          f"{len(report['seeds'])} seed(s) [{acc}], tested on {report['test']['images']} {report['test']['split']} images")
    if "bundle" in report:
        b = report["bundle"]
        print(f"bundle {human_bytes(b['bytes'])} (soft labels {human_bytes(b['soft_label_bytes'])}); "
              f"{report['labels']['used']}")
    regen = report["regen_images_per_s"]
    print(f"train {report['train_s']:.0f} s (student {report['student_images_per_s'] or 0:.0f} img/s"
          + (f", regeneration {regen:.0f} img/s over {report['regenerated_images']} images" if regen else "")
          + f"), eval {report['eval_s']:.0f} s")
    if args.json:
        atomic_write_json(args.json, report)
        print(f"wrote {args.json}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Train a student on a regenerated bundle (K seeds) and test it on real data."""
    from .train import eval_bundle
    _threads(args.threads)
    cfg = _config(args)
    _check_report_path(args.json)
    src = args.bundle[0] if len(args.bundle) == 1 else args.bundle
    report = eval_bundle(src, args.student, args.test_data, cfg, _seeds(args), test_split=args.test_split,
                         test_limit=args.test_limit, cache_dir=args.cache_dir, memory_cache=not args.no_memory_cache,
                         command=command_line(args))
    return _finish(report, args, report["bundle"]["source"])


def cmd_eval_real(args: argparse.Namespace) -> int:
    """Train a student on real pixels (the whole split, or --ipc random images per class) and test it."""
    from .train import eval_real
    _threads(args.threads)
    cfg = _config(args)
    _check_report_path(args.json)
    report = eval_real(args.data, args.student, cfg, _seeds(args), ipc=args.ipc, subset_seed=args.subset_seed,
                       split=args.split, test_data=args.test_data, test_split=args.test_split,
                       test_limit=args.test_limit, image_size=args.image_size, command=command_line(args))
    what = f"{args.data} ({'all' if args.ipc is None else f'IPC {args.ipc} random'} {args.split} images)"
    return _finish(report, args, what)


def cmd_export(args: argparse.Namespace) -> int:
    """Write the regenerated images and soft labels per epoch as safetensors for DD-Ranking."""
    from .ddranking import export_ddranking
    _threads(args.threads)
    src = args.bundle[0] if len(args.bundle) == 1 else args.bundle
    index = export_ddranking(src, args.out, epochs=args.epochs, device=args.device, batch_size=args.batch_size,
                             stats=args.stats, overwrite=args.overwrite, command=command_line(args))
    files = sorted({e["file"] for e in index["epochs"]})
    print(f"wrote {args.out}: {len(files)} file(s) for {len(index['epochs'])} epoch(s), {index['items']} images "
          f"normalised with {index['normalization']['stats']} statistics; see {args.out}/README.md")
    return 0


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--student", default="convnet3", help=f"student network: {', '.join(STUDENTS)} (default convnet3)")
    p.add_argument("--epochs", type=int, default=300, help="training epochs (default 300)")
    p.add_argument("--seeds", type=int, default=3, help="number of student seeds (default 3)")
    p.add_argument("--first-seed", type=int, default=0, help="seeds are FIRST..FIRST+K-1 (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="student batch size (default 64)")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--augment", choices=MODES, default=None,
                   help="crop: pad+crop+flip; rrc: random-resized-crop+flip (default: crop up to 64 px, rrc above)")
    p.add_argument("--mix", choices=MIXES, default="none",
                   help="cutmix: paste a box from another image of the batch; labels mix by area, or the online "
                        "teacher labels the mixed image (RDED/SRe2L training; default none)")
    p.add_argument("--test-data", default=None, help="real test data source (default: the data the bundle or --data came from)")
    p.add_argument("--test-split", default="test")
    p.add_argument("--test-limit", type=int, default=None, help="test on N evenly spread images (default: all)")
    p.add_argument("--eval-batch", type=int, default=500)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--json", default=None, metavar="OUT", help="write the full report (every number) as JSON; "
                   "replaces only an earlier eval report")


def register(subparsers: Any) -> None:
    """Add eval, eval-real and export-ddranking to the ddcodec CLI."""
    e = subparsers.add_parser("eval", help="train a student on a bundle's regenerated images; top-1 on real test data")
    e.add_argument("bundle", nargs="+", help="bundle directory or shard URL(s)")
    _training_options(e)
    e.add_argument("--labels", choices=LABEL_MODES, default="auto",
                   help="auto: KL to soft labels when the bundle has them (or names an online teacher), else CE")
    e.add_argument("--temperature", type=float, default=None, help="KD temperature (default: the stored labels')")
    e.add_argument("--cache-dir", default=None, help="on-disk cache of regenerated variants")
    e.add_argument("--no-memory-cache", action="store_true",
                   help="regenerate every epoch instead of keeping each regenerated variant in memory")
    e.set_defaults(func=cmd_eval)

    r = subparsers.add_parser("eval-real", help="the baselines on real pixels: full data (upper bound) or a random IPC subset")
    r.add_argument("--data", required=True, help="training data source (dataset .tar, directory, sample:NAME, ...)")
    r.add_argument("--split", default="train")
    r.add_argument("--ipc", type=int, default=None, help="train on IPC random images per class (default: all images)")
    r.add_argument("--subset-seed", type=int, default=0,
                   help="seed of the subset; the same as `encode --method random --seed` picks the same images")
    r.add_argument("--image-size", type=int, default=None, help="resize to this square size (default: the data's)")
    _training_options(r)
    r.set_defaults(func=cmd_eval_real, temperature=None)

    x = subparsers.add_parser("export-ddranking", help="write regenerated images + soft labels per epoch for DD-Ranking")
    x.add_argument("bundle", nargs="+")
    x.add_argument("--out", required=True, help="output directory")
    x.add_argument("--epochs", type=int, default=1, help="epochs to export (one file per distinct variant)")
    x.add_argument("--stats", choices=["auto", "cifar", "imagenet", "none"], default="auto",
                   help="normalisation DD-Ranking applies to the real data (auto: cifar for CIFAR classes)")
    x.add_argument("--batch-size", type=int, default=64)
    x.add_argument("--device", default="cpu")
    x.add_argument("--threads", type=int, default=None)
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=cmd_export)
