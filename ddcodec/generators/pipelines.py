"""Regeneration pipelines: pure functions from (item ids, variant) to images, run in fixed micro-batches.

Every pipeline runs the denoiser on micro-batches of one fixed size, padding the last one, and on
CPU with oneDNN (mkldnn) off, whose convolutions change with the thread count. A row's result then
depends neither on which other items share its batch nor on the threads, so an image is bitwise the
same whatever the loader's batch size, worker count or world size.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from ..bundle.manifest import derive_seed
from ..errors import GeneratorError
from .loading import scheduler_from_spec
from .prior import DTYPES, LatentPrior, load_prior

PIPELINES: dict[str, type["RegenerationPipeline"]] = {}


def register_pipeline(name: str) -> Callable[[type], type]:
    """Class decorator: make a pipeline available to bundles whose generator.pipeline is `name`."""
    def deco(cls: type) -> type:
        PIPELINES[name] = cls
        cls.name = name
        return cls
    return deco


def image_sha256(image: torch.Tensor) -> str:
    """sha256 of an image's float32 bytes (C-contiguous, little-endian)."""
    return hashlib.sha256(image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()


@contextlib.contextmanager
def cpu_deterministic(device: torch.device | str):
    """On CPU, turn oneDNN off so results do not depend on the thread count; elsewhere a no-op."""
    if torch.device(device).type != "cpu":
        yield
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TF32 acceleration.*")  # emitted by flags() itself
        flags = torch.backends.mkldnn.flags(enabled=False)
        flags.__enter__()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TF32 acceleration.*")
            flags.__exit__(None, None, None)


def item_generators(seed: int, ids: list[int], variant: int, stream: str = "noise") -> list[torch.Generator]:
    """One seeded CPU generator per item, so noise is identical on every machine."""
    return [torch.Generator("cpu").manual_seed(derive_seed(seed, i, variant, stream)) for i in ids]


class RegenerationPipeline:
    """Base class: holds the prior, the bundle's item tensors and the generation parameters."""

    name = "base"
    streamable = True  # an item's image needs only its own rows, so a reader of some shards can regenerate it

    def __init__(self, prior: LatentPrior, spec: dict[str, Any], items: dict[str, torch.Tensor],
                 prompts: list[str], seed: int, image_size: tuple[int, int], device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None, micro_batch: int | None = None,
                 item_ids: list[int] | None = None) -> None:
        self.prior = prior
        self.spec = spec
        self.params = dict(spec.get("params", {}))
        self.items = items
        # global item id -> row of `items`, when `items` holds only some items' rows (a shard stream)
        self.row_of = None if item_ids is None else {int(i): r for r, i in enumerate(item_ids)}
        self.prompts = prompts
        self.seed = seed
        self.image_size = tuple(image_size)
        self.device = torch.device(device)
        self.dtype = dtype or DTYPES[spec.get("dtype", "float32")]
        self.micro_batch = int(micro_batch or spec.get("micro_batch", 16))
        prior.to(self.device, self.dtype)

    @torch.no_grad()
    def __call__(self, item_ids: torch.Tensor | list[int], variant: int) -> torch.Tensor:
        """Images (B, 3, H, W), float32 in [0, 1], on the pipeline's device."""
        ids = [int(i) for i in item_ids]
        out = []
        with cpu_deterministic(self.device):
            for start in range(0, len(ids), self.micro_batch):
                chunk = ids[start:start + self.micro_batch]
                padded = chunk + [chunk[-1]] * (self.micro_batch - len(chunk))
                out.append(self.generate(padded, variant)[:len(chunk)])
        if not out:
            return torch.empty(0, 3, *self.image_size, device=self.device)
        return torch.cat(out)

    def generate(self, ids: list[int], variant: int) -> torch.Tensor:
        """Images for exactly one micro-batch."""
        raise NotImplementedError

    # shared steps -------------------------------------------------------------------------
    def rows(self, key: str, ids: list[int]) -> torch.Tensor:
        """The `key` rows of items `ids` (global item ids)."""
        return self.items[key][ids if self.row_of is None else [self.row_of[i] for i in ids]]

    def class_ids(self, ids: list[int]) -> torch.Tensor:
        return self.rows("class_ids", ids).to(self.device)

    def condition(self, ids: list[int]) -> dict[str, torch.Tensor]:
        """Denoiser kwargs: a per-item 'cond' tensor when the bundle has one, else the class's."""
        class_ids = self.class_ids(ids)
        kwargs = self.prior.conditioner.condition(class_ids, [self.prompts[c] for c in class_ids.tolist()],
                                                  **self.size_kwargs())
        if "cond" in self.items:
            kwargs["encoder_hidden_states"] = self.rows("cond", ids).to(self.device, self.dtype)
        return {k: _cast(v, self.dtype) for k, v in kwargs.items()}

    def size_kwargs(self) -> dict[str, Any]:
        """{'image_size': pixel size of the denoised latents} for conditioners that take it (SDXL's time_ids)."""
        fn = getattr(self.prior.conditioner, "condition", None)
        if fn is None or "image_size" not in inspect.signature(fn).parameters:
            return {}
        if "latents" in self.items:
            f = 2 ** (len(self.prior.vae.config.block_out_channels) - 1)
            return {"image_size": tuple(int(n) * f for n in self.items["latents"].shape[-2:])}
        return {"image_size": self.image_size}

    def start_latents(self, ids: list[int]) -> torch.Tensor | None:
        """z0 for img2img: stored latents, or stored pixels encoded by the VAE; None for pure sampling."""
        if "latents" in self.items:
            return self.rows("latents", ids).to(self.device, self.dtype).contiguous()
        if "pixels" in self.items:
            return self.prior.encode(self.upsample(self.rows("pixels", ids))).to(self.dtype)
        return None

    def upsample(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(self.device, torch.float32) / 255.0
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False).clamp(0, 1)
        return x.to(self.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = self.prior.decode(latents)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
        return x.float()

    def denoise(self, z0: torch.Tensor | None, ids: list[int], variant: int, strength: float) -> torch.Tensor:
        """Noise z0 to `strength` with seeded noise (pure noise if z0 is None), then run the scheduler to t=0."""
        p = self.params
        steps, guidance = int(p.get("steps", 4)), float(p.get("guidance_scale", 1.0))
        gens = item_generators(self.seed, ids, variant)
        sched = scheduler_from_spec(self.spec["scheduler"])
        sched.set_timesteps(steps, device=self.device)
        if z0 is None:
            timesteps = sched.timesteps
            shape = (len(ids), self.prior.unet.config.in_channels, *self.latent_size())
            latents = randn_tensor(shape, generator=gens, device=self.device, dtype=torch.float32) * sched.init_noise_sigma
        else:
            init = min(int(steps * strength), steps)
            if init < 1:
                return z0
            t_start = steps - init
            timesteps = sched.timesteps[t_start * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            noise = randn_tensor(z0.shape, generator=gens, device=self.device, dtype=torch.float32)
            latents = sched.add_noise(z0.float(), noise, timesteps[:1].repeat(len(ids)))
        cond = self.condition(ids)
        if guidance > 1.0:
            uncond = self.prior.conditioner.null_condition(len(ids), p.get("negative_prompt"), **self.size_kwargs())
            cond = {k: _cat(_cast(uncond[k], self.dtype), v) for k, v in cond.items()}
        step_kwargs = {"generator": gens} if "generator" in sched.step.__code__.co_varnames else {}
        for t in timesteps:
            x = sched.scale_model_input(latents, t)
            x = torch.cat([x, x]) if guidance > 1.0 else x
            eps = self.run_denoiser(x.to(self.dtype), t, cond).float()
            if guidance > 1.0:
                e_u, e_c = eps.chunk(2)
                eps = e_u + guidance * (e_c - e_u)
            latents = sched.step(eps, t, latents, **step_kwargs).prev_sample
        return latents.to(self.dtype)

    def run_denoiser(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        added = extra.pop("added_cond_kwargs", None)
        return self.prior.unet(x.contiguous(), t, encoder_hidden_states=cond["encoder_hidden_states"],
                               added_cond_kwargs=added, **extra).sample

    def latent_size(self) -> tuple[int, int]:
        f = 2 ** (len(self.prior.vae.config.block_out_channels) - 1)
        return (self.image_size[0] // f, self.image_size[1] // f)


def _cast(v: Any, dtype: torch.dtype) -> Any:
    if isinstance(v, dict):
        return {k: _cast(x, dtype) for k, x in v.items()}
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.to(dtype)
    return v


def _cat(a: Any, b: Any) -> Any:
    """torch.cat([a, b]) of tensors, key by key for dicts (SDXL's added_cond_kwargs)."""
    if isinstance(a, dict):
        return {k: _cat(a[k], b[k]) for k in b}
    return torch.cat([a, b])


@register_pipeline("img2img")
class Img2ImgPipeline(RegenerationPipeline):
    """Latent img2img: z0 (stored latents or encoded pixels), seeded noise at `strength`, denoise, decode.

    strength 0 is a plain VAE decode; no stored z0 means pure class-conditional sampling.
    """

    def generate(self, ids: list[int], variant: int) -> torch.Tensor:
        z0 = self.start_latents(ids)
        strength = float(self.params.get("strength", 0.0))
        if z0 is not None and strength <= 0:
            return self.decode(z0)
        return self.decode(self.denoise(z0, ids, variant, strength))


_PRIORS: dict[tuple, LatentPrior] = {}


def get_prior(model: dict[str, Any], num_classes: int) -> LatentPrior:
    """Load (once per process) the prior a manifest's generator.model names."""
    key = (model["source"], model.get("revision"), num_classes)
    if key not in _PRIORS:
        _PRIORS[key] = load_prior(model["source"], model.get("revision"), num_classes=num_classes)
    return _PRIORS[key]


def check_weights(prior: LatentPrior, expected: dict[str, str], allow_different_weights: bool = False) -> None:
    """Refuse (or warn, if allowed) when the prior's weights differ from the bundle's recorded hashes."""
    actual = prior.component_hashes()
    bad = [k for k, v in expected.items() if actual.get(k) != v]
    if not bad:
        return
    msg = (f"generator weights differ from the bundle's for {', '.join(bad)} "
           f"(expected {expected[bad[0]][:12]}…, found {str(actual.get(bad[0]))[:12]}…)")
    if allow_different_weights:
        warnings.warn(msg + "; images will not match the bundle's fingerprints", stacklevel=2)
        return
    raise GeneratorError(msg, "load the exact weights the bundle was made with, or pass --allow-different-weights")


def pipeline_class(name: str) -> type[RegenerationPipeline]:
    """The registered pipeline class `name` (plugins included)."""
    if name not in PIPELINES:
        _load_plugins()
    if name not in PIPELINES:
        raise GeneratorError(f"this ddcodec has no regeneration pipeline {name!r}",
                             "upgrade ddcodec; known pipelines: " + ", ".join(sorted(PIPELINES)))
    return PIPELINES[name]


def build_pipeline(manifest: dict[str, Any], items: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, micro_batch: int | None = None, prior: LatentPrior | None = None,
                   allow_different_weights: bool = False, item_ids: list[int] | None = None) -> RegenerationPipeline:
    """The pipeline a manifest names, with its prior loaded and its weights checked.

    `item_ids` names the items whose rows `items` holds, when it holds only some (a shard stream).
    """
    gen = manifest["generator"]
    cls = pipeline_class(gen["pipeline"])
    prior = prior or get_prior(gen["model"], len(manifest["classes"]["names"]))
    check_weights(prior, gen["model"]["components"], allow_different_weights)
    if item_ids is not None and not cls.streamable:
        raise GeneratorError(f"the {gen['pipeline']!r} pipeline mixes items across shards, so it cannot regenerate "
                             "from some shards alone", "read the whole bundle: DistilledDataset(urls) rather than streaming")
    return cls(prior, gen, items, manifest["classes"]["prompts"], manifest["seed"], tuple(manifest["image"]["size"]),
               device=device, dtype=dtype, micro_batch=micro_batch, item_ids=item_ids)


def _load_plugins() -> None:
    """Import the modules that register method-specific pipelines."""
    import importlib
    for mod in ("ddcodec.generators.dace", "ddcodec.generators.ld3m"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
