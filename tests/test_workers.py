"""DataLoader workers: forkserver (or spawn) by default, never a bare fork; the datasets pickle for them."""

from __future__ import annotations

import multiprocessing
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from ddcodec import DDCodecError, DistilledDataset

FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()


def by_batch(batches) -> dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]]:
    """{item ids: (images, soft labels)} of (images, soft, hard, ids) batches."""
    return {tuple(ids.tolist()): (x, soft) for x, soft, _, ids in batches}


def test_default_start_method_is_not_fork(noisy_bundle):
    ds = DistilledDataset(noisy_bundle, batch_size=5)
    ctx = ds.loader(num_workers=2).kwargs["multiprocessing_context"]
    assert ctx.get_start_method() == ("forkserver" if FORKSERVER else "spawn")
    assert ds.loader(num_workers=2, multiprocessing_context="fork").kwargs["multiprocessing_context"] == "fork"
    assert "multiprocessing_context" not in ds.loader().kwargs


def test_pickled_dataset_leaves_the_pipeline_behind(noisy_bundle):
    ds = DistilledDataset(noisy_bundle, batch_size=5, return_ids=True)
    ds.set_epoch(1)
    first = next(iter(ds))
    assert ds._pipeline is not None
    clone = ForkingPickler.loads(ForkingPickler.dumps(ds))  # what spawn/forkserver workers receive
    assert clone._pipeline is None and ds._pipeline is not None
    assert all(torch.equal(a, b) for a, b in zip(first, next(iter(clone))))


def test_explicit_fork_still_works_and_equals_the_default(noisy_bundle):
    ds = DistilledDataset(noisy_bundle, batch_size=4, return_ids=True)
    ds.set_epoch(2)
    default = by_batch(ds.loader(num_workers=2))
    forked = by_batch(ds.loader(num_workers=2, multiprocessing_context="fork"))
    assert default.keys() == forked.keys()
    assert all(torch.equal(default[k][0], forked[k][0]) for k in default)


def test_unpicklable_teacher_is_a_one_line_error(noisy_bundle):
    ds = DistilledDataset(noisy_bundle, batch_size=5, online_teacher=lambda x: torch.zeros(len(x), 10))
    with pytest.raises(DDCodecError, match="cannot send the dataset to .* DataLoader workers") as e:
        next(iter(ds.loader(num_workers=1)))
    assert "\n" not in str(e.value) and "multiprocessing_context='spawn'" in str(e.value)


def test_teacher_by_name_is_reloaded_in_workers(noisy_bundle):
    from ddcodec.labels.teachers import find_weights, load_teacher
    try:
        find_weights("cifar10-resnet56")
    except DDCodecError:
        pytest.skip("cifar10-resnet56 weights not found")
    ds = DistilledDataset(noisy_bundle, batch_size=10, return_ids=True, online_teacher="cifar10-resnet56")
    in_process = by_batch(ds)
    workers = by_batch(ds.loader(num_workers=1))  # 334 tensors: over forkserver's fd limit unless sent by name
    assert in_process.keys() == workers.keys()
    assert all(torch.allclose(in_process[k][1], workers[k][1], atol=1e-5) for k in in_process)
    if FORKSERVER:  # a loaded module has to travel as tensors; the error says what to do instead
        loaded = DistilledDataset(noisy_bundle, batch_size=10, online_teacher=load_teacher("cifar10-resnet56"))
        with pytest.raises(DDCodecError, match="too many fds.*by name.*'spawn'"):
            next(iter(loaded.loader(num_workers=1)))
