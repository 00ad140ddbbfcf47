"""Streaming a bundle's shards: http:// (a local server), pipe:, split by rank and worker, clear shard errors."""

from __future__ import annotations

import copy
import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import torch

from ddcodec import DDCodecError, DistilledDataset, StreamingDistilledDataset
from ddcodec.bundle import Bundle, write_bundle
from ddcodec.bundle.shards import write_shards

SHARDS = "shard-{000000..000009}.tar"


@pytest.fixture(scope="module")
def soft_noisy(noisy_bundle, tmp_path_factory) -> Path:
    """The noisy bundle (20 items, 3 variants) with seeded top-3 int8 soft labels."""
    from ddcodec.labels.codec import encode_soft_labels
    b = Bundle.open(noisy_bundle)
    m = copy.deepcopy(b.manifest)
    m["payloads"] = {}
    m.pop("fingerprints")
    probs = torch.softmax(torch.randn(b.num_items, 3, 10, generator=torch.Generator().manual_seed(1)) * 3, -1)
    tensors, codec = encode_soft_labels(probs, k=3, quant="int8")
    m["labels"] = {"kind": "soft", "payload": "labels", "codec": codec}
    out = tmp_path_factory.mktemp("bundles") / "soft-noisy"
    write_bundle(out, m, {"items": dict(b.items), "labels": tensors}, fingerprints=0)
    return out


@pytest.fixture(scope="module")
def shard_dir(soft_noisy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    assert len(write_shards(Bundle.open(soft_noisy), out, items_per_shard=2)) == 10
    return out


@pytest.fixture(scope="module")
def reference(soft_noisy) -> dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]:
    """(item, epoch) -> (image, soft label) from the whole-bundle loader, epochs 0 and 1."""
    ds = DistilledDataset(soft_noisy, batch_size=8, return_ids=True)
    out = {}
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for images, soft, _, ids in ds:
            out.update({(int(i), epoch): (x, s) for i, x, s in zip(ids, images, soft)})
    return out


