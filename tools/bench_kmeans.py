"""Benchmark: scikit-learn MiniBatchKMeans (what d4m uses) against torch k-means on real per-class VAE latents.

Reports, per IPC (= clusters), the torch/sklearn ratios of wall time and of inertia (sum of squared distances of
all points to their nearest centre) as min / median / max over seeded repeats. A torch implementation is only
worth adopting if its time ratio is < 1 at an inertia ratio <= 1.

    python tools/bench_kmeans.py --data ../shared/datasets/cifar10.tar --generator builtin:default --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from sklearn.cluster import MiniBatchKMeans


def inertia(x: torch.Tensor, centres: torch.Tensor) -> float:
    """Sum over points of the squared distance to the nearest centre (float64)."""
    x, c = x.double(), centres.double()
    d = (x * x).sum(1, keepdim=True) - 2 * x @ c.T + (c * c).sum(1)[None]
    return float(d.min(1).values.clamp(min=0).sum())


def kmeanspp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (one candidate per step)."""
    n = len(x)
    centres = [x[int(torch.randint(n, (1,), generator=g))]]
    d2 = ((x - centres[0]) ** 2).sum(1)
    for _ in range(1, k):
        j = int(torch.multinomial(d2 / d2.sum(), 1, generator=g)) if float(d2.sum()) > 0 else int(torch.randint(n, (1,), generator=g))
        centres.append(x[j])
        d2 = torch.minimum(d2, ((x - x[j]) ** 2).sum(1))
    return torch.stack(centres)


def torch_lloyd(x: torch.Tensor, k: int, seed: int, iters: int = 100, tol: float = 1e-4) -> torch.Tensor:
    """Full-batch Lloyd k-means with k-means++ seeding, distances by one matmul per iteration."""
    g = torch.Generator().manual_seed(seed)
    c = kmeanspp(x, k, g)
    xx = (x * x).sum(1, keepdim=True)
    for _ in range(iters):
        assign = (xx - 2 * x @ c.T + (c * c).sum(1)[None]).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= tol * float(x.var(0).sum()) * k / len(x):
            break
    return c


def torch_minibatch(x: torch.Tensor, k: int, seed: int, batch: int = 1024, steps: int = 100) -> torch.Tensor:
    """Sculley's mini-batch k-means (per-centre learning rate 1/count), k-means++ seeding."""
    g = torch.Generator().manual_seed(seed)
    c = kmeanspp(x, k, g)
    counts = torch.zeros(k, dtype=x.dtype)
    for _ in range(steps):
        b = x[torch.randint(len(x), (min(batch, len(x)),), generator=g)]
        assign = ((b * b).sum(1, keepdim=True) - 2 * b @ c.T + (c * c).sum(1)[None]).argmin(1)
        bc = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, b)
        counts += bc
        eta = (bc / counts.clamp(min=1))[:, None]
        c = torch.where(bc[:, None] > 0, (1 - eta) * c + eta * sums / bc.clamp(min=1)[:, None], c)
    return c


def sklearn_kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """What ddcodec's d4m runs."""
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=min(1024, len(x)), n_init="auto")
    km.fit(x.double().numpy())
    return torch.from_numpy(km.cluster_centers_).float()


def class_latents(data: str, generator: str, per_class: int, classes: int) -> list[torch.Tensor]:
    """Real latents: the first `per_class` images of each of `classes` classes, VAE-encoded by the prior."""
    from ddcodec.data import load_source
    from ddcodec.generators.prior import load_prior
    from ddcodec.methods.common import class_indices, encode_latents, load_images
    source = load_source(data, "train")
    prior = load_prior(generator, num_classes=len(source.classes))
    size = tuple(source[0][0].shape[-2:])
    out = []
    for idx in class_indices(source)[:classes]:
        images, _ = load_images(source, idx[:per_class], size)
        out.append(encode_latents(prior, images).flatten(1))
    return out


def ratios(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 3), "median": round(statistics.median(values), 3), "max": round(max(values), 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/datasets/cifar10.tar")
    p.add_argument("--generator", default="builtin:default")
    p.add_argument("--per-class", type=int, default=5000)
    p.add_argument("--classes", type=int, default=2)
    p.add_argument("--ipc", type=int, nargs="+", default=[1, 10, 50])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the report (and the command) to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    latents = class_latents(a.data, a.generator, a.per_class, a.classes)
    print(f"latents: {a.classes} classes x {latents[0].shape[0]} points x {latents[0].shape[1]} dims "
          f"({a.generator}), torch threads {torch.get_num_threads()}")
    report = {}
    impls = {"torch-lloyd": torch_lloyd, "torch-minibatch": torch_minibatch}
    for k in a.ipc:
        rows = {name: {"time": [], "inertia": []} for name in impls}
        sk_times = []
        for r in range(a.repeats):
            for x in latents:
                t0 = time.perf_counter()
                c = sklearn_kmeans(x, k, r)
                ts = time.perf_counter() - t0
                sk_times.append(ts)
                base = inertia(x, c)
                for name, fn in impls.items():
                    t0 = time.perf_counter()
                    c = fn(x, k, r)
                    rows[name]["time"].append((time.perf_counter() - t0) / ts)
                    rows[name]["inertia"].append(inertia(x, c) / base)
        report[k] = {"sklearn_seconds": ratios(sk_times),
                     **{name: {"time_ratio": ratios(v["time"]), "inertia_ratio": ratios(v["inertia"])} for name, v in rows.items()}}
        print(f"ipc {k}: " + json.dumps(report[k]))
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": "python tools/bench_kmeans.py " + " ".join(sys.argv[1:]), "generator": a.generator,
                       "per_class": a.per_class, "classes": a.classes, "repeats": a.repeats,
                       "threads": torch.get_num_threads(), "ipc": report}, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
