"""Exactly once across real processes: gloo ranks × DataLoader workers × epochs, and resume from saved states.

Builds a 20-item, 3-variant img2img bundle (builtin:tiny prior, the shipped CIFAR-10 sample), then
for each world size launches that many `python tests/test_distributed.py` rank processes joined in a
torch.distributed gloo group. Each rank iterates DistilledDataset.loader(num_workers=W) for every W
and epoch, all_gathers its item ids, and resumes from saved states (every state for the worker
counts in --resume-all-for, mid-epoch for the others). The checks are tests/test_distributed.py's
check(): every item exactly once per epoch across ranks, equal batch counts, the global order equal
to the seeded permutation whatever the world size and worker count, every image equal to a
single-process run, and exact continuation after every resume. Any failure stops the run.

    python tools/exactly_once.py --worlds 1 2 3 4 --workers 0 1 2 3 4 --epochs 3 --json exactly_once.json
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def distributed_tests() -> Any:
    spec = importlib.util.spec_from_file_location("test_distributed", ROOT / "tests" / "test_distributed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_bundle(work: Path) -> Path:
    """20 real CIFAR-10 sample images (2 per class), img2img at strength 0.5, 3 variants: seeded noise matters."""
    from thread_determinism import make_bundle as img2img_bundle  # tools/ is on sys.path when a tool runs
    return img2img_bundle(work, seed=3, steps=2, guidance=1.5, fingerprints=4)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=3)
    p.add_argument("--resume-all-for", type=int, nargs="*", default=None,
                   help="worker counts resumed from every saved state (default: all of --workers)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    td = distributed_tests()
    resume_all = tuple(args.workers if args.resume_all_for is None else args.resume_all_for)
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="ddcodec-once-") as tmp:
        bundle = make_bundle(Path(tmp))
        from ddcodec.bundle import Bundle
        b = Bundle.open(bundle)
        counts = td.run_grid(bundle, Path(tmp), worlds=args.worlds, workers=args.workers, epochs=args.epochs,
                             batch=args.batch, resume_all_for=resume_all)
    figures = {"items": b.num_items, "variants": b.variants, "batch_size": args.batch, "worlds": args.worlds,
               "workers": args.workers, "epochs": args.epochs, "resume_all_for": list(resume_all), "backend": "gloo",
               **counts, "wall_seconds": round(time.time() - t0, 1),
               "command": "python tools/exactly_once.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    for world, c in figures["per_world"].items():
        print(f"world {world}: {c['epoch_runs']} (workers, epoch) runs, {c['items_yielded']} items yielded, "
              f"{c['images_compared']} images compared, {c['resumes']} resumes ({c['resumed_batches']} batches after them)")
    print(f"PASS: {figures['epoch_runs']} epoch runs, {figures['items_yielded']} items each exactly once, "
          f"{figures['resumes']} resumes exact, in {figures['wall_seconds']} s")
    if args.json:
        from ddcodec.bundle.atomic import atomic_write_json
        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
