"""LD3M regeneration (Moser et al.): learned latent codes Z and conditioning c through a T-step reverse process
with the residual of eq. 12, seeded per (item, variant) so the distilled codes regenerate bitwise.

One DDIM step (eta > 0 draws the paper's sigma_t * eps_t) from z_k at timestep t_k, k = T..1:

    eps    = f_theta(c, z_k, t_k)                                   (classifier-free guided when scale > 1)
    x0     = (z_k - sqrt(1 - a_k) * eps) / sqrt(a_k)                 the denoiser's clean-latent estimate
    x0'    = (1 - k/T) * x0 + (k/T) * Z                             eq. 12's residual, in x0 space
    z_k-1  = sqrt(a_prev) * x0' + sqrt(1 - a_prev - s^2) * eps + s * eps_k

with z_T = sqrt(a_T) * Z + sqrt(1 - a_T) * eps_T (q(z_T | Z)). The residual is applied to the predicted x0
inside the DDIM step, as in the official code; its anchor is Z, the clean code z_T was noised from, since x0'
lives in clean-latent space. Every denoiser call (and the VAE decode) can be checkpointed, so the same
function runs differentiably during distillation and without gradients in DistilledDataset.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor
from torch.utils.checkpoint import checkpoint

from ..errors import GeneratorError
from .loading import scheduler_from_spec
from .pipelines import RegenerationPipeline, _cast, _cat, cpu_deterministic, item_generators, register_pipeline


class _Round(torch.autograd.Function):
    """Round to a storage dtype in the forward pass, pass the gradient straight through."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # noqa: D102
        return x.to(dtype).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # noqa: D102
        return grad, None


def round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x rounded to `dtype` (values exactly as stored), differentiable with a straight-through gradient."""
    return x if x.dtype == dtype else _Round.apply(x, dtype)


def ddim_schedule(spec: dict[str, Any], steps: int) -> tuple[list[int], list[float], list[float]]:
    """(timesteps t_T..t_1, alpha-bar at each, alpha-bar after each step) for `steps` steps of the bundle's scheduler."""
    sched = scheduler_from_spec(spec)
    if not hasattr(sched, "alphas_cumprod"):
        raise GeneratorError(f"scheduler {type(sched).__name__} has no alphas_cumprod", "use a DDIM/DDPM-family scheduler")
    num_train = int(sched.config.num_train_timesteps)
    if not 1 <= steps <= num_train:
        raise GeneratorError(f"ld3m needs 1 to {num_train} steps, not {steps}")
    sched.set_timesteps(steps)
    ts = [int(t) for t in sched.timesteps]
    ac = sched.alphas_cumprod.double()
    final = float(getattr(sched, "final_alpha_cumprod", ac[0]))
    alphas = [float(ac[t]) for t in ts]
    prev = [float(ac[t]) for t in ts[1:]] + [final]
    return ts, alphas, prev


