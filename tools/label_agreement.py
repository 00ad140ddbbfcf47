"""How often a teacher agrees with a bundle's classes on its regenerated images.

For each bundle, regenerate every (item, variant) with the bundle's own pipeline, run the teacher, and report
the share of images whose teacher top-1 is the item's class, the mean teacher probability of that class, and,
for stored soft labels, the share whose stored label's top-1 is the item's class. A low share means soft or
online labels teach the student other classes than the ones the images were made for.

    python tools/label_agreement.py runs/cifar10-ipc10-convnet3/{random,d4m,dace,ld3m-dc} --teacher cifar10-resnet56-ft
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from softlabel_cost import regenerate_all  # noqa: E402

from ddcodec.bundle import Bundle  # noqa: E402
from ddcodec.labels.codec import decode_soft_labels  # noqa: E402
from ddcodec.labels.teachers import load_teacher  # noqa: E402


def agreement(bundle: Bundle, teacher: Any, variants: int | None = None) -> dict[str, Any]:
    """Teacher and stored-label agreement with the class ids over the first `variants` variants."""
    v = min(variants or bundle.variants, bundle.variants)
    _, logits = regenerate_all(bundle, v, teacher)
    classes = bundle.items["class_ids"].long()
    probs = logits.softmax(-1)  # (N, V, C)
    row: dict[str, Any] = {"bundle": bundle.source, "method": bundle.manifest["method"]["name"],
                           "items": bundle.num_items, "variants": v,
                           "teacher_top1_is_class": float((probs.argmax(-1) == classes[:, None]).float().mean()),
                           "teacher_prob_of_class": float(probs.gather(-1, classes[:, None, None].expand(-1, v, 1)).mean())}
    if bundle.labels is not None:
        codec = bundle.manifest["labels"]["codec"]
        ids = torch.arange(bundle.num_items)
        stored = torch.stack([decode_soft_labels(bundle.labels, codec, ids, j) for j in range(v)], dim=1)
        row["stored_top1_is_class"] = float((stored.argmax(-1) == classes[:, None]).float().mean())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundles", nargs="+")
    p.add_argument("--teacher", required=True, help="registered teacher name, e.g. cifar10-resnet56-ft")
    p.add_argument("--variants", type=int, default=None, help="first V variants (default: all)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the rows as JSON")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher)
    rows = []
    print("| bundle | method | images | teacher top-1 = class | teacher p(class) | stored label top-1 = class |")
    print("|---|---|---|---|---|---|")
    for path in args.bundles:
        r = agreement(Bundle.open(path), teacher, args.variants)
        rows.append({**r, "teacher": args.teacher})
        stored = f"{100 * r['stored_top1_is_class']:.1f}%" if "stored_top1_is_class" in r else "–"
        print(f"| {path} | {r['method']} | {r['items'] * r['variants']} | {100 * r['teacher_top1_is_class']:.1f}% | "
              f"{r['teacher_prob_of_class']:.3f} | {stored} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": " ".join(["python tools/label_agreement.py", *(argv or sys.argv[1:])]),
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
