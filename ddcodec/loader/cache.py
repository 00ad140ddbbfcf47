"""On-disk cache of regenerated images, one safetensors file per (item, variant)."""

from __future__ import annotations

import os
from pathlib import Path

import safetensors.torch
import torch

from ..bundle.atomic import atomic_write_bytes


class RegenerationCache:
    """Stores regenerated images keyed by bundle digest, generator settings, variant and item."""

    def __init__(self, root: str | os.PathLike, key: str, image_shape: tuple[int, ...]) -> None:
        self.dir = Path(root) / key
        self.shape = tuple(image_shape)

    def path(self, item: int, variant: int) -> Path:
        return self.dir / f"v{variant:06d}" / f"{item:09d}.safetensors"

    def get(self, item: int, variant: int) -> torch.Tensor | None:
        """The cached image, or None if absent or unreadable (a damaged entry is regenerated)."""
        p = self.path(item, variant)
        try:
            img = safetensors.torch.load(p.read_bytes())["image"]
        except Exception:
            return None
        return img if tuple(img.shape) == self.shape and img.dtype == torch.float32 else None

    def put(self, item: int, variant: int, image: torch.Tensor) -> None:
        atomic_write_bytes(self.path(item, variant),
                           safetensors.torch.save({"image": image.detach().to("cpu", torch.float32).contiguous()}))
