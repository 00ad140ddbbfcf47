"""Encode-time soft labels: regenerate every (item, variant) exactly as DistilledDataset will, label it with a
teacher, and store the top-k codec payload (FKD-style, one label per item per planned epoch).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..bundle import Bundle
from ..errors import DDCodecError
from .codec import QUANT, decode_soft_labels, encode_soft_labels

KINDS = ("hard", "soft", "online")
AGREEMENT_WARNING = 0.5  # below this share of labels naming the item's class, encode warns
DEFAULT_TEACHERS = {"cifar10": "cifar10-resnet56", "imagenette": "imagenette-efficientnet-lite0"}


@dataclass(frozen=True)
class LabelOptions:
    """What to store as labels, and for how many variants."""

    kind: str = "soft"
    teacher: str | None = None
    k: int = 5
    quant: str = "int8"
    temperature: float = 1.0
    variants: int = 1
    batch: int = 256

    def record(self) -> dict[str, Any]:
        rec: dict[str, Any] = {"labels": self.kind, "variants": self.variants}
        if self.kind != "hard":
            rec.update(teacher=self.teacher, temperature=self.temperature)
        if self.kind == "soft":
            rec.update(soft_k=self.k, soft_quant=self.quant)
        return rec


def add_arguments(group: Any, variants_default: str = "d4m 10, dace 50, rded and ld3m 1") -> None:
    """The label options shared by the producers that use a teacher (all default None)."""
    group.add_argument("--labels", choices=KINDS, default=None,
                       help="soft (default): teacher top-k per (item, variant); hard: class ids only; "
                            "online: store none, record the teacher")
    group.add_argument("--teacher", default=None, help="teacher name (default: the dataset's, e.g. cifar10-resnet56)")
    group.add_argument("--soft-k", type=int, default=None, help="soft labels: probabilities kept per label (default 5)")
    group.add_argument("--soft-quant", choices=QUANT, default=None, help="soft labels: int8 (default) or fp16")
    group.add_argument("--temperature", type=float, default=None, help="teacher softmax temperature (default 1)")
    group.add_argument("--variants", type=int, default=None, help=f"planned epochs: distinct regenerations per item, each labelled (default {variants_default})")
    group.add_argument("--device", default=None, help="device for encoding, teacher and labelling (default cpu)")


def label_options(args: Any, variants: int, kind: str = "soft") -> LabelOptions:
    """LabelOptions from parsed args, with this method's defaults for what is unset; one-line errors."""
    get = lambda name, default: default if getattr(args, name, None) is None else getattr(args, name)  # noqa: E731
    opts = LabelOptions(kind=get("labels", kind), teacher=get("teacher", None), k=int(get("soft_k", 5)),
                        quant=get("soft_quant", "int8"), temperature=float(get("temperature", 1.0)),
                        variants=int(get("variants", variants)))
    if opts.kind not in KINDS:
        raise DDCodecError(f"unknown --labels {opts.kind!r}", "use hard, soft or online")
    if opts.variants < 1:
        raise DDCodecError(f"--variants must be at least 1, not {opts.variants}")
    if opts.k < 1:
        raise DDCodecError(f"--soft-k must be at least 1, not {opts.k}")
    if not opts.temperature > 0:
        raise DDCodecError(f"--temperature must be positive, not {opts.temperature}")
    if opts.quant not in QUANT:
        raise DDCodecError(f"unknown --soft-quant {opts.quant!r}", "use int8 or fp16")
    return opts


def resolve_teacher(name: str | None, raw_classes: list[str]) -> str:
    """The teacher to use: `name` (checked against the data's classes) or the default for this dataset."""
    from .teachers import TEACHERS, get_spec
    if name is None:
        for teacher in DEFAULT_TEACHERS.values():
            if list(TEACHERS[teacher].classes) == list(raw_classes):
                return teacher
        raise DDCodecError("no default teacher for this dataset's classes", "pass --teacher NAME (or --labels hard)")
    spec = get_spec(name)
    if list(spec.classes) != list(raw_classes):
        raise DDCodecError(f"teacher {name!r} was trained on {len(spec.classes)} other classes ({', '.join(spec.classes[:3])}, ...) "
                           f"than this data's ({', '.join(raw_classes[:3])}, ...)", "choose the teacher of this dataset")
    return name


