"""Fuzzing the bundle and shard readers (a fast subset of tools/fuzz_readers.py) and their resource limits."""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import subprocess
import sys
import tarfile
import tracemalloc
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ddcodec.bundle import Bundle
from ddcodec.bundle.payload import decode_payload, sha256_bytes
from ddcodec.errors import BundleError

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("fuzz_readers", ROOT / "tools" / "fuzz_readers.py")
fz = importlib.util.module_from_spec(_spec)
sys.modules["fuzz_readers"] = fz
_spec.loader.exec_module(fz)


class DrawSource:
    """A fuzz_readers.Source over hypothesis draws, so failing inputs shrink."""

    def __init__(self, data: st.DataObject) -> None:
        self.data = data

    def randint(self, a: int, b: int) -> int:
        return self.data.draw(st.integers(a, b))

    def choice(self, seq: list):
        return seq[self.data.draw(st.integers(0, len(seq) - 1))]

    def randbytes(self, n: int) -> bytes:
        return self.data.draw(st.binary(min_size=n, max_size=n))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    return fz.make_seeds(tmp_path_factory.mktemp("fuzz") / "seeds")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(sorted(fz.FAMILIES)), data=st.data())
def test_readers_load_or_refuse_in_one_line(seeds, family, data):
    with fz.address_space_headroom(2048):
        r = fz.run_one(family, DrawSource(data), seeds, seeds.root / "case", timeout=30)
    assert not r.violation, f"{family}: {r.violation}"
    assert r.outcome in ("loaded", "BundleError"), r.outcome


def test_unnoticed_damage_is_a_violation(seeds, monkeypatch):
    """The damage check can fail: with the manifest checksum switched off, some manifest bit flips load silently."""
    import ddcodec.bundle.manifest as manifest
    src = fz.RandomSource(0)
    case = seeds.root / "case-damage"
    with monkeypatch.context() as mp:
        mp.setattr(manifest, "check_checksum", lambda m, where: None)
        off = [fz.run_one("dir_flip_manifest", src, seeds, case) for _ in range(300)]
    assert any("damage went unnoticed" in r.violation for r in off)
    on = [fz.run_one("dir_flip_manifest", fz.RandomSource(0), seeds, case) for _ in range(300)]
    assert not any(r.violation for r in on)  # with it on, nothing different loads


def test_every_family_and_memory_bound_in_a_fresh_process(tmp_path):
    """10 inputs per family in a fresh process, so its peak-RSS growth is measured from a clean start."""
    out = tmp_path / "fuzz.json"
    n = 10 * len(fz.FAMILIES)
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "fuzz_readers.py"), "--inputs", str(n), "--seed", "1",
                        "--json", str(out), "--workdir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["inputs"] == n and not figures["violations"]
    assert figures["peak_rss_growth_mb"] < fz.RSS_BOUND_MB
    assert set(figures["outcomes"]) <= {"loaded", "BundleError"}


# resource limits: allocation follows the declared sizes and what the files hold -----------------------------
def traced_peak(fn) -> tuple[int, BaseException | None]:
    """Peak bytes allocated through Python's allocators while fn() runs, and the exception it raised."""
    tracemalloc.start()
    err = None
    try:
        fn()
    except BaseException as e:  # noqa: BLE001
        err = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, err


def info_for(data: bytes, raw_bytes: int) -> dict:
    return {"sha256": sha256_bytes(data), "bytes": len(data), "raw_bytes": raw_bytes,
            "tensors": {"x": {"dtype": "uint8", "shape": [16]}}}


@pytest.mark.parametrize("content_size", [True, False])
def test_zstd_bomb_stops_at_declared_size(content_size):
    bomb = fz.zstd_zeros(256, content_size=content_size)  # 256 MiB of zeros in ~10 kB
    peak, err = traced_peak(lambda: decode_payload(bomb, info_for(bomb, 600), "bomb"))
    assert isinstance(err, BundleError) and len(str(err).splitlines()) == 1
    assert peak < 4 << 20, f"allocated {peak} bytes for a payload declared as 600"


def test_lying_frame_header_is_refused_before_allocating():
    raw = b"\0" * 600
    data = fz.zstd_with_size(raw, 1 << 60)
    peak, err = traced_peak(lambda: decode_payload(data, info_for(data, 600), "liar"))
    assert isinstance(err, BundleError) and "declares" in str(err)
    assert peak < 1 << 20


def test_huge_declared_raw_bytes_with_a_tiny_file():
    raw = b"\0" * 600
    for data in (fz.zstd(raw, content_size=False), fz.zstd(raw)):
        peak, err = traced_peak(lambda: decode_payload(data, info_for(data, 1 << 34), "tiny"))
        assert isinstance(err, BundleError), err
        assert peak < 4 << 20, f"allocated {peak} bytes for a file of {len(data)}"


def test_safetensors_header_sizes():
    for header_len in (2**40, 2**63, 2**64 - 1):
        raw = fz.safetensors_bytes({"x": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}, b"\0" * 16,
                                   header_len=header_len)
        data = fz.zstd(raw)
        peak, err = traced_peak(lambda: decode_payload(data, info_for(data, len(raw)), "st"))
        assert isinstance(err, BundleError) and "safetensors" in str(err)
        assert peak < 1 << 20


