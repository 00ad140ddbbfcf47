"""D4M (Su et al., CVPR 2024): per-class mini-batch k-means prototypes in the VAE latent space, regenerated
by img2img from each prototype with the class prompt, and labelled by a teacher per epoch (training-time matching).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from sklearn.cluster import MiniBatchKMeans
from tqdm import tqdm

from ..bundle import Bundle, derive_seed, new_manifest, write_bundle
from ..data import load_source, readable_names
from ..errors import DDCodecError
from ..generators.prior import LatentPrior, check_prior_classes, load_prior
from ..labels import softlabels
from .checkpoint import WorkDir
from ..parallel import is_main
from .common import (batched, check_class_sizes, class_indices, default_prompts, encode_device, encode_latents,
                     generator_record, image_size, load_images, map_units, option, seeded_subset, work_params)

DEFAULTS: dict[str, Any] = {
    "strength": 0.7,                               # official code
    "steps": 25,                                   # official: 50 (SD default); 25 DDIM steps, 17 run at strength 0.7
    "negative_prompt": "cartoon, anime, painting",  # official code
    "candidates": None,                            # images per class clustered: all, as the paper
    "kmeans_batch": 1024,                          # scikit-learn's default mini-batch
    "prototype": "centroid",                       # the paper's; "medoid" is ours
    "variants": 10,
}
GUIDANCE = {"text": 8.0, "class": 4.0}  # official 8 with SD 1.5; 4 for class-conditional priors


def add_arguments(group: Any) -> None:
    """D4M options (default None: the method's defaults apply)."""
    group.add_argument("--strength", type=float, default=None, help="d4m: img2img noise level (default 0.7)")
    group.add_argument("--steps", type=int, default=None, help="scheduler steps (d4m 25, dace 5)")
    group.add_argument("--guidance-scale", type=float, default=None,
                       help="classifier-free guidance (d4m: 8 for text priors, 4 for class priors; dace 1)")
    group.add_argument("--negative-prompt", default=None, help="d4m: negative prompt (default 'cartoon, anime, painting')")
    group.add_argument("--candidates", type=int, default=None,
                       help="real images per class considered (d4m: all; dace/rded: 300)")
    group.add_argument("--kmeans-batch", type=int, default=None, help="d4m: mini-batch k-means batch size (default 1024)")
    group.add_argument("--prototype", choices=("centroid", "medoid"), default=None,
                       help="d4m: store each k-means centre (centroid, the paper; default) or the real latent nearest "
                            "to it (medoid, ours)")
    softlabels.add_arguments(group)


def kmeans_prototypes(latents: torch.Tensor, k: int, seed: int, batch_size: int,
                      medoid: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(centres, cluster sizes) of seeded MiniBatchKMeans on flattened latents, largest cluster first.

    With `medoid`, each centre is replaced by the nearest latent of its cluster (of the unused ones if it is empty).
    """
    x = latents.reshape(len(latents), -1).double().numpy()
    km = MiniBatchKMeans(n_clusters=k, random_state=seed % 2**32, batch_size=min(batch_size, len(x)), n_init="auto")
    labels = km.fit_predict(x)
    sizes = np.bincount(labels, minlength=k)
    order = sorted(range(k), key=lambda j: (-int(sizes[j]), j))
    if medoid:
        dist = km.transform(x)
        picked: list[int] = []
        for j in order:
            members = np.flatnonzero(labels == j)
            if len(members) == 0:
                members = np.setdiff1d(np.arange(len(x)), picked)
            picked.append(int(members[np.argmin(dist[members, j])]))
        protos = latents[picked].float()
    else:
        protos = torch.from_numpy(km.cluster_centers_[order]).float().reshape(k, *latents.shape[1:])
    return protos.contiguous(), torch.tensor(sizes[order], dtype=torch.int64)


def class_latents(prior: LatentPrior, source: Any, indices: list[int], size: tuple[int, int], label: str,
                  batch_size: int = 64, load: int = 1024) -> torch.Tensor:
    """VAE latent means of one class's images (this rank's work unit): loaded `load` at a time, fixed chunks."""
    batch = min(batch_size, len(indices))  # fixed chunks (padded): latents depend on neither the ranks nor `load`
    load = max(batch, load // batch * batch)
    return torch.cat([encode_latents(prior, load_images(source, chunk, size)[0], batch_size=batch, split_ranks=False)
                      for chunk in tqdm(list(batched(indices, load)), desc=f"VAE-encoding {label}", leave=False)])


def run(args: Any) -> Bundle | None:
    """`ddcodec encode --method d4m`."""
    ipc, seed = int(args.ipc), int(args.seed)
    if ipc < 1:
        raise DDCodecError(f"--ipc must be at least 1, not {ipc}")
    source = load_source(args.data, args.split)
    raw = list(source.classes)
    names = readable_names(raw)
    per_class = class_indices(source)
    candidates = option(args, "candidates", DEFAULTS["candidates"])
    check_class_sizes(per_class, ipc, names, f"--ipc {ipc}", "lower --ipc")
    if candidates is not None and candidates < ipc:
        raise DDCodecError(f"--candidates {candidates} is fewer than --ipc {ipc} clusters", "raise --candidates")
    labels = softlabels.label_options(args, DEFAULTS["variants"])
    if labels.kind != "hard":
        labels = replace(labels, teacher=softlabels.resolve_teacher(labels.teacher, raw))
    device = encode_device(args)
    teacher = softlabels.open_teacher(labels.teacher, device) if labels.kind == "soft" else None
    prior = load_prior(args.generator, num_classes=len(names))
    check_prior_classes(prior, names)
    size = image_size(source, per_class[0], args.image_size)
    gen_params = {"strength": float(option(args, "strength", DEFAULTS["strength"])),
                  "steps": int(option(args, "steps", DEFAULTS["steps"])),
                  "guidance_scale": float(option(args, "guidance_scale", GUIDANCE.get(prior.kind, 4.0))),
                  "negative_prompt": option(args, "negative_prompt", DEFAULTS["negative_prompt"])}
    if not 0 <= gen_params["strength"] <= 1 or gen_params["steps"] < 1:
        raise DDCodecError("--strength must be in [0, 1] and --steps at least 1")
    km_batch = int(option(args, "kmeans_batch", DEFAULTS["kmeans_batch"]))
    prototype = option(args, "prototype", DEFAULTS["prototype"])
    encode_batch = int(option(args, "encode_batch_size", 64))
    params = {"ipc": ipc, "data": str(args.data), "split": args.split, "candidates": candidates,
              "encode_batch_size": encode_batch,
              "kmeans": {"impl": "sklearn.MiniBatchKMeans", "batch_size": km_batch, "n_init": "auto"},
              "prototype": prototype,
              **labels.record()}
    work = WorkDir(args.out, work_params(args, prior, **params, **gen_params, device=str(device)), discard_stale=args.overwrite)
    prior.to(device)
    latent_shape = tuple(encode_latents(prior, torch.zeros(1, 3, *size), batch_size=1, split_ranks=False).shape[1:])

    def cluster(c: int) -> dict[str, torch.Tensor]:
        idx = seeded_subset(per_class[c], candidates, derive_seed(seed, c, 0, "candidates"))
        proto, count = kmeans_prototypes(class_latents(prior, source, idx, size, names[c], encode_batch), ipc,
                                         derive_seed(seed, c, 0, "kmeans"), km_batch, prototype == "medoid")
        return {"prototypes": proto, "sizes": count}

    spec = {"prototypes": ((ipc, *latent_shape), torch.float32), "sizes": ((ipc,), torch.int64)}
    units = map_units(work, [f"kmeans-c{c}" for c in range(len(per_class))], cluster, spec, desc="d4m k-means (classes)")
    centres, sizes = [u["prototypes"] for u in units], [u["sizes"] for u in units]
    params["cluster_sizes"] = torch.cat(sizes).tolist()
    manifest = new_manifest(method="d4m", params=params, seed=seed, class_names=names, prompts=default_prompts(names),
                            image_size=size, variants=labels.variants,
                            generator=generator_record(prior, "img2img", gen_params, micro_batch=args.micro_batch))
    payloads = {"items": {"class_ids": torch.arange(len(names)).repeat_interleave(ipc),
                          "latents": torch.cat(centres).to(torch.float16)}}
    manifest, payloads = softlabels.attach_labels(manifest, payloads, labels, teacher, prior, work, device)
    if not is_main():
        return None
    bundle = write_bundle(args.out, manifest, payloads, overwrite=args.overwrite, prior=prior)
    work.done()
    return bundle
