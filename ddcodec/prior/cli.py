"""`ddcodec prior train | eval`: train a diffusers-format latent prior on a dataset, and measure it."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..errors import DDCodecError


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _flags(text: str) -> list[bool]:
    return [bool(v) for v in _ints(text)]


def register(subparsers: Any) -> None:
    """Add `ddcodec prior` with its `train` and `eval` sub-commands."""
    p = subparsers.add_parser("prior", help="train or evaluate a latent diffusion prior")
    sub = p.add_subparsers(dest="prior_command", required=True, metavar="ACTION")
    d = __import__("ddcodec.prior.config", fromlist=["PriorConfig"]).PriorConfig()

    t = sub.add_parser("train", help="train a VAE, then a class-conditional latent denoiser; save with save_pretrained")
    t.add_argument("--data", required=True, help="dataset .tar, ImageFolder dir, 'sample:cifar10', or torchvision name")
    t.add_argument("--split", default="train")
    t.add_argument("--out", required=True, help="prior directory to write (diffusers layout)")
    t.add_argument("--image-size", type=int, default=None, help="square training size (default: the data's)")
    t.add_argument("--limit", type=int, default=None, help="train on a seeded class-balanced subset of this many images")
    t.add_argument("--latent-channels", type=int, default=d.latent_channels)
    t.add_argument("--vae-channels", type=_ints, default=d.vae_channels, help="VAE widths; n entries = 2^(n-1) downsampling")
    t.add_argument("--unet-channels", type=_ints, default=d.unet_channels)
    t.add_argument("--unet-attention", type=_flags, default=d.unet_attention, help="attention per UNet level, e.g. 0,1,1")
    t.add_argument("--context-dim", type=int, default=d.context_dim, help="class token width (cross-attention dim)")
    t.add_argument("--vae-from", default=None, metavar="PRIOR",
                   help="start from this prior's VAE (builtin:default, a directory or hub id); with no --vae-steps it "
                        "is kept as it is and only the denoiser is trained")
    t.add_argument("--vae-steps", type=int, default=None, help=f"VAE training steps (default {d.vae_steps}; 0 with --vae-from)")
    t.add_argument("--unet-steps", type=int, default=d.unet_steps)
    t.add_argument("--decoder-steps", type=int, default=d.decoder_steps,
                   help="finally fine-tune the VAE decoder alone on the frozen latents (sharper, same latent space)")
    t.add_argument("--decoder-lr", type=float, default=d.decoder_lr)
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="VAE batch size")
    t.add_argument("--unet-batch-size", type=int, default=d.unet_batch_size)
    t.add_argument("--vae-lr", type=float, default=d.vae_lr)
    t.add_argument("--unet-lr", type=float, default=d.unet_lr)
    t.add_argument("--feature-net", default=None,
                   help="teacher name whose features sharpen the VAE (e.g. cifar10-resnet20); use a different one to evaluate")
    t.add_argument("--feature-weight", type=float, default=d.feature_weight)
    t.add_argument("--logit-weight", type=float, default=d.logit_weight)
    t.add_argument("--holdout", type=int, default=d.holdout, help="train images kept out for monitoring and selection")
    t.add_argument("--no-bf16", dest="bf16", action="store_false", help="train in float32 instead of bfloat16 autocast")
    t.add_argument("--seed", type=int, default=d.seed)
    t.add_argument("--checkpoint-every", type=int, default=250, help="steps between checkpoints")
    t.add_argument("--checkpoint-dir", default=None, help="default: OUT.ckpt next to OUT")
    t.add_argument("--resume", action="store_true", help="continue the unfinished run in the checkpoint directory")
    t.add_argument("--stop-after", type=int, default=None, help="checkpoint and stop after this many steps (resume later)")
    t.add_argument("--save-dtype", choices=["float32", "float16"], default="float32", help="dtype of the saved weights")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--overwrite", action="store_true", help="replace OUT and discard an unfinished run")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="teacher accuracy on reconstructions, img2img regenerations and samples")
    e.add_argument("prior", help="prior directory, builtin:default, or a hub id")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", help="test, or 'holdout' for the train images the prior kept out")
    e.add_argument("--teacher", default="cifar10-resnet56", help="registered teacher name")
    e.add_argument("--limit", type=int, default=1000, help="seeded class-balanced subset size (0 = all)")
    e.add_argument("--image-size", type=int, default=None,
                   help="resize the data to this square size (default: the size the prior was trained at)")
    e.add_argument("--rho", type=float, default=0.5, help="img2img strength")
    e.add_argument("--steps", type=int, default=10, help="scheduler steps of the full schedule")
    e.add_argument("--guidance", type=_floats, default=[3.0], help="classifier-free guidance for pure samples (comma list)")
    e.add_argument("--img2img-guidance", type=float, default=1.0)
    e.add_argument("--samples-per-class", type=int, default=100)
    e.add_argument("--micro-batch", type=int, default=50)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--threads", type=int, default=None)
    e.add_argument("--json", default=None, help="also write the results to this JSON file")
    e.set_defaults(func=cmd_eval)


def cmd_train(args: argparse.Namespace) -> int:
    import torch
    from .config import PriorConfig, with_vae_from
    from .data import load_images
    from .train import train_prior
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    ckpt = Path(args.checkpoint_dir) if args.checkpoint_dir else out.with_name(out.name + ".ckpt")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise DDCodecError(f"{out} already exists", "choose another --out or pass --overwrite")
    if args.overwrite and not args.resume:
        from .checkpoint import remove_checkpoint
        remove_checkpoint(ckpt)
    data = load_images(args.data, args.split, args.image_size, args.limit, args.seed)
    cfg = PriorConfig(image_size=int(data.images.shape[-1]), latent_channels=args.latent_channels,
                      vae_channels=args.vae_channels, unet_channels=args.unet_channels,
                      unet_attention=args.unet_attention, context_dim=args.context_dim, vae_from=args.vae_from,
                      vae_steps=args.vae_steps if args.vae_steps is not None else 0 if args.vae_from else PriorConfig.vae_steps,
                      unet_steps=args.unet_steps, decoder_steps=args.decoder_steps, decoder_lr=args.decoder_lr,
                      batch_size=args.batch_size, unet_batch_size=args.unet_batch_size,
                      vae_lr=args.vae_lr, unet_lr=args.unet_lr, feature_net=args.feature_net,
                      feature_weight=args.feature_weight, logit_weight=args.logit_weight,
                      holdout=min(args.holdout, len(data) // 2), bf16=args.bf16, seed=args.seed)
    cfg = with_vae_from(cfg)
    c, h, w = cfg.latent_shape
    print(f"training a prior on {len(data)} images ({len(data.classes)} classes, {cfg.image_size} px); "
          f"latents {c}x{h}x{w}; {cfg.vae_steps} VAE + {cfg.unet_steps} denoiser steps", flush=True)
    t0 = time.time()
    record = train_prior(cfg, data, out, ckpt, resume=args.resume, checkpoint_every=args.checkpoint_every,
                         stop_after=args.stop_after, save_dtype=getattr(torch, args.save_dtype))
    if record is None:
        return 0
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out}: {sum(v for k, v in record['parameters'].items() if '.' not in k) / 1e6:.2f}M parameters, "
          f"{size / 1e6:.1f} MB, {time.time() - t0:.0f} s this run")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from ..generators.prior import load_prior, trained_size, training_record
    from ..labels.teachers import load_teacher
    from .data import load_images
    from .evaluate import evaluate
    if args.threads:
        torch.set_num_threads(args.threads)
    prior = load_prior(args.prior)
    size = args.image_size or trained_size(prior)
    held = None
    if args.split == "holdout":
        held = training_record(prior).get("holdout_indices")
        if not held:
            raise DDCodecError(f"{args.prior} has no training.json with held-out indices", "use --split test")
    # decode only the images evaluated: the held-out ones, then the class-balanced --limit of them
    data = load_images(args.data, "train" if held else args.split, size, limit=args.limit or None, seed=args.seed,
                       indices=held)
    teacher = load_teacher(args.teacher)
    res = evaluate(prior, data, teacher, rho=args.rho, steps=args.steps, guidance=tuple(args.guidance),
                   img2img_guidance=args.img2img_guidance, samples_per_class=args.samples_per_class, seed=args.seed,
                   micro_batch=args.micro_batch)
    res.update({"prior": args.prior, "data": args.data, "split": args.split, "teacher": args.teacher})
    print_table(res)
    if args.json:
        from ..bundle.atomic import atomic_write_json
        atomic_write_json(args.json, res)
        print(f"wrote {args.json}")
    return 0


def print_table(res: dict[str, Any]) -> None:
    """The eval results as a small Markdown table."""
    n = res["n_images"]
    rows = [("VAE PSNR (dB)", f"{res['vae_psnr_db']:.2f}"),
            ("teacher accuracy, original images", f"{100 * res['acc_original']:.1f}%"),
            ("teacher accuracy, VAE reconstructions", f"{100 * res['acc_reconstruction']:.1f}%"),
            (f"teacher accuracy, img2img rho={res['rho']} (guidance {res['guidance_img2img']})", f"{100 * res['acc_img2img']:.1f}%")]
    for g, acc in res.get("acc_samples", {}).items():
        rows.append((f"teacher accuracy, pure samples (guidance {g}, {res['samples_per_class']}/class)", f"{100 * acc:.1f}%"))
    print(f"prior {res['prior']} on {res['data']} [{res['split']}], {n} images, teacher {res['teacher']}, "
          f"{res['steps']} scheduler steps, seed {res['seed']}")
    print("| figure | value |\n|---|---|")
    for k, v in rows:
        print(f"| {k} | {v} |")
