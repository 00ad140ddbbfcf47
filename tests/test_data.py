"""Data sources: the shipped sample, webdataset shards, ImageFolder directories, and their errors."""

from __future__ import annotations

import io
import os
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from ddcodec.data import load_source
from ddcodec.data.sources import SAMPLES, ImageFolderSource, WebDatasetSource, is_wds_spec
from ddcodec.errors import DDCodecError

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("DDCODEC_SHARED", ROOT.parent / "shared"))
CIFAR10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def png_bytes(color: tuple[int, int, int], size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


# the shipped sample ---------------------------------------------------------------------------------------
def test_sample_counts_and_classes():
    path = SAMPLES / "cifar10.tar"
    assert path.stat().st_size <= 5 * 1024 * 1024
    train, test = load_source("sample:cifar10", "train"), load_source("sample:cifar10", "test")
    assert train.classes == CIFAR10 and test.classes == CIFAR10
    assert Counter(train.targets) == {c: 200 for c in range(10)}
    assert Counter(test.targets) == {c: 100 for c in range(10)}
    img, label = train[0]
    assert img.dtype == torch.uint8 and img.shape == (3, 32, 32) and label == 0
    assert (SAMPLES / "README.md").is_file()


def test_sample_rule_is_seeded_and_balanced():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_sample import pick
    finally:
        sys.path.pop(0)
    names = {(s, c): [f"{s}/{c}/{i:04d}.jpg" for i in range(50)] for s in ("train", "test") for c in ("a", "b")}
    a = pick(names, {"train": 5, "test": 3}, seed=0)
    assert a == pick(names, {"train": 5, "test": 3}, seed=0) != pick(names, {"train": 5, "test": 3}, seed=1)
    assert Counter(n.rsplit("/", 1)[0] for n in a) == {"train/a": 5, "train/b": 5, "test/a": 3, "test/b": 3}


@pytest.mark.slow
def test_sample_matches_the_rule_on_the_shared_tar():
    cifar = SHARED / "datasets" / "cifar10.tar"
    if not cifar.exists():
        pytest.skip("shared cifar10.tar not found")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_sample import pick
    finally:
        sys.path.pop(0)
    names: dict[tuple[str, str], list[str]] = {}
    with tarfile.open(cifar) as tar:
        for m in tar:
            parts = m.name.split("/")
            if m.isfile() and len(parts) == 3:
                names.setdefault((parts[0], parts[1]), []).append(m.name)
    with tarfile.open(SAMPLES / "cifar10.tar") as tar:
        shipped = [m.name for m in tar if m.isfile()]
    assert shipped == pick(names, {"train": 200, "test": 100}, seed=0)


def test_unknown_sample_lists_known():
    with pytest.raises(DDCodecError, match="known samples: cifar10"):
        load_source("sample:mnist")


# webdataset shards ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """Two shards of 15 and 5 real sample images (jpg) with integer .cls labels, plus a classes.txt."""
    src = load_source("sample:cifar10", "test")
    d = tmp_path_factory.mktemp("wds")
    picks = list(range(0, 1000, 50))  # 20 images, 2 per class
    for s, chunk in enumerate((picks[:15], picks[15:])):
        with wds.TarWriter(str(d / f"test-{s:06d}.tar")) as w:
            for i in chunk:
                w.write({"__key__": f"img{i:05d}", "jpg": src.samples[i][0].read_bytes(), "cls": str(src.targets[i]).encode()})
    return d


def test_wds_brace_pattern_and_labels(shards):
    ds = load_source(f"wds:{shards}/test-{{000000..000001}}.tar", "test")
    assert isinstance(ds, WebDatasetSource) and len(ds) == 20
    assert ds.classes == [str(i) for i in range(10)]
    assert Counter(ds.targets) == {c: 2 for c in range(10)}
    ref = load_source("sample:cifar10", "test")
    img, label = ds[7]
    assert torch.equal(img, ref[7 * 50][0]) and label == ref.targets[7 * 50]


def test_wds_split_placeholder_directory_and_sidecar_names(shards, tmp_path):
    (tmp_path / "test").mkdir()
    for p in shards.glob("*.tar"):
        (tmp_path / "test" / p.name).write_bytes(p.read_bytes())
    (tmp_path / "test" / "classes.txt").write_text("\n".join(CIFAR10) + "\n")
    ds = load_source(str(tmp_path / "{split}" / "test-{000000..000001}.tar"), "test")
    assert ds.classes == CIFAR10 and len(ds) == 20
    assert len(load_source(f"wds:{tmp_path}", "test")) == 20  # a directory: <dir>/<split>/*.tar
    single = load_source(str(tmp_path / "test" / "test-000001.tar"), "train")  # a plain path to one shard
    assert isinstance(single, WebDatasetSource) and len(single) == 5


def test_wds_streamed_through_pipe(shards):
    ds = load_source(f"pipe:cat {shards}/test-000000.tar", "test")
    assert len(ds) == 15 and ds[0][0].shape == (3, 32, 32)


def test_wds_text_labels_and_png(tmp_path):
    with wds.TarWriter(str(tmp_path / "s.tar")) as w:
        for i, name in enumerate(["red", "green", "red", "blue"]):
            color = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}[name]
            w.write({"__key__": f"k{i}", "png": png_bytes(color), "cls": name.encode()})
    ds = WebDatasetSource([str(tmp_path / "s.tar")])
    assert ds.classes == ["blue", "green", "red"] and ds.targets == [2, 1, 2, 0]
    assert ds[1][0][:, 0, 0].tolist() == [0, 255, 0]


