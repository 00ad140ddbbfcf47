"""Train a student on a bundle with DistributedDataParallel: each rank regenerates only its share.

    torchrun --nproc_per_node 2 tools/train_ddp.py BUNDLE --epochs 2 --json run.json
    torchrun --nnodes 2 --node_rank 0 --master_addr HOST --nproc_per_node 8 tools/train_ddp.py BUNDLE ...
    torchrun --nproc_per_node 2 tools/train_ddp.py 'http://host/shards/shard-{000000..000015}.tar' --stream

On CPU it uses the gloo backend, on GPUs nccl with one GPU per rank (LOCAL_RANK). DistilledDataset
(or StreamingDistilledDataset with --stream) reads the rank and world size from torch.distributed,
so every rank yields the same number of batches and the ranks' items together are the bundle, once
per epoch. The JSON (rank 0) records every rank's item ids per epoch, the batch counts, the loss,
and a digest of the final weights on every rank (DDP keeps them equal), plus the test accuracy when
--test-data is given.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from ddcodec import DistilledDataset, StreamingDistilledDataset
from ddcodec.bundle.atomic import atomic_write_json
from ddcodec.eval.augment import augment, default_mode, normalize
from ddcodec.eval.students import build_student


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bundle", nargs="+", help="a bundle directory, or shard paths / URLs (brace patterns allowed)")
    p.add_argument("--stream", action="store_true", help="stream the shards: each rank and worker reads only its own")
    p.add_argument("--student", default="convnet3")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0, help="student initialisation and augmentation")
    p.add_argument("--test-data", default=None, help="a data source with a test split (e.g. sample:cifar10)")
    p.add_argument("--json", default=None, help="write the run record here (rank 0)")
    return p.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes; one GPU per rank when there are GPUs."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def weights_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def gather_ints(values: list[int], world: int) -> list[list[int]]:
    """Every rank's list of ints (padded tensors through all_gather; no pickle)."""
    if world == 1:
        return [values]
    n = torch.tensor([len(values)])
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = int(max(s.item() for s in sizes))
    mine = torch.full((longest,), -1, dtype=torch.int64)
    mine[:len(values)] = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(out, mine)
    return [o[:int(s.item())].tolist() for o, s in zip(out, sizes)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world, device = setup()
    source = args.bundle[0] if len(args.bundle) == 1 and Path(args.bundle[0]).is_dir() else args.bundle
    if args.stream:
        ds = StreamingDistilledDataset(source, device=device, batch_size=args.batch_size, num_workers=args.workers,
                                       return_ids=True)
        manifest = ds.manifest
        loader = ds.loader()
    else:
        ds = DistilledDataset(source, device=device, batch_size=args.batch_size, return_ids=True)
        manifest = ds.bundle.manifest
        loader = ds.loader(num_workers=args.workers)
    size = tuple(manifest["image"]["size"])
    classes = len(manifest["classes"]["names"])
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_student(args.student, classes, size).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(args.seed * 1000 + rank)
    mode = default_mode(min(size))
    record: dict = {"world_size": world, "stream": args.stream, "batch_size": args.batch_size, "workers": args.workers,
                    "epochs": [], "num_items": int(manifest["items"]["count"])}
    t_start = time.perf_counter()
    for epoch in range(args.epochs):
        ds.set_epoch(epoch)
        ids_seen: list[int] = []
        batches, loss_sum, t0 = 0, 0.0, time.perf_counter()
        for images, soft, hard, ids in loader:
            x = normalize(augment(images.float(), g, mode))
            logits = ddp(x)
            loss = F.kl_div(F.log_softmax(logits, -1), soft.to(device), reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            ids_seen += ids.tolist()
            batches += 1
            loss_sum += loss.item()
        per_rank = gather_ints(ids_seen, world)
        counts = gather_ints([batches], world)
        record["epochs"].append({"epoch": epoch, "variant": epoch % int(manifest["variants"]), "ids": per_rank,
                                 "batches": [c[0] for c in counts], "mean_loss": loss_sum / max(1, batches),
                                 "seconds": time.perf_counter() - t0})
        if rank == 0:
            print(f"epoch {epoch}: {batches} batches per rank, loss {loss_sum / max(1, batches):.4f}, "
                  f"{time.perf_counter() - t0:.1f}s", file=sys.stderr)
    record["seconds"] = time.perf_counter() - t_start
    digest = weights_digest(model)
    record["weights"] = [bytes(d).decode() for d in
                         gather_ints(list(digest.encode()), world)]  # every rank's digest: DDP keeps them equal
    if args.test_data and rank == 0:
        from ddcodec.eval.feeds import load_split
        x, y, _ = load_split(args.test_data, "test", size=size)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(normalize(x[i:i + 256].to(device).float() / 255)).argmax(-1).cpu()
                              for i in range(0, len(x), 256)])
        record["test_accuracy"] = float((pred == y).float().mean())
    if rank == 0 and args.json:
        atomic_write_json(Path(args.json), record)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
