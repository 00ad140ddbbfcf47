"""DistilledDataset: regenerates a bundle's images in batches while a student trains."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import threading
import time
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..bundle import Bundle
from ..errors import DDCodecError
from ..generators.pipelines import build_pipeline
from ..labels.codec import decode_soft_labels, one_hot
from .cache import RegenerationCache
from .order import epoch_permutation, rank_batches, steps_per_epoch


def dist_info(rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """(rank, world size) from arguments, torch.distributed, or torchrun/accelerate environment variables."""
    if rank is not None and world_size is not None:
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class WorkerSendable:
    """Online-teacher setup and pickling shared by the datasets, so spawn/forkserver DataLoader workers can get them.

    A worker receives no built pipeline and, for a teacher given by name, only the name: both are rebuilt in
    the worker (a loaded teacher also has more tensors than forkserver can pass, ~250 fds).
    """

    manifest: dict[str, Any]
    device: torch.device

    def _set_online_teacher(self, teacher: Callable[[torch.Tensor], torch.Tensor] | str | None, temperature: float) -> None:
        self.online_teacher, self.teacher_temperature = resolve_online_teacher(self.manifest, teacher, temperature, self.device)
        self._teacher_name = teacher if isinstance(teacher, str) else None  # reloaded by name in workers

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if "_pipeline" in state:
            state["_pipeline"] = None
        if state.get("_teacher_name"):
            state["online_teacher"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        if state.get("_teacher_name"):
            self.online_teacher = resolve_online_teacher(self.manifest, state["_teacher_name"], self.teacher_temperature,
                                                         self.device)[0]


class DistilledDataset(WorkerSendable, IterableDataset):
    """Yields (images, soft_labels, hard_labels) batches regenerated from a bundle.

    `set_epoch(e)` selects variant e mod the bundle's variant count. Each rank yields its share of
    a seeded epoch order that does not depend on world size or worker count.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike | list[str], device: str | torch.device = "cpu",
                 batch_size: int = 64, dtype: torch.dtype | None = None, micro_batch: int | None = None,
                 shuffle: bool = True, rank: int | None = None, world_size: int | None = None,
                 cache_dir: str | os.PathLike | None = None, return_ids: bool = False,
                 online_teacher: Callable[[torch.Tensor], torch.Tensor] | str | None = None, teacher_temperature: float = 1.0,
                 allow_different_weights: bool = False, prior: Any = None) -> None:
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle.open(bundle)
        if batch_size < 1:
            raise DDCodecError(f"batch_size must be at least 1, not {batch_size}")
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.micro_batch = micro_batch
        self.shuffle = shuffle
        self.rank, self.world_size = dist_info(rank, world_size)
        if not 0 <= self.rank < self.world_size:
            raise DDCodecError(f"rank {self.rank} is outside world size {self.world_size}")
        self.cache_dir = cache_dir
        self.return_ids = return_ids
        self._set_online_teacher(online_teacher, teacher_temperature)
        self.allow_different_weights = allow_different_weights
        self._prior = prior
        self._pipeline = None
        self.epoch = 0
        self._start = 0  # batches of the current epoch already consumed (resume point)
        self._step = 0
        rank_batches(torch.arange(self.bundle.num_items), self.batch_size, self.world_size, self.rank)  # fail early

    # epochs and resume -------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (and so the variant); resets the resume position."""
        self.epoch, self._start, self._step = int(epoch), 0, 0

    @property
    def variant(self) -> int:
        return self.epoch % self.bundle.variants

    def __len__(self) -> int:
        return steps_per_epoch(self.bundle.num_items, self.batch_size, self.world_size)

    def state_dict(self) -> dict[str, Any]:
        """Where this rank is: epoch and batches consumed, plus what must match on resume."""
        return {"epoch": self.epoch, "batches": self._step, "bundle": self.bundle.digest(),
                "world_size": self.world_size, "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state_dict(): the next batch is the one after the last consumed."""
        epoch, batches = resume_position(state, self.state_dict(), len(self), "bundle, world size, batch size and shuffle")
        self.epoch, self._start, self._step = epoch, batches, batches

    # regeneration ------------------------------------------------------------------------
    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            self._pipeline = build_pipeline(self.bundle.manifest, self.bundle.items, device=self.device, dtype=self.dtype,
                                            micro_batch=self.micro_batch, prior=self._prior,
                                            allow_different_weights=self.allow_different_weights)
        return self._pipeline

    def _cache(self) -> RegenerationCache | None:
        if self.cache_dir is None:
            return None
        p = self.pipeline
        key = hashlib.sha256(f"{self.bundle.digest()}|{p.device.type}|{p.dtype}|{p.micro_batch}".encode()).hexdigest()[:20]
        return RegenerationCache(self.cache_dir, key, (3, *p.image_size))

    def regenerate(self, ids: torch.Tensor, variant: int) -> torch.Tensor:
        """Images for `ids` at `variant`, from the cache where present."""
        cache = self._cache()
        if cache is None:
            return self.pipeline(ids, variant)
        cached = {int(i): cache.get(int(i), variant) for i in ids}
        todo = [i for i, img in cached.items() if img is None]
        if todo:
            for i, img in zip(todo, self.pipeline(todo, variant)):
                cache.put(i, variant, img)
                cached[i] = img.cpu()
        return torch.stack([cached[int(i)] for i in ids]).to(self.pipeline.device)

    def labels(self, ids: torch.Tensor, variant: int, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft, hard) labels for these items at this variant."""
        return batch_labels(self.bundle.manifest, self.bundle.labels, self.bundle.items["class_ids"], ids, variant, images,
                            self.online_teacher, self.teacher_temperature)

    def batches(self) -> list[torch.Tensor]:
        """This rank's item-id batches for the current epoch."""
        perm = epoch_permutation(self.bundle.num_items, self.bundle.seed, self.epoch, self.shuffle)
        return rank_batches(perm, self.batch_size, self.world_size, self.rank)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker = get_worker_info()
        wid, nw = (worker.id, worker.num_workers) if worker else (0, 1)
        variant = self.variant
        batches = self.batches()
        for s in range(self._start, len(batches)):
            if (s - self._start) % nw != wid:
                continue
            ids = batches[s]
            images = self.regenerate(ids, variant)
            soft, hard = self.labels(ids, variant, images)
            if worker is None:
                self._step = s + 1
            yield (images, soft, hard, ids) if self.return_ids else (images, soft, hard)
        if worker is None:
            self._start, self._step = 0, 0

    @property
    def manifest(self) -> dict[str, Any]:
        """The bundle's manifest."""
        return self.bundle.manifest

    def loader(self, num_workers: int = 0, **kwargs: Any) -> "TrackingLoader":
        """A DataLoader over this dataset that keeps state_dict() exact with workers."""
        return TrackingLoader(self, num_workers=num_workers, **kwargs)


def resume_position(state: dict[str, Any], mine: dict[str, Any], steps: int, same: str) -> tuple[int, int]:
    """(epoch, batches) of a saved state, refused unless its layout keys equal this loader's (`mine`)."""
    for key in mine.keys() - {"epoch", "batches"}:
        if key in state and state[key] != mine[key]:
            raise DDCodecError(f"cannot resume: saved {key} is {state[key]!r}, this loader has {mine[key]!r}",
                               f"resume with the same {same}")
    epoch, batches = state.get("epoch"), state.get("batches")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (epoch, batches)) \
            or epoch < 0 or not 0 <= batches <= steps:
        raise DDCodecError(f"cannot resume: saved position epoch={epoch!r}, batches={batches!r} is not a valid "
                           f"position (0..{steps} batches)", "pass a state saved by state_dict()")
    return epoch, batches


