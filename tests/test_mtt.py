"""LD3M with the MTT loss: `ddcodec experts train` writes a resumable, checksummed trajectory buffer; an MTT encode
(tiny prior, 4 classes x 6 CIFAR-10 images, IPC 1, T = 2) lowers its probe loss, stores codes that regenerate the
optimised images bitwise, resumes to the same codes and learned lr, and bad arguments fail with one line."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ddcodec.cli import build_parser, main
from ddcodec.loader import DistilledDataset
from ddcodec.methods import experts as X
from ddcodec.methods import ld3m

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(cifar4) -> Path:
    """6 real train images of each of 4 CIFAR-10 classes (conftest.cifar4)."""
    return cifar4


# 2 experts x 3 epochs; batch 4 gives 6 SGD steps an epoch on the 24 images, so the experts move measurably
EXPERTS = ["--experts", "2", "--epochs", "3", "--batch-size", "4", "--threads", "1"]
FAST = ["--ipc", "1", "--iterations", "4", "--steps", "2", "--checkpoint-every", "2", "--guidance-scale", "1"]
MTT = [*FAST, "--ld3m-loss", "mtt", "--syn-steps", "3", "--dsa-strategy", "color_crop_flip"]


@pytest.fixture(scope="module")
def buffer(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experts") / "buf"
    assert main(["experts", "train", "--data", str(data), "--out", str(out), *EXPERTS]) == 0
    return out


def argv(data, out, buffer, extra: list[str]) -> list[str]:
    return ["encode", "--method", "ld3m", "--data", str(data), "--out", str(out), "--generator", "builtin:tiny",
            "--expert-dir", str(buffer), *extra]


def encode(data, out, buffer, extra: list[str]):
    return ld3m.encode(build_parser().parse_args(argv(data, out, buffer, extra)))


@pytest.fixture(scope="module")
def mtt(data, buffer, tmp_path_factory):
    return encode(data, tmp_path_factory.mktemp("ld3m") / "mtt", buffer, MTT)


def test_buffer_files_and_metadata(buffer):
    meta = json.loads((buffer / "experts.json").read_text())
    net = X.matching_convnet(4, (32, 32))
    p = sum(t.numel() for t in net.parameters())
    assert meta["format"] == X.FORMAT and meta["student"] == "convnet3" and meta["depth"] == 3
    assert meta["classes"] == ["airplane", "automobile", "bird", "cat"] and meta["image_size"] == [32, 32]
    assert meta["epochs"] == 3 and meta["lr"] == 0.01 and meta["momentum"] == 0.0 and meta["num_images"] == 24
    assert meta["param_count"] == p and meta["param_layout"] == X.param_layout(net)
    assert [r["file"] for r in meta["experts"]] == ["expert_000.safetensors", "expert_001.safetensors"]
    trajectories = []
    for r in meta["experts"]:
        raw = (buffer / r["file"]).read_bytes()
        assert hashlib.sha256(raw).hexdigest() == r["sha256"] and len(r["train_acc"]) == 3
        t = safetensors.torch.load(raw)
        assert list(t) == ["trajectory"] and t["trajectory"].dtype == torch.float32 and t["trajectory"].shape == (4, p)
        assert torch.isfinite(t["trajectory"]).all() and not torch.equal(t["trajectory"][0], t["trajectory"][3])
        trajectories.append(t["trajectory"])
    assert not torch.equal(trajectories[0][0], trajectories[1][0])  # each expert has its own seeded init
    assert not list(buffer.glob(".*.tmp")) and not list(buffer.glob("*.pt*"))


def test_buffer_resumes_and_extends(buffer, data, tmp_path, monkeypatch, capsys):
    """A lost expert is retrained (bitwise the same), finished ones are skipped, --experts 3 adds one, other
    settings are refused with one line."""
    out = tmp_path / "buf"
    shutil.copytree(buffer, out)
    (out / "expert_001.safetensors").unlink()
    trained = []
    train = X.train_expert
    monkeypatch.setattr(X, "train_expert", lambda images, labels, config, k, *a: trained.append(k) or train(images, labels, config, k, *a))
    assert main(["experts", "train", "--data", str(data), "--out", str(out), *EXPERTS]) == 0
    assert trained == [1]
    assert (out / "expert_001.safetensors").read_bytes() == (buffer / "expert_001.safetensors").read_bytes()
    assert (out / "experts.json").read_bytes() == (buffer / "experts.json").read_bytes()
    extra = [a if a != "2" else "3" for a in EXPERTS]
    assert main(["experts", "train", "--data", str(data), "--out", str(out), *extra]) == 0
    assert trained == [1, 2] and len(json.loads((out / "experts.json").read_text())["experts"]) == 3
    capsys.readouterr()
    assert main(["experts", "train", "--data", str(data), "--out", str(out), *EXPERTS, "--lr", "0.02"]) == 2
    err = capsys.readouterr().err.strip()
    assert "holds experts trained with other settings (lr: 0.01, now 0.02)" in err and "\n" not in err


def test_mtt_bundle_and_loss(mtt, buffer):
    b, d = mtt
    p = b.manifest["method"]["params"]
    assert p["loss"] == "mtt" and p["syn_steps"] == 3 and p["expert_epochs"] == 2 and p["max_start_epoch"] == 20
    assert p["start_epoch_limit"] == 2 and p["experts"] == 2 and p["expert_buffer_epochs"] == 3 and p["lr_z"] == 10.0
    assert p["experts_sha256"] == hashlib.sha256((buffer / "experts.json").read_bytes()).hexdigest()
    assert p["regeneration_check"]["max_abs_diff"] == 0.0 and b.items["latents"].dtype == torch.float16
    # the loss under iteration 0's expert, start epoch, batches and augmentation drops; the codes and lr moved
    assert p["probe_loss_end"] < p["probe_loss_start"]
    assert len(d.losses) == 4 and all(torch.isfinite(torch.tensor(d.losses)))
    assert p["syn_lr_learned"] != 0.01 and 0 < p["syn_lr_learned"] < 1
    z0 = d.pipe.items["latents"].half()
    assert not torch.equal(b.items["latents"], z0) and torch.isfinite(b.items["latents"].float()).all()


def test_optimised_images_are_the_regenerated_ones(mtt):
    b, d = mtt
    with torch.enable_grad():
        optimised = d.render(0, grad=True)
    ds = DistilledDataset(b.root, batch_size=3, return_ids=True)
    regenerated = {int(i): img for x, _, _, ids in ds for i, img in zip(ids, x)}
    assert sorted(regenerated) == list(range(4))
    assert all(torch.equal(optimised[i].detach(), regenerated[i]) for i in range(4))


def test_resume_after_interruption_is_identical(mtt, data, buffer, tmp_path, interrupt_ld3m):
    """Killed after 3 of 4 iterations (state saved at 2, with the learned lr and its momentum), then re-run."""
    out = tmp_path / "resumed"
    interrupt_ld3m(3)
    assert main(argv(data, out, buffer, MTT)) == 130
    state = safetensors.torch.load_file(tmp_path / "resumed.partial" / "ld3m-state.safetensors")
    assert {"syn_lr", "opt_lr.0.momentum_buffer", "opt.0.momentum_buffer"} <= set(state)
    interrupt_ld3m(None)
    b, d = encode(data, out, buffer, MTT)
    ref, ref_d = mtt
    assert d.losses == ref_d.losses and torch.equal(d.syn_lr, ref_d.syn_lr)
    for key in ("latents", "cond", "class_ids"):
        assert torch.equal(b.items[key], ref.items[key])
    assert b.manifest["fingerprints"]["entries"] == ref.manifest["fingerprints"]["entries"]


def test_missing_expert_dir_fails_before_any_work(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ld3m, "load_source", lambda *a, **k: pytest.fail("loaded data before checking --expert-dir"))
    assert main(["encode", "--method", "ld3m", "--data", str(data), "--out", str(tmp_path / "x"),
                 "--generator", "builtin:tiny", *MTT]) == 2
    err = capsys.readouterr().err.strip()
    assert "--ld3m-loss mtt needs --expert-dir DIR" in err and "\n" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def _tampered(buffer: Path, tmp_path: Path, what: str) -> Path:
    out = tmp_path / "tampered"
    shutil.copytree(buffer, out)
    if what == "file":
        raw = bytearray((out / "expert_001.safetensors").read_bytes())
        raw[-1] ^= 1
        (out / "expert_001.safetensors").write_bytes(bytes(raw))
    else:
        meta = json.loads((out / "experts.json").read_text())
        meta.update({"classes": ["a", "b", "c", "d"]} if what == "classes" else {"depth": 4})
        (out / "experts.json").write_text(json.dumps(meta))
    return out


@pytest.mark.parametrize("extra,tamper,message", [
    (["--expert-epochs", "4"], None, "--expert-epochs 4 is more than the expert buffer's 3 epochs"),
    (["--syn-steps", "0"], None, "--syn-steps must be at least 1, not 0"),
    (["--batch-syn", "0"], None, "--batch-syn must be at least 1, not 0"),
    (["--image-size", "16"], None, "are [32, 32] px, the bundle [16, 16]"),
    ([], "classes", "were trained on classes ['a', 'b', 'c', 'd']"),
    ([], "depth", "are ConvNet-4, LD3M matches ConvNet-3 at 32 px"),
    ([], "file", "expert_001.safetensors does not match its sha256 in experts.json"),
    ([], "nodir", "is not a directory"),
])
def test_bad_arguments_are_one_line_errors(data, buffer, tmp_path, capsys, extra, tamper, message):
    where = buffer if tamper is None else tmp_path / "nowhere" if tamper == "nodir" else _tampered(buffer, tmp_path, tamper)
    assert main(argv(data, tmp_path / "x", where, [*MTT, *extra])) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and err.startswith("ddcodec: error:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize("extra,message", [
    (["--experts", "0"], "--experts must be at least 1, not 0"),
    (["--student", "resnet18"], "--student 'resnet18' cannot be an MTT expert"),
    (["--dsa-strategy", "blur"], "unknown DSA augmentation 'blur'"),
])
def test_experts_bad_arguments(data, tmp_path, capsys, extra, message):
    assert main(["experts", "train", "--data", str(data), "--out", str(tmp_path / "b"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not (tmp_path / "b").exists()


def test_functional_student_is_the_convnet():
    """unflatten + functional_call on a flat row computes what the module with those weights computes."""
    torch.manual_seed(0)
    net = X.matching_convnet(4, (32, 32))
    x = torch.randn(2, 3, 32, 32)
    out = torch.func.functional_call(net, X.unflatten(X.flatten(net), X.param_layout(net)), (x,))
    assert torch.equal(out, net(x))
