"""Pixel-space distillation objectives on decoded images: distribution matching (DM, Zhao & Bilen 2023) and
gradient matching (DC, Zhao et al. 2021), with siamese differentiable augmentation (DSA, Zhao & Bilen 2021).

All randomness comes from CPU generators seeded by the caller, so a distillation run is reproducible and resumable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DDCodecError

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"  # DC/DM/GLaD/LD3M default
DSA_OPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
# DSA's ParamDiffAug defaults
SCALE, ROTATE, CROP_PAD, CUTOUT, BRIGHTNESS, SATURATION, CONTRAST = 1.2, 15.0, 0.125, 0.5, 1.0, 2.0, 0.5


def parse_strategy(strategy: str) -> tuple[str, ...]:
    """DSA ops of a strategy string ('none' for no augmentation); one-line error on unknown ops."""
    if strategy.lower() in ("", "none"):
        return ()
    ops = tuple(strategy.split("_"))
    bad = [o for o in ops if o not in DSA_OPS]
    if bad:
        raise DDCodecError(f"unknown DSA augmentation {bad[0]!r}", f"use ops from {'_'.join(DSA_OPS)}, or none")
    return ops


@dataclass(frozen=True)
class Augmentation:
    """One siamese DSA draw: the op and its scalar parameters, applied alike to real and synthetic batches."""

    op: str
    values: tuple[float, ...] = ()

    @classmethod
    def sample(cls, ops: tuple[str, ...], g: torch.Generator, size: tuple[int, int]) -> "Augmentation":
        """Pick one op (as DSA does per call) and draw its parameters."""
        if not ops:
            return cls("none")
        op = ops[int(torch.randint(len(ops), (1,), generator=g))]
        u = torch.rand(3, generator=g, dtype=torch.float64).tolist()
        h, w = size
        if op == "crop":
            ph, pw = int(h * CROP_PAD + 0.5), int(w * CROP_PAD + 0.5)
            return cls(op, (float(torch.randint(-ph, ph + 1, (1,), generator=g)), float(torch.randint(-pw, pw + 1, (1,), generator=g))))
        if op == "cutout":
            sh, sw = int(h * CUTOUT + 0.5), int(w * CUTOUT + 0.5)
            return cls(op, (float(torch.randint(0, h + (1 - sh % 2), (1,), generator=g)),
                            float(torch.randint(0, w + (1 - sw % 2), (1,), generator=g)), float(sh), float(sw)))
        return cls(op, tuple(u))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a (B, 3, H, W) batch, differentiably."""
        op, v = self.op, self.values
        if op == "none":
            return x
        if op == "color":
            x = x + (v[0] - 0.5) * BRIGHTNESS
            m = x.mean(dim=1, keepdim=True)
            x = (x - m) * (v[1] * SATURATION) + m
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - m) * (v[2] + CONTRAST) + m
        if op == "flip":
            return x.flip(3) if v[0] < 0.5 else x
        if op == "crop":
            dy, dx = int(v[0]), int(v[1])
            h, w = x.shape[-2:]
            p = max(abs(dy), abs(dx))
            xp = F.pad(x, (p, p, p, p))
            return xp[:, :, p + dy:p + dy + h, p + dx:p + dx + w]
        if op == "cutout":
            cy, cx, sh, sw = (int(t) for t in v)
            h, w = x.shape[-2:]
            mask = torch.ones(h, w, device=x.device, dtype=x.dtype)
            mask[max(cy - sh // 2, 0):min(cy - sh // 2 + sh, h), max(cx - sw // 2, 0):min(cx - sw // 2 + sw, w)] = 0
            return x * mask
        if op == "scale":
            sx, sy = (v[i] * (SCALE - 1 / SCALE) + 1 / SCALE for i in (0, 1))
            theta = [[sx, 0.0, 0.0], [0.0, sy, 0.0]]
        else:  # rotate
            a = (v[0] - 0.5) * 2 * ROTATE / 180 * math.pi
            theta = [[math.cos(a), math.sin(-a), 0.0], [math.sin(a), math.cos(a), 0.0]]
        th = torch.tensor(theta, dtype=x.dtype, device=x.device).expand(len(x), 2, 3)
        grid = F.affine_grid(th, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)


def dm_class_loss(net: nn.Module, real: torch.Tensor, syn: torch.Tensor) -> torch.Tensor:
    """||mean embed(real) - mean embed(syn)||^2 for one class (eq. 3)."""
    with torch.no_grad():
        mu_real = net.embed(real).mean(0)
    return ((mu_real - net.embed(syn).mean(0)) ** 2).sum()


def match_distance(gw_syn: list[torch.Tensor], gw_real: list[torch.Tensor]) -> torch.Tensor:
    """DC's layer-wise gradient distance: sum over output units of (1 - cosine), biases ignored (DC 'ours')."""
    dis = gw_syn[0].new_zeros(())
    for gs, gr in zip(gw_syn, gw_real):
        if gs.dim() == 1:  # bias / norm vectors: DC ignores them
            continue
        gs, gr = gs.reshape(gs.shape[0], -1), gr.reshape(gr.shape[0], -1)
        dis = dis + (1 - (gs * gr).sum(-1) / (gs.norm(dim=-1) * gr.norm(dim=-1) + 1e-6)).sum()
    return dis


def dc_class_loss(net: nn.Module, real: torch.Tensor, syn: torch.Tensor, label: int) -> torch.Tensor:
    """Gradient matching for one class (eq. 2): distance between the CE gradients on real and synthetic images."""
    params = [p for p in net.parameters() if p.requires_grad]
    y_real = torch.full((len(real),), label, dtype=torch.long, device=real.device)
    y_syn = torch.full((len(syn),), label, dtype=torch.long, device=syn.device)
    gw_real = [g.detach() for g in torch.autograd.grad(F.cross_entropy(net(real), y_real), params)]
    gw_syn = torch.autograd.grad(F.cross_entropy(net(syn), y_syn), params, create_graph=True)
    return match_distance(list(gw_syn), gw_real)


def dc_loops(ipc: int) -> tuple[int, int]:
    """DC's (outer_loop, inner_loop) for an IPC: network re-initialised every outer_loop updates, trained inner_loop steps between."""
    table = {1: (1, 1), 10: (10, 50), 20: (20, 25), 30: (30, 20), 40: (40, 15), 50: (50, 10)}
    key = max(k for k in table if k <= max(ipc, 1))
    return table[key]


def train_network(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int, lr: float, batch: int,
                  ops: tuple[str, ...], g: torch.Generator) -> None:
    """DC's inner loop: `steps` SGD steps of the matching network on (detached) synthetic images, with DSA."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    size = tuple(images.shape[-2:])
    for _ in range(steps):
        idx = torch.randperm(len(images), generator=g)[:batch].to(images.device)
        aug = Augmentation.sample(ops, g, size)
        loss = F.cross_entropy(net(aug(images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
