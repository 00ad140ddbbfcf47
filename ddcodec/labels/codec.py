"""Soft-label codec: top-k probabilities per (item, variant), quantised, stored in a payload."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import DDCodecError

QUANT = ("int8", "fp16")


def encode_soft_labels(probs: torch.Tensor, k: int, quant: str = "int8", temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Keep the top-k of (items, variants, classes) probabilities; return payload tensors and the codec record."""
    if probs.dim() != 3:
        raise DDCodecError("soft labels must be shaped (items, variants, classes)")
    if quant not in QUANT:
        raise DDCodecError(f"unknown soft-label quantisation {quant!r}", "use int8 or fp16")
    n, v, c = probs.shape
    k = max(1, min(int(k), c))
    vals, idx = probs.float().topk(k, dim=-1)
    index_dtype = torch.uint8 if c <= 256 else torch.int16 if c <= 32767 else torch.int32
    tensors = {"topk_index": idx.to(index_dtype)}
    if quant == "int8":
        tensors["topk_value"] = (vals.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        tensors["topk_value"] = vals.to(torch.float16)
    codec = {"name": "topk", "k": k, "quant": quant, "temperature": float(temperature), "classes": c, "variants": v}
    return tensors, codec


FLOOR = {"int8": 3e-5, "fp16": 1e-7}  # decoded floor of a class whose probability was not kept (or rounded to 0)


def decode_soft_labels(tensors: dict[str, torch.Tensor], codec: dict[str, Any], ids: torch.Tensor, variant: int) -> torch.Tensor:
    """Dense (B, classes) probabilities for items `ids` at `variant`.

    The mass the kept values leave is spread evenly over the unknown classes: those outside the top-k and
    those whose value quantised to 0. Each unknown class gets at least FLOOR[quant] (int8 rounds anything
    below 1/510 to 0, and the kept values can sum past 1), so no class decodes to exactly 0.
    """
    c = int(codec["classes"])
    v = variant % int(codec["variants"])
    idx = tensors["topk_index"][ids, v].long()
    val = tensors["topk_value"][ids, v].float()
    if codec["quant"] == "int8":
        val = val / 255.0
    known = torch.zeros(len(ids), c, dtype=torch.bool).scatter_(1, idx, val > 0)
    out = torch.zeros(len(ids), c).scatter_(1, idx, val)
    unknown = (c - known.sum(-1, keepdim=True)).clamp(min=1)
    rest = (1.0 - out.sum(-1, keepdim=True)).clamp(min=0)
    fill = (rest / unknown).clamp(min=FLOOR.get(codec["quant"], 1e-7))
    out = torch.where(known, out, fill)
    return out / out.sum(-1, keepdim=True)


def one_hot(class_ids: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Hard labels as probability vectors."""
    return torch.nn.functional.one_hot(class_ids.long(), num_classes).float()