def resolve_online_teacher(manifest: dict[str, Any], teacher: Callable[[torch.Tensor], torch.Tensor] | str | None,
                           temperature: float, device: torch.device) -> tuple[Any, float]:
    """(teacher callable or None, temperature): "bundle" loads the teacher the manifest names, a str a registered one."""
    if not isinstance(teacher, str):
        return teacher, temperature
    from ..labels.teachers import load_teacher
    if teacher == "bundle":
        online = manifest["labels"].get("online_teacher")
        if not online:
            raise DDCodecError("online_teacher='bundle' but this bundle names no online teacher",
                               "encode with --labels online, or pass a teacher name or callable")
        return load_teacher(online["name"], device), float(online.get("temperature", temperature))
    return load_teacher(teacher, device), temperature


def batch_labels(manifest: dict[str, Any], label_rows: dict[str, torch.Tensor] | None, class_ids: torch.Tensor,
                 rows: torch.Tensor, variant: int, images: torch.Tensor,
                 online_teacher: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft, hard) labels of `rows`: the online teacher's, the stored soft labels, or one-hot class ids."""
    hard = class_ids[rows]
    if online_teacher is not None:
        with torch.no_grad():
            soft = torch.softmax(online_teacher(images).float() / temperature, -1)
        return soft.to(images.device), hard.to(images.device)
    lab = manifest["labels"]
    if lab["kind"] == "soft":
        soft = decode_soft_labels(label_rows, lab["codec"], rows, variant)
    else:
        soft = one_hot(hard, len(manifest["classes"]["names"]))
    return soft.to(images.device), hard.to(images.device)


