"""A labelled PNG grid of regenerated images."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .bundle.atomic import atomic_write_bytes


def preview_grid(images: torch.Tensor, class_ids: list[int], class_names: list[str], per_class: int,
                 min_cell: int = 64) -> Image.Image:
    """One row per class: the class name, then up to `per_class` images, upscaled to at least `min_cell` px."""
    h, w = images.shape[-2:]
    scale = max(1, int(np.ceil(min_cell / max(h, w))))
    ch, cw = h * scale, w * scale
    font = ImageFont.load_default()
    label_w = 8 + max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(n, font=font)) for n in class_names)
    rows = sorted(set(class_ids))
    grid = Image.new("RGB", (label_w + per_class * (cw + 2), len(rows) * (ch + 2)), "white")
    draw = ImageDraw.Draw(grid)
    arr = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    for r, c in enumerate(rows):
        y = r * (ch + 2)
        draw.text((4, y + ch // 2 - 6), class_names[c], fill="black", font=font)
        picks = [i for i, k in enumerate(class_ids) if k == c][:per_class]
        for j, i in enumerate(picks):
            tile = Image.fromarray(arr[i]).resize((cw, ch), Image.NEAREST)
            grid.paste(tile, (label_w + j * (cw + 2), y))
    return grid


def save_png(img: Image.Image, path: str | os.PathLike) -> None:
    """Write a PNG atomically."""
    import io
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
