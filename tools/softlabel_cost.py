"""What the soft-label codec costs: bytes against fp16 full logits, and the effect of top-k and quantisation.

For a bundle, regenerate every (item, variant) with the bundle's own pipeline, run the teacher, and compare the
full-precision probabilities with what each (k, quant) codec decodes to: mean KL, top-1 agreement and max error.
With --student-epochs, also train a ConvNet-3 student from scratch on the regenerated images with each codec's
labels and report top-1 on the real test split (mean +- std over --seeds).

    python tools/softlabel_cost.py BUNDLE --ks 1 2 3 5 10 --student-epochs 300 --test-data ../shared/datasets/cifar10.tar
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F

from ddcodec.bundle import Bundle
from ddcodec.bundle.payload import encode_payload
from ddcodec.eval.augment import normalize
from ddcodec.eval.students import build_student
from ddcodec.generators.pipelines import build_pipeline
from ddcodec.labels.codec import QUANT, decode_soft_labels, encode_soft_labels
from ddcodec.labels.softlabels import teacher_logits
from ddcodec.labels.teachers import load_teacher


def regenerate_all(bundle: Bundle, variants: int, teacher: Any, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (V, N, 3, H, W), teacher logits (N, V, C)) for every item and the first `variants` variants."""
    pipe = build_pipeline(bundle.manifest, bundle.items)
    n = bundle.num_items
    images, logits = [], []
    for v in range(variants):
        x = torch.cat([pipe(list(range(s, min(s + batch, n))), v).cpu() for s in range(0, n, batch)])
        images.append(x)
        logits.append(teacher_logits(teacher, x))
    return torch.stack(images), torch.stack(logits, dim=1)


def kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats."""
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)


def codec_rows(probs: torch.Tensor, ks: list[int], quants: list[str], temperature: float) -> list[dict[str, Any]]:
    """Bytes and fidelity of each (k, quant) against the full-precision probabilities."""
    n, v, c = probs.shape
    ids = torch.arange(n)
    rows = []
    for quant in quants:
        for k in ks:
            tensors, codec = encode_soft_labels(probs, k, quant, temperature)
            q = torch.stack([decode_soft_labels(tensors, codec, ids, j) for j in range(v)], dim=1)
            p = probs.reshape(-1, c)
            qq = q.reshape(-1, c)
            rows.append({"k": codec["k"], "quant": quant, "bytes": encode_payload(tensors)[1]["bytes"],
                         "kl_nats": float(kl(p, qq).mean()), "top1_agree": float((p.argmax(-1) == qq.argmax(-1)).float().mean()),
                         "max_abs_err": float((p - qq).abs().max()), "labels": q})
    return rows


def train_student(images: torch.Tensor, labels: torch.Tensor, test: tuple[torch.Tensor, torch.Tensor], epochs: int,
                  seed: int, batch: int = 20) -> float:
    """Top-1 (%) on `test` of a ConvNet-3 trained with soft cross-entropy, no augmentation; epoch e uses variant e mod V."""
    torch.manual_seed(seed)
    v, n = images.shape[:2]
    model = build_student("convnet3", labels.shape[-1], tuple(images.shape[-2:]))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for e in range(epochs):
        model.train()
        for idx in torch.randperm(n, generator=g).split(batch):
            x, y = images[e % v, idx], labels[idx, e % v]
            loss = -(y * F.log_softmax(model(normalize(x)), -1)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():
        x, y = test
        pred = torch.cat([model(normalize(x[s:s + 500])).argmax(-1) for s in range(0, len(x), 500)])
    return 100.0 * float((pred == y).float().mean())


def test_split(data: str, per_class: int, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `per_class` real test images of each class, resized to the bundle's size."""
    from ddcodec.data import load_source
    from ddcodec.methods.common import class_indices, load_images
    source = load_source(data, "test")
    idx = [i for c in class_indices(source) for i in c[:per_class]]
    return load_images(source, idx, size)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle")
    p.add_argument("--teacher", default=None, help="default: the bundle's labelling teacher")
    p.add_argument("--temperature", type=float, default=None, help="default: the bundle's")
    p.add_argument("--variants", type=int, default=None, help="variants to regenerate (default: all)")
    p.add_argument("--ks", type=int, nargs="+", default=[1, 2, 3, 5, 10])
    p.add_argument("--quants", nargs="+", default=list(QUANT), choices=QUANT)
    p.add_argument("--student-epochs", type=int, default=0, help="also train students (0: fidelity only)")
    p.add_argument("--student-ks", type=int, nargs="+", default=[1, 3])
    p.add_argument("--student-quants", nargs="+", default=["int8"], choices=QUANT)
    p.add_argument("--student-batch", type=int, default=20)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--test-data", default="../shared/datasets/cifar10.tar")
    p.add_argument("--test-per-class", type=int, default=200)
    p.add_argument("--json", default=None, help="write the results here too")
    a = p.parse_args()
    bundle = Bundle.open(a.bundle)
    lab = bundle.manifest["labels"]
    name = a.teacher or (lab.get("teacher") or lab.get("online_teacher") or {}).get("name")
    temperature = a.temperature or float((lab.get("teacher") or {}).get("temperature", 1.0))
    teacher = load_teacher(name)
    v = min(a.variants or bundle.variants, bundle.variants)
    t0 = time.time()
    images, logits = regenerate_all(bundle, v, teacher)
    probs = torch.softmax(logits / temperature, -1)
    n, _, c = probs.shape
    full = {"logits": logits.to(torch.float16)}
    raw_fp16 = n * v * c * 2
    zst_fp16 = encode_payload(full)[1]["bytes"]
    print(f"bundle {a.bundle}: {n} items x {v} variants x {c} classes, teacher {name}, T={temperature}, "
          f"regenerated in {time.time() - t0:.0f}s")
    print(f"fp16 full logits: {raw_fp16} B raw, {zst_fp16} B zstd-19\n")
    rows = codec_rows(probs, a.ks, a.quants, temperature)
    print("| k | quant | bytes (zstd) | vs fp16 logits raw | vs fp16 logits zstd | mean KL (nats) | top-1 agreement | max abs err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['k']} | {r['quant']} | {r['bytes']} | {r['bytes'] / raw_fp16:.3f} | {r['bytes'] / zst_fp16:.3f} | "
              f"{r['kl_nats']:.4f} | {100 * r['top1_agree']:.2f}% | {r['max_abs_err']:.4f} |")
    result: dict[str, Any] = {"bundle": a.bundle, "items": n, "variants": v, "classes": c, "teacher": name,
                              "temperature": temperature, "fp16_logits_raw": raw_fp16, "fp16_logits_zstd": zst_fp16,
                              "codecs": [{k: val for k, val in r.items() if k != "labels"} for r in rows]}
    if a.student_epochs:
        test = test_split(a.test_data, a.test_per_class, tuple(images.shape[-2:]))
        configs = [("full fp32", probs)] + [(f"k={r['k']} {r['quant']}", r["labels"]) for r in rows
                                            if r["k"] in a.student_ks and r["quant"] in a.student_quants]
        hard = F.one_hot(bundle.items["class_ids"], c).float()[:, None].expand(n, v, c)
        configs.append(("hard labels", hard))
        print(f"\nstudent: ConvNet-3, {a.student_epochs} epochs of batch {a.student_batch}, SGD 0.01 cosine, no augmentation, "
              f"{a.seeds} seeds, {len(test[1])} real test images\n")
        print("| labels | top-1 % (mean +- std) |")
        print("|---|---|")
        result["students"] = {}
        for label, q in configs:
            accs = [train_student(images, q, test, a.student_epochs, s, a.student_batch) for s in range(a.seeds)]
            std = statistics.stdev(accs) if len(accs) > 1 else 0.0
            result["students"][label] = accs
            print(f"| {label} | {statistics.mean(accs):.2f} +- {std:.2f} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
