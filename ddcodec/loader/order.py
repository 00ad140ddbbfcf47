"""Elastic order: a seeded per-epoch permutation, split into (rank, step) pieces independent of world size."""

from __future__ import annotations

import hashlib
import math

import torch

from ..errors import DDCodecError


def epoch_permutation(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The global item order of an epoch: the same on every rank, worker and machine."""
    return _seeded_perm(num_items, f"order:{seed}:{epoch}") if shuffle else torch.arange(num_items)


def steps_per_epoch(num_items: int, batch_size: int, world_size: int) -> int:
    """Batches each rank yields per epoch; the same on every rank."""
    return max(1, math.ceil(num_items / (batch_size * world_size)))


def rank_batches(perm: torch.Tensor, batch_size: int, world_size: int, rank: int) -> list[torch.Tensor]:
    """This rank's batches: the permutation cut into steps×ranks near-equal contiguous pieces, step-major.

    Every item lands in exactly one piece, all ranks get the same number of batches, and batch sizes
    differ by at most one. Reading the pieces in order gives back the permutation, whatever the world size.
    """
    n = len(perm)
    steps = steps_per_epoch(n, batch_size, world_size)
    pieces = steps * world_size
    if n < pieces:
        raise DDCodecError(
            f"{n} items cannot fill {steps} equal batch count(s) on {world_size} rank(s) with batch size {batch_size}",
            "use a batch size of at least 2, fewer ranks, or a bundle with more items")
    bounds = [round(k * n / pieces) for k in range(pieces + 1)]
    return [perm[bounds[s * world_size + rank]:bounds[s * world_size + rank + 1]] for s in range(steps)]


def _seeded_perm(n: int, text: str) -> torch.Tensor:
    s = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randperm(n, generator=torch.Generator().manual_seed(s))


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The shard order of an epoch for streaming: the same on every rank and worker."""
    return list(range(num_shards)) if not shuffle else _seeded_perm(num_shards, f"shards:{seed}:{epoch}").tolist()


def item_order(count: int, seed: int, epoch: int, shard: int, shuffle: bool = True) -> list[int]:
    """The order of one shard's items within an epoch, as positions 0..count-1."""
    return list(range(count)) if not shuffle else _seeded_perm(count, f"items:{seed}:{epoch}:{shard}").tolist()


def shard_slots(order: list[int], world_size: int, rank: int, workers: int) -> list[list[int]]:
    """This rank's shards, per DataLoader worker: by node, then by worker (webdataset's split_by_node/worker)."""
    mine = order[rank::world_size]
    return [mine[w::workers] for w in range(workers)]


def slot_steps(counts: list[int], world_size: int, workers: int, batch_size: int) -> int:
    """Batches each (rank, worker) slot yields per epoch: the same for all slots and epochs, whatever the shard order."""
    slots = world_size * workers
    most, fewest = -(-len(counts) // slots), len(counts) // slots  # shards per slot
    big, small = max(counts), min(counts)
    steps = max(1, math.ceil(most * big / batch_size))
    if fewest == 0 or fewest * big - (big - small) < steps:
        raise DDCodecError(
            f"{len(counts)} shard(s) of up to {big} items cannot feed {world_size} rank(s) x {workers} worker(s) "
            f"with {steps} equal batch(es) each",
            "re-shard with fewer items per shard (at least ranks x workers shards), "
            "or read the whole bundle with DistilledDataset(urls)")
    return steps


def cut(count: int, steps: int) -> list[int]:
    """Bounds of `steps` near-equal contiguous pieces of `count` items."""
    return [round(k * count / steps) for k in range(steps + 1)]