@pytest.fixture(scope="module")
def server(shard_dir):
    """An HTTP server on 127.0.0.1 serving the shards (and a truncated copy of one) until the module ends."""
    data = (shard_dir / "shard-000003.tar").read_bytes()
    (shard_dir / "broken.tar").write_bytes(data[: len(data) // 2])
    handler = functools.partial(_QuietHandler, directory=str(shard_dir))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def collect(urls: str, epoch: int, world: int, workers: int, batch_size: int = 2) -> tuple[list[int], dict]:
    """Batch counts per rank and every (item -> (image, soft)) yielded in one epoch over all ranks."""
    counts, seen = [], {}
    for rank in range(world):
        ds = StreamingDistilledDataset(urls, batch_size=batch_size, rank=rank, world_size=world, num_workers=workers,
                                       return_ids=True)
        ds.set_epoch(epoch)
        n = 0
        for images, soft, hard, ids in ds.loader():
            n += 1
            for i, x, s in zip(ids.tolist(), images, soft):
                assert i not in seen, f"item {i} yielded twice"
                seen[i] = (x, s)
        counts.append(n)
    return counts, seen


@pytest.mark.parametrize("world,workers", [(1, 0), (2, 0), (2, 2), (3, 1), (4, 0)])
def test_stream_split_by_rank_and_worker_is_exactly_once_and_bitwise(shard_dir, reference, world, workers):
    counts, seen = collect(str(shard_dir / SHARDS), 1, world, workers)
    assert len(set(counts)) == 1, f"unequal batch counts across ranks: {counts}"
    assert sorted(seen) == list(range(20))
    for i, (x, s) in seen.items():
        rx, rs = reference[(i, 1)]
        assert torch.equal(x, rx) and torch.equal(s, rs), f"item {i} differs from the whole-bundle loader"


def test_each_reader_opens_only_its_own_shards(shard_dir, monkeypatch):
    import ddcodec.loader.stream as stream
    opened: list[str] = []
    real = stream.ShardReader

    def spy(url, *args, **kwargs):
        opened.append(url)
        return real(url, *args, **kwargs)

    ds = StreamingDistilledDataset(str(shard_dir / SHARDS), batch_size=2, rank=1, world_size=2, num_workers=2)
    monkeypatch.setattr(stream, "ShardReader", spy)
    ds.set_epoch(0)
    order = stream.shard_order(10, ds.seed, 0)
    mine = order[1::2]
    for slot in range(2):
        opened.clear()
        list(ds.slot_batches(slot))
        assert opened == [str(shard_dir / f"shard-{s:06d}.tar") for s in mine[slot::2]]


def test_http_and_pipe_equal_local(shard_dir, server, reference):
    for urls in (f"{server}/{SHARDS}", f"pipe:cat {shard_dir}/{SHARDS}"):
        counts, seen = collect(urls, 0, 2, 1)
        assert counts == [5, 5] and sorted(seen) == list(range(20))
        assert all(torch.equal(x, reference[(i, 0)][0]) for i, (x, _) in seen.items())
    whole = Bundle.open([f"{server}/{SHARDS}"])
    assert whole.manifest == Bundle.open(str(shard_dir / SHARDS)).manifest
    ds = DistilledDataset([f"{server}/{SHARDS}"], batch_size=8, return_ids=True)
    images, _, _, ids = next(iter(ds))
    assert all(torch.equal(x, reference[(int(i), 0)][0]) for i, x in zip(ids, images))


def test_missing_or_broken_shard_is_named(shard_dir, server):
    missing = f"{server}/shard-000404.tar"
    with pytest.raises(DDCodecError, match=r"shard-000404\.tar could not be read.*404"):
        Bundle.open([f"{server}/shard-{{000000..000008}}.tar", missing])
    with pytest.raises(DDCodecError, match="broken.tar"):
        Bundle.open([f"{server}/broken.tar"])
    with pytest.raises(DDCodecError, match=r"pipe:cat /nonexistent/shard.tar 2>/dev/null could not be read"):
        StreamingDistilledDataset("pipe:cat /nonexistent/shard.tar 2>/dev/null")
    # a stream that reaches a broken shard mid-epoch names it
    urls = [f"{server}/shard-{s:06d}.tar" for s in range(10)]
    urls[3] = f"{server}/broken.tar"
    ds = StreamingDistilledDataset(urls, batch_size=2, shuffle=False)
    with pytest.raises(DDCodecError, match="broken.tar"):
        list(ds)


def test_stream_refuses_wrong_shard_lists(shard_dir, tmp_path):
    urls = [str(shard_dir / f"shard-{s:06d}.tar") for s in range(10)]
    with pytest.raises(DDCodecError, match="10 shards, but 9"):
        StreamingDistilledDataset(urls[:9])
    swapped = [urls[0], urls[2], urls[1], *urls[3:]]
    with pytest.raises(DDCodecError, match="listed at position"):
        list(StreamingDistilledDataset(swapped, batch_size=2, shuffle=False))
    with pytest.raises(DDCodecError, match="equal batch"):
        StreamingDistilledDataset(urls, batch_size=1, world_size=4, rank=0, num_workers=3)
    bad = tmp_path / "shards"
    shutil.copytree(shard_dir, bad)
    import tarfile
    with tarfile.open(bad / "shard-000005.tar") as tar:
        last = tar.getmembers()[-1]
    data = bytearray((bad / "shard-000005.tar").read_bytes())
    data[last.offset_data + last.size - 1] ^= 0x01  # the last byte of the last item's tensor data
    (bad / "shard-000005.tar").write_bytes(bytes(data))
    with pytest.raises(DDCodecError, match="shard-000005.tar"):
        list(StreamingDistilledDataset(str(bad / SHARDS), batch_size=2, shuffle=False))


def test_stream_resume_continues_exactly(shard_dir):
    urls = str(shard_dir / SHARDS)

    def fresh() -> StreamingDistilledDataset:
        ds = StreamingDistilledDataset(urls, batch_size=2, num_workers=2, return_ids=True)
        ds.set_epoch(2)
        return ds

    full = [ids.tolist() for *_, ids in fresh().loader()]
    assert sorted(i for b in full for i in b) == list(range(20))
    for stop in (0, 1, 3, len(full)):
        ds = fresh()
        it = iter(ds.loader())
        head = [next(it)[-1].tolist() for _ in range(stop)]
        state = ds.state_dict()
        del it
        again = StreamingDistilledDataset(urls, batch_size=2, num_workers=2, return_ids=True)
        again.load_state_dict(state)
        assert head + [ids.tolist() for *_, ids in again.loader()] == full
        direct = StreamingDistilledDataset(urls, batch_size=2, num_workers=2, return_ids=True)
        direct.load_state_dict(state)  # the main process reading both workers' shards gives the same sequence
        assert head + [ids.tolist() for *_, ids in direct] == full
    with pytest.raises(DDCodecError, match="num_workers"):
        StreamingDistilledDataset(urls, batch_size=2, num_workers=1).load_state_dict(state)
