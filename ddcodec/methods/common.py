"""Shared producer steps: picking items, resizing, VAE-encoding, and the generator record."""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F

from ..errors import DDCodecError
from ..generators.prior import LatentPrior


def class_indices(source: Any) -> list[list[int]]:
    """Indices of each class's images, in source order."""
    targets = getattr(source, "targets", None) or [source[i][1] for i in range(len(source))]
    per = [[] for _ in source.classes]
    for i, t in enumerate(targets):
        per[int(t)].append(i)
    return per


def pick_random(per_class: list[list[int]], ipc: int, seed: int, class_names: list[str]) -> list[int]:
    """IPC indices per class, drawn with a seeded generator; class-major order."""
    g = torch.Generator().manual_seed(seed)
    picked = []
    for c, idx in enumerate(per_class):
        if ipc > len(idx):
            raise DDCodecError(f"--ipc {ipc} is larger than class '{class_names[c]}' ({len(idx)} images)",
                               f"use --ipc {len(idx)} or less")
        picked.extend(idx[j] for j in torch.randperm(len(idx), generator=g)[:ipc].tolist())
    return picked


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (B,3,h,w) to float (B,3,H,W) in [0,1]."""
    x = images.float() / 255.0
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    return x


def load_images(source: Any, indices: Iterable[int], size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected images resized to `size` (float [0,1]) and their labels."""
    imgs, labels = [], []
    for i in indices:
        img, label = source[i]
        imgs.append(resize(img[None], size)[0])
        labels.append(label)
    return torch.stack(imgs), torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def encode_latents(prior: LatentPrior, images: torch.Tensor, batch_size: int = 64, desc: str = "VAE-encoding",
                   split_ranks: bool = True) -> torch.Tensor:
    """Scaled VAE latent means of images in [0,1], in fixed padded chunks split across ranks.

    Fixed chunk shapes make each latent independent of the rank split, so a parallel encode
    produces the same bytes as a single-process one. split_ranks=False encodes every chunk here
    (for callers that already run inside one rank's share of the work).
    """
    from ..generators.pipelines import cpu_deterministic
    from ..parallel import map_chunks
    n = len(images)

    def chunk(k: int) -> torch.Tensor:
        x = images[k * batch_size:(k + 1) * batch_size]
        if len(x) < batch_size:
            x = torch.cat([x, x[-1:].expand(batch_size - len(x), *x.shape[1:])])
        with cpu_deterministic(next(prior.vae.parameters()).device):
            return prior.encode(x.contiguous()).float()

    count = -(-n // batch_size)
    out = map_chunks(chunk, count, desc=desc) if split_ranks else [chunk(k) for k in range(count)]
    return torch.cat(out)[:n]


def generator_record(prior: LatentPrior, pipeline: str, params: dict[str, Any], dtype: str = "float32",
                     micro_batch: int = 16) -> dict[str, Any]:
    """The manifest's generator section for this prior and recipe."""
    return {
        "pipeline": pipeline,
        "model": {"source": prior.source, "revision": prior.revision, "kind": prior.kind,
                  "components": prior.component_hashes()},
        "scheduler": prior.scheduler_spec(),
        "dtype": dtype,
        "micro_batch": int(micro_batch),
        "params": params,
    }


def default_prompts(class_names: list[str]) -> list[str]:
    return [f"a photo of a {n}" for n in class_names]


# shared by the d4m, dace and rded producers ---------------------------------------------------
def option(args: Any, name: str, default: Any) -> Any:
    """A method option from argparse, or the method's default when unset (options default to None)."""
    value = getattr(args, name, None)
    return default if value is None else value


def image_size(source: Any, indices: list[int], size: int | None) -> tuple[int, int]:
    """The bundle's (H, W): --image-size if given, else the first selected image's."""
    if size:
        return (int(size), int(size))
    return tuple(int(s) for s in source[indices[0]][0].shape[-2:])


def check_class_sizes(per_class: list[list[int]], need: int, class_names: list[str], what: str, fix: str) -> None:
    """Fail with one line when some class has fewer than `need` images."""
    for c, idx in enumerate(per_class):
        if need > len(idx):
            raise DDCodecError(f"{what} needs {need} images of class '{class_names[c]}' but it has {len(idx)}", fix)


def seeded_subset(indices: list[int], count: int | None, seed: int) -> list[int]:
    """`count` of `indices` drawn with a seeded permutation (all of them, in order, when count is None or larger)."""
    if count is None or count >= len(indices):
        return list(indices)
    g = torch.Generator().manual_seed(seed)
    return [indices[j] for j in torch.randperm(len(indices), generator=g)[:count].tolist()]


def work_params(args: Any, prior: LatentPrior | None, **method: Any) -> dict[str, Any]:
    """Everything that determines an encode's intermediate results: the resume key of its WorkDir."""
    common = {k: getattr(args, k, None) for k in ("method", "data", "split", "ipc", "seed", "generator", "image_size",
                                                   "micro_batch")}
    return {**common, "prior": prior.component_hashes() if prior is not None else None, **method}


def batched(seq: list[int], size: int) -> Iterable[list[int]]:
    """Consecutive chunks of `seq` of at most `size`."""
    for s in range(0, len(seq), size):
        yield seq[s:s + size]


UnitSpec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def pack_unit(unit: dict[str, torch.Tensor], spec: UnitSpec) -> torch.Tensor:
    """A unit's tensors as one flat uint8 tensor, keys in sorted order (so ranks can all-gather it)."""
    parts = []
    for key in sorted(spec):
        shape, dtype = spec[key]
        t = unit[key].to(dtype).contiguous()
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"unit tensor {key} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        parts.append(t.reshape(-1).view(torch.uint8))
    return torch.cat(parts)


def unpack_unit(flat: torch.Tensor, spec: UnitSpec) -> dict[str, torch.Tensor]:
    """The inverse of pack_unit."""
    out, offset = {}, 0
    for key in sorted(spec):
        shape, dtype = spec[key]
        n = dtype.itemsize
        for d in shape:
            n *= d
        out[key] = flat[offset:offset + n].clone().view(dtype).reshape(shape)
        offset += n
    return out


def map_units(work: Any, names: list[str], compute: Any, spec: UnitSpec | Any, desc: str) -> list[dict[str, torch.Tensor]]:
    """Resumable work units, split across torchrun ranks: unit k is read from `work` or computed and saved by
    the rank that owns it; every rank gets every unit. `spec` (or spec(k)) gives each unit's shapes and dtypes."""
    from ..parallel import map_chunks
    spec_of = spec if callable(spec) else (lambda k: spec)

    def one(k: int) -> torch.Tensor:
        unit = work.get(names[k]) if work is not None else None
        if unit is None:
            unit = compute(k)
            if work is not None:
                work.put(names[k], unit)
        return pack_unit(unit, spec_of(k))

    return [unpack_unit(flat, spec_of(k)) for k, flat in enumerate(map_chunks(one, len(names), desc=desc))]


def encode_device(args: Any) -> torch.device:
    """--device (default cpu); a bare 'cuda' means this rank's GPU under torchrun."""
    import os
    name = option(args, "device", "cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)
