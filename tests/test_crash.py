"""Crash safety: an interrupted encode, shard run or cached regeneration resumes identically or refuses.

Two kinds of check: (1) simulated crashes at every rename and delete step of write_bundle and
write_shards (in-process, exact), and (2) real `kill -9` trials from tools/crash_trials.py (a few
here; the full 20+20+20 run is marked slow).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ddcodec.bundle import Bundle, new_manifest, write_bundle
from ddcodec.bundle.shards import write_shards
from ddcodec.errors import DDCodecError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("crash_trials", ROOT / "tools" / "crash_trials.py")
ct = importlib.util.module_from_spec(_spec)
sys.modules["crash_trials"] = ct
_spec.loader.exec_module(ct)


class Crash(BaseException):
    """Stands in for SIGKILL at a chosen step (BaseException, so no `except Exception` swallows it)."""


def tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()} if root.is_dir() else {}


def synthetic(seed: int) -> tuple[dict, dict]:
    """A manifest and payloads that need no generator (write_bundle with fingerprints=0)."""
    gen = {"pipeline": "img2img", "model": {"source": "builtin:tiny", "components": {"vae": "0" * 64}},
           "scheduler": {"class": "DDIMScheduler", "config": {}}, "dtype": "float32", "micro_batch": 4, "params": {}}
    m = new_manifest(method="random", params={"ipc": 2}, seed=seed, class_names=["a", "b"], prompts=["a", "b"],
                     image_size=(8, 8), variants=1, generator=gen)
    g = torch.Generator().manual_seed(seed)
    return m, {"items": {"class_ids": torch.tensor([0, 0, 1, 1]), "latents": torch.randn(4, 4, 2, 2, generator=g).half()}}


def crash_at(monkeypatch, step: int) -> list[str]:
    """Make the step-th os.replace / shutil.rmtree call (counting from 0) raise Crash before it acts."""
    calls: list[str] = []
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def hook(name, real):
        def wrapped(*a, **k):
            calls.append(name)
            if len(calls) - 1 == step:
                raise Crash(name)
            return real(*a, **k)
        return wrapped
    monkeypatch.setattr(os, "replace", hook("replace", real_replace))
    monkeypatch.setattr(shutil, "rmtree", hook("rmtree", real_rmtree))
    return calls


def openable_and_wrong(dirs: list[Path], allowed: list[dict[str, str]]) -> list[str]:
    bad = []
    for d in dirs:
        try:
            Bundle.open(d)
        except DDCodecError:
            continue
        if tree(d) not in allowed:
            bad.append(d.name)
    return bad


@pytest.mark.parametrize("overwrite", [False, True])
def test_write_bundle_crash_at_every_step(tmp_path, monkeypatch, overwrite):
    m_old, p_old = synthetic(1)
    m_new, p_new = synthetic(2)
    write_bundle(tmp_path / "ref", m_new, p_new, fingerprints=0)
    write_bundle(tmp_path / "old", m_old, p_old, fingerprints=0)
    ref, old = tree(tmp_path / "ref"), tree(tmp_path / "old")
    with monkeypatch.context() as mp:
        calls = crash_at(mp, -1)
        if overwrite:
            shutil.copytree(tmp_path / "old", tmp_path / "count")
        calls.clear()
        write_bundle(tmp_path / "count", m_new, p_new, fingerprints=0, overwrite=overwrite)
        steps = len(calls)
    assert steps >= (5 if overwrite else 2)
    for step in range(steps):
        out = tmp_path / f"s{step}" / "bundle"
        out.parent.mkdir()
        if overwrite:
            shutil.copytree(tmp_path / "old", out)
        with monkeypatch.context() as mp:
            crash_at(mp, step)
            with pytest.raises(Crash):
                write_bundle(out, m_new, p_new, fingerprints=0, overwrite=overwrite)
        siblings = [out, out.with_name("bundle.writing"), out.with_name("bundle.old")]
        assert not openable_and_wrong(siblings, [ref, old]), f"crash at step {step}"
        if out.exists() and not overwrite:
            assert tree(out) == ref  # the only way out exists after a crash is the finished bundle
            continue
        write_bundle(out, m_new, p_new, fingerprints=0, overwrite=overwrite)
        assert tree(out) == ref, f"re-run after a crash at step {step} differs"


def test_write_shards_crash_at_every_step(tmp_path, monkeypatch):
    m, p = synthetic(3)
    b = write_bundle(tmp_path / "b", m, p, fingerprints=0)
    ref = tree(Path(write_shards(b, tmp_path / "ref", items_per_shard=1)[0]).parent)
    for step in range(len(ref)):
        out = tmp_path / f"s{step}"
        with monkeypatch.context() as mp:
            crash_at(mp, step)
            with pytest.raises(Crash):
                write_shards(b, out, items_per_shard=1)
        present = sorted(out.glob("shard-*.tar"))
        if present:
            with pytest.raises(DDCodecError, match="of 4 items"):
                Bundle.open([str(x) for x in present])
        write_shards(b, out, items_per_shard=1)
        assert tree(out) == ref, f"re-run after a crash at shard step {step} differs"


def test_kill_trials_fast(tmp_path):
    """Real kill -9 once each, while output is being written: an encode, `ddcodec shard`, a cached regeneration."""
    figures = ct.crash_trials(tmp_path, trials=1, shard_trials=1, cache_trials=1, seed=5, log=lambda s: None,
                              overwrite=False, mode="write")
    assert figures["failed"] == 0 and figures["wrong"] == 0, figures["results"]
    assert figures["trials"] == 3


@pytest.mark.slow
def test_kill_trials_full(tmp_path):
    figures = ct.crash_trials(tmp_path, trials=20, shard_trials=20, cache_trials=20, seed=0, log=print)
    assert figures["failed"] == 0 and figures["wrong"] == 0, figures["results"]
