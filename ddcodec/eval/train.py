"""Train a student from scratch (on a regenerated bundle or on real images) and test it on a real split."""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .. import __version__
from ..errors import DDCodecError
from .augment import IMAGENET_MEAN, IMAGENET_STD, MIXES, augment, cutmix, default_mode, normalize
from .feeds import BundleFeed, TensorFeed, load_split, load_tensors
from .students import build_student, count_parameters

LABEL_MODES = ("auto", "soft", "hard")
REPORT_KINDS = ("bundle", "real-full", "real-subset")  # the "kind" of eval_bundle's and eval_real's reports


@dataclass
class TrainConfig:
    """How a student is trained; every field lands in the JSON report."""

    epochs: int = 300
    batch_size: int = 64
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    augment: str | None = None
    mix: str = "none"
    temperature: float | None = None
    labels: str = "auto"
    device: str = "cpu"
    eval_batch: int = 500

    def record(self) -> dict[str, Any]:
        return asdict(self) | {"normalize_mean": list(IMAGENET_MEAN), "normalize_std": list(IMAGENET_STD)}


def derive(seed: int, stream: str) -> int:
    """A 63-bit seed for one random stream of one student seed."""
    return int.from_bytes(hashlib.sha256(f"ddcodec-eval:{seed}:{stream}".encode()).digest()[:8], "little") >> 1


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, total_steps: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """SGD (momentum, weight decay) or AdamW, with a per-step cosine, step (halfway, x0.1) or constant schedule."""
    if cfg.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                                                     weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        raise DDCodecError(f"unknown optimizer {cfg.optimizer!r}", "use sgd or adamw")
    total = max(1, total_steps)
    if cfg.schedule == "cosine":
        fn = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total))  # noqa: E731
    elif cfg.schedule == "step":
        fn = lambda s: 0.1 if s >= total // 2 else 1.0  # noqa: E731
    elif cfg.schedule == "constant":
        fn = lambda s: 1.0  # noqa: E731
    else:
        raise DDCodecError(f"unknown schedule {cfg.schedule!r}", "use cosine, step or constant")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, fn)


def soft_loss(logits: torch.Tensor, probs: torch.Tensor, temperature: float, stored_temperature: float) -> torch.Tensor:
    """T² · KL(target_T ‖ softmax(logits / T)); the stored probabilities are re-tempered from their own temperature to T."""
    target = probs.float()
    if temperature != stored_temperature:
        target = torch.softmax(target.clamp_min(1e-8).log() * (stored_temperature / temperature), -1)
    return F.kl_div(F.log_softmax(logits.float() / temperature, -1), target, reduction="batchmean") * temperature ** 2


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, device: str | torch.device = "cpu",
             batch_size: int = 500) -> float:
    """Top-1 accuracy on uint8 (N, 3, H, W) images."""
    model.eval()
    correct = 0
    for s in range(0, len(images), batch_size):
        x = normalize(images[s:s + batch_size].to(device).float().div_(255))
        correct += (model(x).argmax(1).cpu() == labels[s:s + batch_size]).sum().item()
    model.train()
    return correct / max(1, len(images))


