"""Text-conditioned latent priors (SD 1.5, SD-Turbo, SDXL-Turbo): CLIP conditioner, loading, saving, builders."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import diffusers
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

from ..errors import GeneratorError
from . import text_configs
from .loading import load_scheduler
from .prior import LatentPrior, register_builtin

ENCODER_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
TOKENIZER_CLASSES = ("CLIPTokenizer", "CLIPTokenizerFast")
SLOTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
Embedding = tuple[torch.Tensor, torch.Tensor | None]


class TextConditioner(nn.Module):
    """CLIP tokenizer(s) and text encoder(s) as a conditioner, with diffusers' `encode_prompt` semantics.

    One encoder (SD 1.5, SD-Turbo): its final hidden state. Two (SDXL): both penultimate hidden states
    concatenated, plus text_encoder_2's pooled projection and the size `time_ids` as `added_cond_kwargs`.
    The encoders are submodules, so the state dict (and the prior's component hash) covers their weights.
    """

    def __init__(self, tokenizers: Sequence[Any], encoders: dict[str, nn.Module], text_time: bool = False,
                 force_zeros_for_empty_prompt: bool = True, default_size: tuple[int, int] = (512, 512)) -> None:
        super().__init__()
        if len(tokenizers) != len(encoders) or not encoders:
            raise ValueError("need one tokenizer per text encoder")
        self.tokenizers = list(tokenizers)
        self.names = list(encoders)
        for name, enc in encoders.items():
            self.add_module(name, enc)
        self.text_time = bool(text_time)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)
        self.default_size = (int(default_size[0]), int(default_size[1]))
        self._cache: dict[str, Embedding] = {}

    @property
    def encoders(self) -> list[nn.Module]:
        return [getattr(self, n) for n in self.names]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The encoders' tensors, with 'text_model.' dropped from keys so hashes agree across transformers 4 and 5."""
        sd = super().state_dict(*args, **kwargs)
        return type(sd)((k.replace(".text_model.", ".", 1), v) for k, v in sd.items())

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Load `state_dict()`'s normalised keys (or the raw ones)."""
        raw = {k.replace(".text_model.", ".", 1): k for k in super().state_dict()}
        return super().load_state_dict({raw.get(k, k): v for k, v in state_dict.items()}, strict=strict, assign=assign)

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> "TextConditioner":
        self._cache = {}  # cached embeddings live on the old device/dtype
        return super()._apply(fn, *args, **kwargs)

    @torch.no_grad()
    def embed(self, prompt: str) -> Embedding:
        """(1, L, D) cross-attention states and (1, P) pooled embedding (None without text_time), cached per prompt."""
        if prompt not in self._cache:
            # on CPU, oneDNN off (as pipelines.cpu_deterministic): the cached value must not depend on the caller
            off = torch.backends.mkldnn.flags(enabled=False) if self.device.type == "cpu" else contextlib.nullcontext()
            with off:
                self._cache[prompt] = self._encode(prompt)
        return self._cache[prompt]

    def _encode(self, prompt: str) -> Embedding:
        states, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.encoders):
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(next(enc.parameters()).device)
            if not self.text_time:
                return enc(ids)[0], None
            out = enc(ids, output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled

    def condition(self, class_ids: torch.Tensor, prompts: list[str],
                  image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """Denoiser keyword arguments for these prompts (one per row); `image_size` sets SDXL's time_ids."""
        return self._kwargs([self.embed(p) for p in prompts], image_size)

    def null_condition(self, n: int, negative_prompt: str | None = None,
                       image_size: tuple[int, int] | None = None) -> dict[str, Any]:
        """Unconditional kwargs for CFG: the negative prompt, else "" (zeros for SDXL with force_zeros_for_empty_prompt)."""
        if negative_prompt is None and self.text_time and self.force_zeros_for_empty_prompt:
            states, pooled = self.embed("")
            emb: Embedding = (torch.zeros_like(states), torch.zeros_like(pooled))
        else:
            emb = self.embed(negative_prompt or "")
        return self._kwargs([emb] * n, image_size)

    def _kwargs(self, embs: list[Embedding], image_size: tuple[int, int] | None) -> dict[str, Any]:
        states = torch.cat([e[0] for e in embs])
        if not self.text_time:
            return {"encoder_hidden_states": states}
        h, w = image_size or self.default_size
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=states.dtype, device=states.device).repeat(len(embs), 1)
        pooled = torch.cat([e[1] for e in embs])
        return {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def make_conditioner(tokenizers: Sequence[Any], encoders: dict[str, nn.Module], unet: UNet2DConditionModel,
                     vae: AutoencoderKL, force_zeros_for_empty_prompt: bool = True) -> TextConditioner:
    """A TextConditioner matched to the UNet (text_time for SDXL), checking the SDXL embedding width."""
    text_time = unet.config.addition_embed_type == "text_time"
    if text_time:
        proj = getattr(list(encoders.values())[-1].config, "projection_dim", 0)
        want = unet.add_embedding.linear_1.in_features
        if 6 * unet.config.addition_time_embed_dim + proj != want:
            raise GeneratorError(f"the UNet's added embedding takes {want} features, not 6 size ids + a {proj}-d "
                                 "pooled text embedding (an SDXL refiner or aesthetic-score model?)",
                                 "use an SDXL base/Turbo-style model")
    sample = unet.config.sample_size
    h, w = (sample, sample) if isinstance(sample, int) else tuple(sample)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return TextConditioner(tokenizers, encoders, text_time=text_time,
                           force_zeros_for_empty_prompt=force_zeros_for_empty_prompt, default_size=(h * f, w * f))


# loading and saving -----------------------------------------------------------------------------------


def _load(cls: Any, source: str, subfolder: str, revision: str | None, local_files_only: bool | None,
          weights: bool = True) -> Any:
    kwargs: dict[str, Any] = {"subfolder": subfolder, "revision": revision, "local_files_only": bool(local_files_only)}
    if weights:
        kwargs["use_safetensors"] = True
    try:
        return cls.from_pretrained(source, **kwargs)
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise GeneratorError(f"cannot load component '{subfolder}' of {source!r} ({msg})",
                             "check that the model directory is complete and has .safetensors weights") from None


def _transformers_class(index: dict[str, Any], name: str, allowed: tuple[str, ...]) -> Any:
    entry = index.get(name) or [None, None]
    cls_name = str(entry[1]) if len(entry) > 1 else "None"
    if entry[0] != "transformers" or cls_name not in allowed or not hasattr(transformers, cls_name):
        raise GeneratorError(f"model_index.json names {name} = {entry!r}, which ddcodec does not load",
                             "use a model whose text stack is " + " / ".join(allowed))
    return getattr(transformers, cls_name)


def load_text_prior(source: str, revision: str | None, index: dict[str, Any],
                    local_files_only: bool | None) -> LatentPrior:
    """A Stable Diffusion-family prior from diffusers layout: vae, unet, scheduler, tokenizer(s), text encoder(s)."""
    vae = _load(AutoencoderKL, source, "vae", revision, local_files_only)
    unet = _load(UNet2DConditionModel, source, "unet", revision, local_files_only)
    scheduler = load_scheduler(source, index, revision, local_files_only)
    tokenizers, encoders = [], {}
    for tok_name, enc_name in SLOTS:
        if not index.get(enc_name) or index[enc_name][0] is None:
            continue
        enc_cls = _transformers_class(index, enc_name, ENCODER_CLASSES)
        tok_cls = _transformers_class(index, tok_name, TOKENIZER_CLASSES)
        encoders[enc_name] = _load(enc_cls, source, enc_name, revision, local_files_only)
        tokenizers.append(_load(tok_cls, source, tok_name, revision, local_files_only, weights=False))
    conditioner = make_conditioner(tokenizers, encoders, unet, vae,
                                   bool(index.get("force_zeros_for_empty_prompt", True)))
    return LatentPrior(vae, unet, scheduler, conditioner, source=source, revision=revision, kind="text").to("cpu")


def save_text_prior(prior: LatentPrior, path: str | os.PathLike) -> None:
    """Save a text prior in the standard diffusers layout (StableDiffusion[XL]Pipeline model_index.json)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cond: TextConditioner = prior.conditioner
    prior.vae.save_pretrained(path / "vae")
    prior.unet.save_pretrained(path / "unet")
    prior.scheduler.save_pretrained(path / "scheduler")
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLPipeline" if cond.text_time else "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "vae": ["diffusers", type(prior.vae).__name__], "unet": ["diffusers", type(prior.unet).__name__],
        "scheduler": ["diffusers", type(prior.scheduler).__name__],
        "feature_extractor": [None, None], "image_encoder": [None, None]}
    if cond.text_time:
        index["force_zeros_for_empty_prompt"] = cond.force_zeros_for_empty_prompt
    else:
        index.update({"safety_checker": [None, None], "requires_safety_checker": False})
    slots = dict((enc, tok) for tok, enc in SLOTS)
    for tok, (enc_name, enc) in zip(cond.tokenizers, zip(cond.names, cond.encoders)):
        enc.save_pretrained(path / enc_name)
        tok.save_pretrained(path / slots[enc_name])
        index[enc_name] = ["transformers", type(enc).__name__]
        index[slots[enc_name]] = ["transformers", type(tok).__name__]
    (path / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")


# building from configs (tiny for tests, full-size for GPU benchmarks) ------------------------------------


def build_text_prior(config: dict[str, Any], seed: int = 0, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32, source: str = "builtin:custom") -> LatentPrior:
    """A prior from a text_configs dict, with seeded random weights (device 'meta' builds no storage)."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=None if device.type == "cuda" else []), device:
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config["vae"])
        unet = UNet2DConditionModel(**config["unet"])
        encoders = {name: getattr(transformers, e["class"])(transformers.CLIPTextConfig(**e["config"]))
                    for (_, name), e in zip(SLOTS, config["text_encoders"])}
    tokenizers = [text_configs.byte_level_clip_tokenizer(e.get("pad_token", "!")) for e in config["text_encoders"]]
    sched = config["scheduler"]
    scheduler = getattr(diffusers, sched["class"]).from_config(sched["config"])
    conditioner = make_conditioner(tokenizers, encoders, unet, vae, config.get("force_zeros_for_empty_prompt", True))
    prior = LatentPrior(vae, unet, scheduler, conditioner, source=source, kind="text")
    return prior if device.type == "meta" else prior.to(device, dtype)


def _builtin(config_fn: Callable[[], dict[str, Any]], name: str) -> Callable[..., LatentPrior]:
    def factory(num_classes: int | None = None, seed: int = 0) -> LatentPrior:
        """Seeded random-weight prior (num_classes is ignored: text priors condition on prompts)."""
        return build_text_prior(config_fn(), seed=seed, source=name)
    factory.__name__ = name.split(":")[-1].replace("-", "_")
    return factory


tiny_sd_turbo_prior = _builtin(text_configs.tiny_sd_turbo_config, "builtin:tiny-sd-turbo")
tiny_sdxl_turbo_prior = _builtin(text_configs.tiny_sdxl_turbo_config, "builtin:tiny-sdxl-turbo")

register_builtin("builtin:tiny-sd-turbo", tiny_sd_turbo_prior)
register_builtin("builtin:tiny-sdxl-turbo", tiny_sdxl_turbo_prior)
# Full-size architectures with random weights, for GPU throughput benchmarks (built on CPU in float32 when loaded by name).
FULL_SIZE = {"builtin:random-sd-turbo": text_configs.sd_turbo_config,
             "builtin:random-sdxl-turbo": text_configs.sdxl_turbo_config,
             "builtin:random-sd15": text_configs.sd15_config}
for _name, _config in FULL_SIZE.items():
    register_builtin(_name, _builtin(_config, _name))


def load_benchmark_prior(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                         num_classes: int | None = None) -> LatentPrior:
    """A prior by name on `device`; full-size random architectures are initialised there directly (fast on a GPU)."""
    if name in FULL_SIZE:
        return build_text_prior(FULL_SIZE[name](), device=device, dtype=dtype, source=name)
    from ddcodec.generators.prior import load_prior
    return load_prior(name, num_classes=num_classes).to(device, dtype)


def stock_pipeline(prior: LatentPrior, img2img: bool = True) -> Any:
    """A stock diffusers (img2img) pipeline sharing the prior's very modules: the naive baseline."""
    from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                           StableDiffusionXLPipeline)
    c = prior.conditioner
    if c.text_time:
        cls = StableDiffusionXLImg2ImgPipeline if img2img else StableDiffusionXLPipeline
        return cls(vae=prior.vae, unet=prior.unet, scheduler=prior.scheduler, text_encoder=c.encoders[0],
                   text_encoder_2=c.encoders[1], tokenizer=c.tokenizers[0], tokenizer_2=c.tokenizers[1])
    cls = StableDiffusionImg2ImgPipeline if img2img else StableDiffusionPipeline
    return cls(vae=prior.vae, unet=prior.unet, scheduler=prior.scheduler, text_encoder=c.encoders[0],
               tokenizer=c.tokenizers[0], safety_checker=None, feature_extractor=None, requires_safety_checker=False)
