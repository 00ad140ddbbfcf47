"""Crash trials: kill -9 an encode, a shard run, and a cached regeneration at seeded random points, then re-run.

Each encode trial starts `ddcodec encode --method random` (builtin:tiny prior, the shipped CIFAR-10
sample) in a subprocess, kills its process group with SIGKILL, checks that nothing on disk then opens
as a bundle unless it is byte-for-byte the right one, re-runs the same command, and requires either a
bundle identical (every file, byte for byte) to an uninterrupted run or a one-line refusal that leaves
no wrong bundle behind. Half the encode trials pass --overwrite over an older bundle (the `.old`
swap). Shard trials do the same for `ddcodec shard`; cache trials kill a DistilledDataset with a
cache_dir mid-epoch and require the re-run's images to equal uncached ones bitwise.

Kill points: "uniform" trials wait a seeded uniform fraction of the uninterrupted run's time; "write"
trials wait until the command's first output appears and then a seeded 0-150 ms more for an encode
(its staging directory lives about 0.1 s with the tiny prior), 0-50 ms for `ddcodec shard` (whose
whole write phase is that short) and 0-1.5 s for the cache. A run that finishes before its kill point
(a busy machine makes runs slower or faster than the uninterrupted one) is started again from the
same state with the delay halved, up to ATTEMPTS times; `attempts` records how many it took.

    python tools/crash_trials.py --trials 20 --seed 0 --json crash.json
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

DATA = "sample:cifar10"
IPC = 2
TIMEOUT = 900
ATTEMPTS = 4  # a run that ends before its kill point is started again with the delay halved, up to this many times


def clean_env() -> dict[str, str]:
    """The environment for child runs: no torchrun variables, quiet progress bars."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def encode_cmd(out: Path, seed: int = 0, overwrite: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "ddcodec.cli", "encode", "--method", "random", "--data", DATA, "--ipc", str(IPC),
           "--out", str(out), "--generator", "builtin:tiny", "--seed", str(seed)]
    return cmd + (["--overwrite"] if overwrite else [])


def shard_cmd(bundle: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "ddcodec.cli", "shard", str(bundle), "--out", str(out), "--items-per-shard", "1"]


CACHE_SCRIPT = """
import hashlib, sys
from ddcodec.loader import DistilledDataset
bundle, cache, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
ds = DistilledDataset(bundle, batch_size=3, cache_dir=None if cache == '-' else cache, return_ids=True)
for e in range(epochs):
    ds.set_epoch(e)
    for x, soft, hard, ids in ds:
        for i, img in zip(ids.tolist(), x):
            print(e, i, hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest(), flush=True)
"""


def cache_cmd(bundle: Path, cache: Path | None, epochs: int = 2) -> list[str]:
    return [sys.executable, "-c", CACHE_SCRIPT, str(bundle), str(cache) if cache else "-", str(epochs)]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=clean_env())


def tree_bytes(root: Path) -> dict[str, str]:
    """sha256 of every file under root, by relative path."""
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def run_and_kill(cmd: list[str], delay: float, wait_for: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Start cmd in its own process group; SIGKILL the group after `delay` s (counted from wait_for() if given)."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
                            start_new_session=True)
    start = t0
    if wait_for is not None:
        while proc.poll() is None and not wait_for() and time.monotonic() - t0 < TIMEOUT:
            time.sleep(0.002)
        start = time.monotonic()
    while proc.poll() is None and time.monotonic() - start < delay:
        time.sleep(0.005)
    killed = proc.poll() is None
    if killed:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"killed": killed, "at_s": round(time.monotonic() - t0, 2)}