def fit(student: str, num_classes: int, image_size: tuple[int, int], feed: BundleFeed | TensorFeed, steps_per_epoch: int,
        cfg: TrainConfig, seed: int, test: tuple[torch.Tensor, torch.Tensor], soft: bool, stored_temperature: float = 1.0,
        desc: str = "", teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train one freshly initialised student for cfg.epochs and return its test accuracy and timings.

    With a `teacher`, every augmented batch is relabelled by it (FKD/RDED-style: the label matches the crop).
    """
    if cfg.mix not in MIXES:
        raise DDCodecError(f"unknown mix {cfg.mix!r}", f"use one of {', '.join(MIXES)}")
    torch.manual_seed(derive(seed, "init"))
    model = build_student(student, num_classes, image_size).to(cfg.device).train()
    opt, sched = make_optimizer(model, cfg, cfg.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(derive(seed, "augment"))
    mode = cfg.augment or default_mode(min(image_size))
    temperature = cfg.temperature or stored_temperature
    regen0, regenerated0 = feed.regen_s, feed.regenerated
    student_s, trained, loss_v = 0.0, 0, float("nan")
    t_start = time.perf_counter()
    bar = tqdm(range(cfg.epochs), desc=desc or f"{student} seed {seed}", unit="epoch", leave=False, mininterval=1.0)
    for e in bar:
        for images, probs, hard in feed.epoch(e):
            t0 = time.perf_counter()
            x = augment(images.float(), g, mode)
            perm, kept = None, 1.0
            if cfg.mix == "cutmix":
                x, perm, kept = cutmix(x, g)
            if teacher is not None:  # the teacher labels the mixed crop itself
                with torch.no_grad():
                    probs = torch.softmax(teacher(x).float() / stored_temperature, -1)
            elif perm is not None and soft:
                probs = kept * probs.float() + (1 - kept) * probs.float()[perm.to(probs.device)]
            logits = model(normalize(x))
            if soft:
                loss = soft_loss(logits, probs, temperature, stored_temperature)
            else:
                loss = F.cross_entropy(logits, hard.long())
                if perm is not None:
                    loss = kept * loss + (1 - kept) * F.cross_entropy(logits, hard.long()[perm.to(hard.device)])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            student_s += time.perf_counter() - t0
            trained += len(images)
            loss_v = float(loss.detach())
        bar.set_postfix(loss=f"{loss_v:.3f}", refresh=False)
    train_s = time.perf_counter() - t_start
    t0 = time.perf_counter()
    acc = evaluate(model, test[0], test[1], cfg.device, cfg.eval_batch)
    return {"seed": seed, "accuracy": acc, "final_loss": loss_v, "train_s": train_s, "student_s": student_s,
            "regen_s": feed.regen_s - regen0, "regenerated_images": feed.regenerated - regenerated0,
            "trained_images": trained, "eval_s": time.perf_counter() - t0, "parameters": count_parameters(model)}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy per seed, mean and std (population std, numpy's default, as in the DD papers), and throughput."""
    acc = np.array([r["accuracy"] for r in runs], dtype=np.float64)
    regen_s = sum(r["regen_s"] for r in runs)
    regenerated = sum(r["regenerated_images"] for r in runs)
    student_s = sum(r["student_s"] for r in runs)
    trained = sum(r["trained_images"] for r in runs)
    return {
        "accuracy": acc.tolist(), "mean": float(acc.mean()), "std": float(acc.std()),
        "std_sample": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "train_s": sum(r["train_s"] for r in runs), "eval_s": sum(r["eval_s"] for r in runs),
        "regen_s": regen_s, "regenerated_images": regenerated,
        "regen_images_per_s": regenerated / regen_s if regen_s > 0 else None,
        "student_s": student_s, "trained_images": trained,
        "student_images_per_s": trained / student_s if student_s > 0 else None,
        "per_seed": runs,
    }


def environment(cfg: TrainConfig) -> dict[str, Any]:
    return {"ddcodec": __version__, "torch": torch.__version__, "python": platform.python_version(),
            "device": cfg.device, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}


def _check_classes(train_names: list[str], test_classes: list[str]) -> None:
    from ..data import readable_names
    if len(train_names) != len(test_classes):
        raise DDCodecError(f"the training set has {len(train_names)} classes but the test data has {len(test_classes)}",
                           "pass --test-data with the same classes")
    if list(train_names) != readable_names(test_classes) and list(train_names) != list(test_classes):
        raise DDCodecError(f"class names differ between training set ({train_names[0]}, ...) and test data "
                           f"({test_classes[0]}, ...)", "pass --test-data with the same classes in the same order")


def _label_setup(bundle: Any, cfg: TrainConfig) -> tuple[bool, float, Any, dict[str, Any]]:
    """(train on soft labels?, their stored temperature, online teacher or None, labels record)."""
    lab = bundle.manifest["labels"]
    if cfg.labels not in LABEL_MODES:
        raise DDCodecError(f"unknown --labels {cfg.labels!r}", "use auto, soft or hard")
    online = lab.get("online_teacher")
    has_soft = lab["kind"] == "soft" or online is not None
    if cfg.labels == "soft" and not has_soft:
        raise DDCodecError("this bundle stores hard labels only and names no online teacher", "use --labels hard or auto")
    soft = has_soft and cfg.labels != "hard"
    stored_t = float(lab.get("codec", {}).get("temperature", 1.0)) if lab["kind"] == "soft" else \
        float((online or {}).get("temperature", 1.0))
    teacher = None
    if soft and lab["kind"] != "soft":
        from ..loader.dataset import resolve_online_teacher
        teacher, _ = resolve_online_teacher(bundle.manifest, "bundle", stored_t, torch.device(cfg.device))
    record = {"kind": lab["kind"], "used": "soft (KL)" if soft else "hard (CE)", "stored_temperature": stored_t,
              "temperature": (cfg.temperature or stored_t) if soft else None,
              "online_teacher": online["name"] if teacher is not None else None,
              "online_relabel": "every augmented batch" if teacher is not None else None, "codec": lab.get("codec")}
    return soft, stored_t, teacher, record


def bundle_record(bundle: Any) -> dict[str, Any]:
    """What the table needs about a bundle: method, IPC, sizes in bytes (total, soft labels, by payload)."""
    from ..cli import inspect_summary
    s = inspect_summary(bundle)
    lab = bundle.manifest["labels"]
    soft_bytes = int(bundle.manifest["payloads"][lab["payload"]]["bytes"]) if lab["kind"] == "soft" else 0
    ipc = s["method_params"].get("ipc") or round(bundle.num_items / max(1, bundle.num_classes))
    return {"source": s["source"], "digest": bundle.digest(), "method": s["method"], "method_params": s["method_params"],
            "ipc": ipc, "items": s["items"], "classes": s["classes"], "variants": s["variants"],
            "image_size": s["image_size"], "generator": s["generator"]["source"], "pipeline": s["generator"]["pipeline"],
            "generator_params": s["generator"]["params"], "bytes": s["total_bytes"], "bytes_without_reference": s["total_bytes"] - s["bytes"].get("reference", 0),
            "soft_label_bytes": soft_bytes, "bytes_by_part": s["bytes"]}


def eval_bundle(bundle: Any, student: str, test_data: str | None, cfg: TrainConfig, seeds: list[int], test_split: str = "test",
                test_limit: int | None = None, cache_dir: str | None = None, memory_cache: bool = True,
                command: str | None = None) -> dict[str, Any]:
    """Train `student` on the regenerated bundle once per seed; report top-1 on the real test split.

    `test_data` defaults to the data source the bundle was encoded from (its `test_split`).
    """
    from ..bundle import Bundle
    from ..loader import DistilledDataset
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    size = tuple(b.manifest["image"]["size"])
    build_student(student, b.num_classes, size)  # fail early on a bad name or size
    soft, stored_t, teacher, labels = _label_setup(b, cfg)
    test_data = test_data or b.manifest["method"]["params"].get("data")
    if not test_data:
        raise DDCodecError("the bundle does not record its data source", "pass --test-data")
    test_x, test_y, test_classes = load_split(test_data, test_split, test_limit, size)
    _check_classes(b.class_names, test_classes)
    ds = DistilledDataset(b, device=cfg.device, batch_size=cfg.batch_size, cache_dir=cache_dir, return_ids=True)
    feed = BundleFeed(ds, memory_cache=memory_cache)
    t0 = time.perf_counter()
    runs = []
    for k, seed in enumerate(seeds):
        r = fit(student, b.num_classes, size, feed, len(ds), cfg, seed, (test_x, test_y), soft, stored_t,
                desc=f"{student} seed {seed} ({k + 1}/{len(seeds)})", teacher=teacher)
        tqdm.write(f"seed {seed}: top-1 {100 * r['accuracy']:.2f}% (train {r['train_s']:.0f} s)")
        runs.append(r)
    return {"kind": "bundle", "command": command, "student": student, "bundle": bundle_record(b), "labels": labels,
            "train": cfg.record() | {"augment": cfg.augment or default_mode(min(size)), "steps_per_epoch": len(ds),
                                     "memory_cache": memory_cache, "cache_dir": cache_dir},
            "generator_setup_s": feed.setup_s,
            "test": {"data": test_data, "split": test_split, "images": len(test_y), "limit": test_limit},
            "seeds": list(seeds), **summarise(runs), "wall_s": time.perf_counter() - t0, "environment": environment(cfg)}


def eval_real(data: str, student: str, cfg: TrainConfig, seeds: list[int], ipc: int | None = None, subset_seed: int = 0,
              split: str = "train", test_data: str | None = None, test_split: str = "test", test_limit: int | None = None,
              image_size: int | None = None, command: str | None = None) -> dict[str, Any]:
    """Train `student` on real pixels: the whole split (the upper bound) or IPC random images per class.

    The subset is drawn exactly as `encode --method random --seed SUBSET_SEED` draws it, so it holds the same images
    as that bundle: the pair measures what the prior's VAE round trip costs.
    """
    from ..data import load_source, readable_names
    from ..methods.common import class_indices, pick_random
    build_student(student, 2, image_size or 32)  # fail early on a bad name
    src = load_source(data, split)
    names = readable_names(src.classes)
    if ipc is None:
        indices = list(range(len(src)))
    else:
        if ipc < 1:
            raise DDCodecError(f"--ipc must be at least 1, not {ipc}")
        indices = pick_random(class_indices(src), ipc, subset_seed, names)
    first = src[indices[0]][0]
    size = (image_size, image_size) if image_size else tuple(first.shape[-2:])
    train_x, train_y = load_tensors(src, indices, size, f"loading {split}")
    test_x, test_y, test_classes = load_split(test_data or data, test_split, test_limit, size)
    _check_classes(names, test_classes)
    steps = -(-len(train_y) // cfg.batch_size)
    t0 = time.perf_counter()
    runs = []
    for k, seed in enumerate(seeds):
        feed = TensorFeed(train_x, train_y, cfg.batch_size, derive(seed, "order"), cfg.device)
        r = fit(student, len(names), size, feed, steps, cfg, seed, (test_x, test_y), soft=False,
                desc=f"{student} seed {seed} ({k + 1}/{len(seeds)})")
        tqdm.write(f"seed {seed}: top-1 {100 * r['accuracy']:.2f}% (train {r['train_s']:.0f} s)")
        runs.append(r)
    kind = "real-full" if ipc is None else "real-subset"
    return {"kind": kind, "command": command, "student": student,
            "data": {"source": data, "split": split, "images": len(train_y), "classes": names, "ipc": ipc,
                     "subset_seed": subset_seed if ipc is not None else None, "image_size": list(size),
                     "pixel_bytes_uint8": int(train_x.numel())},
            "labels": {"kind": "hard", "used": "hard (CE)"},
            "train": cfg.record() | {"augment": cfg.augment or default_mode(min(size)), "steps_per_epoch": steps},
            "test": {"data": test_data or data, "split": test_split, "images": len(test_y), "limit": test_limit},
            "seeds": list(seeds), **summarise(runs), "wall_s": time.perf_counter() - t0, "environment": environment(cfg)}
