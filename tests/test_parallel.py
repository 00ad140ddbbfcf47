"""Parallel encode under torchrun (gloo, CPU) gives the same bundle bytes as one process; DDP training example."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ddcodec.bundle import Bundle
from ddcodec.bundle.shards import write_shards
from ddcodec.cli import main

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_encode_matches_single_process(cifar_folder, tmp_path):
    args = ["encode", "--method", "random", "--data", str(cifar_folder), "--ipc", "3", "--generator", "builtin:tiny",
            "--encode-batch-size", "8", "--seed", "5"]
    assert main(args + ["--out", str(tmp_path / "single")]) == 0
    env = {**os.environ, "DDCODEC_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "ddcodec.cli", *args, "--out", str(tmp_path / "multi")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    single = {p.name: p.read_bytes() for p in (tmp_path / "single").iterdir()}
    multi = {p.name: p.read_bytes() for p in (tmp_path / "multi").iterdir()}
    assert single.keys() == multi.keys()
    for name in single:
        assert single[name] == multi[name], f"{name} differs between 1 and 2 processes"


METHOD_ARGS = {  # the teacher (ResNet-56) scores patches and writes soft labels in both
    "d4m": ["--ipc", "2", "--candidates", "6", "--steps", "2", "--variants", "2"],
    "dace": ["--ipc", "1", "--candidates", "6", "--variants", "2", "--steps", "2"],
}


def torchrun(nproc: int, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "DDCODEC_BACKEND": "gloo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("method,nproc", [("d4m", 3), ("dace", 2)])
def test_torchrun_method_encode_matches_single_process(cifar_folder, tmp_path, method, nproc):
    """k-means per class, teacher patch scoring and soft labelling split across ranks give the same bytes."""
    args = ["encode", "--method", method, "--data", str(cifar_folder), "--generator", "builtin:tiny", "--seed", "2",
            *METHOD_ARGS[method]]
    assert main(args + ["--out", str(tmp_path / "single")]) == 0
    r = torchrun(nproc, "-m", "ddcodec.cli", *args, "--out", str(tmp_path / "multi"))
    assert r.returncode == 0, r.stderr[-2000:]
    single = {p.name: p.read_bytes() for p in (tmp_path / "single").iterdir()}
    multi = {p.name: p.read_bytes() for p in (tmp_path / "multi").iterdir()}
    assert single.keys() == multi.keys() and Bundle.open(tmp_path / "multi").manifest["labels"]["kind"] == "soft"
    for name in single:
        assert single[name] == multi[name], f"{name} differs between 1 and {nproc} processes"


@pytest.mark.parametrize("stream", [False, True])
def test_train_ddp_example_two_processes(noisy_bundle, tmp_path, stream):
    """tools/train_ddp.py: equal batch counts, the ranks' items are the bundle once per epoch, equal weights."""
    source = [str(noisy_bundle)]
    if stream:
        write_shards(Bundle.open(noisy_bundle), tmp_path / "shards", items_per_shard=5)
        source = [str(tmp_path / "shards" / "shard-{000000..000003}.tar"), "--stream", "--workers", "1"]
    out = tmp_path / "run.json"
    r = torchrun(2, str(ROOT / "tools" / "train_ddp.py"), *source, "--epochs", "3", "--batch-size", "4",
                 "--json", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["world_size"] == 2 and len(rec["epochs"]) == 3
    for e in rec["epochs"]:
        a, b = e["batches"]
        assert a == b > 0
        assert sorted(e["ids"][0] + e["ids"][1]) == list(range(rec["num_items"]))
    assert rec["weights"][0] == rec["weights"][1]


def test_torchrun_ld3m_dm_splits_classes_and_matches_single_process(cifar_folder, tmp_path):
    """LD3M-DM: ranks optimise disjoint classes; the codes, labels and losses equal one process's bit for bit."""
    args = ["encode", "--method", "ld3m", "--data", str(cifar_folder), "--generator", "builtin:tiny", "--seed", "4",
            "--ipc", "1", "--iterations", "3", "--steps", "2", "--batch-real", "4", "--ld3m-loss", "dm",
            "--variants", "2", "--guidance-scale", "2", "--checkpoint-every", "2"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank: the backward pass's matmuls may split reductions by thread count
    try:
        assert main(args + ["--out", str(tmp_path / "single")]) == 0
    finally:
        torch.set_num_threads(threads)
    r = torchrun(2, "-m", "ddcodec.cli", *args, "--out", str(tmp_path / "multi"))
    assert r.returncode == 0, r.stderr[-2000:]
    one, two = Bundle.open(tmp_path / "single"), Bundle.open(tmp_path / "multi")
    for name in one.payloads:
        for key, t in one.payloads[name].items():
            assert torch.equal(t, two.payloads[name][key]), f"{name}/{key} differs between 1 and 2 processes"
    timing = {"step_seconds_mean", "step_device"}
    p1, p2 = (b.manifest["method"]["params"] for b in (one, two))
    assert {k: v for k, v in p1.items() if k not in timing} == {k: v for k, v in p2.items() if k not in timing}
