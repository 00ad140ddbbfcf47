"""Peak memory (max RSS on CPU) of each method's encode and of regenerating its bundle, one child process each.

Every measurement is a fresh `python -m ddcodec.cli encode ...` (or a DistilledDataset epoch) run as a child
process; its peak resident set size is the `ru_maxrss` that `os.wait4` returns for that child (Linux: KiB, the
largest RSS of the child and of any descendants it waited for). A child that only imports ddcodec, torch and
diffusers gives the floor every run pays. Children run one at a time with OMP_NUM_THREADS=--threads.
This script imports only the standard library on purpose: Linux counts the parent's pages a child had
before its exec into the child's ru_maxrss, so a parent holding torch would inflate every figure.

  # each method at small table-like settings, then one regeneration epoch of each bundle
  python tools/bench_memory.py methods --out /tmp/ddbench/mem --threads 1 --json docs/results/bench-memory-methods.json
  # LD3M-DM peak memory against T (steps through the reverse process) and IPC, one iteration each
  python tools/bench_memory.py ld3m --steps 2 5 10 20 --ipc 1 10 --out /tmp/ddbench/ld3m --threads 1 \\
      --json docs/results/bench-memory-ld3m.json
  # the same with LD3M's probe loss rendered under torch.no_grad() (diagnostic, see docs/benchmarks.md), and
  # with glibc's mmap threshold fixed so freed activation buffers go back to the OS instead of the heap
  python tools/bench_memory.py ld3m ... --probe-no-grad --env MALLOC_MMAP_THRESHOLD_=65536

--probe-no-grad runs the encode through a wrapper that replaces `Distiller.probe` (the fixed-yardstick loss
computed before and after the optimisation) with the same computation whose rendering runs under
torch.no_grad(). As written, the probe renders with gradients enabled but without checkpointing, so it keeps
every denoiser call's activations until its loss is computed; the wrapper shows what the optimisation itself
needs. It changes no result: the probe's images and loss are the same either way.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

# small, table-like settings (CIFAR-10 sample, IPC 10); each method's other options are its defaults
METHODS: dict[str, list[str]] = {
    "random": ["--method", "random", "--ipc", "10"],
    "d4m": ["--method", "d4m", "--ipc", "10", "--variants", "2"],
    "dace": ["--method", "dace", "--ipc", "10", "--variants", "2"],
    "rded": ["--method", "rded", "--ipc", "10"],
    "ld3m-dm": ["--method", "ld3m", "--ld3m-loss", "dm", "--ipc", "10", "--iterations", "2", "--batch-real", "64"],
}

FLOOR = "import torch, diffusers, ddcodec, ddcodec.cli, ddcodec.loader"
REGEN = r"""
import sys
from ddcodec import DistilledDataset
n = sum(len(images) for images, _, _ in DistilledDataset(sys.argv[1], batch_size=int(sys.argv[2])))
print(f"regenerated {n} images")
"""


PROBE_NO_GRAD = r"""
import sys, torch
import ddcodec.methods.ld3m as ld3m

def probe(self):
    with torch.no_grad():
        images = self.render(0, grad=False)
    with torch.enable_grad():
        return self.total(self.objective(self.network(0, fresh=True), images, 0)[1])

