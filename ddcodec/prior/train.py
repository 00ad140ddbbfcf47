"""`ddcodec prior train`: a VAE stage, then a class-conditional latent denoiser stage, with checkpoints and resume."""

from __future__ import annotations

import copy
import math
import os
import shutil
import signal
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers.training_utils import EMAModel, compute_snr
from tqdm import tqdm

from ..bundle.atomic import atomic_write_json, replace_dir
from ..errors import DDCodecError
from ..generators.prior import LatentPrior
from .checkpoint import (find_checkpoint, load_checkpoint, load_optimizer_state, optimizer_state, remove_checkpoint,
                         save_checkpoint)
from .config import PriorConfig, build_prior, parameter_counts, with_vae_from
from .data import ImageSet, split_holdout
from .perceptual import FeatureLoss, load_feature_net


@dataclass
class RunState:
    """Where a run is: stage ('vae' | 'unet' | 'done'), the step within it, wall time spent, and the log."""

    stage: str = "vae"
    step: int = 0
    seconds: dict[str, float] = field(default_factory=lambda: {"vae": 0.0, "latents": 0.0, "unet": 0.0})
    scaling_factor: float = 1.0
    log: list[dict[str, Any]] = field(default_factory=list)


# settings a resumed run may change: step counts (the learning-rate schedules stretch), batch sizes, loss weights
RESUMABLE = ("vae_steps", "unet_steps", "decoder_steps", "batch_size", "unet_batch_size", "feature_weight", "logit_weight",
             "decoder_lr")


