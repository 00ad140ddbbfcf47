"""Export a bundle's regenerated images and soft labels in the form DD-Ranking's evaluators take (safetensors, no pickle)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ..bundle.atomic import replace_dir
from ..errors import DDCodecError
from .augment import IMAGENET_MEAN, IMAGENET_STD

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # DD-Ranking's CIFAR-10/100 statistics
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
STATS = ("auto", "cifar", "imagenet", "none")


def pick_stats(kind: str, class_names: list[str]) -> tuple[str, tuple[float, ...] | None, tuple[float, ...] | None]:
    """(name, mean, std) of the normalisation DD-Ranking applies to the real data of this dataset."""
    if kind == "auto":
        kind = "cifar" if class_names == CIFAR10_NAMES or len(class_names) == 100 else "imagenet"
    if kind == "cifar":
        return kind, CIFAR_MEAN, CIFAR_STD
    if kind == "imagenet":
        return kind, IMAGENET_MEAN, IMAGENET_STD
    if kind == "none":
        return kind, None, None
    raise DDCodecError(f"unknown normalisation {kind!r}", f"use one of {', '.join(STATS)}")


def class_major(class_ids: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Item ids sorted by (class, id) — DD-Ranking's hard labels are [0]*IPC + [1]*IPC + ... — and per-class counts."""
    ids = torch.arange(len(class_ids))
    order = sorted(ids.tolist(), key=lambda i: (int(class_ids[i]), i))
    counts = torch.bincount(class_ids.long()).tolist()
    return torch.tensor(order), counts


