"""Labelled image sources: dataset tars, ImageFolder directories, torchvision datasets, the shipped sample."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..errors import DDCodecError

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"
EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
SPLIT_ALIASES = {"train": ("train",), "test": ("test", "val"), "val": ("val", "test")}


def cache_root() -> Path:
    """Where extracted datasets live: $DDCODEC_CACHE or ~/.cache/ddcodec."""
    return Path(os.environ.get("DDCODEC_CACHE", Path.home() / ".cache" / "ddcodec"))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """A PIL image as a (3, H, W) uint8 tensor."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class ImageFolderSource(Dataset):
    """`root/<class>/<image>` files as (uint8 image, label); classes are the sorted folder names."""

    def __init__(self, root: str | os.PathLike, class_names: list[str] | None = None) -> None:
        self.root = Path(root)
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not folders:
            raise DDCodecError(f"{self.root} has no class folders", "expected an ImageFolder layout root/<class>/<image>")
        self.folders = folders
        self.classes = class_names or folders
        self.samples: list[tuple[Path, int]] = []
        for label, name in enumerate(folders):
            files = sorted(f for f in (self.root / name).iterdir() if f.suffix.lower() in EXTENSIONS)
            self.samples.extend((f, label) for f in files)
        self.targets = [label for _, label in self.samples]
        if not self.samples:
            raise DDCodecError(f"{self.root} holds no images", f"expected files ending in {', '.join(EXTENSIONS)}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                return to_tensor(img), label
        except (OSError, ValueError) as e:
            raise DDCodecError(f"cannot read image {path} ({e})", "remove or replace the file") from None


class TorchvisionSource(Dataset):
    """A torchvision dataset by name, read from the local cache (no downloads)."""

    def __init__(self, name: str, split: str, root: str | os.PathLike | None = None) -> None:
        import torchvision.datasets as tvd
        cls = {k.lower(): getattr(tvd, k) for k in dir(tvd) if isinstance(getattr(tvd, k), type)}.get(name.lower())
        if cls is None:
            raise DDCodecError(f"unknown data source {name!r}", "pass a dataset .tar, an ImageFolder directory, or a torchvision dataset name")
        root = Path(root or cache_root() / "torchvision")
        try:
            try:
                self.ds = cls(root=str(root), train=(split == "train"), download=False)
            except TypeError:
                self.ds = cls(root=str(root), split=split, download=False)
        except Exception as e:
            raise DDCodecError(f"torchvision dataset {cls.__name__} is not in {root} ({str(e).splitlines()[0][:80]})",
                               "download it there first, or pass a local .tar or ImageFolder directory") from None
        self.classes = list(getattr(self.ds, "classes", []))
        self.targets = list(getattr(self.ds, "targets", []))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.ds[i]
        return (to_tensor(img) if isinstance(img, Image.Image) else img), int(label)


def extract_tar(path: Path) -> Path:
    """Extract a dataset tar once into the cache (atomically) and return the directory."""
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:16]
    dest = cache_root() / "datasets" / f"{path.stem}-{key}"
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        from tqdm import tqdm
        with tarfile.open(path) as tar:
            members = tar.getmembers()
            for m in tqdm(members, desc=f"extracting {path.name}", unit="file", leave=False,
                          disable=len(members) < 2000):
                tar.extract(m, tmp, filter="data")
        os.replace(tmp, dest)
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if dest.is_dir():  # another process won the race
            return dest
        raise DDCodecError(f"cannot extract {path} ({e})", "check that the file is a complete tar archive") from None
    return dest


def split_dir(root: Path, split: str) -> Path:
    """root/<split>, accepting val for test and the other way round; root itself when it has no splits."""
    for name in SPLIT_ALIASES.get(split, (split,)):
        if (root / name).is_dir():
            return root / name
    if any((root / s).is_dir() for s in ("train", "test", "val")):
        raise DDCodecError(f"{root} has no '{split}' split", "use --split train or test")
    return root


def load_source(spec: str, split: str = "train", class_names: list[str] | None = None) -> Dataset:
    """A labelled image source from a dataset tar, a directory, 'sample:NAME', or a torchvision name."""
    if spec.startswith("sample:"):
        name = spec.split(":", 1)[1]
        path = SAMPLES / f"{name}.tar"
        if not path.exists():
            known = sorted(p.stem for p in SAMPLES.glob("*.tar")) if SAMPLES.exists() else []
            raise DDCodecError(f"no shipped sample {name!r}", "known samples: " + (", ".join(known) or "none"))
        return ImageFolderSource(split_dir(extract_tar(path), split), class_names)
    path = Path(spec).expanduser()
    if path.is_file() and tarfile.is_tarfile(path):
        return ImageFolderSource(split_dir(extract_tar(path), split), class_names)
    if path.is_dir():
        return ImageFolderSource(split_dir(path, split), class_names)
    if path.suffix or os.sep in spec:
        raise DDCodecError(f"data source {spec} does not exist or is not a tar/directory", "check the --data path")
    return TorchvisionSource(spec, split)


IMAGENETTE_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player", "n03000684": "chain saw",
    "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck", "n03425413": "gas pump",
    "n03445777": "golf ball", "n03888257": "parachute",
}


def readable_names(classes: list[str]) -> list[str]:
    """Human class names (WordNet ids mapped for Imagenette; underscores to spaces)."""
    return [IMAGENETTE_NAMES.get(c, c.replace("_", " ")) for c in classes]


def describe(ds: Any) -> str:
    return f"{len(ds)} images, {len(ds.classes)} classes"
