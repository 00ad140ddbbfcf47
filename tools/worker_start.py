"""DataLoader worker start-up cost: 2-worker epochs of ds.loader() with fork, forkserver (the default) and spawn.

Builds tools/exactly_once.py's bundle (20 items, 3 variants, img2img with the builtin:tiny prior) and,
for each start method, runs a fresh Python process that iterates `--epochs` epochs of
`ds.loader(num_workers=2, multiprocessing_context=METHOD)` (batch size 3, so 7 batches an epoch). Each
epoch starts new workers. It records the seconds to the first batch and to the end of each epoch; the
first epoch of forkserver includes starting the server, which imports torch and ddcodec once.
"none" is the same epochs with no workers, for reference.

    python tools/worker_start.py --methods none fork forkserver spawn --epochs 5 --json worker_start.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child(bundle: str, method: str, epochs: int, workers: int) -> None:
    """Run in a fresh process: time each epoch's first batch and end; print one JSON line."""
    from ddcodec.loader import DistilledDataset
    ds = DistilledDataset(bundle, batch_size=3, return_ids=True)
    kwargs = {} if method == "none" else {"num_workers": workers, "multiprocessing_context": method}
    firsts, totals = [], []
    for epoch in range(epochs):
        ds.set_epoch(epoch)
        t0 = time.perf_counter()
        first, n = None, 0
        for _ in ds.loader(**kwargs):
            first = time.perf_counter() - t0 if first is None else first
            n += 1
        firsts.append(round(first, 3))
        totals.append(round(time.perf_counter() - t0, 3))
    print(json.dumps({"method": method, "batches": n, "first_batch_s": firsts, "epoch_s": totals}))


def measure(bundle: Path, method: str, epochs: int, workers: int) -> dict:
    """One fresh process's figures for `method`."""
    out = subprocess.run([sys.executable, __file__, "--child", str(bundle), method, str(epochs), str(workers)],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    later = r["first_batch_s"][1:] or r["first_batch_s"]
    r["median_later_first_batch_s"] = round(statistics.median(later), 3)
    r["median_later_epoch_s"] = round(statistics.median(r["epoch_s"][1:] or r["epoch_s"]), 3)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=["none", "fork", "forkserver", "spawn"])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--child", nargs=4, metavar=("BUNDLE", "METHOD", "EPOCHS", "WORKERS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0
    sys.path.insert(0, str(ROOT / "tools"))
    from exactly_once import make_bundle
    runs = []
    with tempfile.TemporaryDirectory(prefix="ddcodec-workers-") as tmp:
        bundle = make_bundle(Path(tmp))
        for method in args.methods:
            r = measure(bundle, method, args.epochs, args.workers)
            print(f"{method}: first batch {r['first_batch_s']} s, epoch {r['epoch_s']} s")
            runs.append(r)
    figures = {"workers": args.workers, "epochs": args.epochs, "batch_size": 3, "items": 20, "python": sys.version.split()[0],
               "runs": runs, "command": "python tools/worker_start.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if args.json:
        from ddcodec.bundle.atomic import atomic_write_json
        atomic_write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
