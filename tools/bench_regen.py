"""Benchmark: DistilledDataset-style batched regeneration vs a naive per-image diffusers pipeline call.

Same model, same stored latents, same seeded noise, same steps and strength; both on the same device,
side by side in one run, repeated and interleaved. Reports images/s of each, the speed-up ratio
(min / median / max over repeats), the largest pixel difference between the two (0 = bitwise), and,
with --student, a student's training throughput (forward + backward + SGD step) for comparison.

The batched side is `PIPELINES["img2img"]`, the object `DistilledDataset.pipeline` builds from a
bundle's manifest. The naive side is diffusers' StableDiffusion(XL)Img2ImgPipeline called once per
image; for a class-conditional prior (`builtin:default`) it gets the class token as `prompt_embeds`
and the null class as `negative_prompt_embeds`.

  python tools/bench_regen.py --threads 1                      # CPU, tiny SD-Turbo architecture
  python tools/bench_regen.py --threads 1 --generator builtin:default --latent-size 16 \\
      --steps 25 --strength 0.7 --guidance 4 --items 64 --student convnet3   # the default prior, d4m's recipe
  python tools/bench_regen.py --generator builtin:random-sd-turbo --device cuda --dtype float16 \\
      --latent-size 64 --items 64 --micro-batch 16 32        # full-size SD-Turbo at 512 px on a GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from typing import Any, Callable

import torch

from ddcodec.generators.loading import scheduler_from_spec
from ddcodec.generators.pipelines import PIPELINES, cpu_deterministic, item_generators
from ddcodec.generators.prior import LatentPrior
from ddcodec.generators.text import load_benchmark_prior

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def ratios(num: list[float], den: list[float]) -> dict[str, float]:
    """min / median / max of num[i] / den[i] (paired repeats)."""
    r = [a / b for a, b in zip(num, den)]
    return {"min": min(r), "median": statistics.median(r), "max": max(r)}


def naive_pipeline(prior: LatentPrior, spec: dict[str, Any]) -> tuple[Any, Callable[[int, str], dict[str, Any]]]:
    """(stock diffusers img2img pipeline on the prior's modules, fn(class id, prompt) -> its prompt kwargs)."""
    from diffusers import StableDiffusionImg2ImgPipeline
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # steps_offset: diffusers rewrites its own (fresh) scheduler copy
        if prior.kind == "text":
            from ddcodec.generators.text import stock_pipeline
            pipe = stock_pipeline(prior)
            pipe.scheduler = scheduler_from_spec(spec["scheduler"])
            return pipe, lambda c, prompt: {"prompt": prompt}
        pipe = StableDiffusionImg2ImgPipeline(
            vae=prior.vae, unet=prior.unet, scheduler=scheduler_from_spec(spec["scheduler"]), text_encoder=None,
            tokenizer=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    cond = prior.conditioner

    def kwargs(c: int, prompt: str) -> dict[str, Any]:
        ids = torch.tensor([c, -1], device=cond.device)
        pos, neg = cond(ids).to(prior.unet.dtype).chunk(2)
        return {"prompt_embeds": pos, "negative_prompt_embeds": neg}
    return pipe, kwargs


def student_images_per_s(name: str, size: tuple[int, int], batch: int, steps: int, device: torch.device,
                         num_classes: int = 10) -> float:
    """Training throughput of a student: forward, soft-label KL loss, backward and an SGD step per batch."""
    from ddcodec.eval.students import build_student
    torch.manual_seed(0)
    model = build_student(name, num_classes, size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch, 3, *size, device=device)
    target = torch.softmax(torch.randn(batch, num_classes, device=device), -1)

    def step() -> None:
        loss = torch.nn.functional.kl_div(torch.log_softmax(model(x), -1), target, reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    step()  # warm-up
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return batch * steps / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> dict[str, Any]:
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
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--student", default=None, help="also time this student's training, e.g. convnet3")
    ap.add_argument("--student-size", type=int, default=32, help="student input size (default 32: CIFAR-10)")
    ap.add_argument("--student-batch", type=int, default=64)
    ap.add_argument("--student-steps", type=int, default=20)
    ap.add_argument("--reference-dtype", default=None, choices=DTYPES,
                    help="also compare both sides' images with the naive pipeline run in this dtype (e.g. float32)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    prior = load_benchmark_prior(args.generator, device, dtype)
    if dtype == torch.float16 and prior.vae.config.get("force_upcast", False):
        # Both sides would run an SDXL VAE in float32 (LatentPrior.vae_upcast, diffusers' upcast_vae); measure the
        # float16 decode instead, which is what an fp16-safe VAE such as sdxl-vae-fp16-fix gives.
        prior.vae.register_to_config(force_upcast=False)
    n, h = args.items, args.latent_size
    if prior.kind == "text":
        prompts = [f"a photo of a {c}" for c in ("cat", "dog", "ship", "truck")]
    else:
        prompts = [f"class {c}" for c in range(prior.conditioner.config.num_classes)]
    latents = torch.randn(n, 4, h, h, generator=torch.Generator().manual_seed(0))
    items = {"latents": latents, "class_ids": torch.arange(n) % len(prompts)}
    f = 2 ** (len(prior.vae.config.block_out_channels) - 1)
    size = (h * f, h * f)
    spec = {"params": {"steps": args.steps, "strength": args.strength, "guidance_scale": args.guidance},
            "scheduler": prior.scheduler_spec(), "dtype": args.dtype}
    naive, prompt_kwargs = naive_pipeline(prior, spec)
    naive.set_progress_bar_config(disable=True)
    ids = list(range(n))
    last: dict[str, torch.Tensor] = {}

    def naive_images(pipe: Any, kwargs: Callable[[int, str], dict[str, Any]], dt: torch.dtype) -> torch.Tensor:
        out = []
        with cpu_deterministic(device), torch.no_grad():
            for i in ids:
                gen = item_generators(0, [i], 0)[0]
                c = int(items["class_ids"][i])
                out.append(pipe(image=latents[i:i + 1].to(device, dt), strength=args.strength,
                                num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gen,
                                output_type="pt", **kwargs(c, prompts[c])).images)
        return torch.cat(out).float()

    def run_naive() -> float:
        sync(device)
        t = time.perf_counter()
        last["naive"] = naive_images(naive, prompt_kwargs, dtype)
        sync(device)
        return time.perf_counter() - t

    def run_batched(mb: int) -> float:
        pipe = PIPELINES["img2img"](prior, spec, items, prompts, 0, size, device=device, dtype=dtype, micro_batch=mb)
        sync(device)
        t = time.perf_counter()
        last[f"mb{mb}"] = pipe(ids, 0)
        sync(device)
        return time.perf_counter() - t

    run_naive(), [run_batched(mb) for mb in args.micro_batch]  # warm-up (embedding caches, kernels)
    diff = {f"mb{mb}": float((last[f"mb{mb}"] - last["naive"]).abs().max()) for mb in args.micro_batch}
    mean_diff = {f"mb{mb}": float((last[f"mb{mb}"] - last["naive"]).abs().mean()) for mb in args.micro_batch}
    # random weights can drive pixels to the clamp at 0 or 1, where a rounding difference flips a whole pixel
    saturated = float(((last["naive"] <= 0) | (last["naive"] >= 1)).float().mean())
    reference: dict[str, dict[str, float]] = {}
    if args.reference_dtype:  # how far each side's images are from the same pipeline at a higher precision
        ref_dtype = DTYPES[args.reference_dtype]
        ref_prior = load_benchmark_prior(args.generator, device, ref_dtype)
        ref_prior.vae.register_to_config(force_upcast=prior.vae.config.get("force_upcast", False))
        ref_pipe, ref_kwargs = naive_pipeline(ref_prior, {**spec, "dtype": args.reference_dtype})
        ref_pipe.set_progress_bar_config(disable=True)
        ref = naive_images(ref_pipe, ref_kwargs, ref_dtype)
        for k in ["naive"] + [f"mb{mb}" for mb in args.micro_batch]:
            d = (last[k] - ref).abs()
            reference[k] = {"max": float(d.max()), "mean": float(d.mean())}
        del ref_prior, ref_pipe
    rows: dict[str, list[float]] = {"naive": []} | {f"batched_mb{mb}": [] for mb in args.micro_batch}
    student: list[float] = []
    for _ in range(args.repeats):  # interleaved so machine noise hits all alike
        rows["naive"].append(run_naive())
        for mb in args.micro_batch:
            rows[f"batched_mb{mb}"].append(run_batched(mb))
        if args.student:
            student.append(student_images_per_s(args.student, (args.student_size,) * 2, args.student_batch,
                                                args.student_steps, device))
    result: dict[str, Any] = {
        "command": "python tools/bench_regen.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "generator": args.generator, "device": str(device), "dtype": args.dtype, "items": n,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "image_size": list(size), "steps": args.steps, "strength": args.strength, "guidance": args.guidance,
        "denoiser_steps_run": min(int(args.steps * args.strength), args.steps),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "seconds": rows, "images_per_s": {k: n / statistics.median(v) for k, v in rows.items()},
        "max_abs_diff_vs_naive": diff, "mean_abs_diff_vs_naive": mean_diff, "naive_saturated_fraction": saturated,
        "reference_dtype": args.reference_dtype, "abs_diff_vs_reference": reference,
        "speedup": {}}
    for mb in args.micro_batch:
        result["speedup"][f"mb{mb}"] = ratios(rows["naive"], rows[f"batched_mb{mb}"])
    if args.student:
        result["student"] = {"name": args.student, "batch": args.student_batch,
                             "image_size": [args.student_size] * 2, "threads": torch.get_num_threads(),
                             "images_per_s": student, "images_per_s_median": statistics.median(student)}
        # regenerated images/s : student training images/s, per micro-batch (medians)
        result["regen_over_student"] = {k: v / statistics.median(student) for k, v in result["images_per_s"].items()}
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
            fh.write("\n")
    return result


if __name__ == "__main__":
    main()
