"""Loading a labelled image source into one in-memory uint8 tensor, with a seeded held-out slice."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..data import load_source
from ..errors import DDCodecError


@dataclass
class ImageSet:
    """Images (N,3,H,W) uint8, labels (N,) int64 and the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def _collate(batch: list) -> tuple[list[torch.Tensor], list[int]]:
    return [b[0] for b in batch], [int(b[1]) for b in batch]


def load_images(spec: str, split: str, image_size: int | None = None, limit: int | None = None,
                seed: int = 0, desc: str = "loading images", indices: list[int] | None = None) -> ImageSet:
    """The images of `spec`/`split` (all, or those at `indices`; then a seeded class-balanced `limit` of them), resized."""
    source = load_source(spec, split)
    classes = list(getattr(source, "classes", []))
    if not classes or len(source) == 0:
        raise DDCodecError(f"{spec} ({split}) holds no labelled images", "check --data and --split")
    if indices is None:
        indices = list(range(len(source)))
    if limit is not None and limit < len(indices):
        targets = _targets(source)
        indices = [indices[i] for i in balanced_subset(torch.tensor([targets[i] for i in indices]), limit, seed).tolist()]
    loader = DataLoader(torch.utils.data.Subset(source, indices), batch_size=256, collate_fn=_collate)
    images, labels = [], []
    for imgs, labs in tqdm(loader, desc=desc, unit="batch", leave=False):
        for img in imgs:
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            size = image_size or img.shape[-1]
            if tuple(img.shape[-2:]) != (size, size):
                img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                    align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
            images.append(img)
        labels.extend(labs)
    try:
        stacked = torch.stack(images)
    except RuntimeError:
        raise DDCodecError(f"{spec} has images of different sizes", "pass --image-size to resize them") from None
    return ImageSet(stacked, torch.tensor(labels, dtype=torch.long), classes)


def _targets(source: object) -> list[int]:
    t = getattr(source, "targets", None)
    return list(t) if t is not None and len(t) else [int(source[i][1]) for i in range(len(source))]  # type: ignore[index]


def balanced_subset(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """A seeded subset of about `n` indices, the same share from every class, in ascending order."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique()
    per = max(1, n // len(classes))
    picked = []
    for c in classes.tolist():
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:per]])
    return torch.cat(picked).sort().values


def split_holdout(data: ImageSet, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): a seeded class-balanced slice of `n` images kept out of training."""
    if n <= 0:
        return torch.arange(len(data)), torch.zeros(0, dtype=torch.long)
    held = balanced_subset(data.labels, n, seed + 7919)
    mask = torch.ones(len(data), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held
