"""Training feeds: batches from a regenerated bundle (timed, optionally cached in memory) or from real image tensors."""

from __future__ import annotations

import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..errors import DDCodecError

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # images [0,1], soft probs or None, hard labels


def spread(n_total: int, n: int) -> list[int]:
    """`n` indices spread evenly over `n_total` (a class-sorted source keeps every class)."""
    return list(range(n_total)) if n >= n_total else [int(i * n_total / n) for i in range(n)]


def resize_u8(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A uint8 (3, h, w) image resized (bilinear, antialiased) to `size`."""
    if tuple(img.shape[-2:]) == tuple(size):
        return img
    x = F.interpolate(img[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def load_tensors(source: Any, indices: list[int], size: tuple[int, int] | None, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `indices` of a source as one uint8 (N, 3, H, W) tensor (resized to `size`) plus int64 labels."""
    images, labels = [], []
    for i in tqdm(indices, desc=desc, unit="img", leave=False, mininterval=1.0, disable=len(indices) < 500):
        img, label = source[i]
        images.append(resize_u8(img, size) if size else img)
        labels.append(int(label))
    if not images:
        raise DDCodecError(f"{desc}: no images selected")
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        raise DDCodecError(f"{desc}: images have different sizes {sorted(shapes)[:2]}", "pass --image-size to resize them")
    return torch.stack(images), torch.tensor(labels, dtype=torch.int64)


def load_split(spec: str, split: str, limit: int | None = None, size: tuple[int, int] | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A split of a data source as uint8 tensors: evenly spread `limit` images (all if None), resized to `size`."""
    from ..data import load_source
    src = load_source(spec, split)
    idx = spread(len(src), limit if limit else len(src))
    x, y = load_tensors(src, idx, size, f"loading {split}")
    return x, y, list(src.classes)


class BundleFeed:
    """Epoch batches from a DistilledDataset; times regeneration and keeps regenerated variants in memory.

    The cache is keyed by variant and shared by every seed, so each variant is regenerated once per run
    (unless `memory_cache` is off). The batch order is the dataset's own (seeded by the bundle).
    """

    def __init__(self, dataset: Any, memory_cache: bool = True, max_cache_bytes: int = 4 << 30) -> None:
        self.ds = dataset
        self.memory_cache = memory_cache
        self.max_cache_bytes = max_cache_bytes
        self.cache: dict[int, torch.Tensor] = {}
        self.regen_s = 0.0
        self.regenerated = 0
        t0 = time.perf_counter()
        _ = dataset.pipeline  # build (load the generator) now, so regeneration times exclude it
        self.setup_s = time.perf_counter() - t0

    @property
    def num_items(self) -> int:
        return self.ds.bundle.num_items

    def _cache_ok(self, images: torch.Tensor) -> bool:
        used = sum(t.numel() * t.element_size() for t in self.cache.values())
        return self.memory_cache and used + images[:1].numel() * images.element_size() * self.num_items <= self.max_cache_bytes

    def epoch(self, e: int) -> Iterator[Batch]:
        """The batches of epoch `e` (variant e mod variants)."""
        ds = self.ds
        ds.set_epoch(e)
        v = ds.variant
        if v in self.cache:
            store = self.cache[v]
            for ids in ds.batches():
                images = store[ids].to(ds.device)
                soft, hard = ds.labels(ids, v, images)
                yield images, soft, hard
            return
        store, it = None, iter(ds)
        while True:
            t0 = time.perf_counter()
            try:
                images, soft, hard, ids = next(it)
            except StopIteration:
                break
            self.regen_s += time.perf_counter() - t0
            self.regenerated += len(ids)
            if store is None and self._cache_ok(images):
                store = torch.empty((self.num_items, *images.shape[1:]), dtype=images.dtype)
            if store is not None:
                store[ids] = images.detach().cpu()
            yield images, soft, hard
        if store is not None:
            self.cache[v] = store


class TensorFeed:
    """Epoch batches of real uint8 images with hard labels, in a seeded order."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 device: str | torch.device = "cpu") -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.seed, self.device = batch_size, seed, torch.device(device)
        self.regen_s, self.regenerated = 0.0, 0

    @property
    def num_items(self) -> int:
        return len(self.labels)

    def epoch(self, e: int) -> Iterator[Batch]:
        g = torch.Generator().manual_seed((self.seed ^ (e * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1))
        perm = torch.randperm(self.num_items, generator=g)
        steps = -(-self.num_items // self.batch_size)
        bounds = [round(k * self.num_items / steps) for k in range(steps + 1)]  # near-equal batches, none of size 1
        for a, b in zip(bounds, bounds[1:]):
            ids = perm[a:b]
            yield self.images[ids].to(self.device).float().div_(255), None, self.labels[ids].to(self.device)