def test_oversize_manifest_file_is_not_read(seeds, tmp_path):
    d = Path(fz.write_dir(tmp_path, seeds))
    with open(d / "manifest.json", "wb") as f:
        f.truncate(1 << 36)  # sparse: 64 GiB on paper
    peak, err = traced_peak(lambda: Bundle.open(d))
    assert isinstance(err, BundleError) and "limit" in str(err)
    assert peak < 1 << 20


def manifest_only_tar(seeds) -> bytes:
    """The first seed shard's manifest member, without the end-of-archive blocks (more members may follow)."""
    data = fz.tar_bytes(fz._shard_members(seeds, 0)[:1])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        m = tar.getmembers()[0]
    return data[: m.offset_data + -(-m.size // 512) * 512]


def _shard_with(seeds, extra: bytes, name: str = "item-000000001.item.safetensors", gz: bool = False) -> bytes:
    """The first seed shard's manifest, then a member header claiming len(extra) bytes and those bytes."""
    head = manifest_only_tar(seeds)
    body = fz._raw_header(name, f"{len(extra):011o}\0".encode()) + extra
    data = head + body
    return gzip.compress(data, compresslevel=1, mtime=0) if gz else data


@pytest.mark.parametrize("gz", [False, True])
def test_shard_member_larger_than_manifest_allows(seeds, tmp_path, gz):
    """An item member far larger than the manifest's row size is refused before its data is read."""
    p = tmp_path / ("s.tar.gz" if gz else "s.tar")
    p.write_bytes(_shard_with(seeds, b"\0" * (32 << 20), gz=gz))
    peak, err = traced_peak(lambda: Bundle.open([str(p)]))
    assert isinstance(err, BundleError) and "over its limit" in str(err), err
    assert peak < 4 << 20


def test_shard_pax_bomb_after_manifest_is_cut_off(seeds, tmp_path):
    """A gzip'd pax header of 256 MiB after the manifest: reading stops at the manifest's budget."""
    head = manifest_only_tar(seeds)
    pax = fz._raw_header("././@PaxHeader", f"{256 << 20:011o}\0".encode(), typeflag=b"x")
    p = tmp_path / "bomb.tar.gz"
    p.write_bytes(gzip.compress(head + pax, mtime=0) + fz.gzip_zeros(256))
    peak, err = traced_peak(lambda: Bundle.open([str(p)]))
    assert isinstance(err, BundleError) and "more data than its manifest declares" in str(err), err
    assert peak < 8 << 20


def test_shard_must_start_with_manifest(seeds, tmp_path):
    members = fz._shard_members(seeds, 0)
    p = tmp_path / "s.tar"
    p.write_bytes(fz.tar_bytes(members[2:] + members[:2]))
    with pytest.raises(BundleError, match="does not start with the bundle manifest"):
        Bundle.open([str(p)])


def test_shard_unknown_member_refused(seeds, tmp_path):
    members = fz._shard_members(seeds, 0)
    p = tmp_path / "s.tar"
    p.write_bytes(fz.tar_bytes(members + [("notes.txt", b"hello")]))
    with pytest.raises(BundleError, match="unexpected member"):
        Bundle.open([str(p)])


def test_compressed_shards_still_load(seeds, tmp_path):
    paths = []
    for k, blob in enumerate(seeds.shard_bytes):
        p = tmp_path / f"shard-{k:06d}.tar.gz"
        p.write_bytes(gzip.compress(blob, mtime=0))
        paths.append(str(p))
    a, b = Bundle.open(paths), Bundle.open(str(seeds.bundle))
    assert a.manifest == b.manifest
    assert all(all((a.payloads[n][k] == t).all() for k, t in ts.items()) for n, ts in b.payloads.items())


def test_payload_with_trailing_frame_refused(seeds, tmp_path):
    raw = seeds.raw["items"]
    data = fz.zstd(raw) + fz.zstd(raw)
    m = fz.resign(seeds.manifest, "items", data, raw_bytes=len(raw))
    d = fz.write_dir(tmp_path, seeds, {"items.safetensors.zst": data}, m)
    with pytest.raises(BundleError, match="more than the declared"):
        Bundle.open(d)


def test_fifo_payload_does_not_hang(seeds, tmp_path):
    import os
    d = Path(fz.write_dir(tmp_path, seeds))
    (d / "items.safetensors.zst").unlink()
    os.mkfifo(d / "items.safetensors.zst")
    with fz.time_limit(10), pytest.raises(BundleError):
        Bundle.open(d)


def test_seed_shards_round_trip(seeds):
    """The fuzz seeds themselves load, from the directory and from the shards."""
    a = Bundle.open(str(seeds.bundle))
    b = Bundle.open([str(p) for p in seeds.shards])
    assert a.manifest == b.manifest and a.num_items == 12
    fz.check_loaded(a)
    fz.check_loaded(b)
    with tarfile.open(fileobj=io.BytesIO(seeds.shard_bytes[0])) as tar:
        assert tar.getnames()[0] == "bundle.manifest.json"
    assert zstandard.ZstdDecompressor().decompress((seeds.bundle / "items.safetensors.zst").read_bytes())