@register_pipeline("ld3m")
class LD3MPipeline(RegenerationPipeline):
    """Items: `latents` Z (the learned start code), `cond` c (learned context tokens), `class_ids`.

    Params: steps (T), eta (DDIM noise; 1 draws the full sigma_t), guidance_scale, code_dtype.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.steps = int(self.params.get("steps", 10))
        self.eta = float(self.params.get("eta", 1.0))
        self.guidance = float(self.params.get("guidance_scale", 1.0))
        self.timesteps, self.alphas, self.alphas_prev = ddim_schedule(self.spec["scheduler"], self.steps)
        self.prediction = str(self.spec["scheduler"].get("config", {}).get("prediction_type", "epsilon"))

    def generate(self, ids: list[int], variant: int) -> torch.Tensor:
        z = self.rows("latents", ids).to(self.device, self.dtype)
        c = self.rows("cond", ids).to(self.device, self.dtype)
        return self.forward(z, c, self.class_ids(ids), ids, variant, grad=False)

    # the reverse process, shared by regeneration and distillation ---------------------------
    def forward(self, z: torch.Tensor, c: torch.Tensor, class_ids: torch.Tensor, ids: list[int], variant: int,
                grad: bool = True) -> torch.Tensor:
        """Images (B,3,H,W) in [0,1] for codes (z, c) of exactly one micro-batch; `grad` checkpoints each call."""
        gens = item_generators(self.seed, ids, variant)
        T = self.steps
        kwargs = self.cond_kwargs(class_ids, c)
        uncond = None
        if self.guidance > 1.0:
            uncond = _cast(self.prior.conditioner.null_condition(len(ids), None, **self.size_kwargs()), self.dtype)
        z0 = z.float()
        noise = randn_tensor(z0.shape, generator=gens, device=self.device, dtype=torch.float32)
        a_T = self.alphas[0]
        latents = a_T ** 0.5 * z0 + (1 - a_T) ** 0.5 * noise
        for i, t in enumerate(self.timesteps):
            k = T - i
            a, a_prev = self.alphas[i], self.alphas_prev[i]
            out = self._call(latents, t, kwargs, uncond, grad)
            x0, eps = self.split_prediction(out, latents, a)
            w = k / T
            x0 = (1 - w) * x0 + w * z0
            sigma = self.eta * ((1 - a_prev) / (1 - a)) ** 0.5 * (1 - a / a_prev) ** 0.5
            latents = a_prev ** 0.5 * x0 + max(1 - a_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if sigma > 0:
                latents = latents + sigma * randn_tensor(z0.shape, generator=gens, device=self.device, dtype=torch.float32)
        if grad and torch.is_grad_enabled():
            return checkpoint(self.decode_images, latents.to(self.dtype), use_reentrant=False, preserve_rng_state=False)
        return self.decode_images(latents.to(self.dtype))

    def forward_batched(self, z: torch.Tensor, c: torch.Tensor, ids: list[int], variant: int,
                        grad: bool = True) -> torch.Tensor:
        """forward() over any number of items in the pipeline's fixed, padded micro-batches (as __call__ runs)."""
        out = []
        class_ids = self.items["class_ids"].to(self.device)
        with cpu_deterministic(self.device):
            for s in range(0, len(ids), self.micro_batch):
                rows = list(range(s, min(s + self.micro_batch, len(ids))))
                rows += [rows[-1]] * (self.micro_batch - len(rows))
                chunk = [ids[r] for r in rows]
                images = self.forward(z[rows], c[rows], class_ids[chunk], chunk, variant, grad=grad)
                out.append(images[:min(self.micro_batch, len(ids) - s)])
        return torch.cat(out)

    def cond_kwargs(self, class_ids: torch.Tensor, c: torch.Tensor) -> dict[str, Any]:
        """Denoiser kwargs for these classes with the context tokens replaced by c."""
        kwargs = self.prior.conditioner.condition(class_ids, [self.prompts[i] for i in class_ids.tolist()],
                                                  **self.size_kwargs())
        kwargs = _cast(kwargs, self.dtype)
        kwargs["encoder_hidden_states"] = c.to(self.dtype)
        return kwargs

    def _call(self, latents: torch.Tensor, t: int, cond: dict[str, Any], uncond: dict[str, Any] | None,
              grad: bool) -> torch.Tensor:
        """One (guided) denoiser prediction, checkpointed when gradients flow."""
        if grad and torch.is_grad_enabled():
            return checkpoint(self._predict, latents, t, cond, uncond, use_reentrant=False, preserve_rng_state=False)
        return self._predict(latents, t, cond, uncond)

    def _predict(self, latents: torch.Tensor, t: int, cond: dict[str, Any], uncond: dict[str, Any] | None) -> torch.Tensor:
        with cpu_deterministic(self.device):  # also when checkpointing recomputes it inside backward()
            return self._predict_eps(latents, t, cond, uncond)

    def _predict_eps(self, latents: torch.Tensor, t: int, cond: dict[str, Any], uncond: dict[str, Any] | None) -> torch.Tensor:
        x = latents.to(self.dtype)
        tt = torch.tensor(t, device=self.device)
        if uncond is None:
            return self.run_denoiser(x, tt, cond).float()
        both = {k: _cat(uncond[k], v) for k, v in cond.items()}
        e_u, e_c = self.run_denoiser(torch.cat([x, x]), tt, both).float().chunk(2)
        return e_u + self.guidance * (e_c - e_u)

    def split_prediction(self, out: torch.Tensor, latents: torch.Tensor, a: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) from the denoiser output for its prediction type."""
        if self.prediction == "epsilon":
            return (latents - (1 - a) ** 0.5 * out) / a ** 0.5, out
        if self.prediction == "v_prediction":
            return a ** 0.5 * latents - (1 - a) ** 0.5 * out, a ** 0.5 * out + (1 - a) ** 0.5 * latents
        if self.prediction == "sample":
            return out, (latents - a ** 0.5 * out) / (1 - a) ** 0.5
        raise GeneratorError(f"unknown prediction_type {self.prediction!r}")

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Differentiable VAE decode to [0,1] at the bundle's image size (same ops as LatentPrior.decode)."""
        with cpu_deterministic(self.device):
            return self._decode(latents)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        with self.prior.vae_precision() as dtype:
            x = self.prior.vae.decode((latents.to(dtype) / self.prior.scaling_factor).contiguous()).sample
        x = ((x.float() + 1) / 2).clamp(0, 1)
        if tuple(x.shape[-2:]) != self.image_size:
            x = torch.nn.functional.interpolate(x, size=self.image_size, mode="bilinear", antialias=True,
                                                align_corners=False).clamp(0, 1)
        return x
