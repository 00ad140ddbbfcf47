"""A prior's architecture and training recipe as plain data, and the diffusers components it builds."""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

from ..errors import DDCodecError
from ..generators.conditioning import ClassEmbedder
from ..generators.prior import LatentPrior


@dataclass
class PriorConfig:
    """Everything `ddcodec prior train` needs to rebuild the models and continue a run."""

    image_size: int = 32
    latent_channels: int = 4
    vae_channels: list[int] = field(default_factory=lambda: [32, 64])
    vae_layers: int = 1
    vae_norm_groups: int = 16
    unet_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    unet_layers: int = 1
    unet_attention: list[bool] = field(default_factory=lambda: [False, True, True])
    unet_norm_groups: int = 16
    attention_head_dim: int = 32
    context_dim: int = 64
    context_tokens: int = 1
    vae_steps: int = 2000
    unet_steps: int = 4000
    decoder_steps: int = 0
    batch_size: int = 32
    unet_batch_size: int = 64
    vae_lr: float = 1e-3
    unet_lr: float = 1e-3
    decoder_lr: float = 5e-4
    warmup: int = 100
    kl_weight: float = 1e-6
    sample_posterior: bool = False  # decode the latent mean, as regeneration does (sampling blurs a short run)
    feature_net: str | None = None
    vae_from: str | None = None  # start from this prior's VAE (builtin:default, a directory or hub id) instead of a new one
    feature_weight: float = 1.0
    logit_weight: float = 0.1
    cfg_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    flip: bool = True
    bf16: bool = True
    holdout: int = 500
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PriorConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        s = self.image_size // self.downsample
        return (self.latent_channels, s, s)

    def check(self) -> None:
        """Raise a one-line error for an impossible configuration."""
        if self.image_size % (self.downsample * 2 ** (len(self.unet_channels) - 1)):
            raise DDCodecError(f"--image-size {self.image_size} is not divisible by the VAE and UNet downsampling",
                               "use a multiple of " + str(self.downsample * 2 ** (len(self.unet_channels) - 1)))
        if len(self.unet_attention) != len(self.unet_channels):
            raise DDCodecError("--unet-attention needs one flag per --unet-channels entry", "e.g. 0,1,1 for 3 levels")
        for c in self.vae_channels:
            if c % self.vae_norm_groups:
                raise DDCodecError(f"VAE width {c} is not divisible by {self.vae_norm_groups} norm groups", "pick multiples of 16")
        for c in self.unet_channels:
            if c % self.unet_norm_groups or c % self.attention_head_dim:
                raise DDCodecError(f"UNet width {c} is not divisible by the norm groups and head size", "pick multiples of 32")
        if min(self.vae_steps, self.unet_steps) < 0 or self.batch_size < 1 or self.unet_batch_size < 1:
            raise DDCodecError("steps must be >= 0 and batch sizes >= 1", "check --vae-steps/--unet-steps/--batch-size")


def build_vae(cfg: PriorConfig) -> AutoencoderKL:
    """A small AutoencoderKL with len(vae_channels)-1 downsamplings and no mid-block attention."""
    n = len(cfg.vae_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=cfg.latent_channels,
                         block_out_channels=tuple(cfg.vae_channels), down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=cfg.vae_layers,
                         norm_num_groups=cfg.vae_norm_groups, sample_size=cfg.image_size, scaling_factor=1.0,
                         mid_block_add_attention=False)


def build_unet(cfg: PriorConfig) -> UNet2DConditionModel:
    """A class-conditional UNet over the latents: self- and cross-attention on the levels flagged in unet_attention."""
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.unet_attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.unet_attention))
    return UNet2DConditionModel(sample_size=cfg.latent_shape[1], in_channels=cfg.latent_channels,
                                out_channels=cfg.latent_channels, layers_per_block=cfg.unet_layers,
                                block_out_channels=tuple(cfg.unet_channels), down_block_types=down, up_block_types=up,
                                cross_attention_dim=cfg.context_dim, norm_num_groups=cfg.unet_norm_groups,
                                # diffusers reads attention_head_dim as the number of heads; give heads of size head_dim
                                attention_head_dim=tuple(max(1, c // cfg.attention_head_dim) for c in cfg.unet_channels))


def build_conditioner(cfg: PriorConfig, num_classes: int) -> ClassEmbedder:
    """Learned per-class context tokens plus the null class for classifier-free guidance."""
    return ClassEmbedder(num_classes=num_classes, num_tokens=cfg.context_tokens, embed_dim=cfg.context_dim)


def build_scheduler() -> DDIMScheduler:
    """DDIM, v-prediction, zero terminal SNR, trailing spacing: sound for few-step img2img and sampling from pure noise."""
    return DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         clip_sample=False, set_alpha_to_one=False, steps_offset=0, prediction_type="v_prediction",
                         rescale_betas_zero_snr=True, timestep_spacing="trailing")


def build_prior(cfg: PriorConfig, num_classes: int, source: str = "ddcodec:untrained") -> LatentPrior:
    """Freshly initialised components, seeded by cfg.seed; the VAE is cfg.vae_from's when that is set."""
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed)
    try:
        vae, unet, cond = build_vae(cfg), build_unet(cfg), build_conditioner(cfg, num_classes)
    finally:
        torch.random.set_rng_state(state)
    if cfg.vae_from:
        vae = source_vae(cfg.vae_from)
    return LatentPrior(vae, unet, build_scheduler(), cond, source=source, kind="class")


def source_vae(source: str) -> AutoencoderKL:
    """The VAE of an existing prior, in float32 and trainable."""
    from ..generators.prior import load_prior
    vae = load_prior(source).vae.to(torch.float32)
    vae.register_to_config(scaling_factor=1.0)
    return vae.train().requires_grad_(True)


@functools.lru_cache(maxsize=8)
def _vae_shape(source: str) -> dict[str, Any]:
    """The shape fields of a prior's VAE (cached: the CLI and train_prior both ask before build_prior loads it)."""
    c = source_vae(source).config
    return {"vae_channels": list(c.block_out_channels), "latent_channels": int(c.latent_channels),
            "vae_layers": int(c.layers_per_block), "vae_norm_groups": int(c.norm_num_groups)}


def with_vae_from(cfg: PriorConfig) -> PriorConfig:
    """cfg with its VAE shape fields read from cfg.vae_from's VAE (they then describe the VAE the prior really has)."""
    return replace(cfg, **_vae_shape(cfg.vae_from)) if cfg.vae_from else cfg


def parameter_counts(prior: LatentPrior) -> dict[str, int]:
    """Parameters per component, and the VAE's encoder and decoder separately."""
    n = {name: sum(p.numel() for p in m.parameters()) for name, m in prior.modules().items()}
    n["vae.encoder"] = sum(p.numel() for p in prior.vae.encoder.parameters()) + sum(p.numel() for p in prior.vae.quant_conv.parameters())
    n["vae.decoder"] = n["vae"] - n["vae.encoder"]
    return n
