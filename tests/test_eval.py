"""Evaluation harness: students, augmentation, soft-label loss, `ddcodec eval` / `eval-real` / `export-ddranking`."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from ddcodec.errors import DDCodecError
from ddcodec.eval.augment import augment, crop_flip, cutmix
from ddcodec.eval.students import STUDENTS, build_student
from ddcodec.eval.train import TrainConfig, eval_bundle, soft_loss

REPORT_KEYS = {"kind", "command", "student", "labels", "train", "test", "seeds", "accuracy", "mean", "std",
               "train_s", "eval_s", "regen_s", "regenerated_images", "regen_images_per_s", "student_s",
               "trained_images", "student_images_per_s", "per_seed", "environment"}


@pytest.mark.parametrize("name,size", [(n, 32) for n in STUDENTS if n not in ("convnet4", "convnet5")]
                         + [("resnet18", 64), ("convnet4", 64), ("vit-tiny", 64)])
def test_student_forward(name, size):
    torch.manual_seed(0)
    net = build_student(name, 10, size).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 3, size, size))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_student_names():
    assert build_student("convnet", 10, 64).classifier.in_features == 128 * 4 * 4  # depth 4 at 64 px
    assert isinstance(build_student("resnet18-in", 10, 32).stem[1], torch.nn.GroupNorm)
    assert isinstance(build_student("resnet18", 10, 64).stem[3], torch.nn.MaxPool2d)  # ImageNet stem from 64 px
    with pytest.raises(DDCodecError):
        build_student("resnet50", 10, 32)


def test_augment_seeded_and_exact():
    x = torch.rand(8, 3, 32, 32)
    a = augment(x, torch.Generator().manual_seed(1), "crop")
    b = augment(x, torch.Generator().manual_seed(1), "crop")
    assert torch.equal(a, b) and a.shape == x.shape
    same = crop_flip(x, torch.Generator().manual_seed(0), pad=0)  # no padding: identity or mirror, pixel-exact
    assert all(torch.equal(s, o) or torch.equal(s, o.flip(-1)) for s, o in zip(same, x))
    r = augment(x, torch.Generator().manual_seed(2), "rrc")
    assert r.shape == x.shape and torch.isfinite(r).all()


def test_cutmix_pastes_one_box_and_reports_its_area():
    x = torch.arange(4, dtype=torch.float32)[:, None, None, None].expand(4, 3, 16, 16).clone()  # image i is all i
    mixed, perm, kept = cutmix(x, torch.Generator().manual_seed(3))
    again = cutmix(x, torch.Generator().manual_seed(3))
    assert torch.equal(mixed, again[0]) and torch.equal(perm, again[1]) and kept == again[2]
    for i in range(4):
        own = (mixed[i] == i).float().mean().item()
        assert own == pytest.approx(kept) or perm[i] == i  # the pasted box covers exactly 1 - kept of the image
        assert set(mixed[i].unique().tolist()) <= {float(i), float(perm[i])}
    kept_values = {cutmix(x, torch.Generator().manual_seed(s))[2] for s in range(20)}
    assert len(kept_values) > 5 and all(0.0 <= k <= 1.0 for k in kept_values)


def test_soft_loss():
    p = torch.softmax(torch.randn(4, 10), -1)
    assert soft_loss(p.log(), p, 1.0, 1.0).abs() < 1e-5  # the teacher's own logits cost nothing
    assert soft_loss(p.log(), p, 4.0, 1.0).abs() < 1e-5  # re-tempered to T=4, the teacher's logits still match
    assert soft_loss(p.log() * 2, p, 4.0, 1.0) > 1e-3


@pytest.fixture(scope="module")
def soft_bundle(tiny_bundle, tmp_path_factory):
    """One item per class of the tiny bundle, 2 variants, random top-3 soft labels stored at temperature 2."""
    from ddcodec.bundle import Bundle, write_bundle
    from ddcodec.labels.codec import encode_soft_labels
    b = Bundle.open(tiny_bundle)
    m = copy.deepcopy(b.manifest)
    m["payloads"], m["variants"] = {}, 2
    m.pop("fingerprints")
    keep = torch.arange(0, b.num_items, 4)
    probs = torch.softmax(torch.randn(len(keep), 2, 10, generator=torch.Generator().manual_seed(0)) * 3, -1)
    tensors, codec = encode_soft_labels(probs, k=3, temperature=2.0)
    m["labels"] = {"kind": "soft", "payload": "labels", "codec": codec}
    m["method"]["params"]["ipc"] = 1
    out = tmp_path_factory.mktemp("bundles") / "soft"
    return write_bundle(out, m, {"items": {k: v[keep] for k, v in b.items.items()}, "labels": tensors}, fingerprints=0)


def test_eval_soft_labels_and_determinism(soft_bundle, tiny_bundle, cifar_folder):
    r = eval_bundle(soft_bundle, "convnet3", str(cifar_folder), TrainConfig(epochs=2, batch_size=5), [3, 3])
    assert r["labels"]["used"] == "soft (KL)" and r["labels"]["temperature"] == 2.0
    assert r["bundle"]["soft_label_bytes"] > 0 and 0.0 <= r["mean"] <= 1.0
    a, b = r["per_seed"]  # the same seed twice: bitwise the same training on CPU
    assert a["accuracy"] == b["accuracy"] and a["final_loss"] == b["final_loss"]
    assert r["regenerated_images"] == 20  # 2 variants x 10 items, regenerated once and shared by both seeds
    with pytest.raises(DDCodecError):
        eval_bundle(tiny_bundle, "convnet3", str(cifar_folder), TrainConfig(epochs=1, labels="soft"), [0])


def test_eval_cli_json(soft_bundle, cifar_folder, tmp_path):
    from ddcodec.cli import main
    out = tmp_path / "r.json"
    rc = main(["eval", str(soft_bundle.root), "--student", "convnet3", "--test-data", str(cifar_folder), "--epochs", "1",
               "--seeds", "1", "--batch-size", "5", "--labels", "hard", "--json", str(out)])
    assert rc == 0
    r = json.loads(out.read_text())
    assert REPORT_KEYS <= set(r) and r["labels"]["used"] == "hard (CE)"
    assert 0.0 <= r["accuracy"][0] <= 1.0 and r["mean"] == r["accuracy"][0]
    assert r["bundle"]["bytes"] > 0 and r["bundle"]["soft_label_bytes"] > 0 and r["bundle"]["ipc"] == 1
    assert r["test"]["images"] == 20 and r["trained_images"] == 10 and r["regenerated_images"] == 10
    assert r["command"].startswith("ddcodec ")


def test_eval_json_refuses_a_file_that_is_not_a_report(soft_bundle, cifar_folder, tmp_path, monkeypatch):
    from test_bundle import assert_one_line_error, run_cli
    import ddcodec.eval.train as train

    def no_training(*a, **k):
        raise AssertionError("trained before checking --json")
    monkeypatch.setattr(train, "eval_bundle", no_training)
    monkeypatch.setattr(train, "eval_real", no_training)
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}\n')
    for cmd in (["eval", str(soft_bundle.root), "--test-data", str(cifar_folder)],
                ["eval-real", "--data", str(cifar_folder), "--ipc", "1"]):
        r = run_cli(*cmd, "--epochs", "1", "--seeds", "1", "--json", str(notes))
        assert_one_line_error(r, "is not a ddcodec eval report")
        assert notes.read_text() == '{"mine": 1}\n'
        assert_one_line_error(run_cli(*cmd, "--epochs", "1", "--json", str(tmp_path)), "is a directory")


def test_eval_json_replaces_an_earlier_report(cifar_folder, tmp_path):
    from ddcodec.cli import main
    out = tmp_path / "real.json"
    args = ["eval-real", "--data", str(cifar_folder), "--ipc", "1", "--student", "convnet3", "--epochs", "1",
            "--seeds", "1", "--json", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert main([*args[:-3], "2", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["seeds"] == [0, 1] and first["seeds"] == [0]


def test_eval_real_subset(cifar_folder, tmp_path):
    from ddcodec.cli import main
    out = tmp_path / "real.json"
    assert main(["eval-real", "--data", str(cifar_folder), "--ipc", "2", "--student", "convnet3", "--epochs", "1",
                 "--seeds", "1", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["kind"] == "real-subset" and r["data"]["images"] == 20 and 0.0 <= r["mean"] <= 1.0


def test_export_ddranking(soft_bundle, tmp_path):
    from safetensors.torch import load_file
    from ddcodec.eval.ddranking import export_ddranking
    index = export_ddranking(soft_bundle, tmp_path / "dd", epochs=3)
    assert [e["variant"] for e in index["epochs"]] == [0, 1, 0] and index["ipc"] == 1
    d = load_file(str(tmp_path / "dd" / "variant_001.safetensors"))
    assert d["images"].shape == (10, 3, 32, 32) and d["soft_labels"].shape == (10, 10)
    assert torch.equal(d["hard_labels"], torch.arange(10))  # class-major, as DD-Ranking assumes
    assert torch.allclose(torch.softmax(d["soft_labels"], -1), d["soft_probs"], atol=1e-5)
    assert (tmp_path / "dd" / "README.md").is_file()
    with pytest.raises(DDCodecError):
        export_ddranking(soft_bundle, tmp_path / "dd", epochs=1)


def test_online_teacher_relabels_augmented_batches():
    from ddcodec.eval.feeds import TensorFeed
    from ddcodec.eval.train import fit

    class Recorder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.seen = []

        def forward(self, x):
            self.seen.append(x.clone())
            return torch.zeros(len(x), 10).index_fill_(1, torch.tensor([7]), 5.0)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8, generator=g)
    feed = TensorFeed(images, torch.arange(12) % 10, 4, seed=0)
    teacher = Recorder()
    test = (images, torch.full((12,), 7))
    r = fit("convnet3", 10, (16, 16), feed, 3, TrainConfig(epochs=2, batch_size=4, lr=0.05), 0, test, soft=True,
            teacher=teacher)
    assert len(teacher.seen) == 6  # every batch of every epoch
    originals = {tuple(images[i].float().div(255).flatten().tolist()) for i in range(12)}
    assert sum(tuple(x.flatten().tolist()) not in originals for b in teacher.seen for x in b) > 6  # augmented crops
    assert r["accuracy"] == 1.0  # trained only on the teacher's labels (class 7), not the hard ones


def test_cutmix_training_mixes_labels_and_is_recorded(soft_bundle, cifar_folder):
    cfg = TrainConfig(epochs=2, batch_size=5, mix="cutmix")
    r = eval_bundle(soft_bundle, "convnet3", str(cifar_folder), cfg, [0, 0])
    a, b = r["per_seed"]
    assert a["final_loss"] == b["final_loss"] and r["train"]["mix"] == "cutmix"
    plain = eval_bundle(soft_bundle, "convnet3", str(cifar_folder), TrainConfig(epochs=2, batch_size=5), [0])
    assert plain["per_seed"][0]["final_loss"] != a["final_loss"]
    hard = eval_bundle(soft_bundle, "convnet3", str(cifar_folder), TrainConfig(epochs=1, batch_size=5, mix="cutmix",
                                                                                labels="hard"), [0])
    assert hard["labels"]["used"] == "hard (CE)" and hard["per_seed"][0]["final_loss"] > 0
    with pytest.raises(DDCodecError, match="unknown mix"):
        eval_bundle(soft_bundle, "convnet3", str(cifar_folder), TrainConfig(epochs=1, mix="mixup"), [0])
