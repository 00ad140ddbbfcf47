"""RDED-style coreset selection, shared by `dace` and `rded`: the teacher's lowest-loss random crop per real
image, then the IPC x r^2 lowest-loss of those per class, stored as uint8 patches at H/r x W/r.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..bundle.manifest import derive_seed
from .checkpoint import WorkDir
from .common import batched, load_images, map_units, seeded_subset

RATIO = (3 / 4, 4 / 3)


@dataclass(frozen=True)
class SelectionConfig:
    """How patches are chosen: factor r, candidate images per class, random crops per image, crop area range."""

    factor: int = 2
    candidates: int = 300
    num_crops: int = 5
    scale: tuple[float, float] = (0.08, 1.0)
    batch: int = 64

    def record(self) -> dict[str, Any]:
        return {"factor": self.factor, "candidates": self.candidates, "num_crops": self.num_crops,
                "crop_scale": list(self.scale)}


def crop_box(g: torch.Generator, h: int, w: int, scale: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a RandomResizedCrop drawn from `g` (torchvision's algorithm, seeded)."""
    area = h * w
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        cw, ch = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (1,), generator=g))
            left = int(torch.randint(0, w - cw + 1, (1,), generator=g))
            return top, left, ch, cw
    ratio = w / h
    if ratio < RATIO[0]:
        cw, ch = w, int(round(w / RATIO[0]))
    elif ratio > RATIO[1]:
        ch, cw = h, int(round(h * RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def resized_crop(image: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """Crop (3,H,W) to `box` and resize to `size` (bilinear, antialiased)."""
    top, left, h, w = box
    crop = image[None, :, top:top + h, left:left + w]
    if tuple(crop.shape[-2:]) == tuple(size):
        return crop[0]
    return F.interpolate(crop, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float [0,1] to uint8, rounded."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def score_images(teacher: Any, images: torch.Tensor, label: int, indices: list[int], seed: int,
                 cfg: SelectionConfig, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each image: (lowest crop loss, its low-res patch uint8, its box) over cfg.num_crops seeded crops."""
    n, _, H, W = images.shape
    tsize = (teacher.image_size, teacher.image_size) if getattr(teacher, "image_size", None) else (H, W)
    low = (H // cfg.factor, W // cfg.factor)
    boxes = [[crop_box(torch.Generator().manual_seed(derive_seed(seed, idx, 0, "crop")), H, W, cfg.scale)
              for _ in range(cfg.num_crops)] for idx in indices]
    crops = torch.stack([resized_crop(images[i], b, tsize) for i in range(n) for b in boxes[i]])
    logits = teacher(crops.to(device)).float()
    target = torch.full((len(crops),), label, dtype=torch.long, device=logits.device)
    loss = F.cross_entropy(logits, target, reduction="none").cpu().view(n, cfg.num_crops)
    best_loss, best = loss.min(dim=1)
    chosen = [boxes[i][int(best[i])] for i in range(n)]
    patches = torch.stack([to_uint8(resized_crop(images[i], chosen[i], low)) for i in range(n)])
    return best_loss, patches, torch.tensor(chosen, dtype=torch.int64)


def select_class(source: Any, indices: list[int], label: int, keep: int, size: tuple[int, int], teacher: Any,
                 seed: int, cfg: SelectionConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """The `keep` lowest-loss patches of one class, best first: pixels, loss, source index, crop box."""
    cand = seeded_subset(indices, cfg.candidates, derive_seed(seed, label, 0, "candidates"))
    losses, patches, boxes = [], [], []
    for chunk in batched(cand, cfg.batch):
        images, _ = load_images(source, chunk, size)
        l, p, b = score_images(teacher, images, label, chunk, seed, cfg, device)
        losses.append(l)
        patches.append(p)
        boxes.append(b)
    loss = torch.cat(losses)
    order = torch.sort(loss, stable=True).indices[:keep]
    return {"pixels": torch.cat(patches)[order].contiguous(), "loss": loss[order].contiguous(),
            "source_index": torch.tensor(cand, dtype=torch.int64)[order].contiguous(),
            "box": torch.cat(boxes)[order].contiguous()}


def select_patches(source: Any, per_class: list[list[int]], keep: int, size: tuple[int, int], teacher: Any,
                   seed: int, cfg: SelectionConfig, work: WorkDir, device: torch.device) -> list[dict[str, torch.Tensor]]:
    """select_class for every class, each a resumable unit `patches-c{c}` (classes split across torchrun ranks)."""
    h, w = size[0] // cfg.factor, size[1] // cfg.factor
    spec = {"pixels": ((keep, 3, h, w), torch.uint8), "loss": ((keep,), torch.float32),
            "source_index": ((keep,), torch.int64), "box": ((keep, 4), torch.int64)}
    return map_units(work, [f"patches-c{c}" for c in range(len(per_class))],
                     lambda c: select_class(source, per_class[c], c, keep, size, teacher, seed, cfg, device), spec,
                     desc="selecting patches (classes)")


def stitch(patches: torch.Tensor, factor: int) -> torch.Tensor:
    """(n*r^2, 3, h, w) patches to (n, 3, r*h, r*w) images, row-major r x r grids (RDED's collage)."""
    r2 = factor * factor
    n = patches.shape[0] // r2
    _, ch, h, w = patches.shape
    x = patches[:n * r2].reshape(n, factor, factor, ch, h, w)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(n, ch, factor * h, factor * w).contiguous()
