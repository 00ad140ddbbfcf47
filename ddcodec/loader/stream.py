"""StreamingDistilledDataset: regenerates a bundle from its shards, each rank and worker reading only its own."""

from __future__ import annotations

import hashlib
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..bundle.shards import ShardReader, expand_urls
from ..errors import DDCodecError
from ..generators.pipelines import build_pipeline, pipeline_class
from .dataset import TrackingLoader, WorkerSendable, batch_labels, dist_info, resume_position
from .order import cut, item_order, shard_order, shard_slots, slot_steps


class StreamingDistilledDataset(WorkerSendable, IterableDataset):
    """Yields (images, soft_labels, hard_labels) batches streamed from shard URLs (paths, http(s)://, pipe:).

    Each epoch the shards are put in a seeded order, split by rank and then by DataLoader worker, as
    webdataset's split_by_node and split_by_worker do; each reader regenerates only the items of its
    own shards. Every item is yielded once per epoch and every rank yields the same number of batches.
    The order depends on the world size and `num_workers` (use DistilledDataset for an elastic order).
    """

    def __init__(self, urls: str | list[str], device: str | torch.device = "cpu", batch_size: int = 64,
                 num_workers: int = 0, dtype: torch.dtype | None = None, micro_batch: int | None = None,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None, return_ids: bool = False,
                 online_teacher: Callable[[torch.Tensor], torch.Tensor] | str | None = None, teacher_temperature: float = 1.0,
                 allow_different_weights: bool = False, prior: Any = None) -> None:
        self.urls = expand_urls([urls] if isinstance(urls, str) else urls)
        if not self.urls:
            raise DDCodecError("no shard URLs given", "pass shard paths or URLs, e.g. 'dir/shard-{000000..000003}.tar'")
        if batch_size < 1 or num_workers < 0:
            raise DDCodecError(f"batch_size must be at least 1 and num_workers at least 0, not {batch_size}, {num_workers}")
        with ShardReader(self.urls[0], position=0) as head:
            self.manifest, self.manifest_bytes, index = head.manifest, head.manifest_bytes, head.index
        n, full = self.manifest["items"]["count"], index["count"]
        if index["shards"] != len(self.urls):
            raise DDCodecError(f"the bundle has {index['shards']} shards, but {len(self.urls)} URL(s) were given",
                               "pass every shard once, in order: 'shard-{000000..NNNNNN}.tar'")
        last = n - full * (len(self.urls) - 1)
        if not 1 <= last <= full:
            raise DDCodecError(f"shard {self.urls[0]} says {full} items per shard, which does not fit {n} items in "
                               f"{len(self.urls)} shards", "re-shard the bundle with 'ddcodec shard'")
        self.counts = [full] * (len(self.urls) - 1) + [last]
        self.device = torch.device(device)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.dtype, self.micro_batch, self.shuffle, self.return_ids = dtype, micro_batch, shuffle, return_ids
        self.rank, self.world_size = dist_info(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise DDCodecError(f"rank {self.rank} is outside world size {self.world_size}")
        self._set_online_teacher(online_teacher, teacher_temperature)
        self.allow_different_weights, self._prior = allow_different_weights, prior
        self.steps = slot_steps(self.counts, self.world_size, self.workers, self.batch_size)  # fail early
        self._check_streamable()
        self.epoch, self._start, self._step = 0, 0, 0

    def _check_streamable(self) -> None:
        name = self.manifest["generator"]["pipeline"]
        if not pipeline_class(name).streamable:
            raise DDCodecError(f"a {name!r} bundle mixes items across shards, so it cannot be streamed shard by shard",
                               "read the whole bundle with DistilledDataset(urls)")

    @property
    def workers(self) -> int:
        """Readers per rank: the DataLoader workers, or one when the main process reads."""
        return max(1, self.num_workers)

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def variant(self) -> int:
        return self.epoch % int(self.manifest["variants"])

    def __len__(self) -> int:
        return self.steps * self.workers

    # epochs and resume -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (and so the variant and shard order); resets the resume position."""
        self.epoch, self._start, self._step = int(epoch), 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is, plus what must match on resume."""
        return {"epoch": self.epoch, "batches": self._step, "bundle": hashlib.sha256(self.manifest_bytes).hexdigest()[:16],
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle": self.shuffle,
                "num_workers": self.num_workers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict(): the next batch is the one after the last consumed."""
        epoch, batches = resume_position(state, self.state_dict(), len(self),
                                         "shards, world size, batch size, shuffle and num_workers")
        self.epoch, self._start, self._step = epoch, batches, batches

    # streaming ---------------------------------------------------------------------------
    def slot_batches(self, slot: int, skip: int = 0) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(item ids, rows) of each batch of one reader's shards this epoch, from batch `skip` on."""
        shards = shard_slots(shard_order(len(self.urls), self.seed, self.epoch, self.shuffle),
                             self.world_size, self.rank, self.workers)[slot]
        bounds = cut(sum(self.counts[s] for s in shards), self.steps)
        done, b = 0, skip  # items of this slot passed so far; the batch being filled
        ids: list[int] = []
        rows: list[dict[str, torch.Tensor]] = []
        for s in shards:
            if done + self.counts[s] <= bounds[skip]:  # every item of this shard falls in skipped batches
                done += self.counts[s]
                continue
            with ShardReader(self.urls[s], self.manifest_bytes, position=s) as reader:
                items = dict(reader.items())
            first = reader.index["first"]
            if reader.index["count"] != self.counts[s] or first != s * self.counts[0]:
                raise DDCodecError(f"shard {self.urls[s]} holds items {first}..{first + reader.index['count'] - 1}, "
                                   "not where the first shard's layout puts them", "pass the shards of one bundle")
            for k in item_order(len(items), self.seed, self.epoch, s, self.shuffle):
                if done >= bounds[skip]:
                    ids.append(first + k)
                    rows.append(items[first + k])
                done += 1
                if done == bounds[b + 1] and done > bounds[skip]:
                    yield ids, {key: torch.cat([r[key] for r in rows]) for key in rows[0]}
                    ids, rows, b = [], [], b + 1

    def regenerate(self, ids: list[int], rows: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(images, soft, hard) of one streamed batch."""
        m = self.manifest
        prefix = m["items"]["payload"] + "/"
        items = {k[len(prefix):]: v for k, v in rows.items() if k.startswith(prefix)}
        pipe = build_pipeline(m, items, device=self.device, dtype=self.dtype, micro_batch=self.micro_batch,
                              prior=self._prior, allow_different_weights=self.allow_different_weights, item_ids=ids)
        images = pipe(ids, self.variant)
        label_rows = None
        if m["labels"]["kind"] == "soft":
            lp = m["labels"]["payload"] + "/"
            label_rows = {k[len(lp):]: v for k, v in rows.items() if k.startswith(lp)}
        soft, hard = batch_labels(m, label_rows, items["class_ids"], torch.arange(len(ids)), self.variant, images,
                                  self.online_teacher, self.teacher_temperature)
        return (images, soft, hard, torch.tensor(ids)) if self.return_ids else (images, soft, hard)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker = get_worker_info()
        start = self._start
        if worker is not None:
            if worker.num_workers != self.workers:
                raise DDCodecError(f"this stream was planned for num_workers={self.num_workers}, but the DataLoader has "
                                   f"{worker.num_workers}", "use ds.loader(), or pass the same num_workers to both")
            # batch p of the rank's sequence comes from slot p % workers; the DataLoader starts its round robin
            # at worker 0, so after `start` batches worker j serves slot (start + j) % workers
            slot = (start + worker.id) % self.workers
            for ids, rows in self.slot_batches(slot, (start + worker.id) // self.workers):
                yield self.regenerate(ids, rows)
            return
        streams = [self.slot_batches(w, len(range(w, start, self.workers))) for w in range(self.workers)]
        for p in range(start, len(self)):
            ids, rows = next(streams[p % self.workers])
            self._step = p + 1
            yield self.regenerate(ids, rows)
        self._start, self._step = 0, 0

    def loader(self, **kwargs: Any) -> TrackingLoader:
        """A DataLoader with this stream's num_workers that keeps state_dict() exact."""
        return TrackingLoader(self, num_workers=self.num_workers, **kwargs)
