"""Time one LD3M distillation step, split into the generator (T checkpointed denoiser calls, forward and backward)
and the DM/DC/MTT objective on the decoded images, for a given prior, IPC, class count, T and real batch.

    python tools/bench_ld3m.py --generator builtin:tiny --classes 10 --ipc 1 --steps 10 --batch-real 256 --loss dm
    python tools/bench_ld3m.py --generator builtin:tiny --classes 10 --ipc 1 --steps 10 --loss mtt --syn-steps 20

Real images are random pixels and MTT's expert trajectories random perturbations of a seeded ConvNet (the cost
depends on neither's content). Prints wall and CPU seconds per step.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from typing import Any

import torch

from ddcodec.generators.ld3m import LD3MPipeline
from ddcodec.generators.text import load_benchmark_prior
from ddcodec.methods.common import generator_record
from ddcodec.methods.experts import flatten, matching_convnet
from ddcodec.methods.ld3m import Config, Distiller, balanced_micro_batch
from ddcodec.methods.matching import DSA_STRATEGY, dc_loops


class RandomExperts:
    """Stands in for an ExpertBuffer: trajectories of random steps from a seeded ConvNet (timing only)."""

    def __init__(self, num_classes: int, size: tuple[int, int], epochs: int = 30, count: int = 2) -> None:
        torch.manual_seed(0)
        self.start = flatten(matching_convnet(num_classes, size))
        self.epochs, self.count = epochs, count

    def __len__(self) -> int:
        return self.count

    def pair(self, k: int, start: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(k * 1000 + start)
        return self.start, self.start + 1e-3 * span * torch.randn(self.start.shape, generator=g)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generator", default="builtin:tiny")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--ipc", type=int, default=1)
    p.add_argument("--steps", type=int, nargs="+", default=[10], help="T values, one measurement each")
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--batch-real", type=int, default=256)
    p.add_argument("--loss", choices=("dm", "dc", "mtt"), default="dm")
    p.add_argument("--syn-steps", type=int, default=20, help="mtt: student steps N")
    p.add_argument("--batch-syn", type=int, default=None, help="mtt: synthetic images per student step (default all)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the timings (and peak GPU memory) here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    prior = load_benchmark_prior(a.generator, device, num_classes=a.classes)
    rows = [measure(a, prior, device, t) for t in a.steps]
    if a.json:
        with open(a.json, "w") as fh:
            fh.write(json.dumps({"command": "python tools/bench_ld3m.py " + shlex.join(sys.argv[1:] if argv is None else argv),
                                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
                                 "rows": rows}, indent=2) + "\n")


def measure(a: argparse.Namespace, prior: Any, device: torch.device, steps: int) -> dict[str, Any]:
    """Time (and on a GPU, peak memory of) a few LD3M steps at T = `steps`."""
    n, size = a.classes * a.ipc, (a.image_size, a.image_size)
    class_ids = torch.arange(a.classes).repeat_interleave(a.ipc)
    f = 2 ** (len(prior.vae.config.block_out_channels) - 1)
    z0 = torch.randn(n, prior.unet.config.in_channels, a.image_size // f, a.image_size // f)
    record = generator_record(prior, "ld3m", {"steps": steps, "eta": 1.0, "guidance_scale": a.guidance_scale},
                              micro_batch=balanced_micro_batch(n, a.micro_batch))
    pipe = LD3MPipeline(prior, record, {"class_ids": class_ids, "latents": z0}, [f"class {k}" for k in range(a.classes)],
                        0, size, device=device, dtype=torch.float32)
    c0 = pipe.condition(list(range(n)))["encoder_hidden_states"].detach().float()
    pools = [torch.randint(0, 256, (max(a.batch_real, 1), 3, *size), dtype=torch.uint8) for _ in range(a.classes)]
    outer, inner = dc_loops(a.ipc) if a.loss == "dc" else (1, 0)
    cfg = Config(a.loss, a.iterations, 1e-2, 1e-2, "sgd", 0.5, a.batch_real, DSA_STRATEGY, 10**9, 1, outer, inner,
                 syn_steps=a.syn_steps, batch_syn=a.batch_syn)
    experts = RandomExperts(a.classes, size) if a.loss == "mtt" else None
    d = Distiller(pipe, z0, c0, pools, cfg, seed=0, experts=experts)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)

    def timed(fn):
        if cuda:
            torch.cuda.synchronize(device)
        w, c = time.perf_counter(), time.process_time()
        out = fn()
        if cuda:
            torch.cuda.synchronize(device)
        return out, time.perf_counter() - w, time.process_time() - c

    gen, obj, step = [], [], []
    for it in range(a.iterations + 1):
        images, w1, c1 = timed(lambda: d.render(0))
        _, w2, c2 = timed(lambda: d.objective(d.network(it), images, it)[0].backward())
        _, w3, c3 = timed(d.step)
        if it:  # skip warm-up
            gen.append((w1, c1))
            obj.append((w2, c2))
            step.append((w3, c3))
    mean = lambda xs, i: sum(x[i] for x in xs) / len(xs)  # noqa: E731
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    print(f"{a.generator} n={n} T={steps} guidance={a.guidance_scale} micro_batch={pipe.micro_batch} "
          f"loss={a.loss} " + (f"syn_steps={a.syn_steps} batch_syn={a.batch_syn or n} " if a.loss == "mtt" else
                              f"batch_real={a.batch_real} ") + f"device={device} threads={torch.get_num_threads()}")
    print(f"  full step        wall {mean(step, 0):.3f} s   cpu {mean(step, 1):.3f} s")
    print(f"  generator fwd    wall {mean(gen, 0):.3f} s   cpu {mean(gen, 1):.3f} s   (images only; backward is in the step)")
    print(f"  objective+bwd    wall {mean(obj, 0):.3f} s   cpu {mean(obj, 1):.3f} s   (includes the generator backward)")
    if peak is not None:
        print(f"  peak GPU memory  {peak / 2**30:.2f} GiB (torch.cuda.max_memory_allocated)", flush=True)
    return {"generator": a.generator, "images": n, "ipc": a.ipc, "steps": steps, "loss": a.loss, "image_size": a.image_size,
            "micro_batch": pipe.micro_batch, "batch_real": a.batch_real, "step_s": mean(step, 0),
            "generator_forward_s": mean(gen, 0), "objective_backward_s": mean(obj, 0), "peak_gpu_bytes": peak}

if __name__ == "__main__":
    main()
