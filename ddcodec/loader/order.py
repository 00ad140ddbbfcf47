"""Elastic order: a seeded per-epoch permutation, split into (rank, step) pieces independent of world size."""

from __future__ import annotations

import hashlib
import math

import torch

from ..errors import DDCodecError


def epoch_permutation(num_items: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The global item order of an epoch: the same on every rank, worker and machine."""
    if not shuffle:
        return torch.arange(num_items)
    s = int.from_bytes(hashlib.sha256(f"order:{seed}:{epoch}".encode()).digest()[:8], "little") & ((1 << 63) - 1)
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(s))


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
