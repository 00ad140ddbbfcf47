"""`ddcodec prior eval`: what a classifier still sees in a prior's reconstructions, img2img outputs and samples."""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm import tqdm

from ..generators.pipelines import Img2ImgPipeline
from ..generators.prior import LatentPrior
from ..labels.softlabels import teacher_logits
from .data import ImageSet
from .train import psnr


def img2img(prior: LatentPrior, items: dict[str, torch.Tensor], num_classes: int, image_size: int, strength: float,
            steps: int, guidance: float, seed: int, micro_batch: int) -> Img2ImgPipeline:
    """The regeneration pipeline bundles use, on ad-hoc items ('pixels' for img2img, only 'class_ids' for sampling)."""
    spec = {"scheduler": prior.scheduler_spec(), "dtype": "float32", "micro_batch": micro_batch,
            "params": {"strength": strength, "steps": steps, "guidance_scale": guidance}}
    prompts = [f"class {c}" for c in range(num_classes)]
    return Img2ImgPipeline(prior, spec, items, prompts, seed, (image_size, image_size), micro_batch=micro_batch)


def run(pipe: Img2ImgPipeline, n: int, desc: str, progress: bool, chunk: int = 200) -> torch.Tensor:
    """All n items' images, in chunks with a progress bar."""
    out = []
    for s in tqdm(range(0, n, chunk), desc=desc, unit="chunk", disable=not progress, leave=False):
        out.append(pipe(list(range(s, min(n, s + chunk))), 0).cpu())
    return torch.cat(out)


@torch.no_grad()
def accuracy(teacher: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Top-1 accuracy of `teacher` on [0,1] images (resized to its input size when it has one)."""
    correct = 0
    for s in range(0, len(images), batch):
        correct += (teacher_logits(teacher, images[s:s + batch]).argmax(1) == labels[s:s + batch]).sum().item()
    return correct / max(1, len(images))


def evaluate(prior: LatentPrior, data: ImageSet, teacher: torch.nn.Module, rho: float = 0.5, steps: int = 10,
             guidance: tuple[float, ...] = (3.0,), img2img_guidance: float = 1.0, samples_per_class: int = 100, seed: int = 0,
             micro_batch: int = 50, progress: bool = True) -> dict[str, Any]:
    """Teacher accuracy on originals, VAE reconstructions, img2img at `rho`, and pure class-conditional samples."""
    size = int(data.images.shape[-1])
    k = len(data.classes)
    real = data.images.float() / 255
    items = {"class_ids": data.labels, "pixels": data.images}
    t0, res = time.time(), {}
    rec = run(img2img(prior, items, k, size, 0.0, steps, 1.0, seed, micro_batch), len(data), "reconstructing", progress)
    res["vae_psnr_db"] = round(psnr(rec, real), 2)
    res["acc_original"] = accuracy(teacher, real, data.labels)
    res["acc_reconstruction"] = accuracy(teacher, rec, data.labels)
    res["seconds_reconstruction"] = round(time.time() - t0, 1)
    t0 = time.time()
    regen = run(img2img(prior, items, k, size, rho, steps, img2img_guidance, seed, micro_batch), len(data),
                f"img2img rho={rho}", progress)
    res["acc_img2img"] = accuracy(teacher, regen, data.labels)
    res["seconds_img2img"] = round(time.time() - t0, 1)
    res["img2img_psnr_db"] = round(psnr(regen, real), 2)
    if samples_per_class > 0:
        ids = torch.arange(k).repeat_interleave(samples_per_class)
        res["acc_samples"] = {}
        for g in guidance:
            t0 = time.time()
            samples = run(img2img(prior, {"class_ids": ids}, k, size, 1.0, steps, g, seed + 1, micro_batch),
                          len(ids), f"sampling (guidance {g})", progress)
            res["acc_samples"][str(g)] = accuracy(teacher, samples, ids)
            res[f"seconds_samples_{g}"] = round(time.time() - t0, 1)
    res.update({"n_images": len(data), "image_size": size, "samples_per_class": samples_per_class, "rho": rho, "steps": steps,
                "guidance_samples": list(guidance), "guidance_img2img": img2img_guidance, "seed": seed})
    return res
