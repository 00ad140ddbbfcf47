"""FLOPs of one denoiser call and one VAE decode of full-size priors, and their FLOP-bound time on a GPU.

The architectures are built on the meta device (no weights, no compute) and run under
torch.utils.flop_counter.FlopCounterMode, which counts matmul, convolution and attention FLOPs
(2 per multiply-add) from shapes alone. The FLOP-bound time is FLOPs / peak, a theoretical lower
bound, not a measurement: the default peak is the H100 SXM's dense fp16/bf16 tensor-core figure,
989 TFLOP/s.

  python tools/unet_flops.py --priors sd-turbo sdxl-turbo --latent-size 64 --json docs/results/bench-unet-flops.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from ddcodec.generators import text_configs
from ddcodec.generators.text import build_text_prior

CONFIGS: dict[str, Callable[[], dict[str, Any]]] = {
    "sd-turbo": text_configs.sd_turbo_config, "sdxl-turbo": text_configs.sdxl_turbo_config,
    "sd15": text_configs.sd15_config}


def count(fn: Callable[[], Any]) -> int:
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def flops(name: str, latent: int, batch: int = 1, tokens: int = 77) -> dict[str, Any]:
    """FLOPs per image of one UNet call (no guidance) and one VAE decode / encode, at `latent` x `latent` latents."""
    prior = build_text_prior(CONFIGS[name](), device="meta")
    unet, vae = prior.unet, prior.vae
    meta = torch.device("meta")
    width = unet.config.cross_attention_dim
    x = torch.empty(batch, unet.config.in_channels, latent, latent, device=meta)
    kwargs: dict[str, Any] = {"encoder_hidden_states": torch.empty(batch, tokens, width, device=meta)}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.add_embedding.linear_1.in_features - 6 * unet.config.addition_time_embed_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.empty(batch, pooled, device=meta),
                                       "time_ids": torch.empty(batch, 6, device=meta)}
    t = torch.tensor([999] * batch, device=meta)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.no_grad():
        u = count(lambda: unet(x, t, **kwargs))
        d = count(lambda: vae.decode(x).sample)
        e = count(lambda: vae.encode(torch.empty(batch, 3, latent * f, latent * f, device=meta)).latent_dist.mean)
    params = sum(p.numel() for p in unet.parameters())
    return {"prior": name, "image_size": latent * f, "latent": [unet.config.in_channels, latent, latent],
            "unet_params": params, "unet_flops_per_image": u / batch, "vae_decode_flops_per_image": d / batch,
            "vae_encode_flops_per_image": e / batch}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--priors", nargs="+", default=["sd-turbo", "sdxl-turbo"], choices=list(CONFIGS))
    ap.add_argument("--latent-size", type=int, default=64)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense fp16 peak (default: H100 SXM)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rows = []
    for name in args.priors:
        r = flops(name, args.latent_size)
        peak = args.peak_tflops * 1e12
        # an image at s steps without guidance: s UNet calls and one VAE decode
        r["flop_bound_ms_per_image"] = {str(s): (s * r["unet_flops_per_image"] + r["vae_decode_flops_per_image"]) / peak * 1e3
                                        for s in args.steps}
        r["flop_bound_images_per_s"] = {k: 1e3 / v for k, v in r["flop_bound_ms_per_image"].items()}
        print(f"{name} @ {r['image_size']} px: UNet {r['unet_flops_per_image'] / 1e12:.3f} TFLOP/call, "
              f"VAE decode {r['vae_decode_flops_per_image'] / 1e12:.3f} TFLOP; FLOP-bound ms/image at "
              + ", ".join(f"{s} steps {v:.2f}" for s, v in r["flop_bound_ms_per_image"].items()), flush=True)
        rows.append(r)
    result = {"command": "python tools/unet_flops.py " + shlex.join(sys.argv[1:] if argv is None else argv),
              "peak_tflops": args.peak_tflops, "note": "theoretical FLOP-bound time, not a measurement",
              "priors": rows}
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
