"""A latent diffusion prior: VAE, denoiser, scheduler and conditioner, loaded by id or path."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..errors import GeneratorError
from .conditioning import ClassEmbedder

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ASSETS = Path(__file__).resolve().parent.parent / "assets"
DEFAULT_PRIOR = ASSETS / "prior-cifar10"
# priors shipped in the package, by the name bundles record; a name keeps its weights for good, so a better prior
# gets a new name and every bundle made with an older one still regenerates (docs/prior.md)
SHIPPED_PRIORS = {"builtin:default": DEFAULT_PRIOR, "builtin:cifar10-v2": ASSETS / "prior-cifar10-v2",
                  "builtin:imagenette-64": ASSETS / "prior-imagenette-64"}


@dataclass
class LatentPrior:
    """The components a regeneration pipeline runs, plus where they came from."""

    vae: AutoencoderKL
    unet: UNet2DConditionModel
    scheduler: SchedulerMixin
    conditioner: torch.nn.Module
    source: str
    revision: str | None = None
    kind: str = "class"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scaling_factor(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 1.0) or 1.0)

    def modules(self) -> dict[str, torch.nn.Module]:
        """The components that hold weights, by name."""
        mods = {"vae": self.vae, "unet": self.unet}
        if isinstance(self.conditioner, torch.nn.Module):
            mods["conditioner"] = self.conditioner
        mods.update({k: v for k, v in self.extra.items() if isinstance(v, torch.nn.Module)})
        return mods

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "LatentPrior":
        for m in self.modules().values():
            p = next(m.parameters(), None)
            if p is not None and (p.device != torch.device(device) or p.dtype != dtype):
                m.to(device=device, dtype=dtype)
            m.eval().requires_grad_(False)
        return self

    def vae_upcast(self) -> bool:
        """Whether the VAE runs in float32 under a float16 SDXL-style prior whose VAE asks for it (force_upcast).

        SDXL's VAE overflows in float16; diffusers' SDXL pipelines honour the flag the same way (SD's do not)."""
        p = next(self.vae.parameters())
        return (p.dtype == torch.float16 and bool(self.vae.config.get("force_upcast", False))
                and self.unet.config.get("addition_embed_type") == "text_time")

    @contextlib.contextmanager
    def vae_precision(self) -> Iterator[torch.dtype]:
        """The dtype to feed the VAE; float32 for the duration of the block where `vae_upcast()`."""
        p = next(self.vae.parameters())
        if not self.vae_upcast():
            yield p.dtype
            return
        self.vae.to(torch.float32)
        try:
            yield torch.float32
        finally:
            self.vae.to(torch.float16)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled latent means of images in [0, 1]; deterministic (no sampling)."""
        p = next(self.vae.parameters())
        out_dtype = p.dtype
        with self.vae_precision() as dtype:
            dist = self.vae.encode(images.to(p.device, dtype) * 2 - 1).latent_dist
            return (dist.mean * self.scaling_factor).to(out_dtype).contiguous()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] from scaled latents."""
        p = next(self.vae.parameters())
        with self.vae_precision() as dtype:
            x = self.vae.decode((latents.to(p.device, dtype) / self.scaling_factor).contiguous()).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    def component_hashes(self, refresh: bool = False) -> dict[str, str]:
        """sha256 of each weighted component's state dict (computed once unless `refresh`)."""
        if refresh or "_hashes" not in self.__dict__:
            self.__dict__["_hashes"] = {name: weights_sha256(m) for name, m in sorted(self.modules().items())}
        return dict(self.__dict__["_hashes"])

    def scheduler_spec(self) -> dict[str, Any]:
        """The scheduler as plain data: class name and config."""
        return {"class": type(self.scheduler).__name__, "config": _plain(dict(self.scheduler.config))}

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Save every component in diffusers layout, with a model_index.json."""
        if self.kind == "text":
            from .text import save_text_prior
            return save_text_prior(self, path)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.vae.save_pretrained(path / "vae")
        self.unet.save_pretrained(path / "unet")
        self.scheduler.save_pretrained(path / "scheduler")
        self.conditioner.save_pretrained(path / "conditioner")
        index = {"_class_name": "DDCodecPrior", "kind": self.kind,
                 "vae": ["diffusers", "AutoencoderKL"], "unet": ["diffusers", "UNet2DConditionModel"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__],
                 "conditioner": ["ddcodec", type(self.conditioner).__name__]}
        (path / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def weights_sha256(module: torch.nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in the state dict, in key order."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _plain(obj: Any) -> Any:
    """JSON-safe copy of a config (tuples to lists, drop private keys)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def tiny_class_prior(num_classes: int = 10, seed: int = 0, image_size: int = 32) -> LatentPrior:
    """An LDM-cin256-shaped prior (AutoencoderKL f2 + cross-attention UNet + class embedder), random weights."""
    gen = torch.Generator().manual_seed(seed)
    state = torch.random.get_rng_state()
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    try:
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                            layers_per_block=1, norm_num_groups=16, sample_size=image_size, scaling_factor=1.0)
        unet = UNet2DConditionModel(sample_size=image_size // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                    attention_head_dim=8, norm_num_groups=16)
        conditioner = ClassEmbedder(num_classes=num_classes, num_tokens=1, embed_dim=32)
    finally:
        torch.random.set_rng_state(state)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="trailing")
    return LatentPrior(vae, unet, scheduler, conditioner, source="builtin:tiny", kind="class").to("cpu")


BUILTINS: dict[str, Callable[..., LatentPrior]] = {"builtin:tiny": tiny_class_prior}


