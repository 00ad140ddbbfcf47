"""Parallel encode under torchrun (gloo, CPU) gives the same bundle bytes as one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from ddcodec.cli import main


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
