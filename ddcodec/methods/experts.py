"""Expert trajectories for LD3M's MTT loss (Cazenavette et al. 2022): `ddcodec experts train` trains K ConvNet-D
experts on real data with plain SGD and saves each one's flattened parameters at the start and after every epoch;
`ExpertBuffer` reads them back (checked against experts.json) for the distillation.

Layout of a buffer directory:

    DIR/expert_{k:03d}.safetensors   one tensor `trajectory`, float32, shape (epochs + 1, P)
    DIR/experts.json                 plain-data settings, parameter layout, per-expert file sha256 and train curves

Expert k is a pure function of (settings, seed, k): its initial weights, epoch orders and augmentation draws come
from CPU generators seeded by `derive_seed(seed, k, epoch, ...)`. A re-run skips finished experts, and a larger
`--experts` extends a buffer without retraining what is there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import time
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..bundle.atomic import atomic_write_bytes, atomic_write_json
from ..bundle.manifest import derive_seed
from ..errors import DDCodecError
from ..eval.augment import IMAGENET_MEAN, IMAGENET_STD, normalize
from ..eval.students import ConvNet, convnet_depth
from .matching import DSA_STRATEGY, Augmentation, parse_strategy

FORMAT = "ddcodec-experts/1"
META = "experts.json"
META_KEY = "ddcodec_expert"  # the safetensors metadata entry of an expert file
WIDTH, NORM, ACT, POOL = 128, "instancenorm", "relu", "avgpooling"  # the matching network (ld3m.seeded_convnet)
DEFAULTS = {"experts": 10, "epochs": 30, "lr": 0.01, "batch_size": 256}
_STUDENT = re.compile(r"^convnet(?:-?d?(\d+))?(?:-in)?$")


def expert_file(k: int) -> str:
    return f"expert_{k:03d}.safetensors"


def matching_convnet(num_classes: int, size: tuple[int, int], depth: int | None = None) -> ConvNet:
    """ConvNet-D as the LD3M matching uses it: width 128, instance norm, ReLU, avg-pool; D from the image size."""
    depth = convnet_depth(min(size)) if depth is None else depth
    return ConvNet(3, num_classes, WIDTH, depth, ACT, NORM, POOL, size)


def param_layout(net: torch.nn.Module) -> list[list[Any]]:
    """[name, shape] of every parameter, in `parameters()` order: the order of a flattened row."""
    return [[name, list(p.shape)] for name, p in net.named_parameters()]


def flatten(net: torch.nn.Module) -> torch.Tensor:
    """All parameters as one float32 CPU row."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in net.parameters()])


def unflatten(flat: torch.Tensor, layout: list[list[Any]]) -> dict[str, torch.Tensor]:
    """Views of a flat row (differentiable) keyed by parameter name, for torch.func.functional_call."""
    out, offset = {}, 0
    for name, shape in layout:
        n = 1
        for d in shape:
            n *= int(d)
        out[name] = flat[offset:offset + n].view(*shape)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"a flat row of {flat.numel()} values does not fit a layout of {offset}")
    return out


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _student(name: str, size: tuple[int, int]) -> tuple[str, int]:
    """(canonical name, depth) of a --student; only the matching ConvNet-D can be an expert."""
    m = _STUDENT.match(name.strip().lower())
    if m is None:
        raise DDCodecError(f"--student {name!r} cannot be an MTT expert",
                           "use convnet (depth from the image size) or convnetD: the ConvNet that LD3M matches")
    depth = int(m.group(1)) if m.group(1) else convnet_depth(min(size))
    if not 1 <= depth <= 8 or min(size) >> depth < 1:
        raise DDCodecError(f"ConvNet depth {depth} does not fit {size[0]}x{size[1]} images", "use a smaller depth")
    return f"convnet{depth}", depth


