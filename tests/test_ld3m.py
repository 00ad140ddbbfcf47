"""LD3M: encode real CIFAR-10 images with the tiny prior (DM and DC), the loss goes down, regeneration is bitwise,
the optimised images are exactly the regenerated ones, an interrupted encode resumes to the same bundle, bad args fail."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ddcodec.bundle import Bundle
from ddcodec.cli import build_parser, main
from ddcodec.loader import DistilledDataset
from ddcodec.methods import ld3m

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(cifar4) -> Path:
    """6 real train images of each of 4 CIFAR-10 classes (conftest.cifar4)."""
    return cifar4


FAST = ["--ipc", "1", "--iterations", "4", "--steps", "2", "--batch-real", "6", "--checkpoint-every", "2"]
DM = [*FAST, "--ld3m-loss", "dm", "--variants", "2", "--guidance-scale", "2"]
DC = [*FAST, "--ld3m-loss", "dc", "--guidance-scale", "1", "--dsa-strategy", "none"]


def argv(data, out, extra: list[str]) -> list[str]:
    return ["encode", "--method", "ld3m", "--data", str(data), "--out", str(out), "--generator", "builtin:tiny", *extra]


def encode(data, out, extra: list[str]):
    """(bundle, distiller) through the CLI's own argument parsing."""
    return ld3m.encode(build_parser().parse_args(argv(data, out, extra)))


@pytest.fixture(scope="module")
def dm(data, tmp_path_factory):
    return encode(data, tmp_path_factory.mktemp("ld3m") / "dm", DM)


@pytest.fixture(scope="module")
def dc(data, tmp_path_factory):
    return encode(data, tmp_path_factory.mktemp("ld3m") / "dc", DC)


def regenerate(bundle: Bundle, epoch: int, batch_size: int = 4) -> dict[int, torch.Tensor]:
    ds = DistilledDataset(bundle.root, batch_size=batch_size, return_ids=True)
    ds.set_epoch(epoch)
    return {int(i): img for x, _, _, ids in ds for i, img in zip(ids, x)}


def test_bundle_contents(dm):
    b, _ = dm
    m = b.manifest
    assert m["method"]["name"] == "ld3m" and m["generator"]["pipeline"] == "ld3m"
    assert m["generator"]["params"]["steps"] == 2 and m["generator"]["params"]["guidance_scale"] == 2.0
    assert m["generator"]["scheduler"]["class"] == "DDIMScheduler" and m["generator"]["micro_batch"] == 4
    assert b.num_items == 4 and b.items["class_ids"].tolist() == list(range(4))
    assert b.items["latents"].dtype == torch.float16 and b.items["latents"].shape == (4, 4, 16, 16)
    assert b.items["cond"].dtype == torch.float16 and b.items["cond"].shape == (4, 1, 32)
    p = m["method"]["params"]
    assert p["iterations"] == 4 and p["loss"] == "dm" and p["step_seconds_mean"] > 0
    assert p["regeneration_check"]["max_abs_diff"] == 0.0 and m["labels"]["kind"] == "hard"


@pytest.mark.parametrize("which", ["dm", "dc"])
def test_loss_goes_down(request, which):
    """The loss under a fixed network, real batch and augmentation (iteration 0's) drops after optimisation."""
    b, d = request.getfixturevalue(which)
    p = b.manifest["method"]["params"]
    assert p["probe_loss_end"] < p["probe_loss_start"]
    assert len(d.losses) == 4 and all(loss == loss for loss in d.losses)
    # the codes moved from their initialisation: Z from the VAE encodings, c from the class embedding
    assert not torch.equal(b.items["latents"], ld3m_init(b, d)[0]) and not torch.equal(b.items["cond"], ld3m_init(b, d)[1])


def ld3m_init(b: Bundle, d) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes the distillation started from (VAE encodings of the picked images; class embeddings)."""
    from ddcodec.methods.common import load_images
    from ddcodec.data import load_source
    p = b.manifest["method"]["params"]
    images, _ = load_images(load_source(p["data"]), p["source_indices"], tuple(b.manifest["image"]["size"]))
    z = d.pipe.prior.encode(images).half()
    c = d.pipe.prior.conditioner(b.items["class_ids"]).half()
    return z, c


def test_regenerates_bitwise(dm):
    b, _ = dm
    epochs = []
    for epoch in range(b.variants):
        first, second = regenerate(b, epoch), regenerate(b, epoch, batch_size=7)
        assert sorted(first) == list(range(b.num_items))
        assert all(torch.equal(first[i], second[i]) for i in first)
        epochs.append(first)
    assert not torch.equal(epochs[0][0], epochs[1][0])  # each variant draws its own seeded eps_t


@pytest.mark.parametrize("which", ["dm", "dc"])
def test_optimised_images_are_the_regenerated_ones(request, which):
    """The images the optimisation produces from its final codes equal DistilledDataset's, bitwise (CPU, fp32)."""
    b, d = request.getfixturevalue(which)
    for variant in range(b.variants):
        with torch.enable_grad():
            optimised = d.render(variant, grad=True)
        assert optimised.requires_grad  # the differentiable, checkpointed path
        regenerated = regenerate(b, variant, batch_size=3)
        assert all(torch.equal(optimised[i].detach(), regenerated[i]) for i in range(b.num_items))


def test_resume_after_interruption_is_identical(dm, data, tmp_path, interrupt_ld3m):
    """Interrupted after 3 of 4 iterations (state saved at 2), then re-run: the same codes and loss history."""
    out = tmp_path / "resumed"
    interrupt_ld3m(3)
    assert main(argv(data, out, DM)) == 130
    assert not out.exists() and (tmp_path / "resumed.partial" / "ld3m-state.safetensors").is_file()
    interrupt_ld3m(None)
    b, d = encode(data, out, DM)
    assert not (tmp_path / "resumed.partial").exists()
    ref, ref_d = dm
    assert d.losses == ref_d.losses and len(d.seconds) == 4
    for key in ("latents", "cond", "class_ids"):
        assert torch.equal(b.items[key], ref.items[key])
    assert b.manifest["fingerprints"]["entries"] == ref.manifest["fingerprints"]["entries"]


@pytest.mark.parametrize("extra,message", [
    (["--ipc", "7"], "--ipc 7 needs 7 images of class"),
    (["--ipc", "1", "--steps", "0"], "--steps (T) must be between 1 and 1000, not 0"),
    (["--ipc", "1", "--steps", "1001"], "--steps (T) must be between 1 and 1000, not 1001"),
    (["--ipc", "1", "--batch-real", "0"], "--batch-real must be at least 1"),
    (["--ipc", "1", "--dsa-strategy", "color_blur"], "unknown DSA augmentation 'blur'"),
    (["--ipc", "1", "--eta", "2"], "--eta must be in [0, 1]"),
])
def test_bad_arguments_are_one_line_errors(data, tmp_path, capsys, extra, message):
    assert main(argv(data, tmp_path / "x", extra)) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("ddcodec: error:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_round_to_is_straight_through():
    x = torch.tensor([0.1, 1.0001, -3.3], requires_grad=True)
    y = ld3m.round_to(x, torch.float16)
    assert torch.equal(y.detach(), x.detach().half().float())
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3))

