"""The d4m, dace and rded producers: encode real CIFAR-10 images with the tiny prior, regenerate bitwise,
soft labels, resume after interruption, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ddcodec.bundle import Bundle
from ddcodec.cli import main
from ddcodec.errors import DDCodecError
from ddcodec.labels.codec import decode_soft_labels, encode_soft_labels
from ddcodec.loader import DistilledDataset
from ddcodec.methods.checkpoint import WorkDir
from ddcodec.methods.patch_selection import crop_box, stitch

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = {  # --candidates 6: every method reads only 6 seeded images per class
    "d4m": ["--ipc", "2", "--candidates", "6", "--steps", "4", "--variants", "2"],
    "dace": ["--ipc", "1", "--candidates", "6", "--variants", "2"],
    "rded": ["--ipc", "1", "--candidates", "6"],
}
METHODS = list(ARGS)
SAMPLE = Path(__file__).resolve().parent.parent / "ddcodec" / "assets" / "samples" / "cifar10.tar"


def encode(method: str, data, out, *extra: str) -> int:
    return main(["encode", "--method", method, "--data", str(data), "--out", str(out), "--generator", "builtin:tiny",
                 *ARGS[method], *extra])


@pytest.fixture(scope="module")
def data(request) -> tuple[str, int]:
    """(--data, images per class): the shipped sample when present, else the 6-per-class real folder."""
    if SAMPLE.exists():
        return "sample:cifar10", 200
    return str(request.getfixturevalue("cifar_folder")), 6


@pytest.fixture(scope="module")
def bundles(data, tmp_path_factory) -> dict:
    """One bundle per method, encoded once."""
    root = tmp_path_factory.mktemp("methods")
    out = {}
    for m in METHODS:
        assert encode(m, data[0], root / m) == 0
        out[m] = root / m
    return out


def regenerate(path, epoch: int) -> dict[int, torch.Tensor]:
    ds = DistilledDataset(path, batch_size=16, return_ids=True)
    ds.set_epoch(epoch)
    return {int(i): img for x, _, _, ids in ds for i, img in zip(ids, x)}


@pytest.mark.parametrize("method", METHODS)
def test_regenerates_bitwise(bundles, method):
    b = Bundle.open(bundles[method])
    assert b.manifest["method"]["name"] == method
    epochs = []
    for epoch in range(b.variants):
        first, second = regenerate(bundles[method], epoch), regenerate(bundles[method], epoch)
        assert sorted(first) == list(range(b.num_items))
        assert all(torch.equal(first[i], second[i]) for i in first)
        epochs.append(first)
    if b.variants > 1:  # each epoch's variant draws new seeded noise
        assert not torch.equal(epochs[0][0], epochs[1][0])


def test_shapes_and_payloads(bundles):
    d4m, dace, rded = (Bundle.open(bundles[m]) for m in METHODS)
    assert d4m.num_items == 20 and d4m.items["latents"].dtype == torch.float16
    assert d4m.manifest["generator"]["params"]["strength"] == 0.7
    assert dace.num_items == 40 and dace.items["pixels"].shape[1:] == (3, 16, 16) and dace.items["pixels"].dtype == torch.uint8
    assert rded.num_items == 10 and rded.items["pixels"].shape[1:] == (3, 32, 32)
    assert rded.manifest["generator"]["model"]["source"] == "builtin:none"
    # rded stitches exactly the patches dace keeps: same selection, same order
    per_class = dace.items["pixels"].view(10, 4, 3, 16, 16)
    assert torch.equal(stitch(per_class[3], 2)[0], rded.items["pixels"][3])


@pytest.mark.parametrize("method", METHODS)
def test_soft_labels_decode_to_distributions(bundles, method):
    b = Bundle.open(bundles[method])
    lab = b.manifest["labels"]
    assert lab["kind"] == "soft" and lab["teacher"]["name"] == "cifar10-resnet56"
    assert b.labels["topk_index"].shape == (b.num_items, b.variants, lab["codec"]["k"])
    ids = torch.arange(b.num_items)
    for v in range(b.variants):
        p = decode_soft_labels(b.labels, lab["codec"], ids, v)
        assert p.shape == (b.num_items, 10) and (p >= 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(b.num_items), atol=1e-5)


def test_soft_labels_match_teacher_on_regenerated_images(bundles):
    """The stored labels are the teacher's on exactly the images DistilledDataset yields."""
    from ddcodec.labels.teachers import load_teacher
    teacher = load_teacher("cifar10-resnet56")
    ds = DistilledDataset(bundles["dace"], batch_size=40)
    ds.set_epoch(1)
    x, soft, _ = next(iter(ds))
    with torch.no_grad():
        p = torch.softmax(teacher(x), -1)
    assert (soft - p).abs().max() < 0.01  # int8 quantisation and the top-5 tail
    assert torch.equal(soft.argmax(-1), p.argmax(-1))