# training -------------------------------------------------------------------------------------
def _config(args: argparse.Namespace, names: list[str], size: tuple[int, int], count: int) -> dict[str, Any]:
    """Everything that determines an expert's trajectory (experts.json without the per-expert records)."""
    if args.experts < 1:
        raise DDCodecError(f"--experts must be at least 1, not {args.experts}")
    if args.epochs < 1:
        raise DDCodecError(f"--epochs must be at least 1, not {args.epochs}")
    if not args.lr > 0:
        raise DDCodecError(f"--lr must be more than 0, not {args.lr}")
    if args.batch_size < 1:
        raise DDCodecError(f"--batch-size must be at least 1, not {args.batch_size}")
    parse_strategy(args.dsa_strategy)
    student, depth = _student(args.student, size)
    net = matching_convnet(len(names), size, depth)
    return {
        "format": FORMAT, "student": student, "depth": depth, "width": WIDTH, "norm": NORM, "activation": ACT,
        "pooling": POOL, "image_size": list(size), "classes": names, "num_classes": len(names),
        "data": str(args.data), "split": args.split, "num_images": count,
        "epochs": int(args.epochs), "lr": float(args.lr), "momentum": 0.0, "weight_decay": 0.0,
        "batch_size": int(args.batch_size), "augmentation": f"dsa:{args.dsa_strategy}",
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, "seed": int(args.seed),
        "param_count": sum(p.numel() for p in net.parameters()), "param_layout": param_layout(net),
    }