class Stop(Exception):
    """Raised internally when --stop-after steps are done (after a checkpoint)."""


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warmup then cosine decay to zero: a pure function of the step, so resume needs no scheduler state."""
    warm = min(1.0, (step + 1) / max(1, warmup))
    return base * warm * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(1, total)))


def autocast(enabled: bool) -> Any:
    """bfloat16 autocast on CPU (about 1.6x faster training here), or nothing."""
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else nullcontext()


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255.0


def maybe_flip(x: torch.Tensor, g: torch.Generator, enabled: bool) -> torch.Tensor:
    """Mirror a random half of the batch horizontally."""
    if not enabled:
        return x
    mask = torch.rand(len(x), generator=g) < 0.5
    return torch.where(mask.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


class Trainer:
    """One `ddcodec prior train` run: owns the prior, optimizers, generator, checkpoint and progress."""

    def __init__(self, cfg: PriorConfig, data: ImageSet, out: Path, checkpoint_dir: Path,
                 checkpoint_every: int = 500, stop_after: int | None = None, progress: bool = True,
                 save_dtype: torch.dtype = torch.float32, log: Callable[[str], None] = lambda s: print(s, flush=True)) -> None:
        self.cfg, self.data, self.out, self.ckpt = cfg, data, out, checkpoint_dir
        self.checkpoint_every, self.stop_after, self.progress = checkpoint_every, stop_after, progress
        self.save_dtype, self.say = save_dtype, log
        self.train_idx, self.holdout_idx = split_holdout(data, cfg.holdout, cfg.seed)
        self.prior = build_prior(cfg, len(data.classes), source=str(out))
        self.vae, self.unet, self.cond = self.prior.vae, self.prior.unet, self.prior.conditioner
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        self.dec_opt = torch.optim.AdamW(self.decoder_params(), lr=cfg.decoder_lr, weight_decay=0.0)
        self.unet_opt = torch.optim.AdamW(list(self.unet.parameters()) + list(self.cond.parameters()),
                                          lr=cfg.unet_lr, weight_decay=0.01)
        self.ema = EMAModel(list(self.unet.parameters()) + list(self.cond.parameters()), decay=cfg.ema_decay,
                            use_ema_warmup=True, power=0.75)
        self.g = torch.Generator().manual_seed(cfg.seed)
        self.state = RunState()
        self.features: FeatureLoss | None = load_feature_net(cfg.feature_net) if cfg.feature_net else None
        self.steps_this_run = 0
        self.interrupted = False
        self.latents: torch.Tensor | None = None

    # checkpoints ------------------------------------------------------------------------
    def save(self) -> None:
        """Write a complete checkpoint atomically."""
        vae_opt, vae_meta = optimizer_state(self.vae_opt)
        dec_opt, dec_meta = optimizer_state(self.dec_opt)
        unet_opt, unet_meta = optimizer_state(self.unet_opt)
        ema = self.ema.state_dict()
        tensors = {"vae": self.vae.state_dict(), "unet": self.unet.state_dict(), "conditioner": self.cond.state_dict(),
                   "vae_opt": vae_opt, "unet_opt": unet_opt, "dec_opt": dec_opt,
                   "ema": {f"{i}": p for i, p in enumerate(ema["shadow_params"])},
                   "rng": {"generator": self.g.get_state()}}
        meta = {"config": self.cfg.to_dict(), "classes": self.data.classes, "num_images": len(self.data),
                "state": self.state.__dict__, "vae_opt": vae_meta, "unet_opt": unet_meta, "dec_opt": dec_meta,
                "ema": {k: v for k, v in ema.items() if k != "shadow_params"}}
        save_checkpoint(self.ckpt, tensors, meta)

    def restore(self) -> None:
        """Continue from the checkpoint (its config must match this run's)."""
        tensors, meta = load_checkpoint(self.ckpt)
        now = self.cfg.to_dict()
        diff = sorted(k for k, v in meta["config"].items() if now.get(k) != v)
        fixed = [k for k in diff if k not in RESUMABLE]
        if fixed or meta["classes"] != self.data.classes or meta["num_images"] != len(self.data):
            raise DDCodecError(f"the checkpoint in {self.ckpt} was made with different settings or data "
                               f"({', '.join(fixed) or 'data'})", "repeat the original command with --resume, or pass --overwrite")
        if diff:
            self.say("continuing with changed " + ", ".join(f"{k} {meta['config'][k]} -> {now[k]}" for k in diff))
        self.vae.load_state_dict(tensors["vae"])
        self.unet.load_state_dict(tensors["unet"])
        self.cond.load_state_dict(tensors["conditioner"])
        load_optimizer_state(self.vae_opt, tensors.get("vae_opt", {}), meta["vae_opt"])
        load_optimizer_state(self.unet_opt, tensors.get("unet_opt", {}), meta["unet_opt"])
        if "dec_opt" in meta:
            load_optimizer_state(self.dec_opt, tensors.get("dec_opt", {}), meta["dec_opt"])
        ema = dict(meta["ema"])
        ema["shadow_params"] = [tensors["ema"][str(i)] for i in range(len(tensors["ema"]))]
        self.ema.load_state_dict(ema)
        self.g.set_state(tensors["rng"]["generator"])
        self.state = RunState(**meta["state"])
        self.vae.register_to_config(scaling_factor=self.state.scaling_factor)
        self.say(f"resumed from {self.ckpt}: stage {self.state.stage}, step {self.state.step}")

    def after_step(self, total: int) -> None:
        """Checkpoint every `checkpoint_every` steps, at the end of a stage, and when --stop-after is reached."""
        self.state.step += 1
        self.steps_this_run += 1
        stop = self.interrupted or (self.stop_after is not None and self.steps_this_run >= self.stop_after)
        if stop or self.state.step % self.checkpoint_every == 0 or self.state.step == total:
            self.save()
        if stop and (self.state.step < total or self.interrupted):
            raise Stop

    # stage 1: the VAE --------------------------------------------------------------------
    def vae_loss(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L1 + tiny KL + feature distance + logit KL, on a batch of [0,1] images."""
        cfg = self.cfg
        with autocast(cfg.bf16):
            post = self.vae.encode(x * 2 - 1).latent_dist
            z = post.mean
            if cfg.sample_posterior:
                z = z + post.std * torch.randn(z.shape, generator=self.g).to(z.dtype)
            rec = self.vae.decode(z).sample.float()
            loss, parts = self.reconstruction_loss(x, rec)
            loss = loss + cfg.kl_weight * post.kl().float().mean() / x[0].numel()
        return loss, parts

    def reconstruction_loss(self, x: torch.Tensor, rec: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """L1 in [-1,1] plus the feature net's feature distance and logit KL, for [0,1] images and [-1,1] outputs."""
        cfg = self.cfg
        loss = (rec - (x * 2 - 1)).abs().mean()
        parts = {"l1": loss.item()}
        if self.features is not None:
            dist, logit_kl = self.features(x, (rec + 1) / 2)
            loss = loss + cfg.feature_weight * dist + cfg.logit_weight * logit_kl
            parts.update(feat=dist.item(), logit_kl=logit_kl.item())
        return loss, parts

    def train_vae(self) -> None:
        cfg, total = self.cfg, self.cfg.vae_steps
        self.vae.train().requires_grad_(True)
        bar = tqdm(total=total, initial=self.state.step, desc="VAE", unit="step", disable=not self.progress)
        t0 = time.time()
        try:
            while self.state.step < total:
                idx = self.train_idx[torch.randint(len(self.train_idx), (cfg.batch_size,), generator=self.g)]
                x = maybe_flip(to_unit(self.data.images[idx]), self.g, cfg.flip)
                for group in self.vae_opt.param_groups:
                    group["lr"] = lr_at(self.state.step, total, cfg.vae_lr, cfg.warmup)
                loss, parts = self.vae_loss(x)
                self.vae_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.vae.parameters(), 1.0)
                self.vae_opt.step()
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
                if (self.state.step + 1) % self.checkpoint_every == 0 or self.state.step + 1 == total:
                    self.state.log.append({"stage": "vae", "step": self.state.step + 1, **parts, **self.vae_holdout()})
                    self.say(f"VAE step {self.state.step + 1}: {self.state.log[-1]}")
                self.state.seconds["vae"] += time.time() - t0
                t0 = time.time()
                self.after_step(total)
        finally:
            bar.close()
        self.vae.eval().requires_grad_(False)

    @torch.no_grad()
    def vae_holdout(self, n: int = 500) -> dict[str, float]:
        """PSNR, and the feature net's accuracy on reconstructions, over the held-out train slice."""
        idx = self.holdout_idx[:n]
        if len(idx) == 0:
            return {}
        was = self.vae.training
        self.vae.eval()
        x = to_unit(self.data.images[idx])
        rec = torch.cat([((self.vae(x[s:s + 100] * 2 - 1).sample.float() + 1) / 2).clamp(0, 1) for s in range(0, len(x), 100)])
        self.vae.train(was)
        out = {"holdout_psnr": round(psnr(rec, x), 2)}
        if self.features is not None:
            y = self.data.labels[idx]
            out["holdout_featnet_acc_real"] = round((self.features.classifier(x).argmax(1) == y).float().mean().item(), 4)
            out["holdout_featnet_acc_rec"] = round((self.features.classifier(rec).argmax(1) == y).float().mean().item(), 4)
        return out

    # between the stages: latents ---------------------------------------------------------
    @torch.no_grad()
    def encode_latents(self) -> torch.Tensor:
        """Unscaled latent means of every training image (bf16 autocast when enabled)."""
        t0 = time.time()
        self.vae.eval()
        images = self.data.images[self.train_idx]
        out = []
        for s in tqdm(range(0, len(images), 256), desc="encoding latents", unit="batch", disable=not self.progress, leave=False):
            with autocast(self.cfg.bf16):
                out.append(self.vae.encode(to_unit(images[s:s + 256]) * 2 - 1).latent_dist.mean.float())
        self.state.seconds["latents"] += time.time() - t0
        return torch.cat(out)

    def set_scaling_factor(self, latents: torch.Tensor) -> None:
        """1/std of the training latents, as Stable Diffusion's VAE records it, so the denoiser sees unit variance."""
        self.state.scaling_factor = float(1.0 / latents.std().clamp_min(1e-6))
        self.vae.register_to_config(scaling_factor=self.state.scaling_factor)

    # stage 2: the denoiser ---------------------------------------------------------------
    def unet_loss(self, z0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """v-prediction MSE, weighted by min-SNR-gamma in x0 terms clipped to [1, gamma] (zero-SNR step keeps weight)."""
        cfg, sched = self.cfg, self.prior.scheduler
        y = torch.where(torch.rand(len(y), generator=self.g) < cfg.cfg_dropout, torch.full_like(y, -1), y)
        noise = torch.randn(z0.shape, generator=self.g)
        t = torch.randint(0, sched.config.num_train_timesteps, (len(z0),), generator=self.g)
        zt = sched.add_noise(z0, noise, t)
        target = sched.get_velocity(z0, noise, t)
        with autocast(cfg.bf16):
            pred = self.unet(zt, t, encoder_hidden_states=self.cond(y)).sample.float()
        snr = compute_snr(sched, t)
        weight = snr.clamp(max=cfg.min_snr_gamma).clamp(min=1.0) / (snr + 1)
        return (weight * (pred - target).pow(2).mean(dim=(1, 2, 3))).mean()

    def train_unet(self) -> None:
        cfg, total = self.cfg, self.cfg.unet_steps
        assert self.latents is not None
        labels = self.data.labels[self.train_idx]
        self.unet.train().requires_grad_(True)
        self.cond.train().requires_grad_(True)
        params = list(self.unet.parameters()) + list(self.cond.parameters())
        bar = tqdm(total=total, initial=self.state.step, desc="denoiser", unit="step", disable=not self.progress)
        t0, running = time.time(), None
        try:
            while self.state.step < total:
                idx = torch.randint(len(self.latents), (cfg.unet_batch_size,), generator=self.g)
                z0 = maybe_flip(self.latents[idx] * self.state.scaling_factor, self.g, cfg.flip)
                for group in self.unet_opt.param_groups:
                    group["lr"] = lr_at(self.state.step, total, cfg.unet_lr, cfg.warmup)
                loss = self.unet_loss(z0, labels[idx])
                self.unet_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                self.unet_opt.step()
                self.ema.step(params)
                running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{running:.4f}")
                if (self.state.step + 1) % self.checkpoint_every == 0 or self.state.step + 1 == total:
                    self.state.log.append({"stage": "unet", "step": self.state.step + 1, "loss": round(running, 5)})
                    self.say(f"denoiser step {self.state.step + 1}: loss {running:.4f}")
                self.state.seconds["unet"] += time.time() - t0
                t0 = time.time()
                self.after_step(total)
        finally:
            bar.close()

    # stage 3: decoder refinement ----------------------------------------------------------------
    def decoder_params(self) -> list[torch.nn.Parameter]:
        return list(self.vae.decoder.parameters()) + list(self.vae.post_quant_conv.parameters())

    def train_decoder(self) -> None:
        """Fine-tune only the decoder on the frozen encoder's latents (as SD's ft-MSE VAE): sharper images, same latent space."""
        cfg, total = self.cfg, self.cfg.decoder_steps
        assert self.latents is not None
        self.vae.eval().requires_grad_(False)
        self.vae.decoder.train()
        params = self.decoder_params()
        for p in params:
            p.requires_grad_(True)
        bar = tqdm(total=total, initial=self.state.step, desc="decoder", unit="step", disable=not self.progress)
        t0 = time.time()
        try:
            while self.state.step < total:
                idx = torch.randint(len(self.latents), (cfg.batch_size,), generator=self.g)
                x, z = to_unit(self.data.images[self.train_idx[idx]]), self.latents[idx]
                if cfg.flip:
                    mask = (torch.rand(len(x), generator=self.g) < 0.5).view(-1, 1, 1, 1)
                    x, z = torch.where(mask, x.flip(-1), x), torch.where(mask, z.flip(-1), z)
                for group in self.dec_opt.param_groups:
                    group["lr"] = lr_at(self.state.step, total, cfg.decoder_lr, cfg.warmup // 5)
                with autocast(cfg.bf16):
                    rec = self.vae.decode(z).sample.float()
                    loss, parts = self.reconstruction_loss(x, rec)
                self.dec_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                self.dec_opt.step()
                bar.update(1)
                bar.set_postfix({k: f"{v:.4f}" for k, v in parts.items()})
                if (self.state.step + 1) % self.checkpoint_every == 0 or self.state.step + 1 == total:
                    self.vae.decoder.eval()
                    self.state.log.append({"stage": "decoder", "step": self.state.step + 1, **parts, **self.vae_holdout()})
                    self.vae.decoder.train()
                    self.say(f"decoder step {self.state.step + 1}: {self.state.log[-1]}")
                self.state.seconds["decoder"] = self.state.seconds.get("decoder", 0.0) + time.time() - t0
                t0 = time.time()
                self.after_step(total)
        finally:
            bar.close()
        self.vae.eval().requires_grad_(False)

    # the whole run -------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train what is left, write the prior into `out`, remove the checkpoint; returns the training record."""
        if self.state.stage == "vae":
            self.train_vae()
            if self.cfg.vae_steps == 0:  # a VAE taken as it is (--vae-from): record how it does on this data
                self.state.log.append({"stage": "vae", "step": 0, **self.vae_holdout()})
                self.say(f"VAE from {self.cfg.vae_from or 'initialisation'}: {self.state.log[-1]}")
            self.latents = self.encode_latents()
            self.set_scaling_factor(self.latents)
            self.state.stage, self.state.step = "unet", 0
            self.save()
        if self.state.stage == "unet":
            if self.latents is None:
                self.latents = self.encode_latents()
            self.train_unet()
            self.state.stage, self.state.step = "decoder", 0
            if self.cfg.decoder_steps:
                self.save()
        if self.state.stage == "decoder":
            if self.cfg.decoder_steps and self.latents is None:
                self.latents = self.encode_latents()
            if self.cfg.decoder_steps:
                self.train_decoder()
            self.state.stage = "done"
        record = self.record()
        self.write_prior(record)
        remove_checkpoint(self.ckpt)
        return record

    def record(self) -> dict[str, Any]:
        """What went into this prior: config, data, steps, times, sizes and the held-out indices."""
        c, (lc, lh, lw) = self.cfg, self.cfg.latent_shape
        return {"config": c.to_dict(), "classes": self.data.classes, "train_images": int(len(self.train_idx)),
                "holdout_indices": self.holdout_idx.tolist(), "seconds": {k: round(v, 1) for k, v in self.state.seconds.items()},
                "parameters": parameter_counts(self.prior), "scaling_factor": self.state.scaling_factor,
                "latent_shape": [lc, lh, lw], "latent_values": lc * lh * lw,
                "pixel_values": 3 * c.image_size * c.image_size, "log": self.state.log,
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "saved_dtype": str(self.save_dtype).removeprefix("torch.")}

    def write_prior(self, record: dict[str, Any]) -> None:
        """EMA denoiser weights into a copy of the prior, saved to a temp dir and then swapped into `out`."""
        prior = copy.deepcopy(self.prior)
        params = list(prior.unet.parameters()) + list(prior.conditioner.parameters())
        self.ema.copy_to(params)
        for m in prior.modules().values():
            if self.save_dtype != torch.float32:
                m.to(self.save_dtype)
            m.eval()
        write_prior_dir(prior, self.out, record)


def write_prior_dir(prior: LatentPrior, out: Path, record: dict[str, Any]) -> None:
    """save_pretrained into a sibling temp dir plus training.json, then replace `out` with it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        prior.save_pretrained(tmp)
        atomic_write_json(tmp / "training.json", record)
        for p in [tmp, *tmp.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of the mean squared error over all pixels, images in [0,1]."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def train_prior(cfg: PriorConfig, data: ImageSet, out: str | os.PathLike, checkpoint_dir: str | os.PathLike | None = None,
                resume: bool = False, checkpoint_every: int = 500, stop_after: int | None = None,
                progress: bool = True, save_dtype: torch.dtype = torch.float32,
                log: Callable[[str], None] = lambda s: print(s, flush=True)) -> dict[str, Any] | None:
    """Train (or continue) a prior into `out`; returns its training record, or None when stopped by `stop_after`."""
    cfg = with_vae_from(cfg)
    cfg.check()
    out = Path(out)
    ckpt = Path(checkpoint_dir) if checkpoint_dir else out.with_name(out.name + ".ckpt")
    if find_checkpoint(ckpt) is not None and not resume:
        raise DDCodecError(f"{ckpt} holds an unfinished run", "pass --resume to continue it, or --overwrite to start over")
    trainer = Trainer(cfg, data, out, ckpt, checkpoint_every, stop_after, progress, save_dtype, log)
    if resume and find_checkpoint(ckpt) is not None:
        trainer.restore()
    with checkpoint_on_signal(trainer):
        try:
            return trainer.run()
        except Stop:
            log(f"stopped after {trainer.steps_this_run} step(s); checkpoint in {ckpt}; continue with --resume")
            return None


@contextmanager
def checkpoint_on_signal(trainer: Trainer) -> Iterator[None]:
    """Ctrl-C or SIGTERM: finish the current step, checkpoint, and stop (a second Ctrl-C aborts at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if trainer.interrupted:
            raise KeyboardInterrupt
        trainer.interrupted = True
        trainer.say("interrupted: checkpointing after this step (Ctrl-C again to abort)")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
