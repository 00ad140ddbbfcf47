"""On-disk cache of regenerated images, one safetensors file per (item, variant), checked on every read."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import safetensors.torch
import torch

from ..bundle.atomic import atomic_write_bytes
from ..bundle.bundle import read_at_most
from ..errors import DDCodecError

FORMAT = "ddcodec-regeneration-cache-1"
HEADER_SLACK = 4096  # an entry is the image, a 32-byte checksum and a safetensors header far below this


class RegenerationCache:
    """Stores regenerated images keyed by bundle digest, generator settings, variant and item.

    Each entry holds the image and the sha256 of (format, cache key, item, variant, image bytes). An entry
    that does not check out on read (flipped bits, truncated, tampered, another entry's file) is a miss: it
    is regenerated and atomically rewritten, with a one-line warning, and never returned.
    """

    def __init__(self, root: str | os.PathLike, key: str, image_shape: tuple[int, ...]) -> None:
        self.dir = Path(root) / key
        self.key = key
        self.shape = tuple(image_shape)

    def path(self, item: int, variant: int) -> Path:
        return self.dir / f"v{variant:06d}" / f"{item:09d}.safetensors"

    def checksum(self, item: int, variant: int, image: torch.Tensor) -> torch.Tensor:
        """sha256 binding the image bytes to this cache key, item and variant, as 32 uint8."""
        h = hashlib.sha256(f"{FORMAT}|{self.key}|{item}|{variant}|".encode())
        h.update(memoryview(image.contiguous().numpy()).cast("B"))
        return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8)

    def get(self, item: int, variant: int) -> torch.Tensor | None:
        """The cached image, or None if absent or damaged (a damaged entry is warned about, then regenerated)."""
        p = self.path(item, variant)
        if not os.path.lexists(p):
            return None
        image, problem = self._read(p, item, variant)
        if problem:
            warnings.warn(f"regeneration cache entry {p} is damaged ({problem}); regenerating it", stacklevel=2)
        return image

    def _read(self, p: Path, item: int, variant: int) -> tuple[torch.Tensor | None, str | None]:
        """(image, None) for an entry that checks out, else (None, what is wrong)."""
        expected = 4 * int(torch.Size(self.shape).numel())
        try:
            data = read_at_most(p, expected + HEADER_SLACK)
        except DDCodecError as e:
            return None, str(e).split(". ")[0].rstrip(".")
        except OSError as e:  # e.g. a directory in its place
            return None, f"unreadable: {e.strerror or type(e).__name__}"
        try:
            entry = safetensors.torch.load(data)
        except Exception as e:
            return None, f"not a safetensors file: {' '.join(str(e).split())[:120]}"
        image, digest = entry.get("image"), entry.get("sha256")
        if image is None or digest is None or set(entry) != {"image", "sha256"}:
            return None, f"holds {sorted(entry)}, not an image and its sha256"
        if tuple(image.shape) != self.shape or image.dtype != torch.float32:
            return None, f"{image.dtype} {tuple(image.shape)}, not float32 {self.shape}"
        well_formed = digest.dtype == torch.uint8 and tuple(digest.shape) == (32,)
        if not (well_formed and torch.equal(digest, self.checksum(item, variant, image))):
            return None, "sha256 mismatch"
        return image, None

    def put(self, item: int, variant: int, image: torch.Tensor) -> None:
        """Write one entry atomically: readers see the old entry or the new one, never a part."""
        image = image.detach().to("cpu", torch.float32).contiguous()
        data = safetensors.torch.save({"image": image, "sha256": self.checksum(item, variant, image)})
        atomic_write_bytes(self.path(item, variant), data)
