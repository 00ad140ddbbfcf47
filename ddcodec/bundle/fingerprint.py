"""Reference fingerprints: digests and thumbnails of a few regenerated images, to verify a consumer's stack."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

THUMB = 16
DEFAULT_TOLERANCE = 0.02  # max |difference| of 16 px thumbnails in [0, 1]; GPU and fp16 stacks land well inside


def reference_ids(num_items: int, variants: int, count: int) -> list[tuple[int, int]]:
    """Evenly spaced (item, variant) pairs; the variant alternates when the bundle has several."""
    count = max(1, min(count, num_items))
    items = sorted({round(k * (num_items - 1) / max(count - 1, 1)) for k in range(count)})
    return [(i, k % variants) for k, i in enumerate(items)]


def thumbnail(images: torch.Tensor) -> torch.Tensor:
    """Area-averaged thumbnails no larger than THUMB px on a side."""
    h, w = images.shape[-2:]
    s = max(h, w) / THUMB
    size = (max(1, round(h / s)), max(1, round(w / s))) if s > 1 else (h, w)
    return F.adaptive_avg_pool2d(images.float().cpu(), size)


def regenerate_pairs(pipeline: Any, pairs: list[tuple[int, int]]) -> torch.Tensor:
    """Regenerate each (item, variant) pair; grouped by variant."""
    out: dict[tuple[int, int], torch.Tensor] = {}
    for v in sorted({v for _, v in pairs}):
        ids = [i for i, vv in pairs if vv == v]
        for i, img in zip(ids, pipeline(ids, v)):
            out[(i, v)] = img.cpu()
    return torch.stack([out[p] for p in pairs])


def make_fingerprints(bundle: Any, count: int = 4, prior: Any = None) -> dict[str, Any]:
    """Regenerate reference items on CPU in float32 and record their digests and thumbnails."""
    from ..generators.pipelines import build_pipeline, image_sha256
    pipe = build_pipeline(bundle.manifest, bundle.items, device="cpu", dtype=torch.float32, prior=prior)
    pairs = reference_ids(bundle.num_items, bundle.variants, count)
    images = regenerate_pairs(pipe, pairs)
    return {
        "entries": [{"item": i, "variant": v, "sha256": image_sha256(img)} for (i, v), img in zip(pairs, images)],
        "device": "cpu", "dtype": "float32", "micro_batch": pipe.micro_batch,
        "tolerance": DEFAULT_TOLERANCE, "thumbnail": THUMB,
        "tensors": {"thumbnails": thumbnail(images).to(torch.float16)},
    }


def verify_fingerprints(bundle: Any, device: str = "cpu", dtype: torch.dtype | None = None,
                        tolerance: float | None = None, allow_different_weights: bool = False) -> dict[str, Any]:
    """Regenerate the reference items and compare: bitwise digests first, then thumbnails within tolerance."""
    from ..generators.pipelines import build_pipeline, image_sha256
    fp = bundle.manifest.get("fingerprints")
    if not fp or not fp.get("entries"):
        return {"passed": False, "bitwise": False, "max_diff": float("nan"), "checked": 0,
                "reason": "the bundle has no reference fingerprints"}
    pipe = build_pipeline(bundle.manifest, bundle.items, device=device, dtype=dtype,
                          micro_batch=fp.get("micro_batch"), allow_different_weights=allow_different_weights)
    pairs = [(e["item"], e["variant"] % bundle.variants) for e in fp["entries"]]
    images = regenerate_pairs(pipe, pairs)
    same = [image_sha256(img) == e["sha256"] for img, e in zip(images, fp["entries"])]
    ref = bundle.payloads[fp["payload"]]["thumbnails"].float() if fp.get("payload") else None
    max_diff = float((thumbnail(images) - ref).abs().max()) if ref is not None and ref.shape[0] == len(pairs) else float("nan")
    tol = float(tolerance if tolerance is not None else fp.get("tolerance", DEFAULT_TOLERANCE))
    bitwise = all(same)
    passed = bitwise or (max_diff == max_diff and max_diff <= tol)
    return {"passed": passed, "bitwise": bitwise, "max_diff": 0.0 if bitwise else max_diff, "tolerance": tol,
            "checked": len(pairs), "matching_digests": sum(same)}
