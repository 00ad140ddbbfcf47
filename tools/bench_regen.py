"""Benchmark: DistilledDataset-style batched regeneration vs a naive per-image diffusers pipeline call.

Same model, same stored latents, same steps and strength; both on the same device, side by side in
one run, repeated. Reports images/s of each and the speed-up ratio (min / median / max over repeats).

  python tools/bench_regen.py                                   # CPU, tiny SD-Turbo architecture
  python tools/bench_regen.py --generator builtin:random-sd-turbo --device cuda --dtype float16 \\
      --latent-size 64 --items 64 --micro-batch 16 32        # full-size SD-Turbo at 512 px on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from ddcodec.generators import load_prior
from ddcodec.generators.pipelines import PIPELINES, cpu_deterministic, item_generators
from ddcodec.generators.text import stock_pipeline

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generator", default="builtin:tiny-sd-turbo")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=DTYPES)
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--latent-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--strength", type=float, default=0.5)
    ap.add_argument("--guidance", type=float, default=1.0)
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    prior = load_prior(args.generator).to(device, dtype)
    prompts = [f"a photo of a {c}" for c in ("cat", "dog", "ship", "truck")]
    n, h = args.items, args.latent_size
    latents = torch.randn(n, 4, h, h, generator=torch.Generator().manual_seed(0))
    items = {"latents": latents, "class_ids": torch.arange(n) % len(prompts)}
    f = 2 ** (len(prior.vae.config.block_out_channels) - 1)
    size = (h * f, h * f)
    spec = {"params": {"steps": args.steps, "strength": args.strength, "guidance_scale": args.guidance},
            "scheduler": prior.scheduler_spec(), "dtype": args.dtype}
    naive = stock_pipeline(prior)
    naive.set_progress_bar_config(disable=True)
    ids = list(range(n))

    def run_naive() -> float:
        sync(device)
        t = time.perf_counter()
        with cpu_deterministic(device):
            for i in ids:
                gen = item_generators(0, [i], 0)[0]
                naive(prompt=prompts[int(items["class_ids"][i])], image=latents[i:i + 1].to(device, dtype),
                      strength=args.strength, num_inference_steps=args.steps, guidance_scale=args.guidance,
                      generator=gen, output_type="pt")
        sync(device)
        return time.perf_counter() - t

    def run_batched(mb: int) -> float:
        pipe = PIPELINES["img2img"](prior, spec, items, prompts, 0, size, device=device, dtype=dtype, micro_batch=mb)
        sync(device)
        t = time.perf_counter()
        pipe(ids, 0)
        sync(device)
        return time.perf_counter() - t

    run_naive(), [run_batched(mb) for mb in args.micro_batch]  # warm-up (embedding caches, kernels)
    rows = {"naive": []} | {f"batched_mb{mb}": [] for mb in args.micro_batch}
    for _ in range(args.repeats):  # interleaved so machine noise hits both alike
        rows["naive"].append(run_naive())
        for mb in args.micro_batch:
            rows[f"batched_mb{mb}"].append(run_batched(mb))
    result = {"generator": args.generator, "device": str(device), "dtype": args.dtype, "items": n,
              "image_size": list(size), "steps": args.steps, "strength": args.strength, "guidance": args.guidance,
              "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
              "seconds": rows, "images_per_s": {k: n / statistics.median(v) for k, v in rows.items()},
              "speedup": {}}
    for mb in args.micro_batch:
        r = [a / b for a, b in zip(rows["naive"], rows[f"batched_mb{mb}"])]
        result["speedup"][f"mb{mb}"] = {"min": min(r), "median": statistics.median(r), "max": max(r)}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