def test_soft_labels_record_how_often_the_teacher_names_the_class(bundles):
    """The manifest records the share of labels whose top-1 is the item's class; a low share warns at encode."""
    from ddcodec.labels.softlabels import attach_labels, class_agreement, LabelOptions
    b = Bundle.open(bundles["d4m"])
    codec, cls = b.manifest["labels"]["codec"], b.items["class_ids"]
    top1 = torch.stack([decode_soft_labels(b.labels, codec, torch.arange(b.num_items), v).argmax(-1)
                        for v in range(b.variants)], 1)
    assert b.manifest["labels"]["teacher"]["top1_is_class"] == round(float((top1 == cls[:, None]).float().mean()), 4)
    probs = F.one_hot(torch.tensor([[0], [1], [2], [0]]), 3).float()  # items of classes 0, 1, 1, 1: 2 of 4 agree
    tensors, c = encode_soft_labels(probs, 2, "int8", 1.0)
    assert class_agreement(tensors, c, torch.tensor([0, 1, 1, 1])) == 0.5

    class Always(torch.nn.Module):  # a teacher that names `k` whatever the image
        def __init__(self, k):
            super().__init__()
            self.logits = torch.nn.Parameter(F.one_hot(torch.tensor(k), 10).float() * 9)

        def forward(self, x):
            return self.logits.expand(len(x), -1)

    m = {k: v for k, v in b.manifest.items() if k != "labels"}
    opts = LabelOptions(teacher="const", variants=b.variants)
    items = {"items": b.items}
    with pytest.warns(UserWarning, match="mostly teach other classes"):
        out, _ = attach_labels(m, items, opts, Always(3))
    assert out["labels"]["teacher"]["top1_is_class"] == round(float((cls == 3).float().mean()), 4)


@pytest.mark.parametrize("method,stop", [("d4m", 11), ("rded", 4), pytest.param("dace", 4, marks=pytest.mark.slow)])
def test_resume_after_interruption_is_identical(bundles, data, tmp_path, monkeypatch, method, stop):
    """Killed after `stop` finished units (d4m: all k-means and one soft-label chunk), then re-run: same bundle."""
    out = tmp_path / method
    calls = {"n": 0}
    put = WorkDir.put

    def flaky_put(self, name, tensors):
        put(self, name, tensors)
        calls["n"] += 1
        if calls["n"] == stop:
            raise KeyboardInterrupt

    monkeypatch.setattr(WorkDir, "put", flaky_put)
    assert encode(method, data[0], out) == 130
    assert not out.exists() and (tmp_path / f"{method}.partial").is_dir()
    done = len(list((tmp_path / f"{method}.partial").glob("*.safetensors")))
    assert done == stop
    monkeypatch.setattr(WorkDir, "put", put)
    assert encode(method, data[0], out) == 0
    assert not (tmp_path / f"{method}.partial").exists()
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((bundles[method] / "manifest.json").read_text())
    assert a == b


