"""Seeded batch augmentation on float image tensors: pad-and-crop + flip, or random-resized-crop + flip.

Parameters are drawn from a CPU `torch.Generator`, so a seed gives the same augmentation on every device.
Nothing here needs gradients (students train on fixed regenerated images).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import DDCodecError

MODES = ("crop", "rrc", "flip", "none")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_mode(image_size: int) -> str:
    """crop (pad 1/8 + flip) up to 64 px, random-resized-crop above."""
    return "crop" if image_size <= 64 else "rrc"


def crop_flip(x: torch.Tensor, g: torch.Generator, pad: int | None = None) -> torch.Tensor:
    """Random crop after zero padding by `pad` pixels (default 1/8 of the side), then random horizontal flip."""
    n, _, h, w = x.shape
    pad = max(1, round(min(h, w) / 8)) if pad is None else pad
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    cols = torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(0)[None], cols[None]) + dx[:, None]  # (n, w)
    rows = torch.arange(h)[None] + dy[:, None]  # (n, h)
    padded = F.pad(x, (pad, pad, pad, pad))
    b = torch.arange(n)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[b, rows.to(x.device)[:, :, None], cols.to(x.device)[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()


def flip_only(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip."""
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def resized_crop_flip(x: torch.Tensor, g: torch.Generator, scale: tuple[float, float] = (0.08, 1.0),
                      ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """Random-resized-crop (area fraction in `scale`, log-uniform aspect in `ratio`) back to full size, plus flip."""
    n = len(x)
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(n, generator=g, dtype=torch.float64)
    logr = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * torch.rand(n, generator=g, dtype=torch.float64)
    r = torch.exp(logr)
    cw = torch.sqrt(area * r).clamp(max=1.0)  # crop width / image width
    ch = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1 - cw) * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)  # centre in [-1, 1] coordinates
    cy = (1 - ch) * (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0], theta[:, 0, 2] = cw * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def augment(x: torch.Tensor, g: torch.Generator, mode: str) -> torch.Tensor:
    """Apply augmentation `mode` (crop | rrc | flip | none) to a float (B, 3, H, W) batch."""
    if mode == "crop":
        return crop_flip(x, g)
    if mode == "rrc":
        return resized_crop_flip(x, g)
    if mode == "flip":
        return flip_only(x, g)
    if mode == "none":
        return x
    raise DDCodecError(f"unknown augmentation {mode!r}", f"use one of {', '.join(MODES)}")


def normalize(x: torch.Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> torch.Tensor:
    """(x - mean) / std per channel, for [0, 1] images."""
    m = torch.tensor(mean, device=x.device, dtype=x.dtype)[:, None, None]
    s = torch.tensor(std, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - m) / s


MIXES = ("none", "cutmix")


def cutmix(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix (Yun et al. 2019, Beta(1, 1)): paste one box from a shuffled batch; returns (mixed, perm, kept area)."""
    n, _, h, w = x.shape
    lam = float(torch.rand((), generator=g, dtype=torch.float64))
    perm = torch.randperm(n, generator=g)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (), generator=g)), int(torch.randint(0, w, (), generator=g))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm.to(x.device), :, y0:y1, x0:x1]
    return out, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
