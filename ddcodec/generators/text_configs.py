"""Component configs of the Stable Diffusion family (full-size and tiny) and an offline CLIP tokenizer.

The full-size configs transcribe the published config.json files of SD-Turbo (SD 2.1 architecture),
SDXL-Turbo (SDXL architecture) and SD 1.5; they are built with random weights for GPU benchmarks.
The tiny configs keep each architecture's features (linear projections, per-block head counts,
SDXL's two encoders and text_time embedding) at sizes that run on a CPU in milliseconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

SD_SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                "prediction_type": "epsilon", "steps_offset": 1, "clip_sample": False, "set_alpha_to_one": False,
                "interpolation_type": "linear", "use_karras_sigmas": False}
TURBO_SCHEDULER = {**SD_SCHEDULER, "timestep_spacing": "trailing"}


def _vae(block_out_channels: list[int], scaling_factor: float, sample_size: int, **extra: Any) -> dict[str, Any]:
    n = len(block_out_channels)
    return {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": block_out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": 2, "act_fn": "silu", "norm_num_groups": 32, "sample_size": sample_size,
            "scaling_factor": scaling_factor, **extra}


def _clip(hidden: int, layers: int, heads: int, intermediate: int, act: str, projection_dim: int,
          vocab_size: int = 49408, bos: int = 0, eos: int = 2, pad: int = 1) -> dict[str, Any]:
    return {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": heads, "hidden_act": act,
            "projection_dim": projection_dim, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}


def sd_turbo_config() -> dict[str, Any]:
    """stabilityai/sd-turbo: SD 2.1 UNet (~866M), OpenCLIP-H text tower (23 layers), EulerDiscrete trailing."""
    unet = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "use_linear_projection": True,
            "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}
    return {"pipeline": "StableDiffusionPipeline", "vae": _vae([128, 256, 512, 512], 0.18215, 768), "unet": unet,
            "text_encoders": [{"class": "CLIPTextModel", "config": _clip(1024, 23, 16, 4096, "gelu", 512),
                               "pad_token": "!"}],
            "scheduler": {"class": "EulerDiscreteScheduler", "config": TURBO_SCHEDULER}}


def sd15_config() -> dict[str, Any]:
    """runwayml/stable-diffusion-v1-5: SD 1.x UNet (~860M), CLIP ViT-L/14 text encoder, PNDM."""
    unet = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            "attention_head_dim": 8, "cross_attention_dim": 768, "norm_num_groups": 32,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}
    return {"pipeline": "StableDiffusionPipeline", "vae": _vae([128, 256, 512, 512], 0.18215, 512), "unet": unet,
            "text_encoders": [{"class": "CLIPTextModel", "config": _clip(768, 12, 12, 3072, "quick_gelu", 768),
                               "pad_token": "<|endoftext|>"}],
            "scheduler": {"class": "PNDMScheduler", "config": {**SD_SCHEDULER, "skip_prk_steps": True}}}


def sdxl_turbo_config() -> dict[str, Any]:
    """stabilityai/sdxl-turbo: SDXL UNet (~2.57B), CLIP-L + OpenCLIP-bigG encoders, EulerAncestral trailing."""
    unet = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280],
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "transformer_layers_per_block": [1, 2, 10], "attention_head_dim": [5, 10, 20],
            "cross_attention_dim": 2048, "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
            "norm_num_groups": 32, "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}
    return {"pipeline": "StableDiffusionXLPipeline", "vae": _vae([128, 256, 512, 512], 0.13025, 1024, force_upcast=True),
            "unet": unet, "force_zeros_for_empty_prompt": True,
            "text_encoders": [{"class": "CLIPTextModel", "config": _clip(768, 12, 12, 3072, "quick_gelu", 768),
                               "pad_token": "<|endoftext|>"},
                              {"class": "CLIPTextModelWithProjection",
                               "config": _clip(1280, 32, 20, 5120, "gelu", 1280), "pad_token": "!"}],
            "scheduler": {"class": "EulerAncestralDiscreteScheduler", "config": TURBO_SCHEDULER}}


# Tiny text encoders use the offline byte-level vocabulary: 514 tokens, <|startoftext|> 512, <|endoftext|> 513.
_TINY_IDS = {"vocab_size": 514, "bos": 512, "eos": 513}


def tiny_sd_turbo_config() -> dict[str, Any]:
    """SD-Turbo's architecture in miniature: f2 VAE, 2-level UNet with linear projections, 1 CLIP encoder."""
    unet = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [32, 64], "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": [2, 4],
            "cross_attention_dim": 32, "use_linear_projection": True, "norm_num_groups": 32,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}
    vae = {**_vae([32, 64], 0.18215, 32), "layers_per_block": 1}
    return {"pipeline": "StableDiffusionPipeline", "vae": vae, "unet": unet,
            "text_encoders": [{"class": "CLIPTextModel", "config": _clip(32, 3, 4, 64, "gelu", 32, pad=0, **_TINY_IDS),
                               "pad_token": "!"}],
            "scheduler": {"class": "EulerDiscreteScheduler", "config": TURBO_SCHEDULER}}


def tiny_sdxl_turbo_config() -> dict[str, Any]:
    """SDXL-Turbo's architecture in miniature: two CLIP encoders (hidden 32 + 32), text_time embedding."""
    unet = {"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [32, 64], "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
            "attention_head_dim": [2, 4], "cross_attention_dim": 64, "use_linear_projection": True,
            "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 6 * 8 + 32, "norm_num_groups": 32,
            "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu"}
    vae = {**_vae([32, 64], 0.13025, 32, force_upcast=True), "layers_per_block": 1}
    return {"pipeline": "StableDiffusionXLPipeline", "vae": vae, "unet": unet, "force_zeros_for_empty_prompt": True,
            "text_encoders": [{"class": "CLIPTextModel",
                               "config": _clip(32, 3, 4, 64, "quick_gelu", 32, pad=513, **_TINY_IDS),
                               "pad_token": "<|endoftext|>"},
                              {"class": "CLIPTextModelWithProjection",
                               "config": _clip(32, 3, 4, 64, "gelu", 32, pad=0, **_TINY_IDS), "pad_token": "!"}],
            "scheduler": {"class": "EulerAncestralDiscreteScheduler", "config": TURBO_SCHEDULER}}


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def byte_level_clip_tokenizer(pad_token: str = "!", model_max_length: int = 77) -> Any:
    """A real transformers CLIPTokenizer over CLIP's 514 byte-level tokens (no merges), built offline."""
    from transformers import CLIPTokenizer
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory(prefix="ddcodec-clip-tok-") as tmp:
        d = Path(tmp)
        (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
        (d / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer.from_pretrained(tmp, pad_token=pad_token, model_max_length=model_max_length)