class TrackingLoader:
    """Iterates a DataLoader(dataset, batch_size=None) and records each consumed batch on the dataset.

    Workers start with `safe_start_method()` (forkserver, else spawn) unless another `multiprocessing_context` is given.
    """

    def __init__(self, dataset: DistilledDataset, num_workers: int = 0, **kwargs: Any) -> None:
        self.dataset = dataset
        self.kwargs = {"batch_size": None, "num_workers": num_workers, **kwargs}
        if num_workers > 0 and self.kwargs.get("multiprocessing_context", "forkserver") == "forkserver":
            self.kwargs["multiprocessing_context"] = safe_start_method()

    def __len__(self) -> int:
        return len(self.dataset) - self.dataset._start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        ds = self.dataset
        start = ds._start
        method = start_method(self.kwargs.get("multiprocessing_context")) if self.kwargs["num_workers"] > 0 else None
        if method == "fork":
            settle_feeder_threads()
        for k, batch in enumerate(start_workers(DataLoader(ds, **self.kwargs), method)):
            ds._step = start + k + 1
            yield batch
        ds._start, ds._step = 0, 0


WORKER_MODULES = ["torch", "ddcodec.loader"]  # imported once by the forkserver, so each worker starts without importing


def safe_start_method() -> multiprocessing.context.BaseContext:
    """forkserver where the platform has it, else spawn: never fork a parent that may have threads (gh-112275)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    from multiprocessing import forkserver
    ctx = multiprocessing.get_context("forkserver")
    preload = list(getattr(forkserver._forkserver, "_preload_modules", None) or ["__main__"])
    ctx.set_forkserver_preload(preload + [m for m in WORKER_MODULES if m not in preload])  # no effect once running
    forkserver.ensure_running()  # starts the server process now: its imports overlap whatever the caller does next
    return ctx


def start_method(context: Any) -> str:
    """The start method a DataLoader's `multiprocessing_context` (a name, a context, or None) uses."""
    if context is None:  # torch's default context; allow_none so that asking does not fix the default
        return multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    return context if isinstance(context, str) else context.get_start_method()


def start_workers(loader: DataLoader, method: str | None) -> Iterator[Any]:
    """iter(loader), refusing in one line a dataset that cannot be sent to spawn/forkserver workers."""
    try:
        return iter(loader)
    except Exception as e:
        if method in (None, "fork") or isinstance(e, DDCodecError):
            raise
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        raise DDCodecError(f"cannot send the dataset to {method!r} DataLoader workers ({reason})",
                           "give online_teacher by name or as a top-level function (not a lambda), or pass "
                           "multiprocessing_context='spawn' (no limit on tensors) or 'fork'") from e


def settle_feeder_threads(timeout: float = 2.0) -> None:
    """Let queue feeder threads of finished DataLoaders exit before new workers are forked.

    CPython before 3.12 (gh-112275) can fork while an exiting thread holds the runtime's thread-list
    lock; the forked worker then hangs for ever. The feeder threads of a finished DataLoader's queues
    exit right after it shuts down, so a new epoch's fork races them; waiting for them removes the race.
    """
    deadline = time.monotonic() + timeout
    for t in threading.enumerate():
        if t.name == "QueueFeederThread" and t is not threading.current_thread():
            t.join(max(0.0, deadline - time.monotonic()))