def _key(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _finished(path: Path, key: str, shape: tuple[int, int]) -> dict[str, Any] | None:
    """The record of a finished expert file of this buffer, or None (missing, damaged or other settings)."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            rows = tuple(f.get_slice("trajectory").get_shape())
    except Exception:
        return None
    try:
        info = json.loads(meta.get(META_KEY, "{}"))
    except ValueError:
        return None
    if info.get("config_sha256") != key or rows != shape:
        return None
    return {"file": path.name, "sha256": sha256_file(path), "train_loss": info.get("train_loss", []),
            "train_acc": info.get("train_acc", [])}


def train_expert(images: torch.Tensor, labels: torch.Tensor, config: dict[str, Any], k: int, device: torch.device,
                 bar: Any = None) -> tuple[torch.Tensor, list[float], list[float]]:
    """Expert k: its (epochs + 1, P) trajectory and per-epoch train loss and accuracy (augmented batches)."""
    size = tuple(config["image_size"])
    ops = parse_strategy(config["augmentation"].split(":", 1)[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config["seed"], k, 0, "expert-init"))
        net = matching_convnet(config["num_classes"], size, config["depth"])
    net.to(device).train()
    opt = torch.optim.SGD(net.parameters(), lr=config["lr"], momentum=0.0, weight_decay=0.0)  # MTT: no momentum
    rows, losses, accs = [flatten(net)], [], []
    n, batch = len(images), config["batch_size"]
    for epoch in range(config["epochs"]):
        g = torch.Generator().manual_seed(derive_seed(config["seed"], k, epoch, "expert-epoch"))
        order = torch.randperm(n, generator=g)
        total, correct = 0.0, 0
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            x = normalize(images[idx].to(device).float() / 255)
            y = labels[idx].to(device)
            out = net(Augmentation.sample(ops, g, size)(x))
            loss = F.cross_entropy(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            correct += int((out.argmax(1) == y).sum())
        rows.append(flatten(net))
        losses.append(round(total / n, 6))
        accs.append(round(correct / n, 6))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(expert=k, epoch=epoch + 1, loss=f"{losses[-1]:.3f}", acc=f"{accs[-1]:.3f}")
    return torch.stack(rows), losses, accs


def load_real(data: str, split: str, image_size: int | None) -> tuple[torch.Tensor, torch.Tensor, list[str], tuple[int, int]]:
    """All images of a split as uint8 at the buffer size (resized as the LD3M real pools are), labels, class names."""
    from ..data import load_source, readable_names
    from .common import class_indices, image_size as pick_size, load_images
    source = load_source(data, split)
    names = readable_names(list(source.classes))
    per_class = class_indices(source)
    empty = [names[c] for c, idx in enumerate(per_class) if not idx]
    if empty:
        raise DDCodecError(f"class '{empty[0]}' of {data} has no {split} images", "experts need every class")
    size = pick_size(source, per_class[0], image_size)
    images, labels = [], []
    for c in tqdm(range(len(per_class)), desc="experts: loading real images", unit="class", leave=False):
        x, y = load_images(source, per_class[c], size)
        images.append((x * 255).round().to(torch.uint8))
        labels.append(y)
    return torch.cat(images), torch.cat(labels), names, size


def train_buffer(args: argparse.Namespace) -> dict[str, Any]:
    """`ddcodec experts train`: train (or finish) the buffer in args.out; returns experts.json's content."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise DDCodecError(f"{out} exists and is not a directory", "choose another --out")
    images, labels, names, size = load_real(args.data, args.split, args.image_size)
    config = _config(args, names, size, len(images))
    key = _key(config)
    meta_path = out / META
    if meta_path.exists():
        try:
            old = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            old_config = {k: v for k, v in old.items() if k != "experts"}
            if old_config != config:
                diff = sorted(k for k in set(config) | set(old_config) if config.get(k) != old_config.get(k))
                what = diff[0]
                raise DDCodecError(f"{out} holds experts trained with other settings ({what}: {old_config.get(what)!r}, "
                                   f"now {config.get(what)!r})", "use the same settings to resume or extend it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    shape = (config["epochs"] + 1, config["param_count"])
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    trained = 0
    with tqdm(total=args.experts * config["epochs"], desc="experts", unit="epoch") as bar:
        for k in range(args.experts):
            path = out / expert_file(k)
            rec = _finished(path, key, shape)
            if rec is None:
                traj, losses, accs = train_expert(images, labels, config, k, device, bar)
                # one metadata entry: safetensors writes several in hash-map order, which would change the file's sha256
                meta = {META_KEY: json.dumps({"config_sha256": key, "expert": k, "train_loss": losses, "train_acc": accs},
                                             sort_keys=True)}
                atomic_write_bytes(path, safetensors.torch.save({"trajectory": traj.contiguous()}, metadata=meta))
                rec = {"file": path.name, "sha256": sha256_file(path), "train_loss": losses, "train_acc": accs}
                trained += 1
            else:
                bar.update(config["epochs"])
            records.append(rec)
            atomic_write_json(meta_path, {**config, "experts": records})
    doc = {**config, "experts": records}
    mb = sum((out / r["file"]).stat().st_size for r in records) / 2**20
    final = sum(r["train_acc"][-1] for r in records) / len(records)
    print(f"wrote {out}: {len(records)} experts x {config['epochs']} epochs of {config['student']} "
          f"({config['param_count']} parameters, {mb:.1f} MB); trained {trained} now in {time.perf_counter() - started:.0f} s; "
          f"mean final train accuracy {100 * final:.1f}%")
    return doc


# reading --------------------------------------------------------------------------------------
class ExpertBuffer:
    """A finished buffer directory, with every file checked against experts.json's sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        hint = "train one with: ddcodec experts train --data SRC --out DIR"
        meta_path = self.root / META
        if not self.root.is_dir():
            raise DDCodecError(f"--expert-dir {self.root} is not a directory", hint)
        try:
            raw = meta_path.read_bytes()
            meta = json.loads(raw)
        except FileNotFoundError:
            raise DDCodecError(f"{meta_path} is missing: {self.root} is not an expert buffer", hint) from None
        except (OSError, ValueError) as e:
            raise DDCodecError(f"{meta_path} cannot be read ({type(e).__name__})", "re-run ddcodec experts train") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise DDCodecError(f"{meta_path} is not a {FORMAT} buffer", hint)
        self.sha256 = hashlib.sha256(raw).hexdigest()
        self.meta = meta
        self.files = [self.root / r["file"] for r in meta.get("experts", [])]
        if not self.files:
            raise DDCodecError(f"{self.root} holds no finished experts", "re-run ddcodec experts train to finish it")
        self.epochs, self.num_params = int(meta["epochs"]), int(meta["param_count"])
        for rec, path in zip(meta["experts"], self.files):
            if not path.is_file():
                raise DDCodecError(f"{path} is missing", "re-run ddcodec experts train to redo it")
            if sha256_file(path) != rec["sha256"]:
                raise DDCodecError(f"{path} does not match its sha256 in {META}", "re-run ddcodec experts train to redo it")

    def __len__(self) -> int:
        return len(self.files)

    def check(self, class_names: list[str], size: tuple[int, int], depth: int, layout: list[list[Any]]) -> None:
        """One-line errors when the buffer's experts are not the network LD3M will train on these images."""
        m = self.meta
        fix = "train a buffer on the same data and image size: ddcodec experts train --data SRC --out DIR"
        if list(m.get("classes", [])) != list(class_names):
            raise DDCodecError(f"the experts in {self.root} were trained on classes {m.get('classes')}, the bundle has {class_names}", fix)
        if list(m.get("image_size", [])) != list(size):
            raise DDCodecError(f"the experts in {self.root} are {m.get('image_size')} px, the bundle {list(size)}", fix)
        if int(m.get("depth", -1)) != depth:
            raise DDCodecError(f"the experts in {self.root} are ConvNet-{m.get('depth')}, LD3M matches ConvNet-{depth} at "
                               f"{size[0]} px", "train them with --student convnet")
        if m.get("param_layout") != layout or (m.get("width"), m.get("norm")) != (WIDTH, NORM):
            raise DDCodecError(f"the experts in {self.root} have another parameter layout than the matching ConvNet", fix)
        if m.get("normalization") != {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}:
            raise DDCodecError(f"the experts in {self.root} were trained on differently normalised images", fix)

    def pair(self, k: int, start: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(theta_start, theta_target): expert k's parameters after `start` and `start + span` epochs (float32, CPU)."""
        with safetensors.safe_open(str(self.files[k]), "pt") as f:
            rows = f.get_slice("trajectory")
            return rows[start:start + 1][0].clone(), rows[start + span:start + span + 1][0].clone()

    def record(self) -> dict[str, Any]:
        """What the manifest records about the buffer."""
        m = self.meta
        return {"expert_dir": str(self.root), "experts_sha256": self.sha256, "experts": len(self), "expert_buffer_epochs": self.epochs,
                "expert_student": m.get("student"), "expert_lr": m.get("lr"), "expert_data": m.get("data"),
                "expert_seed": m.get("seed")}


# command line ---------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    train_buffer(args)
    return 0


def register(subparsers: Any) -> None:
    """Add `ddcodec experts train`."""
    p = subparsers.add_parser("experts", help="expert trajectories for LD3M's MTT loss")
    sub = p.add_subparsers(dest="experts_command", required=True, metavar="ACTION")
    t = sub.add_parser("train", help="train K ConvNet experts on real data and save their parameter trajectories")
    t.add_argument("--data", required=True, help="dataset .tar, ImageFolder dir, 'sample:cifar10', or torchvision name")
    t.add_argument("--split", default="train")
    t.add_argument("--out", required=True, help="buffer directory (expert_000.safetensors ..., experts.json)")
    t.add_argument("--experts", type=int, default=DEFAULTS["experts"], help=f"experts K (default {DEFAULTS['experts']})")
    t.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help=f"epochs E per expert (default {DEFAULTS['epochs']})")
    t.add_argument("--student", default="convnet",
                   help="convnet (ConvNet-D, D from the image size: 3 at 32 px) or convnetD; LD3M needs its own D")
    t.add_argument("--lr", type=float, default=DEFAULTS["lr"], help="SGD learning rate, no momentum (default 0.01, as MTT)")
    t.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="default 256, as MTT")
    t.add_argument("--image-size", type=int, default=None, help="square size (default: the data's); must be the bundle's")
    t.add_argument("--dsa-strategy", default=DSA_STRATEGY, help=f"augmentation per batch (default {DSA_STRATEGY}, as MTT), or none")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    t.add_argument("--device", default="cpu")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)