def register_builtin(name: str, factory: Callable[..., LatentPrior]) -> None:
    """Make `factory` loadable as `name` (e.g. 'builtin:tiny-sd-turbo')."""
    BUILTINS[name] = factory


def shipped_name(source: str) -> str | None:
    """The builtin name of a prior shipped in the package ('default' is 'builtin:default'), or None."""
    name = "builtin:default" if source == "default" else source
    return name if name in SHIPPED_PRIORS else None


def resolve_source(source: str) -> str:
    """Map a shipped prior's name ('builtin:default', 'builtin:cifar10-v2') to its path in the package."""
    name = shipped_name(source)
    if name is None:
        return source
    path = SHIPPED_PRIORS[name]
    if not (path / "model_index.json").exists():
        raise GeneratorError(f"the embedded prior {name} is not installed in this package",
                             "train one with 'ddcodec prior train' or pass --generator builtin:tiny")
    return str(path)


def training_record(prior: LatentPrior) -> dict[str, Any]:
    """The training.json that `ddcodec prior train` wrote beside the prior ({} when there is none)."""
    try:
        path = Path(resolve_source(prior.source)) / "training.json"
        record = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError, GeneratorError):
        return {}
    return record if isinstance(record, dict) else {}


def trained_classes(prior: LatentPrior) -> list[str] | None:
    """The class names a class-conditional prior was trained on, when its directory's training.json records them."""
    try:
        return list(training_record(prior)["classes"])
    except (KeyError, TypeError):
        return None


def trained_size(prior: LatentPrior) -> int | None:
    """The square image size a prior was trained at, when its training.json records it."""
    try:
        return int(training_record(prior)["config"]["image_size"])
    except (KeyError, TypeError, ValueError):
        return None


def check_prior_classes(prior: LatentPrior, names: list[str]) -> None:
    """Refuse a class-conditional prior whose classes are not the data's: class k would be drawn as its class k."""
    if prior.kind != "class" or prior.conditioner is None:
        return
    known = int(prior.conditioner.config.num_classes)
    trained = trained_classes(prior)
    fix = ("use a prior trained on this data (`ddcodec prior train --data ...`, then --generator DIR) or a text prior; "
           "--method random and --method ld3m do not depend on the prior's classes")
    if known < len(names):
        raise GeneratorError(f"{prior.source} is conditioned on {known} classes but the data has {len(names)}", fix)
    from ..data import readable_names  # a prior trained on Imagenette records WordNet ids, the data's names are readable
    if trained is not None and [n.lower() for n in readable_names(trained)] != [n.lower() for n in readable_names(names)]:
        raise GeneratorError(f"{prior.source} is conditioned on the classes it was trained on ({', '.join(trained[:3])}, "
                             f"...), not this data's ({', '.join(names[:3])}, ...)", fix)


def load_prior(source: str, revision: str | None = None, num_classes: int | None = None,
               local_files_only: bool | None = None) -> LatentPrior:
    """Load a prior from a builtin name, a local diffusers-layout directory, or a hub id (never remote code)."""
    name = shipped_name(source)
    if name:
        prior = load_prior(resolve_source(name), revision, num_classes, local_files_only)
        prior.source = name  # bundles name the shipped prior, not this machine's install path
        return prior
    if source.startswith("builtin:") and source not in BUILTINS:
        _import_builtin_modules()
    if source in BUILTINS:
        return BUILTINS[source](num_classes=num_classes or 10) if num_classes else BUILTINS[source]()
    if source.startswith("builtin:"):
        raise GeneratorError(f"unknown builtin generator {source!r}", "choose one of " + ", ".join(sorted(BUILTINS) + sorted(SHIPPED_PRIORS)))
    path = Path(source)
    if path.exists():
        if not (path / "model_index.json").exists():
            raise GeneratorError(f"{source} has no model_index.json", "point --generator at a diffusers model directory")
        local_files_only = True
    elif _looks_like_path(source):
        raise GeneratorError(f"{source}: no such directory", "point --generator at a diffusers model directory, a builtin: name or a hub id")
    index = _read_index(source, revision, local_files_only)
    if "conditioner" in index:
        from .loading import load_class_prior
        return load_class_prior(source, revision, index, local_files_only)
    if "text_encoder" in index:
        from .loading import load_text_prior
        return load_text_prior(source, revision, index, local_files_only)
    raise GeneratorError(f"{source} has neither a conditioner nor a text encoder", "use a Stable Diffusion-style or ddcodec prior")


def _looks_like_path(source: str) -> bool:
    """Whether a generator source is meant as a local path rather than a hub id ("owner/name")."""
    return source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source


def _import_builtin_modules() -> None:
    """Import the modules that register more builtins (the text priors need transformers)."""
    try:
        from . import text  # noqa: F401  registers builtin:tiny-sd-turbo, builtin:tiny-sdxl-turbo, ...
    except ImportError as e:
        raise GeneratorError(f"cannot import ddcodec's text priors ({e})", "pip install 'transformers>=4.40'") from None


def _read_index(source: str, revision: str | None, local_files_only: bool | None) -> dict[str, Any]:
    path = Path(source)
    try:
        if path.exists():
            return json.loads((path / "model_index.json").read_text())
        from huggingface_hub import hf_hub_download
        return json.loads(Path(hf_hub_download(source, "model_index.json", revision=revision,
                                               local_files_only=bool(local_files_only))).read_text())
    except Exception as e:
        raise GeneratorError(f"cannot load generator {source!r} ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})",
                             "check the model id or path, or download the weights to a local directory") from None