def test_online_labels(data, tmp_path):
    assert encode("rded", data[0], tmp_path / "online", "--labels", "online") == 0
    m = Bundle.open(tmp_path / "online").manifest
    assert m["labels"] == {"kind": "hard", "online_teacher": {"name": "cifar10-resnet56", "temperature": 1.0}}
    assert "labels" not in m["payloads"]
    from ddcodec.labels.teachers import load_teacher
    ds = DistilledDataset(tmp_path / "online", batch_size=7, online_teacher="bundle")
    images, soft, hard = next(iter(ds))
    expected = torch.softmax(load_teacher("cifar10-resnet56")(images).float(), -1)
    assert torch.allclose(soft, expected, atol=1e-6) and not torch.equal(soft, F.one_hot(hard, 10).float())
    with pytest.raises(DDCodecError, match="names no online teacher"):
        DistilledDataset(bundles_dir_hard(tmp_path, data), online_teacher="bundle")
    from ddcodec.eval.train import TrainConfig, eval_bundle
    r = eval_bundle(tmp_path / "online", "convnet3", data[0], TrainConfig(epochs=1, batch_size=10), [0], test_limit=20)
    assert r["labels"]["online_teacher"] == "cifar10-resnet56" and r["labels"]["used"] == "soft (KL)"


def bundles_dir_hard(tmp_path, data):
    out = tmp_path / "hard"
    assert encode("rded", data[0], out, "--labels", "hard") == 0
    return out


def test_dace_mixup_partner_is_same_class_and_seeded(bundles):
    from ddcodec.generators.pipelines import build_pipeline
    b = Bundle.open(bundles["dace"])
    pipe = build_pipeline(b.manifest, b.items)
    ids = list(range(b.num_items))
    partners, gammas = pipe.mixup_draws(ids, 3)
    again, gammas2 = pipe.mixup_draws(ids[::-1], 3)
    assert partners == again[::-1] and torch.equal(gammas, gammas2.flip(0))
    cls = b.items["class_ids"]
    assert all(int(cls[i]) == int(cls[p]) and p != i for i, p in zip(ids, partners))
    assert ((gammas >= 0.5) & (gammas < 1)).all()
    assert pipe.mixup_draws(ids, 4)[0] != partners


def test_kmeans_medoids_are_real_latents_of_their_clusters():
    """--prototype medoid: each prototype is the latent nearest its k-means centre, from that centre's cluster."""
    from ddcodec.methods.d4m import kmeans_prototypes
    g = torch.Generator().manual_seed(0)
    latents = torch.cat([torch.randn(30, 4, 2, 2, generator=g) + 4 * m for m in range(3)])  # 3 separated blobs
    centres, sizes = kmeans_prototypes(latents, 3, seed=1, batch_size=16)
    medoids, msizes = kmeans_prototypes(latents, 3, seed=1, batch_size=16, medoid=True)
    assert torch.equal(sizes, msizes) and sizes.sum() == 90
    flat, cflat = latents.reshape(90, -1), centres.reshape(3, -1).double()
    nearest = torch.cdist(cflat, flat.double()).argmin(0)  # each latent's centre
    for j, (m, c) in enumerate(zip(medoids.reshape(3, -1), cflat)):
        row = int((flat == m).all(1).nonzero())  # a stored latent, bit for bit
        members = (nearest == j).nonzero().flatten()
        assert row in members.tolist()
        assert row == int(members[(flat[members].double() - c).norm(dim=1).argmin()])
    assert not torch.equal(medoids, centres)


def test_medoid_prototypes_are_recorded_and_replace_the_centres(bundles, data, tmp_path):
    """`--prototype medoid`: the same clusters as the centroid bundle, other latents, recorded in the manifest."""
    assert encode("d4m", data[0], tmp_path / "m", "--prototype", "medoid") == 0
    centroid, medoid = Bundle.open(bundles["d4m"]), Bundle.open(tmp_path / "m")
    cp, mp = centroid.manifest["method"]["params"], medoid.manifest["method"]["params"]
    assert cp["prototype"] == "centroid" and mp["prototype"] == "medoid"
    assert mp["cluster_sizes"] == cp["cluster_sizes"]
    assert not torch.equal(medoid.items["latents"], centroid.items["latents"])


def test_crop_box_and_stitch():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        top, left, h, w = crop_box(g, 32, 24, (0.08, 1.0))
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 24 and h > 0 and w > 0
    patches = torch.arange(8).view(8, 1, 1, 1).expand(8, 1, 2, 2)
    img = stitch(patches, 2)
    assert img.shape == (2, 1, 4, 4)
    assert img[0, 0, ::2, ::2].tolist() == [[0, 1], [2, 3]] and img[1, 0, 0, 2].item() == 5