def open_teacher(name: str, device: str | torch.device = "cpu") -> Any:
    """The named teacher with its weights, in eval mode."""
    from .teachers import load_teacher
    return load_teacher(name, device=device)


@torch.no_grad()
def teacher_logits(teacher: Any, images: torch.Tensor) -> torch.Tensor:
    """Teacher logits for images in [0,1], resized to the teacher's input size when it has one."""
    size = getattr(teacher, "image_size", None)
    if size and tuple(images.shape[-2:]) != (size, size):
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    device = next(teacher.parameters()).device
    return teacher(images.to(device).float()).float().cpu()


def teacher_probs(teacher: Any, images: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) of the teacher on images."""
    return torch.softmax(teacher_logits(teacher, images) / temperature, dim=-1)


def regenerate_probs(pipeline: Any, teacher: Any, ids: list[int], variant: int, temperature: float) -> torch.Tensor:
    """Teacher probabilities of the pipeline's images for items `ids` at `variant`."""
    return teacher_probs(teacher, pipeline(ids, variant), temperature)


def hard_record(opts: LabelOptions) -> dict[str, Any]:
    """The manifest labels section for hard or online labels (online records the teacher for the consumer)."""
    if opts.kind == "online":
        return {"kind": "hard", "online_teacher": {"name": opts.teacher, "temperature": opts.temperature}}
    return {"kind": "hard"}


def attach_labels(manifest: dict[str, Any], payloads: dict[str, dict[str, torch.Tensor]], opts: LabelOptions,
                  teacher: Any = None, prior: Any = None, work: Any = None,
                  device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """Fill in the manifest's labels section and, for soft labels, the `labels` payload (N, V, k)."""
    manifest = dict(manifest)
    if opts.kind != "soft":
        manifest["labels"] = hard_record(opts)
        return manifest, payloads
    from ..generators.pipelines import build_pipeline
    from ..methods.common import map_units
    bundle = Bundle(manifest, payloads)
    pipe = build_pipeline(bundle.manifest, bundle.items, device=device, prior=prior)
    n, v, c = int(bundle.items["class_ids"].shape[0]), bundle.variants, bundle.num_classes
    mb = pipe.micro_batch
    chunk = min(max(mb, opts.batch // mb * mb), -(-n // mb) * mb)
    units = [(variant, s) for variant in range(v) for s in range(0, n, chunk)]
    probe, codec = encode_soft_labels(torch.zeros(chunk, v, c), opts.k, opts.quant, opts.temperature)
    spec = {key: ((chunk, 1, t.shape[-1]), t.dtype) for key, t in probe.items()}

    def compute(k: int) -> dict[str, torch.Tensor]:
        variant, s = units[k]
        ids = [min(i, n - 1) for i in range(s, s + chunk)]  # the last chunk repeats its last item
        probs = regenerate_probs(pipe, teacher, ids, variant, opts.temperature)
        return encode_soft_labels(probs[:, None], opts.k, opts.quant, opts.temperature)[0]

    done = map_units(work, [f"labels-v{variant}-i{s}" for variant, s in units], compute, spec,
                     desc=f"soft labels ({n} items x {v} variants)")
    labels = {}
    for key in spec:
        rows = [torch.cat([u[key] for (variant, _), u in zip(units, done) if variant == j])[:n] for j in range(v)]
        labels[key] = torch.cat(rows, dim=1).contiguous()
    agree = class_agreement(labels, codec, bundle.items["class_ids"])
    manifest["labels"] = {"kind": "soft", "payload": "labels", "codec": codec,
                          "teacher": {"name": opts.teacher, "temperature": opts.temperature,
                                      "input_size": getattr(teacher, "image_size", None), "top1_is_class": agree}}
    if agree < AGREEMENT_WARNING:
        warnings.warn(f"the teacher's top-1 is the item's class on only {agree:.0%} of the regenerated images, so "
                      "these soft labels mostly teach other classes; consider --labels hard, a better prior or "
                      "another teacher")
    return manifest, {**payloads, "labels": labels}


def class_agreement(labels: dict[str, torch.Tensor], codec: dict[str, Any], class_ids: torch.Tensor) -> float:
    """The share of (item, variant) labels whose top-1 class is the item's class."""
    ids = torch.arange(len(class_ids))
    hits = [(decode_soft_labels(labels, codec, ids, v).argmax(-1) == class_ids).float().mean()
            for v in range(int(codec["variants"]))]
    return round(float(torch.stack(hits).mean()), 4)