def test_wds_errors(tmp_path):
    with pytest.raises(DDCodecError, match="does not exist"):
        load_source(f"wds:{tmp_path}/none-{{0..1}}.tar")
    with wds.TarWriter(str(tmp_path / "nolabels.tar")) as w:
        w.write({"__key__": "a", "png": png_bytes((1, 2, 3))})
    with pytest.raises(DDCodecError, match="no samples"):
        load_source(f"wds:{tmp_path}/nolabels.tar")
    with wds.TarWriter(str(tmp_path / "big.tar")) as w:
        w.write({"__key__": "a", "png": png_bytes((1, 2, 3)), "cls": b"7"})
    with pytest.raises(DDCodecError, match="class names"):
        WebDatasetSource([str(tmp_path / "big.tar")], class_names=["x", "y"])
    assert is_wds_spec("https://host/shards-{000..009}.tar") and not is_wds_spec("../shared/datasets/cifar10.tar")


# ImageFolder directories -------------------------------------------------------------------------------------
def make_folder(root: Path, split: str, counts: dict[str, int]) -> None:
    for k, (cls, n) in enumerate(counts.items()):
        (root / split / cls).mkdir(parents=True)
        for i in range(n):
            (root / split / cls / f"{i:03d}.png").write_bytes(png_bytes((10 * k, 20 * i, 0), size=6))


def test_imagefolder_source(tmp_path):
    make_folder(tmp_path, "train", {"cat": 3, "dog": 2})
    make_folder(tmp_path, "val", {"cat": 1, "dog": 1})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    train = load_source(str(tmp_path), "train")
    assert isinstance(train, ImageFolderSource) and train.classes == ["cat", "dog"] and train.targets == [0, 0, 0, 1, 1]
    img, label = train[4]
    assert img.shape == (3, 6, 6) and label == 1 and img[0, 0, 0].item() == 10
    test = load_source(str(tmp_path), "test")  # 'test' falls back to val/
    assert len(test) == 2
    assert load_source(str(tmp_path / "train"), "test").classes == ["cat", "dog"]  # no split folders: the root itself
    with pytest.raises(DDCodecError, match="no 'extra' split"):
        load_source(str(tmp_path), "extra")


def test_imagefolder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DDCodecError, match="no class folders"):
        ImageFolderSource(tmp_path / "empty")
    (tmp_path / "bad" / "a").mkdir(parents=True)
    (tmp_path / "bad" / "a" / "x.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(DDCodecError, match="cannot read image"):
        ImageFolderSource(tmp_path / "bad")[0]
    with pytest.raises(DDCodecError, match="does not exist"):
        load_source(str(tmp_path / "missing.tar"))


def test_dataset_tar_source(tmp_path):
    make_folder(tmp_path / "src", "train", {"a": 2, "b": 2})
    with tarfile.open(tmp_path / "d.tar", "w") as tar:
        tar.add(tmp_path / "src" / "train", arcname="train")
    ds = load_source(str(tmp_path / "d.tar"), "train")
    assert isinstance(ds, ImageFolderSource) and len(ds) == 4 and ds.classes == ["a", "b"]
    assert np.asarray(ds[3][0]).shape == (3, 6, 6)
