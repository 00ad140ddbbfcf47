"""Loading diffusers-layout priors from a local directory or a hub id, without remote code."""

from __future__ import annotations

from typing import Any

import diffusers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.modeling_utils import ModelMixin

from ..errors import GeneratorError
from .conditioning import ClassEmbedder
from .prior import LatentPrior


def _load(cls: Any, source: str, subfolder: str, revision: str | None, local_files_only: bool | None) -> Any:
    # weights only from .safetensors: a component that ships a pickled .bin instead is refused, never unpickled
    kwargs: dict[str, Any] = {"use_safetensors": True} if issubclass(cls, ModelMixin) else {}
    try:
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision,
                                   local_files_only=bool(local_files_only), **kwargs)
    except Exception as e:
        msg = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        raise GeneratorError(f"cannot load component '{subfolder}' of {source!r} ({msg})",
                             "check that the model directory is complete") from None


def load_scheduler(source: str, index: dict[str, Any], revision: str | None, local_files_only: bool | None) -> Any:
    """The scheduler class named in model_index.json, from diffusers only."""
    name = index.get("scheduler", [None, "DDIMScheduler"])[1]
    cls = getattr(diffusers, str(name), None)
    if cls is None or not str(name).endswith("Scheduler"):
        raise GeneratorError(f"scheduler {name!r} is not a diffusers scheduler", "use a diffusers scheduler class")
    return _load(cls, source, "scheduler", revision, local_files_only)


def scheduler_from_spec(spec: dict[str, Any]) -> Any:
    """A fresh scheduler from the manifest's {'class', 'config'} record."""
    name = spec.get("class")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not str(name).endswith("Scheduler"):
        raise GeneratorError(f"scheduler {name!r} is not a diffusers scheduler", "re-encode the bundle with a diffusers scheduler")
    return cls.from_config(spec.get("config", {}))


def load_class_prior(source: str, revision: str | None, index: dict[str, Any],
                     local_files_only: bool | None) -> LatentPrior:
    """A ddcodec class-conditional prior: vae/, unet/, conditioner/, scheduler/."""
    vae = _load(AutoencoderKL, source, "vae", revision, local_files_only)
    unet = _load(UNet2DConditionModel, source, "unet", revision, local_files_only)
    conditioner = _load(ClassEmbedder, source, "conditioner", revision, local_files_only)
    scheduler = load_scheduler(source, index, revision, local_files_only)
    return LatentPrior(vae, unet, scheduler, conditioner, source=source, revision=revision, kind="class").to("cpu")


def load_text_prior(source: str, revision: str | None, index: dict[str, Any],
                    local_files_only: bool | None) -> LatentPrior:
    """A Stable Diffusion-family prior (SD 1.5, SD-Turbo, SDXL-Turbo) with its CLIP text encoder(s)."""
    from .text import load_text_prior as _load_text
    return _load_text(source, revision, index, local_files_only)