ld3m.Distiller.probe = probe
from ddcodec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def peak_rss(cmd: list[str], threads: int, log: Path | None = None, extra_env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd` as a child; its exit status, wall seconds and peak RSS (MiB) from wait4."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), **(extra_env or {})}
    out = open(log, "w") if log else subprocess.DEVNULL
    t = time.perf_counter()
    try:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    finally:
        if log:
            out.close()
    dt = time.perf_counter() - t
    if proc.returncode:
        tail = log.read_text()[-1500:] if log else ""
        raise SystemExit(f"child failed with status {proc.returncode}: {shlex.join(cmd)}\n{tail}")
    return {"command": shlex.join(cmd), "seconds": dt, "peak_rss_mib": usage.ru_maxrss / 1024}


def encode_cmd(data: str, generator: str, args: list[str], out: Path, probe_no_grad: bool = False) -> list[str]:
    entry = ["-c", PROBE_NO_GRAD] if probe_no_grad else ["-m", "ddcodec.cli"]
    return [sys.executable, *entry, "encode", "--data", data, "--generator", generator, *args,
            "--out", str(out), "--overwrite"]


def fresh(out: Path) -> None:
    """Remove a bundle and its resumable .partial state, so nothing is reused."""
    for p in (out, out.with_name(out.name + ".partial")):
        shutil.rmtree(p, ignore_errors=True)


def run_methods(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for name in args.methods:
        out = root / name
        fresh(out)
        enc = peak_rss(encode_cmd(args.data, args.generator, METHODS[name], out), args.threads, root / f"{name}.log",
                       args.env)
        print(f"{name} encode: {enc['peak_rss_mib']:.0f} MiB, {enc['seconds']:.0f} s", flush=True)
        regen = peak_rss([sys.executable, "-c", REGEN, str(out), str(args.batch_size)], args.threads,
                         root / f"{name}-regen.log", args.env)
        print(f"{name} regenerate: {regen['peak_rss_mib']:.0f} MiB, {regen['seconds']:.0f} s", flush=True)
        rows[name] = {"encode": enc, "regenerate": regen, "bundle": str(out)}
    return rows


def run_ld3m(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for ipc in args.ipc:
        for steps in args.steps:
            name = f"ipc{ipc}-T{steps}"
            out = root / name
            fresh(out)
            enc_args = ["--method", "ld3m", "--ld3m-loss", "dm", "--ipc", str(ipc), "--steps", str(steps),
                        "--iterations", str(args.iterations), "--batch-real", str(args.batch_real)]
            cmd = encode_cmd(args.data, args.generator, enc_args, out, args.probe_no_grad)
            r = peak_rss(cmd, args.threads, root / f"{name}.log", args.env)
            if args.probe_no_grad:
                r["command"] = "<probe-no-grad wrapper> " + shlex.join(cmd[3:])
            params = json.loads((out / "manifest.json").read_text())["method"]["params"]
            r.update(ipc=ipc, steps=steps, step_seconds_mean=params.get("step_seconds_mean"))
            print(f"ld3m {name}: {r['peak_rss_mib']:.0f} MiB, {r['seconds']:.0f} s", flush=True)
            rows[name] = r
            fresh(out)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["methods", "ld3m"])
    ap.add_argument("--out", required=True, help="scratch directory for the bundles")
    ap.add_argument("--data", default="sample:cifar10")
    ap.add_argument("--generator", default="builtin:default")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--batch-size", type=int, default=64, help="regeneration batch size")
    ap.add_argument("--steps", type=int, nargs="+", default=[2, 5, 10, 20], help="ld3m: T values")
    ap.add_argument("--ipc", type=int, nargs="+", default=[1, 10], help="ld3m: IPC values")
    ap.add_argument("--iterations", type=int, default=1, help="ld3m: optimisation steps per run")
    ap.add_argument("--batch-real", type=int, default=64, help="ld3m: real images per class per iteration")
    ap.add_argument("--probe-no-grad", action="store_true", help="ld3m: render the probe loss under no_grad (diagnostic)")
    ap.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE",
                    help="extra environment for the children, e.g. MALLOC_MMAP_THRESHOLD_=65536")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    args.env = dict(kv.split("=", 1) for kv in args.env)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    floor = peak_rss([sys.executable, "-c", FLOOR], args.threads, extra_env=args.env)
    print(f"import floor: {floor['peak_rss_mib']:.0f} MiB", flush=True)
    rows = run_methods(args, root) if args.what == "methods" else run_ld3m(args, root)
    result = {"command": "python tools/bench_memory.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "what": args.what, "probe_no_grad": args.probe_no_grad, "env": args.env, "data": args.data,
              "generator": args.generator, "threads": args.threads,
              "machine": platform.processor() or platform.machine(), "import_floor": floor, "runs": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
