"""Real multi-process runs: exactly once across gloo ranks × DataLoader workers × epochs, resume, and thread counts.

Each rank is a separate `python tests/test_distributed.py CONFIG` process with RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT set; it joins a gloo process group, iterates DistilledDataset.loader()
for every worker count and epoch, all_gathers the item ids (as tensors), and resumes from saved
states. The test process then checks: every item exactly once per epoch across ranks, equal batch
counts, the global order equal to the seeded epoch permutation whatever the rank and worker count,
images equal to a single-process run (so the variant is right), and exact continuation after resume.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


# the rank process ----------------------------------------------------------------------------------
def digest(img) -> str:
    return hashlib.sha256(img.contiguous().numpy().tobytes()).hexdigest()[:16]


def gather_batches(batches: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """Every rank's batches of item ids, via all_gather of padded tensors (equal batch counts are checked first)."""
    import torch
    import torch.distributed as dist
    world = dist.get_world_size()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(counts, torch.tensor([len(batches)]))
    steps = max(int(c) for c in counts)
    mine = torch.full((steps, batch_size), -1, dtype=torch.int64)
    for s, b in enumerate(batches):
        mine[s, :len(b)] = torch.tensor(b)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [[[i for i in row.tolist() if i >= 0] for row in t[:int(c)]] for t, c in zip(out, counts)]


def consume(loader, k: int) -> list[list[int]]:
    """The id batches of the first k batches of `loader` (then the iteration is closed)."""
    it = iter(loader)
    got = []
    for _ in range(k):
        got.append(next(it)[3].tolist())
    it.close()
    return got


