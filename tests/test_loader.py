"""DistilledDataset: bitwise determinism, elastic exactly-once order, resume, cache, shards."""

from __future__ import annotations

import torch
import pytest

from ddcodec.bundle import Bundle
from ddcodec.bundle.shards import write_shards
from ddcodec.errors import DDCodecError
from ddcodec.loader import DistilledDataset


def collect(ds, epoch=0, loader=None):
    """{item id: image} and the list of batches' id lists, for one epoch."""
    ds.set_epoch(epoch)
    images, batches = {}, []
    for x, soft, hard, ids in (loader if loader is not None else ds):
        batches.append(ids.tolist())
        assert torch.allclose(soft.sum(-1), torch.ones(len(ids)))
        for i, img in zip(ids.tolist(), x):
            images[i] = img
    return images, batches


def test_regenerate_twice_bitwise(noisy_bundle):
    a, _ = collect(DistilledDataset(noisy_bundle, batch_size=7, return_ids=True), epoch=1)
    b, _ = collect(DistilledDataset(noisy_bundle, batch_size=7, return_ids=True), epoch=1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[i], b[i]) for i in a)


def test_variants_differ_and_cycle(noisy_bundle):
    ds = DistilledDataset(noisy_bundle, batch_size=40, return_ids=True)
    e0, _ = collect(ds, 0)
    e1, _ = collect(ds, 1)
    e3, _ = collect(ds, 3)  # 3 variants: epoch 3 is variant 0 again
    assert not torch.equal(e0[0], e1[0])
    assert all(torch.equal(e0[i], e3[i]) for i in e0)


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("workers", [0, 2])
def test_exactly_once_across_ranks_and_workers(noisy_bundle, world, workers):
    reference, ref_batches = collect(DistilledDataset(noisy_bundle, batch_size=5, return_ids=True), epoch=2)
    order = [i for b in ref_batches for i in b]
    seen, per_rank = {}, []
    steps = []
    for rank in range(world):
        ds = DistilledDataset(noisy_bundle, batch_size=5, rank=rank, world_size=world, return_ids=True)
        imgs, batches = collect(ds, 2, ds.loader(num_workers=workers))
        steps.append(batches)
        per_rank.append(len(batches))
        for i, img in imgs.items():
            assert i not in seen, f"item {i} yielded twice"
            seen[i] = img
    assert sorted(seen) == list(range(Bundle.open(noisy_bundle).num_items))
    assert len(set(per_rank)) == 1, f"unequal batch counts {per_rank}"
    # the global order (step-major, rank-minor) is the same seeded order whatever the world size
    assert [i for s in range(per_rank[0]) for r in range(world) for i in steps[r][s]] == order
    assert all(torch.equal(seen[i], reference[i]) for i in seen), "images depend on the batch layout"


def test_resume_mid_epoch(noisy_bundle):
    full, batches = collect(DistilledDataset(noisy_bundle, batch_size=6, return_ids=True), epoch=1)
    ds = DistilledDataset(noisy_bundle, batch_size=6, return_ids=True)
    ds.set_epoch(1)
    it = iter(ds)
    for _ in range(2):
        next(it)
    state = ds.state_dict()
    assert state["batches"] == 2 and state["epoch"] == 1
    fresh = DistilledDataset(noisy_bundle, batch_size=6, return_ids=True)
    fresh.load_state_dict(state)
    rest = [b for b in fresh]
    assert [r[3].tolist() for r in rest] == batches[2:]
    assert all(torch.equal(img, full[i]) for r in rest for i, img in zip(r[3].tolist(), r[0]))


def test_resume_with_workers(noisy_bundle):
    ds = DistilledDataset(noisy_bundle, batch_size=4, return_ids=True)
    ds.set_epoch(0)
    all_batches = [b[3].tolist() for b in ds.loader(num_workers=2)]
    loader = ds.loader(num_workers=2)
    for k, _ in enumerate(loader):
        if k == 1:
            break
    state = ds.state_dict()
    assert state["batches"] == 2
    fresh = DistilledDataset(noisy_bundle, batch_size=4, return_ids=True)
    fresh.load_state_dict(state)
    assert [b[3].tolist() for b in fresh.loader(num_workers=2)] == all_batches[2:]


def test_resume_refuses_other_layout(noisy_bundle):
    state = DistilledDataset(noisy_bundle, batch_size=4).state_dict()
    with pytest.raises(DDCodecError, match="world size"):
        DistilledDataset(noisy_bundle, batch_size=4, rank=0, world_size=2).load_state_dict(state)


def test_shards_equal_directory(noisy_bundle, tmp_path):
    write_shards(Bundle.open(noisy_bundle), tmp_path, items_per_shard=7)
    urls = [str(p) for p in sorted(tmp_path.glob("*.tar"))]
    assert len(urls) == 3
    a, _ = collect(DistilledDataset(noisy_bundle, batch_size=8, return_ids=True), epoch=1)
    b, _ = collect(DistilledDataset(urls, batch_size=8, return_ids=True), epoch=1)
    pattern = str(tmp_path / "shard-{000000..000002}.tar")
    c, _ = collect(DistilledDataset(pattern, batch_size=8, return_ids=True), epoch=1)
    assert all(torch.equal(a[i], b[i]) and torch.equal(a[i], c[i]) for i in a)


def test_cache_returns_identical_images(noisy_bundle, tmp_path):
    plain, _ = collect(DistilledDataset(noisy_bundle, batch_size=8, return_ids=True), epoch=0)
    ds = DistilledDataset(noisy_bundle, batch_size=8, return_ids=True, cache_dir=tmp_path)
    first, _ = collect(ds, 0)
    files = list(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(plain)
    files[0].write_bytes(b"garbage")  # a damaged entry is regenerated, not trusted
    second, _ = collect(ds, 0)
    assert all(torch.equal(plain[i], first[i]) and torch.equal(plain[i], second[i]) for i in plain)


def test_plain_tuple_and_dataloader(tiny_bundle):
    ds = DistilledDataset(tiny_bundle, batch_size=16)
    assert len(ds) == 3
    x, soft, hard = next(iter(ds))
    assert x.shape == (13, 3, 32, 32) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert soft.shape == (13, 10) and torch.equal(soft.argmax(-1), hard)
    from torch.utils.data import DataLoader
    n = sum(len(b[2]) for b in DataLoader(ds, batch_size=None))
    assert n == 40


def test_rank_env_vars(tiny_bundle, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = DistilledDataset(tiny_bundle, batch_size=4)
    assert (ds.rank, ds.world_size) == (1, 2)


def test_impossible_split_is_a_clear_error(tiny_bundle):
    with pytest.raises(DDCodecError, match="batch size"):
        DistilledDataset(tiny_bundle, batch_size=1, rank=0, world_size=3)