@pytest.mark.parametrize("method,extra,message", [
    ("d4m", ["--ipc", "{n1}", "--candidates", "{n1}"], "--ipc {n1} needs {n1} images of class"),
    ("d4m", ["--ipc", "3", "--candidates", "2"], "--candidates 2 is fewer than --ipc 3"),
    ("dace", ["--ipc", "2"], "keeps 8 patches per class"),
    ("rded", ["--ipc", "{n1}", "--factor", "1", "--candidates", "{n1}"], "needs {n1} images of class"),
    ("dace", ["--teacher", "nope"], "unknown teacher 'nope'"),
    ("rded", ["--teacher", "imagenette-efficientnet-lite0"], "was trained on 10 other classes"),
    ("d4m", ["--soft-k", "0"], "--soft-k must be at least 1"),
    ("dace", ["--rho", "1.5"], "--rho must be in [0, 1]"),
])
def test_bad_arguments_are_one_line_errors(data, tmp_path, capsys, method, extra, message):
    n1 = data[1] + 1
    assert encode(method, data[0], tmp_path / "x", *[e.format(n1=n1) for e in extra]) == 2
    err = capsys.readouterr().err.strip()
    line = err.split("\r")[-1].strip()  # after any \r progress bar, e.g. the sample's first extraction
    assert message.format(n1=n1) in line and "\n" not in err and line.startswith("ddcodec: error:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_missing_model_is_a_one_line_error(data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = main(["encode", "--method", "d4m", "--data", data[0], "--out", str(tmp_path / "x"),
               "--generator", str(tmp_path / "empty"), "--ipc", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "has no model_index.json" in err and "\n" not in err


def test_missing_generator_directory_is_a_one_line_error(data, tmp_path, capsys):
    rc = main(["encode", "--method", "d4m", "--data", data[0], "--out", str(tmp_path / "x"),
               "--generator", str(tmp_path / "nowhere"), "--ipc", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and f"{tmp_path / 'nowhere'}: no such directory" in err and "\n" not in err
    assert not (tmp_path / "x").exists()


def test_changed_arguments_do_not_reuse_partial_work(data, tmp_path):
    WorkDir(tmp_path / "x", {"something": "else"})
    with pytest.raises(DDCodecError, match="different parameters"):
        from ddcodec.cli import build_parser
        from ddcodec.methods import rded
        rded.run(build_parser().parse_args(["encode", "--method", "rded", "--data", data[0], "--out",
                                            str(tmp_path / "x"), *ARGS["rded"]]))
    assert json.loads((tmp_path / "x.partial" / "params.json").read_text())["params"] == {"something": "else"}
    # --overwrite discards the stale work and encodes from scratch
    assert encode("rded", data[0], tmp_path / "x", "--overwrite") == 0
    assert (tmp_path / "x" / "manifest.json").exists() and not (tmp_path / "x.partial").exists()


def test_class_prior_refuses_other_classes(cifar_folder, tmp_path, capsys):
    """The default prior is conditioned on CIFAR-10's classes: d4m on other classes is refused before any work,
    since class k would be drawn as CIFAR-10 class k."""
    from ddcodec.generators.prior import check_prior_classes, load_prior
    prior = load_prior("builtin:default")
    check_prior_classes(prior, ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"])
    prior.source = str(tmp_path / "wnid-prior")  # a prior trained on Imagenette names its classes by WordNet id
    (tmp_path / "wnid-prior").mkdir()
    (tmp_path / "wnid-prior" / "training.json").write_text(json.dumps({"classes": ["n01440764", "n03028079"]}))
    check_prior_classes(prior, ["tench", "church"])
    prior.source = "builtin:default"
    with pytest.raises(DDCodecError, match="not this data's"):
        check_prior_classes(prior, ["tench", "church"])
    with pytest.raises(DDCodecError, match="conditioned on 10 classes but the data has 11"):
        check_prior_classes(prior, [f"c{i}" for i in range(11)])
    for old, new in (("airplane", "tench"), ("ship", "church")):
        shutil.copytree(cifar_folder / "train" / old, tmp_path / "data" / new)
    rc = main(["encode", "--method", "d4m", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "x"),
               "--generator", "builtin:default", "--ipc", "1", "--labels", "hard"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "is conditioned on the classes it was trained on (airplane" in err and "\n" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()
    assert main(["encode", "--method", "d4m", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "y"),
                 "--generator", "builtin:tiny", "--ipc", "1", "--labels", "hard", "--steps", "2"]) == 0


def relabel(src, out, *extra: str) -> int:
    return main(["relabel", str(src), "--out", str(out), *extra])


def test_relabel_changes_labels_only(bundles, tmp_path):
    """Soft -> hard -> soft gives back the encoder's labels bit for bit; items and images never change."""
    src = Bundle.open(bundles["d4m"])
    assert relabel(bundles["d4m"], tmp_path / "online", "--labels", "online", "--teacher", "cifar10-resnet56") == 0
    online = Bundle.open(tmp_path / "online")
    assert online.manifest["labels"] == {"kind": "hard",
                                         "online_teacher": {"name": "cifar10-resnet56", "temperature": 1.0}}
    assert "labels" not in online.payloads and online.manifest["method"]["params"]["relabelled_from"] == src.digest()
    assert all(torch.equal(online.items[k], v) for k, v in src.items.items())
    assert online.manifest["fingerprints"]["entries"] == src.manifest["fingerprints"]["entries"]
    for epoch in (0, 1):
        a, b = regenerate(bundles["d4m"], epoch), regenerate(tmp_path / "online", epoch)
        assert all(torch.equal(a[i], b[i]) for i in a)
    assert relabel(tmp_path / "online", tmp_path / "soft") == 0  # default: soft, the dataset's teacher
    soft = Bundle.open(tmp_path / "soft")
    assert soft.manifest["labels"] == src.manifest["labels"]
    assert all(torch.equal(soft.labels[k], v) for k, v in src.labels.items())


def test_relabel_plans_more_variants_and_keeps_the_old_ones(bundles, tmp_path):
    """Online labels store nothing per variant, so more can be planned later; the existing variants render the same."""
    src = Bundle.open(bundles["d4m"])
    assert relabel(bundles["d4m"], tmp_path / "v3", "--labels", "online", "--teacher", "cifar10-resnet56",
                   "--variants", "3") == 0
    v3 = Bundle.open(tmp_path / "v3")
    assert src.variants == 2 and v3.variants == 3 and v3.manifest["method"]["params"]["variants"] == 3
    old = [regenerate(bundles["d4m"], e) for e in range(2)]
    new = [regenerate(tmp_path / "v3", e) for e in range(3)]
    assert all(torch.equal(old[e][i], new[e][i]) for e in range(2) for i in old[e])
    assert not torch.equal(new[2][0], new[0][0]) and not torch.equal(new[2][0], new[1][0])
    assert main(["verify", str(tmp_path / "v3")]) == 0
    assert relabel(tmp_path / "v3", tmp_path / "soft", "--variants", "3") == 0  # soft: each new variant labelled
    assert Bundle.open(tmp_path / "soft").labels["topk_index"].shape[1] == 3


def test_relabel_refuses_bad_input_and_keeps_the_bundle(bundles, tmp_path, capsys):
    shutil.copytree(bundles["rded"], tmp_path / "b")
    before = sorted((p.name, p.read_bytes()) for p in (tmp_path / "b").iterdir())
    cases = [(["--labels", "hard"], "already exists"),
             (["--labels", "soft", "--teacher", "imagenette-efficientnet-lite0", "--overwrite"], "other classes"),
             (["--variants", "0", "--overwrite"], "--variants must be at least 1"),
             (["--teacher", "no-such-teacher", "--overwrite"], "no-such-teacher")]
    for extra, message in cases:
        assert relabel(tmp_path / "b", tmp_path / "b", *extra) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert sorted((p.name, p.read_bytes()) for p in (tmp_path / "b").iterdir()) == before
    assert relabel(tmp_path / "b", tmp_path / "b", "--labels", "hard", "--overwrite") == 0  # in place
    assert Bundle.open(tmp_path / "b").manifest["labels"] == {"kind": "hard"}
    assert not (tmp_path / "b.old").exists() and not (tmp_path / "b.writing").exists()