def rank_main(cfg: dict[str, Any]) -> None:
    """One rank: iterate every worker count and epoch, gather ids, resume from saved states; write JSON."""
    import torch.distributed as dist
    from ddcodec.loader import DistilledDataset
    dist.init_process_group("gloo", init_method="env://")
    rank = dist.get_rank()
    out: dict[str, Any] = {"rank": rank, "world": dist.get_world_size(), "runs": [], "resumes": []}
    for nw in cfg["workers"]:
        ds = DistilledDataset(cfg["bundle"], batch_size=cfg["batch"], return_ids=True)
        assert (ds.rank, ds.world_size) == (rank, dist.get_world_size())
        for epoch in range(cfg["epochs"]):
            ds.set_epoch(epoch)
            batches, digests = [], {}
            for x, soft, hard, ids in ds.loader(num_workers=nw):
                batches.append(ids.tolist())
                digests.update({str(i): digest(img) for i, img in zip(ids.tolist(), x)})
            gathered = gather_batches(batches, cfg["batch"])
            out["runs"].append({"workers": nw, "epoch": epoch, "batches": batches, "digests": digests,
                                "gathered": gathered, "len": len(ds)})
        epoch = cfg["resume_epoch"]
        points = range(len(ds) + 1) if nw in cfg["resume_all_for"] else [len(ds) // 2]
        for k in points:
            ds = DistilledDataset(cfg["bundle"], batch_size=cfg["batch"], return_ids=True)
            ds.set_epoch(epoch)
            head = consume(ds.loader(num_workers=nw), k)
            state = json.loads(json.dumps(ds.state_dict()))  # a saved state is plain JSON
            fresh = DistilledDataset(cfg["bundle"], batch_size=cfg["batch"], return_ids=True)
            fresh.load_state_dict(state)
            rest = [b[3].tolist() for b in fresh.loader(num_workers=nw)]
            out["resumes"].append({"workers": nw, "epoch": epoch, "k": k, "state": state, "head": head, "rest": rest})
    Path(cfg["out"]).with_suffix(f".rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# the test side -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, cfg: dict[str, Any], tmp: Path, timeout: int = 900) -> list[dict[str, Any]]:
    """Run `world` rank processes on a fresh port; return each rank's JSON."""
    cfg = {**cfg, "out": str(tmp / f"w{world}")}
    cfg_path = tmp / f"cfg-{world}.json"
    cfg_path.write_text(json.dumps(cfg))
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
               "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
        procs.append(subprocess.Popen([sys.executable, __file__, str(cfg_path)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {rank} of {world} failed:\n{log[-3000:]}"
    return [json.loads(Path(cfg["out"]).with_suffix(f".rank{r}.json").read_text()) for r in range(world)]


def reference(bundle: Path, epochs: int, batch: int) -> tuple[dict[int, list[int]], dict[int, dict[str, str]]]:
    """Single-process order and image digests per epoch."""
    from ddcodec.bundle import Bundle
    from ddcodec.loader import DistilledDataset
    from ddcodec.loader.order import epoch_permutation
    b = Bundle.open(bundle)
    ds = DistilledDataset(b, batch_size=batch, return_ids=True)
    order, digests = {}, {}
    for e in range(epochs):
        order[e] = epoch_permutation(b.num_items, b.seed, e).tolist()
        ds.set_epoch(e)
        digests[e] = {str(i): digest(img) for x, _, _, ids in ds for i, img in zip(ids.tolist(), x)}
    return order, digests


def check(ranks: list[dict[str, Any]], cfg: dict[str, Any], order: dict[int, list[int]],
          digests: dict[int, dict[str, str]]) -> dict[str, int]:
    """Assert exactly-once, equal batch counts, rank/worker-independent order and exact resume; count what was checked."""
    world = len(ranks)
    n = len(order[0])
    checked = {"epoch_runs": 0, "items_yielded": 0, "images_compared": 0, "resumes": 0, "resumed_batches": 0}
    for nw in cfg["workers"]:
        for e in range(cfg["epochs"]):
            runs = [next(r for r in rk["runs"] if r["workers"] == nw and r["epoch"] == e) for rk in ranks]
            where = f"world {world}, {nw} workers, epoch {e}"
            counts = [len(r["batches"]) for r in runs]
            assert len(set(counts)) == 1 and counts[0] == runs[0]["len"], f"{where}: unequal batch counts {counts}"
            ids = [i for r in runs for b in r["batches"] for i in b]
            assert sorted(ids) == list(range(n)), f"{where}: items not exactly once"
            assert runs[0]["gathered"] == [r["batches"] for r in runs], f"{where}: all_gather disagrees with the ranks"
            glob = [i for s in range(counts[0]) for r in runs for i in r["batches"][s]]
            assert glob == order[e], f"{where}: global order differs from the seeded permutation"
            for r in runs:
                assert all(digests[e][i] == d for i, d in r["digests"].items()), f"{where}: images differ (variant?)"
                checked["images_compared"] += len(r["digests"])
            checked["epoch_runs"] += 1
            checked["items_yielded"] += len(ids)
        for rk in ranks:
            full = next(r for r in rk["runs"] if r["workers"] == nw and r["epoch"] == cfg["resume_epoch"])["batches"]
            for res in (r for r in rk["resumes"] if r["workers"] == nw):
                k = res["k"]
                assert res["state"]["batches"] == k and res["head"] == full[:k]
                assert res["rest"] == full[k:], f"world {world}, {nw} workers: resume after {k} batches diverges"
                checked["resumes"] += 1
                checked["resumed_batches"] += len(res["rest"])
    return checked


def run_grid(bundle: Path, tmp: Path, worlds: list[int], workers: list[int], epochs: int, batch: int = 3,
             resume_all_for: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """Launch every world size; return what was checked, in total and per world size (it raises on any failure)."""
    cfg = {"bundle": str(bundle), "batch": batch, "workers": workers, "epochs": epochs,
           "resume_epoch": epochs - 1, "resume_all_for": list(resume_all_for)}
    order, digests = reference(bundle, epochs, batch)
    total: dict[str, Any] = {"per_world": {}}
    for world in worlds:
        counts = check(launch(world, cfg, tmp), cfg, order, digests)
        total["per_world"][str(world)] = counts
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def test_two_ranks_exactly_once_and_resume(noisy_bundle, tmp_path):
    """2 gloo ranks × {0, 2} workers × 2 epochs; resume from every saved state with 0 workers, mid-epoch with 2."""
    counts = run_grid(noisy_bundle, tmp_path, worlds=[2], workers=[0, 2], epochs=2)
    assert counts["epoch_runs"] == 4 and counts["items_yielded"] == 4 * 20 and counts["resumes"] > 0


def test_resume_refuses_an_impossible_position(noisy_bundle):
    from ddcodec.errors import DDCodecError
    from ddcodec.loader import DistilledDataset
    ds = DistilledDataset(noisy_bundle, batch_size=3)
    good = ds.state_dict()
    for bad in ({"batches": -1}, {"batches": len(ds) + 1}, {"epoch": -2}, {"epoch": 1.5}, {"batches": "2"}):
        with pytest.raises(DDCodecError, match="valid position"):
            ds.load_state_dict({**good, **bad})
    ds.load_state_dict({**good, "batches": len(ds)})  # the end of an epoch is a valid position
    assert list(ds) == []


@pytest.mark.parametrize("threads", [1, 3])
def test_fingerprints_bitwise_in_fresh_process_with_other_thread_counts(noisy_bundle, threads):
    """Fingerprints made in this process match bitwise in a fresh process with another intra-op thread count."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    r = subprocess.run([sys.executable, "-m", "ddcodec.cli", "verify", str(noisy_bundle)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "bitwise identical" in r.stdout, r.stdout + r.stderr[-2000:]


@pytest.mark.slow
def test_full_grid(noisy_bundle, tmp_path):
    """1-4 ranks × 0-4 workers × 3 epochs (every variant of the bundle); resume from every state for 0 and 3 workers."""
    counts = run_grid(noisy_bundle, tmp_path, worlds=[1, 2, 3, 4], workers=[0, 1, 2, 3, 4], epochs=3,
                      resume_all_for=(0, 3))
    assert counts["epoch_runs"] == 4 * 5 * 3 and counts["items_yielded"] == 60 * 20


if __name__ == "__main__":
    rank_main(json.loads(Path(sys.argv[1]).read_text()))