def one_line_refusal(r: subprocess.CompletedProcess) -> str | None:
    """The error line when r is a clean ddcodec refusal (exit 2, one 'ddcodec: error:' line, no traceback)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and "it/s]" not in ln and "%|" not in ln]
    if r.returncode == 2 and len(lines) == 1 and lines[0].startswith("ddcodec: error:") and "Traceback" not in r.stderr:
        return lines[0]
    return None


@dataclass
class Trial:
    kind: str
    index: int
    mode: str
    killed: bool = False
    at_s: float = 0.0
    phase: str = ""
    outcome: str = ""
    detail: str = ""
    final: str = ""  # what the output is after the re-run: "identical", "older", "absent" or "other"
    attempts: int = 1
    leftovers: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.outcome in ("identical", "refused", "finished before kill")


def kill_at_random(t: Trial, cmd: list[str], reset: Callable[[], None], rng: random.Random, t_ref: float,
                   write_window: float, written: Callable[[], bool]) -> None:
    """Run cmd from reset() and SIGKILL it at a random moment: in `write` mode within `write_window` s of written()
    turning true, else within its reference run time `t_ref`. A run that finishes first is retried at half the delay."""
    for t.attempts in range(1, ATTEMPTS + 1):
        reset()
        scale = 0.5 ** (t.attempts - 1)
        if t.mode == "write":
            r = run_and_kill(cmd, rng.uniform(0, write_window) * scale, wait_for=written)
        else:
            r = run_and_kill(cmd, rng.uniform(0.05, 1.0) * t_ref * scale)
        if r["killed"]:
            break
    t.killed, t.at_s = r["killed"], r["at_s"]


# encode ------------------------------------------------------------------------------------------
def disk_phase(out: Path) -> str:
    """What an interrupted encode left: which of out, out.writing, out.old exist and hold a manifest."""
    parts = []
    for suffix in ("", ".writing", ".old"):
        p = out.with_name(out.name + suffix)
        if p.exists():
            parts.append((suffix or "out") + ("+manifest" if (p / "manifest.json").exists() else ""))
    return ",".join(parts) or "nothing"


def wrong_bundles(dirs: list[Path], allowed: list[dict[str, str]]) -> list[str]:
    """Directories that open as a bundle yet are not byte-for-byte one of the allowed trees."""
    from ddcodec.bundle import Bundle
    from ddcodec.errors import DDCodecError
    bad = []
    for d in dirs:
        if not d.is_dir():
            continue
        try:
            Bundle.open(d)
        except DDCodecError:
            continue
        if tree_bytes(d) not in allowed:
            bad.append(d.name)
    return bad


def encode_trial(k: int, rng: random.Random, work: Path, ref: dict[str, str], old: dict[str, str] | None,
                 old_dir: Path | None, t_ref: float, mode: str | None = None) -> Trial:
    overwrite = old_dir is not None and k % 2 == 1
    mode = mode or ("write" if k % 4 in (2, 3) else "uniform")
    t = Trial("encode" + ("-overwrite" if overwrite else ""), k, mode)
    tdir = work / f"encode-{k:03d}"
    out = tdir / "bundle"
    staging = out.with_name(out.name + ".writing")
    def reset() -> None:
        shutil.rmtree(tdir, ignore_errors=True)
        tdir.mkdir(parents=True)
        if overwrite:
            shutil.copytree(old_dir, out)

    # the staging phase lasts about 0.1 s with the tiny prior: in write mode, kill within 150 ms of it appearing
    kill_at_random(t, encode_cmd(out, overwrite=overwrite), reset, rng, t_ref, 0.15, staging.exists)
    t.phase = disk_phase(out)
    siblings = [out, staging, out.with_name(out.name + ".old")]
    allowed = [ref, old] if old else [ref]
    bad = wrong_bundles(siblings, allowed)
    if bad:
        t.outcome, t.detail = "WRONG", f"after the kill {bad} open as a bundle but match neither run"
        return t
    again = run(encode_cmd(out, overwrite=overwrite))
    final = tree_bytes(out)
    t.final = "identical" if final == ref else "older" if old and final == old else "absent" if not final else "other"
    refusal = one_line_refusal(again)
    if again.returncode == 0:
        t.outcome = "identical" if final == ref else "WRONG"
        t.detail = "" if final == ref else "re-run finished but the bundle differs from the uninterrupted run"
    elif refusal:
        wrong = wrong_bundles([out], allowed)
        t.outcome = "WRONG" if wrong else "refused"
        t.detail = refusal
    else:
        t.outcome, t.detail = "error", (again.stderr.strip().splitlines() or ["?"])[-1][:300]
    if not t.killed and t.outcome == "refused" and final == ref:
        t.outcome = "finished before kill"
    t.leftovers = sorted(p.name for p in tdir.iterdir() if p.name != "bundle")
    if out.exists():  # anything inside the bundle beyond the reference's files
        t.leftovers += sorted(str(p.relative_to(out)) for p in out.rglob("*") if str(p.relative_to(out)) not in ref)
    return t


# shard -------------------------------------------------------------------------------------------
def shard_trial(k: int, rng: random.Random, work: Path, bundle: Path, ref: dict[str, str], t_ref: float,
                mode: str | None = None) -> Trial:
    from ddcodec.bundle import Bundle
    from ddcodec.errors import DDCodecError
    mode = mode or ("write" if k % 2 else "uniform")
    t = Trial("shard", k, mode)
    out = work / f"shard-{k:03d}"
    # writing 20 one-item shards takes tens of milliseconds: in write mode, kill within 50 ms of the first one
    kill_at_random(t, shard_cmd(bundle, out), lambda: shutil.rmtree(out, ignore_errors=True), rng, t_ref, 0.05,
                   lambda: any(out.glob("*.tar")))
    present = sorted(out.glob("shard-*.tar")) if out.exists() else []
    t.phase = f"{len(present)}/{len(ref)} shards"
    if present:
        try:
            b = Bundle.open([str(p) for p in present])
            whole = Bundle.open(bundle)
            if b.manifest != whole.manifest or any(not (b.payloads[n][key] == v).all()
                                                   for n, ts in whole.payloads.items() for key, v in ts.items()):
                t.outcome, t.detail = "WRONG", "a partial shard set opens as a different bundle"
                return t
        except DDCodecError:
            pass
    again = run(shard_cmd(bundle, out))
    final = {n: h for n, h in tree_bytes(out).items() if n.endswith(".tar")}
    t.final = "identical" if final == ref else "absent" if not final else "other"
    if again.returncode == 0:
        t.outcome = "identical" if final == ref else "WRONG"
        if final != ref:
            t.detail = "re-run shards differ from the uninterrupted run"
    else:
        t.outcome, t.detail = ("refused" if one_line_refusal(again) else "error"), again.stderr.strip()[-300:]
    t.leftovers = sorted(n for n in tree_bytes(out) if not n.endswith(".tar"))
    return t


# cache -------------------------------------------------------------------------------------------
def cache_trial(k: int, rng: random.Random, work: Path, bundle: Path, ref: list[str], t_ref: float,
                mode: str | None = None) -> Trial:
    mode = mode or ("write" if k % 2 else "uniform")
    t = Trial("cache", k, mode)
    cache = work / f"cache-{k:03d}"
    kill_at_random(t, cache_cmd(bundle, cache), lambda: shutil.rmtree(cache, ignore_errors=True), rng, t_ref, 1.5,
                   lambda: any(cache.rglob("*.safetensors")))
    t.phase = f"{len(list(cache.rglob('*.safetensors')))}/{len(ref)} cached"
    first = run(cache_cmd(bundle, cache))
    second = run(cache_cmd(bundle, cache))  # everything from the cache now
    lines1, lines2 = first.stdout.split("\n")[:-1], second.stdout.split("\n")[:-1]
    if first.returncode or second.returncode:
        t.outcome, t.detail = "error", (first.stderr + second.stderr).strip()[-300:]
    elif lines1 == ref and lines2 == ref:
        t.outcome = "identical"
        t.final = "identical"
    else:
        diff = sum(a != b for a, b in zip(lines1, ref)) + abs(len(lines1) - len(ref))
        t.outcome, t.detail = "WRONG", f"{diff} image digest(s) differ from uncached regeneration"
    t.leftovers = sorted(p.name for p in cache.rglob("*.tmp"))
    return t


# setup and driver ---------------------------------------------------------------------------------
def make_noisy(src: Path, out: Path) -> None:
    """A 3-variant img2img bundle (strength 0.5) from the reference items: regeneration draws seeded noise."""
    import copy
    from ddcodec.bundle import Bundle, write_bundle
    b = Bundle.open(src)
    m = copy.deepcopy(b.manifest)
    m["payloads"], m["variants"] = {}, 3
    m.pop("fingerprints", None)
    m["generator"]["params"] = {"strength": 0.5, "steps": 4, "guidance_scale": 2.0}
    m["generator"]["micro_batch"] = 4
    write_bundle(out, m, {"items": b.items}, fingerprints=2, overwrite=True)


def timed(cmd: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = run(cmd)
    if r.returncode:
        raise SystemExit(f"uninterrupted run failed: {' '.join(cmd)}\n{r.stderr[-2000:]}")
    return r, time.monotonic() - t0


def crash_trials(work: Path, trials: int = 20, shard_trials: int = 20, cache_trials: int = 20, seed: int = 0,
                 log: Callable[[str], None] = print, overwrite: bool = True, mode: str | None = None) -> dict[str, Any]:
    """Run all trials under `work`; return the figures.

    overwrite: odd-numbered encode trials pass --overwrite over an older bundle; mode: force every
    kill point to "uniform" or "write" (default: alternate).
    """
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ref_dir, old_dir = work / "reference", work / "older"
    for d in (ref_dir, old_dir):
        shutil.rmtree(d, ignore_errors=True)
    _, t_encode = timed(encode_cmd(ref_dir))
    ref = tree_bytes(ref_dir)
    results: list[Trial] = []
    if trials:
        old = None
        if overwrite and trials > 1:
            timed(encode_cmd(old_dir, seed=1))
            old = tree_bytes(old_dir)
            assert old != ref
        for k in range(trials):
            results.append(encode_trial(k, rng, work, ref, old, old_dir if old else None, t_encode, mode))
            log(_line(results[-1]))
    t_shard = 0.0
    if shard_trials:
        _, t_shard = timed(shard_cmd(ref_dir, work / "reference-shards"))
        ref_shards = tree_bytes(work / "reference-shards")
        for k in range(shard_trials):
            results.append(shard_trial(k, rng, work, ref_dir, ref_shards, t_shard, mode))
            log(_line(results[-1]))
    t_cache = 0.0
    if cache_trials:
        noisy = work / "noisy"
        make_noisy(ref_dir, noisy)
        plain, t_cache = timed(cache_cmd(noisy, None))
        ref_lines = plain.stdout.split("\n")[:-1]
        for k in range(cache_trials):
            results.append(cache_trial(k, rng, work, noisy, ref_lines, t_cache, mode))
            log(_line(results[-1]))
    by_kind: dict[str, dict[str, int]] = {}
    by_phase: dict[str, dict[str, int]] = {}
    final: dict[str, dict[str, int]] = {}
    for t in results:
        for table, key in ((by_kind, t.outcome), (by_phase, t.phase), (final, t.final)):
            c = table.setdefault(t.kind, {})
            c[key] = c.get(key, 0) + 1
    return {
        "trials": len(results), "by_kind": by_kind, "on_disk_after_kill": by_phase, "output_after_rerun": final,
        "killed_by_kind": {k: sum(t.killed for t in results if t.kind == k) for k in by_kind},
        "killed": sum(t.killed for t in results),
        "wrong": sum(t.outcome == "WRONG" for t in results), "failed": sum(not t.ok for t in results),
        "with_leftovers": sum(bool(t.leftovers) for t in results),
        "uninterrupted_seconds": {"encode": round(t_encode, 1), "shard": round(t_shard, 1), "cache": round(t_cache, 1)},
        "results": [asdict(t) for t in results],
    }


def _line(t: Trial) -> str:
    kill = f"killed at {t.at_s:5.1f} s" if t.killed else f"ended by {t.at_s:5.1f} s"
    extra = f"  [{t.detail[:120]}]" if t.detail else ""
    left = f"  leftovers {t.leftovers}" if t.leftovers else ""
    return f"{t.kind:16s} #{t.index:02d} {t.mode:7s} {kill}  on disk: {t.phase:28s} -> {t.outcome} (output {t.final}){extra}{left}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=20, help="encode trials")
    p.add_argument("--shard-trials", type=int, default=20)
    p.add_argument("--cache-trials", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default=None, help="keep the trials here (default: a temporary directory)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ddcodec-crash-") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp)
        figures = crash_trials(work, args.trials, args.shard_trials, args.cache_trials, args.seed,
                               log=lambda s: print(s, flush=True))
    figures["command"] = "python tools/crash_trials.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{figures['trials']} trials, {figures['killed']} killed mid-run: " +
          "; ".join(f"{k} {v}" for k, v in figures["by_kind"].items()))
    print(f"wrong bundles: {figures['wrong']}; failed trials: {figures['failed']}; with leftovers: {figures['with_leftovers']}")
    print("PASS" if not figures["failed"] else "FAIL")
    if args.json:
        from ddcodec.bundle.atomic import atomic_write_json
        atomic_write_json(args.json, figures)
    return 0 if not figures["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
