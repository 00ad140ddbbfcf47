"""Determinism across processes and CPU thread counts: regenerate every image of a bundle in fresh processes.

For each thread count (torch.set_num_threads) a fresh process regenerates every (item, variant) of
a seeded img2img bundle (builtin:tiny prior), runs `verify`'s fingerprint check, and saves the
images. The figures: how many images are bitwise equal to the 1-thread run, the max absolute
difference, and whether the fingerprints match bitwise. The same is repeated with oneDNN left on
(ddcodec turns it off during CPU regeneration; this shows why).

    python tools/thread_determinism.py --threads 1 2 4 --json threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CHILD = """
import contextlib, json, sys
import torch, safetensors.torch
threads, onednn, bundle_dir, out = int(sys.argv[1]), sys.argv[2] == "on", sys.argv[3], sys.argv[4]
torch.set_num_threads(threads)
import ddcodec.generators.pipelines as P
if onednn:
    P.cpu_deterministic = lambda device: contextlib.nullcontext()
from ddcodec.bundle import Bundle
from ddcodec.bundle.fingerprint import verify_fingerprints
from ddcodec.generators.pipelines import build_pipeline, image_sha256
b = Bundle.open(bundle_dir)
pipe = build_pipeline(b.manifest, b.items, device="cpu")
images = {f"v{v}": pipe(list(range(b.num_items)), v) for v in range(b.variants)}
safetensors.torch.save_file({k: t.contiguous() for k, t in images.items()}, out)
r = verify_fingerprints(b)
print(json.dumps({"threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(),
                  "fingerprints_bitwise": r["bitwise"], "fingerprints_max_diff": r["max_diff"],
                  "digests": {k: [image_sha256(x) for x in t] for k, t in images.items()}}))
"""


def make_bundle(work: Path, seed: int = 0, steps: int = 4, guidance: float = 2.0, fingerprints: int = 6) -> Path:
    """A 3-variant img2img bundle (strength 0.5) of 20 real CIFAR-10 sample images (2 per class), builtin:tiny prior."""
    import copy
    from ddcodec.bundle import Bundle, write_bundle
    from ddcodec.methods.random_subset import encode_random
    base = encode_random("sample:cifar10", 2, work / "random", seed=seed, generator="builtin:tiny", overwrite=True)
    m = copy.deepcopy(base.manifest)
    m["payloads"], m["variants"] = {}, 3
    m.pop("fingerprints", None)
    m["generator"]["params"] = {"strength": 0.5, "steps": steps, "guidance_scale": guidance}
    m["generator"]["micro_batch"] = 8
    write_bundle(work / "noisy", m, {"items": Bundle.open(work / "random").items}, fingerprints=fingerprints,
                 overwrite=True)
    return work / "noisy"


def regenerate(bundle: Path, threads: int, onednn: bool, out: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", CHILD, str(threads), "on" if onednn else "off", str(bundle), str(out)],
                       capture_output=True, text=True, timeout=1200, env=env)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def compare(a: Path, b: Path) -> tuple[int, int, float]:
    """(bitwise-equal images, total images, max |difference|) between two saved runs."""
    import safetensors.torch
    x, y = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    same = total = 0
    worst = 0.0
    for k in x:
        for p, q in zip(x[k], y[k]):
            total += 1
            same += bool(p.equal(q))
            worst = max(worst, float((p - q).abs().max()))
    return same, total, worst


def measure(work: Path, threads: list[int], bundle: Path | None = None) -> dict[str, Any]:
    bundle = bundle or make_bundle(work)
    rows = []
    for onednn in (False, True):
        base = None
        for t in threads:
            out = work / f"images-t{t}-{'on' if onednn else 'off'}.safetensors"
            r = regenerate(bundle, t, onednn, out)
            base = base or out
            same, total, worst = compare(base, out)
            rows.append({"onednn": onednn, "threads": t, "bitwise_equal_to_first": same, "images": total,
                         "max_abs_diff": worst, "fingerprints_bitwise": r["fingerprints_bitwise"],
                         "fingerprints_max_diff": r["fingerprints_max_diff"]})
    off = [r for r in rows if not r["onednn"]]
    return {"bundle": str(bundle), "threads": threads, "rows": rows,
            "deterministic_with_onednn_off": all(r["bitwise_equal_to_first"] == r["images"] and r["fingerprints_bitwise"]
                                                for r in off)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--bundle", default=None, help="an existing bundle (default: build the 3-variant test bundle)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ddcodec-threads-") as tmp:
        figures = measure(Path(tmp), args.threads, Path(args.bundle) if args.bundle else None)
    figures["command"] = "python tools/thread_determinism.py " + " ".join(argv if argv is not None else sys.argv[1:])
    for r in figures["rows"]:
        print(f"oneDNN {'on ' if r['onednn'] else 'off'} threads {r['threads']}: {r['bitwise_equal_to_first']}/{r['images']} "
              f"bitwise equal to {figures['threads'][0]} thread(s), max |diff| {r['max_abs_diff']:.3g}; fingerprints "
              f"{'bitwise' if r['fingerprints_bitwise'] else 'max diff %.3g' % r['fingerprints_max_diff']}")
    print("PASS" if figures["deterministic_with_onednn_off"] else "FAIL")
    if args.json:
        from ddcodec.bundle.atomic import atomic_write_json
        atomic_write_json(args.json, figures)
    return 0 if figures["deterministic_with_onednn_off"] else 1


if __name__ == "__main__":
    sys.exit(main())
