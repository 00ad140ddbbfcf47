"""Regeneration cache integrity: a damaged, truncated or swapped entry is a warned miss, never a wrong image."""

from __future__ import annotations

import shutil
import warnings

import pytest
import safetensors.torch
import torch

from ddcodec.loader import DistilledDataset
from ddcodec.loader.cache import RegenerationCache


def epoch_images(ds: DistilledDataset, epoch: int = 0) -> dict[int, torch.Tensor]:
    """{item id: image} of one epoch."""
    ds.set_epoch(epoch)
    return {i: img for x, _, _, ids in ds for i, img in zip(ids.tolist(), x)}


def cache_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if "regeneration cache entry" in str(w.message)]


@pytest.fixture(scope="module")
def plain(noisy_bundle) -> dict[int, torch.Tensor]:
    return epoch_images(DistilledDataset(noisy_bundle, batch_size=8, return_ids=True))


def damage_flip(data: bytes, k: int) -> bytes:
    """Flip one bit (by k): in the safetensors header, in the image bytes, or in the checksum (stored last)."""
    pos = [20, 8 + int.from_bytes(data[:8], "little") + 5, len(data) - 10][k % 3]
    return data[:pos] + bytes([data[pos] ^ (1 << (k % 8))]) + data[pos + 1:]


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_entries_are_regenerated_bitwise(noisy_bundle, plain, tmp_path, damage):
    ds = DistilledDataset(noisy_bundle, batch_size=8, return_ids=True, cache_dir=tmp_path)
    first = epoch_images(ds)
    files = sorted(tmp_path.rglob("*.safetensors"))
    assert len(files) == len(plain)
    for k, f in enumerate(files[:6]):
        data = f.read_bytes()
        f.write_bytes(damage_flip(data, k) if damage == "flip" else data[:[0, 7, 60, 200, len(data) // 2, len(data) - 1][k]])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second = epoch_images(ds)
    msgs = cache_warnings(record)
    assert len(msgs) == 6 and all("\n" not in m and "regenerating it" in m for m in msgs)
    assert {m.split("entry ")[1].split(" is damaged")[0] for m in msgs} == {str(f) for f in files[:6]}
    assert all(torch.equal(plain[i], first[i]) and torch.equal(plain[i], second[i]) for i in plain)
    with warnings.catch_warnings(record=True) as record:  # the damaged entries were rewritten
        warnings.simplefilter("always")
        third = epoch_images(ds)
    assert not cache_warnings(record) and all(torch.equal(plain[i], third[i]) for i in plain)


def refused_flips(cache: RegenerationCache, image: torch.Tensor) -> tuple[int, int]:
    """Write `image` as entry (5, 1), flip each bit of the file in turn; (bits, flips refused). None reads wrong."""
    cache.put(5, 1, image)
    path = cache.path(5, 1)
    good = path.read_bytes()
    assert torch.equal(cache.get(5, 1), image)
    refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for bit in range(8 * len(good)):
            data = bytearray(good)
            data[bit // 8] ^= 1 << (bit % 8)
            path.write_bytes(bytes(data))
            got = cache.get(5, 1)
            assert got is None or torch.equal(got, image), f"bit {bit} flipped gave a different image"
            refused += got is None
    return 8 * len(good), refused


def test_every_bit_flip_is_caught(tmp_path):
    """Each single-bit flip of a whole (small) entry is refused."""
    bits, refused = refused_flips(RegenerationCache(tmp_path, "k" * 20, (3, 2, 2)), torch.rand(3, 2, 2))
    assert refused == bits == 1728


@pytest.mark.slow
def test_every_bit_flip_of_a_real_entry_is_caught(noisy_bundle, tmp_path):
    """The same for a regenerated 32x32 image: 99,712 flips (about 3 minutes)."""
    ds = DistilledDataset(noisy_bundle, batch_size=3)
    ds.set_epoch(1)
    image = next(iter(ds))[0][0]
    bits, refused = refused_flips(RegenerationCache(tmp_path, "k" * 20, tuple(image.shape)), image)
    assert refused == bits == 99712


def test_swapped_legacy_and_odd_entries_are_misses(tmp_path):
    cache = RegenerationCache(tmp_path, "k" * 20, (3, 2, 2))
    a, b = torch.rand(3, 2, 2), torch.rand(3, 2, 2)
    cache.put(1, 0, a)
    cache.put(2, 0, b)
    cache.put(1, 1, a)
    other = RegenerationCache(tmp_path, "j" * 20, (3, 2, 2))
    other.path(1, 0).parent.mkdir(parents=True)
    shutil.copy(cache.path(2, 0), cache.path(1, 0))  # another item's entry, valid in itself
    shutil.copy(cache.path(1, 1), other.path(1, 0))  # same item and image, another cache key
    cache.path(3, 0).write_bytes(safetensors.torch.save({"image": a}))  # no checksum (an older ddcodec)
    cache.path(4, 0).mkdir()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert cache.get(1, 0) is None and other.get(1, 0) is None and cache.get(3, 0) is None
        assert cache.get(4, 0) is None and cache.get(9, 0) is None  # a directory; absent (silent)
        assert torch.equal(cache.get(2, 0), b) and torch.equal(cache.get(1, 1), a)
    msgs = cache_warnings(record)
    assert len(msgs) == 4 and sum("sha256 mismatch" in m for m in msgs) == 2
    assert any("not an image and its sha256" in m for m in msgs) and any("Is a directory" in m for m in msgs)
