"""Work splitting across torchrun / accelerate ranks: fixed chunks, round-robin, gathered as tensors (no pickle)."""

from __future__ import annotations

import os
from typing import Callable

import torch
import torch.distributed as dist
from tqdm import tqdm


def init_from_env() -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun/accelerate describe in the environment."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("DDCODEC_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return init_from_env()[0] == 0


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def map_chunks(fn: Callable[[int], torch.Tensor], num_chunks: int, desc: str = "") -> list[torch.Tensor]:
    """fn(k) for every chunk k, rank r computing chunks k ≡ r (mod world); every rank gets all results.

    Every chunk's result must have the same shape and dtype (pad the last chunk), which also keeps
    results independent of how chunks fall on ranks.
    """
    rank, world = init_from_env()
    mine = list(range(rank, num_chunks, world))
    local = [fn(k).cpu() for k in tqdm(mine, desc=desc, unit="chunk", leave=False, disable=not desc or rank != 0)]
    if world == 1:
        return local
    probe = local[0] if local else fn(0).cpu()
    per_rank = -(-num_chunks // world)
    stacked = torch.zeros((per_rank, *probe.shape), dtype=probe.dtype)
    for j, t in enumerate(local):
        stacked[j] = t
    gathered = [torch.empty_like(stacked) for _ in range(world)]
    dist.all_gather(gathered, stacked)
    return [gathered[k % world][k // world] for k in range(num_chunks)]
