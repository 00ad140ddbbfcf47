"""Diffusion-augmented coreset expansion (Abbasi et al.): RDED-style lowest-loss patches stored at H/r x W/r,
each regenerated per epoch by upsample, VAE-encode, latent mixup, seeded noise at rho, few-step denoise, decode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from ..bundle import Bundle, new_manifest, write_bundle
from ..data import load_source, readable_names
from ..errors import DDCodecError
from ..generators.prior import check_prior_classes, load_prior
from ..labels import softlabels
from ..parallel import is_main
from .checkpoint import WorkDir
from .common import (check_class_sizes, class_indices, default_prompts, encode_device, generator_record, image_size,
                     option, work_params)
from .patch_selection import SelectionConfig, select_patches

DEFAULTS: dict[str, Any] = {
    "factor": 2, "candidates": 300, "num_crops": 5, "crop_scale": (0.08, 1.0),  # RDED's selection defaults
    "rho": 0.8, "steps": 5, "guidance_scale": 1.0,  # paper: rho 0.8 (best ablation), SDXL-Turbo 5 steps, no CFG
    "mixup": 1.0, "gamma_min": 0.5,  # latent mixup with a same-class partner on every variant, gamma ~ U[0.5, 1)
    "variants": 50,  # paper: m = student epochs (300); 50 keeps a CPU encode to minutes
}


def add_selection_arguments(group: Any) -> None:
    """Patch-selection options shared by dace and rded (default None)."""
    group.add_argument("--factor", type=int, default=None, help="dace/rded: patch factor r, patches are H/r x W/r (default 2)")
    group.add_argument("--candidates", type=int, default=None,
                       help="real images per class considered (d4m: all; dace/rded: 300)")
    group.add_argument("--num-crops", type=int, default=None, help="dace/rded: random crops scored per image (default 5)")
    group.add_argument("--crop-scale", type=float, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="dace/rded: crop area range as a fraction of the image (default 0.08 1)")


def add_arguments(group: Any) -> None:
    """DACE options (default None: the method's defaults apply)."""
    add_selection_arguments(group)
    group.add_argument("--rho", type=float, default=None, help="dace: noise level t'/T (0.4 super-resolves, 0.8 varies; default 0.8)")
    group.add_argument("--steps", type=int, default=None, help="scheduler steps (d4m 25, dace 5)")
    group.add_argument("--guidance-scale", type=float, default=None,
                       help="classifier-free guidance (d4m: 8 for text priors, 4 for class priors; dace 1)")
    group.add_argument("--mixup", type=float, default=None, help="dace: probability a variant is mixed with a same-class partner (default 1)")
    group.add_argument("--gamma-min", type=float, default=None, help="dace: mixup weight of the item, gamma ~ U[gamma_min, 1) (default 0.5)")
    softlabels.add_arguments(group)


@dataclass
class PatchJob:
    """What dace and rded share: the source, its classes, the selection config, labels and the teacher."""

    source: Any
    raw: list[str]
    names: list[str]
    per_class: list[list[int]]
    cfg: SelectionConfig
    keep: int
    size: tuple[int, int]
    labels: softlabels.LabelOptions
    teacher: Any
    device: torch.device

    def params(self, args: Any) -> dict[str, Any]:
        return {"ipc": int(args.ipc), "data": str(args.data), "split": args.split, **self.cfg.record(),
                "patches_per_class": self.keep, "patch_size": [self.size[0] // self.cfg.factor, self.size[1] // self.cfg.factor],
                "selection_teacher": self.labels.teacher, **self.labels.record()}


def prepare(args: Any, variants: int) -> PatchJob:
    """Parse and check the shared options, load the data and the teacher; every bad argument fails here."""
    ipc = int(args.ipc)
    if ipc < 1:
        raise DDCodecError(f"--ipc must be at least 1, not {ipc}")
    cfg = SelectionConfig(factor=int(option(args, "factor", DEFAULTS["factor"])),
                          candidates=int(option(args, "candidates", DEFAULTS["candidates"])),
                          num_crops=int(option(args, "num_crops", DEFAULTS["num_crops"])),
                          scale=tuple(float(s) for s in option(args, "crop_scale", DEFAULTS["crop_scale"])))
    if cfg.factor < 1 or cfg.num_crops < 1:
        raise DDCodecError("--factor and --num-crops must be at least 1")
    if not 0 < cfg.scale[0] <= cfg.scale[1] <= 1:
        raise DDCodecError(f"--crop-scale {cfg.scale[0]} {cfg.scale[1]} is not a range within (0, 1]")
    keep = ipc * cfg.factor ** 2
    if cfg.candidates < keep:
        raise DDCodecError(f"--ipc {ipc} at --factor {cfg.factor} keeps {keep} patches per class, one per image, "
                           f"but --candidates is {cfg.candidates}", f"use --candidates {keep} or more")
    source = load_source(args.data, args.split)
    raw = list(source.classes)
    names = readable_names(raw)
    per_class = class_indices(source)
    check_class_sizes(per_class, keep, names, f"--ipc {ipc} at --factor {cfg.factor} (one patch per image)",
                      "lower --ipc or --factor")
    size = image_size(source, per_class[0], args.image_size)
    if size[0] // cfg.factor < 1 or size[1] // cfg.factor < 1:
        raise DDCodecError(f"--factor {cfg.factor} leaves no pixels of a {size[0]}x{size[1]} image")
    labels = softlabels.label_options(args, variants)
    labels = replace(labels, teacher=softlabels.resolve_teacher(labels.teacher, raw))
    device = encode_device(args)
    teacher = softlabels.open_teacher(labels.teacher, device)
    return PatchJob(source, raw, names, per_class, cfg, keep, size, labels, teacher, device)


def run(args: Any) -> Bundle | None:
    """`ddcodec encode --method dace`."""
    job = prepare(args, DEFAULTS["variants"])
    prior = load_prior(args.generator, num_classes=len(job.names))
    check_prior_classes(prior, job.names)
    gen_params = {"rho": float(option(args, "rho", DEFAULTS["rho"])), "steps": int(option(args, "steps", DEFAULTS["steps"])),
                  "guidance_scale": float(option(args, "guidance_scale", DEFAULTS["guidance_scale"])),
                  "negative_prompt": option(args, "negative_prompt", None),
                  "mixup": float(option(args, "mixup", DEFAULTS["mixup"])),
                  "gamma_min": float(option(args, "gamma_min", DEFAULTS["gamma_min"]))}
    if not 0 <= gen_params["rho"] <= 1 or gen_params["steps"] < 1:
        raise DDCodecError("--rho must be in [0, 1] and --steps at least 1")
    if not 0 <= gen_params["mixup"] <= 1 or not 0 <= gen_params["gamma_min"] <= 1:
        raise DDCodecError("--mixup and --gamma-min must be in [0, 1]")
    params = job.params(args)
    work = WorkDir(args.out, work_params(args, prior, **params, **gen_params, device=str(job.device)), discard_stale=args.overwrite)
    units = select_patches(job.source, job.per_class, job.keep, job.size, job.teacher, int(args.seed), job.cfg, work, job.device)
    params["source_indices"] = torch.cat([u["source_index"] for u in units]).tolist()
    manifest = new_manifest(method="dace", params=params, seed=int(args.seed), class_names=job.names,
                            prompts=default_prompts(job.names), image_size=job.size, variants=job.labels.variants,
                            generator=generator_record(prior, "dace", gen_params, micro_batch=args.micro_batch))
    payloads = {"items": {"class_ids": torch.arange(len(job.names)).repeat_interleave(job.keep),
                          "pixels": torch.cat([u["pixels"] for u in units]).contiguous()}}
    manifest, payloads = softlabels.attach_labels(manifest, payloads, job.labels, job.teacher, prior, work, job.device)
    if not is_main():
        return None
    bundle = write_bundle(args.out, manifest, payloads, overwrite=args.overwrite, prior=prior)
    work.done()
    return bundle