def export_ddranking(bundle: Any, out: str | os.PathLike, epochs: int = 1, device: str = "cpu", batch_size: int = 64,
                     stats: str = "auto", overwrite: bool = False, command: str | None = None) -> dict[str, Any]:
    """Write variant_VVV.safetensors (images, soft_labels, soft_probs, hard_labels) for the variants of epochs 0..E-1."""
    from ..bundle import Bundle
    from ..loader import DistilledDataset
    b = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
    out = Path(out)
    if epochs < 1:
        raise DDCodecError(f"--epochs must be at least 1, not {epochs}")
    if out.exists() and not overwrite:
        raise DDCodecError(f"{out} already exists", "choose another --out or pass --overwrite")
    stats_name, mean, std = pick_stats(stats, b.class_names)
    ds = DistilledDataset(b, device=device, batch_size=batch_size, shuffle=False)
    order, counts = class_major(b.items["class_ids"])
    equal = len(set(counts)) == 1
    staging = out.with_name(out.name + ".writing")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    files: dict[int, str] = {}
    epochs_index = []
    for e in range(epochs):
        v = e % b.variants
        if v not in files:
            files[v] = f"variant_{v:03d}.safetensors"
            images, probs, hard = [], [], []
            for s in tqdm(range(0, len(order), batch_size), desc=f"regenerating variant {v}", unit="batch", leave=False):
                ids = order[s:s + batch_size]
                x = ds.regenerate(ids, v)
                p, y = ds.labels(ids, v, x)
                images.append(x.float().cpu())
                probs.append(p.float().cpu())
                hard.append(y.cpu())
            x = torch.cat(images)
            if mean is not None:
                x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
            p = torch.cat(probs)
            tensors = {"images": x.contiguous(), "hard_labels": torch.cat(hard).long().contiguous()}
            if b.manifest["labels"]["kind"] == "soft" or ds.online_teacher is not None:
                tensors["soft_probs"] = p.contiguous()
                tensors["soft_labels"] = p.clamp_min(1e-8).log().contiguous()  # logits: softmax gives back soft_probs
            save_file(tensors, str(staging / files[v]), metadata={"bundle": b.digest(), "variant": str(v)})
        epochs_index.append({"epoch": e, "variant": v, "file": files[v]})
    index = {"format": "ddcodec-ddranking-export", "version": 1, "command": command, "bundle": b.source,
             "bundle_digest": b.digest(), "method": b.manifest["method"]["name"], "classes": b.class_names,
             "items": b.num_items, "ipc": counts[0] if equal else None, "per_class_counts": counts,
             "image_size": b.manifest["image"]["size"], "order": "class-major (class id, then item id)",
             "item_ids": order.tolist(), "normalization": {"stats": stats_name, "mean": mean, "std": std},
             "labels": b.manifest["labels"]["kind"], "epochs": epochs_index}
    (staging / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    (staging / "README.md").write_text(readme(index, equal))
    replace_dir(staging, out)
    return index


def readme(index: dict[str, Any], equal: bool) -> str:
    """How to feed the export to DD-Ranking."""
    h, w = index["image_size"]
    first = index["epochs"][0]["file"]
    norm = index["normalization"]
    dataset = "CIFAR10" if norm["stats"] == "cifar" else "ImageNette"
    warn = "" if equal else ("\n**Warning:** the classes hold different numbers of items "
                             f"({index['per_class_counts']}); DD-Ranking assumes IPC items per class and builds its hard "
                             "labels as `[0]*IPC + [1]*IPC + ...`, so pass `hard_labels` yourself or do not use it.\n")
    return f"""# DD-Ranking export of a ddcodec bundle

Made by `{index['command'] or 'ddcodec export-ddranking'}` from bundle `{index['bundle']}`
(digest `{index['bundle_digest']}`, method `{index['method']}`, {index['items']} items, {len(index['classes'])} classes).

## Files

Each `variant_VVV.safetensors` (no pickle) holds one regeneration of every item, in **class-major order**
(class id, then item id; `index.json` lists the item ids):

| tensor | shape | meaning |
|---|---|---|
| `images` | (N, 3, {h}, {w}) float32 | regenerated images, normalised with {norm['stats']} mean/std {norm['mean']}/{norm['std']} (DD-Ranking normalises its real data the same way) |
| `hard_labels` | (N,) int64 | class ids |
| `soft_labels` | (N, C) float32 | the bundle's stored soft labels as logits (log-probabilities), the form of the raw teacher outputs DD-Ranking makes for its own `'S'`-mode labels |
| `soft_probs` | (N, C) float32 | the same labels as probabilities |

`soft_labels`/`soft_probs` are present only when the bundle stores soft labels (or names an online teacher).
`index.json` maps training epochs to files: epoch e uses variant e mod (number of variants), so a bundle with
one variant gives one file for every epoch.
{warn}
## Feeding DD-Ranking (`pip install ddranking`)

DD-Ranking's `compute_metrics(image_tensor=..., soft_labels=..., syn_lr=...)` takes one image tensor (N, 3, H, W),
normalised like its real data, and, in soft-label mode `'S'`, one soft label (teacher logits) per image; its
soft-label evaluator builds the hard labels as `[0]*IPC + [1]*IPC + ...`, which the class-major order matches
(checked against DD-Ranking's `ddranking/metrics/soft_label.py` and `hard_label.py`, 0.1.x). Use epoch 0's file:

```python
from safetensors.torch import load_file
from ddranking.metrics import SoftLabelEvaluator, HardLabelEvaluator

d = load_file("{first}")
soft = SoftLabelEvaluator(dataset="{dataset}", real_data_path="PATH/TO/REAL", ipc={index['ipc']}, model_name="ConvNet-3",
                          soft_label_mode="S", soft_label_criterion="kl", im_size=({h}, {w}), device="cuda")
soft.compute_metrics(image_tensor=d["images"], soft_labels=d["soft_labels"], syn_lr=0.01)

hard = HardLabelEvaluator(dataset="{dataset}", real_data_path="PATH/TO/REAL", ipc={index['ipc']}, model_name="ConvNet-3",
                          im_size=({h}, {w}), device="cuda")
hard.compute_metrics(image_tensor=d["images"], hard_labels=d["hard_labels"], syn_lr=0.01)
```

DD-Ranking draws no per-epoch variants: its `'S'` mode reuses one label per image for every epoch. The other files
are for an evaluator that changes the images and labels each epoch (as `ddcodec eval` does); iterate `index.json`'s
`epochs` list and load `file` for each epoch.
"""
