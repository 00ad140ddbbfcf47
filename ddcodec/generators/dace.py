"""Patch pipelines: DACE (upsample, VAE-encode, latent mixup, seeded noise at rho, few-step denoise, decode)
and `patches` (RDED: stored pixels, upsampled, no model at all).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pipelines import RegenerationPipeline, item_generators, register_pipeline
from .prior import LatentPrior, register_builtin

NULL_PRIOR = "builtin:none"


def null_prior(num_classes: int | None = None, **_: Any) -> LatentPrior:
    """A prior with no weights, for pipelines that run no model (`patches`): nothing to download or verify."""
    return LatentPrior(vae=nn.Identity(), unet=nn.Identity(), scheduler=None, conditioner=None,
                       source=NULL_PRIOR, kind="none")


register_builtin(NULL_PRIOR, null_prior)


def null_generator_record(micro_batch: int, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest generator section of a `patches` bundle: no model, no scheduler."""
    return {"pipeline": "patches",
            "model": {"source": NULL_PRIOR, "revision": None, "kind": "none", "components": null_prior().component_hashes()},
            "scheduler": {}, "dtype": "float32", "micro_batch": int(micro_batch), "params": dict(params or {})}


@register_pipeline("patches")
class PatchesPipeline(RegenerationPipeline):
    """Stored uint8 `pixels`, resized (bicubic) to the bundle's image size when they differ; no diffusion."""

    def generate(self, ids: list[int], variant: int) -> torch.Tensor:
        return self.upsample(self.rows("pixels", ids)).float()


@register_pipeline("dace")
class DacePipeline(RegenerationPipeline):
    """Diffusion-augmented coreset expansion (Abbasi et al.): one stored low-res patch per item.

    Per (item, variant): upsample the patch and VAE-encode it; mix its latent with a seeded same-class
    partner's (z = gamma*z1 + (1-gamma)*z2, paper Sec. 3.3, before the LDM); add seeded noise at
    rho = t'/T; denoise in `steps` scheduler steps; decode. Params: rho, steps, guidance_scale,
    negative_prompt, mixup (probability that a variant is mixed), gamma_min (gamma ~ U[gamma_min, 1)).
    """

    streamable = False  # the mixup partner may sit in another shard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        class_ids = self.items["class_ids"].tolist()
        self.members: dict[int, list[int]] = {}
        for i, c in enumerate(class_ids):
            self.members.setdefault(int(c), []).append(i)

    def mixup_draws(self, ids: list[int], variant: int) -> tuple[list[int], torch.Tensor]:
        """(partner ids, gammas) for each item at this variant; a pure function of (seed, item, variant)."""
        prob = float(self.params.get("mixup", 1.0))
        gamma_min = float(self.params.get("gamma_min", 0.5))
        class_ids = self.items["class_ids"]
        partners, gammas = [], []
        for i, g in zip(ids, item_generators(self.seed, ids, variant, stream="mixup")):
            others = self.members[int(class_ids[i])]
            u = torch.rand(2, generator=g, dtype=torch.float64)
            k = int(torch.randint(max(len(others) - 1, 1), (1,), generator=g))
            if len(others) < 2 or float(u[0]) >= prob:
                partners.append(i)
                gammas.append(1.0)
                continue
            rest = [j for j in others if j != i]
            partners.append(rest[k])
            gammas.append(gamma_min + (1.0 - gamma_min) * float(u[1]))
        return partners, torch.tensor(gammas, dtype=torch.float32)

    def generate(self, ids: list[int], variant: int) -> torch.Tensor:
        z = self.start_latents(ids)
        partners, gammas = self.mixup_draws(ids, variant)
        if any(p != i for p, i in zip(partners, ids)):
            zp = self.start_latents(partners)
            g = gammas.to(self.device).view(-1, 1, 1, 1)
            z = (g * z.float() + (1 - g) * zp.float()).to(self.dtype)
        return self.decode(self.denoise(z, ids, variant, float(self.params.get("rho", 0.8))))
