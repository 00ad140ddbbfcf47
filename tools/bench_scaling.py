"""Single- vs multi-process speed-up of encode and decode under torchrun (gloo on CPU, nccl on GPUs).

Encode: `ddcodec encode` of the shipped CIFAR-10 sample, timed as a whole command, with 1 and N ranks.
Decode: one epoch of DistilledDataset regeneration of that bundle, every rank regenerating its share;
the time is the slowest rank's, from a barrier before the epoch to a barrier after it. Each rank runs
`--threads` intra-op threads (default 1), so N ranks use N cores; a 1-process run with N threads is
timed too, as the alternative use of the same cores. Runs alternate configurations within each
repeat, so drift on a noisy machine hits all of them alike; the figures are min/median/max and
speed-ups of medians.

    python tools/bench_scaling.py --procs 1 2 --repeats 2 --json docs/results/scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD = r"""
import os, sys, time, json, torch, torch.distributed as dist
torch.set_num_threads(int(sys.argv[2]))
from ddcodec import DistilledDataset
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu"
ds = DistilledDataset(sys.argv[1], device=device, batch_size=int(sys.argv[3]))
ds.pipeline  # load the prior before timing
n = 0
for images, _, _ in DistilledDataset(sys.argv[1], device=device, batch_size=2):
    break  # warm-up
if dist.is_initialized(): dist.barrier()
t = time.perf_counter()
for images, _, _ in ds:
    n += len(images)
if torch.cuda.is_available(): torch.cuda.synchronize()
if dist.is_initialized(): dist.barrier()
dt = time.perf_counter() - t
if not dist.is_initialized() or dist.get_rank() == 0:
    print("RESULT " + json.dumps({"seconds": dt, "images_rank0": n}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, threads: int, args: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), *args]


def env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "DDCODEC_BACKEND": "gloo"}


def time_encode(nproc: int, threads: int, enc: list[str], out: Path) -> float:
    cmd = launch(nproc, threads, ["-m", "ddcodec.cli", *enc, "--out", str(out), "--overwrite"])
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env(threads), capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode:
        raise SystemExit(f"encode failed with {nproc} process(es): {r.stderr[-1500:]}")
    return dt


def time_decode(nproc: int, threads: int, bundle: Path, child: Path, batch: int) -> float:
    cmd = launch(nproc, threads, [str(child), str(bundle), str(threads), str(batch)])
    r = subprocess.run(cmd, env=env(threads), capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode or not lines:
        raise SystemExit(f"decode failed with {nproc} process(es): {r.stderr[-1500:]}")
    return json.loads(lines[-1][7:])["seconds"]


def summary(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="d4m")
    p.add_argument("--ipc", type=int, default=10)
    p.add_argument("--generator", default="builtin:default")
    p.add_argument("--batch-size", type=int, default=32, help="decode batch size per rank")
    p.add_argument("--encode-args", default="--candidates 30 --variants 2 --steps 4",
                   help="more `ddcodec encode` arguments (default: 30 candidates per class, 2 labelled variants, 4 img2img steps)")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    enc = ["encode", "--method", a.method, "--data", "sample:cifar10", "--ipc", str(a.ipc), "--generator", a.generator,
           "--seed", "0", *a.encode_args.split()]
    configs = [(n, a.threads) for n in a.procs] + [(1, max(a.procs) * a.threads)]
    times: dict[str, dict[str, list[float]]] = {"encode": {}, "decode": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        child = tmp_path / "decode_child.py"
        child.write_text(CHILD)
        bundle = tmp_path / "bundle"
        time_encode(1, max(a.procs) * a.threads, enc, bundle)  # the decode bundle (and a warm cache)
        for r in range(a.repeats):
            for n, t in configs:
                key = f"{n}x{t}"
                times["encode"].setdefault(key, []).append(time_encode(n, t, enc, tmp_path / f"enc-{key}"))
                times["decode"].setdefault(key, []).append(time_decode(n, t, bundle, child, a.batch_size))
                print(f"repeat {r}: {key} encode {times['encode'][key][-1]:.1f}s decode {times['decode'][key][-1]:.1f}s",
                      file=sys.stderr)
        from ddcodec.bundle import Bundle
        b = Bundle.open(bundle)
        items, variants = b.num_items, b.variants
    base = f"1x{a.threads}"
    result: dict[str, Any] = {
        "command": "python tools/bench_scaling.py " + " ".join(sys.argv[1:]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_end": os.getloadavg()},
        "encode_command": "ddcodec " + " ".join(enc), "bundle_items": items, "variants": variants,
        "configs": "PROCSxTHREADS", "seconds": {k: {c: summary(v) for c, v in d.items()} for k, d in times.items()},
        "speedup_vs_" + base: {k: {c: statistics.median(d[base]) / statistics.median(v) for c, v in d.items()}
                               for k, d in times.items()},
    }
    print(json.dumps(result["speedup_vs_" + base], indent=2))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
