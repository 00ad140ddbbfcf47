"""Labelled image sources: dataset tars, ImageFolder dirs, webdataset shards, torchvision datasets, the shipped sample."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Callable

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

WDS_SCHEMES = ("http://", "https://", "pipe:", "s3://", "gs://", "file:")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
WDS_LABEL_EXTS = ("cls", "cls.txt", "cls2")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's rule: key up to the first dot of the file name


def is_wds_spec(spec: str) -> bool:
    """True for 'wds:...', shard URLs and brace patterns ('shards/train-{0000..0009}.tar')."""
    if spec.startswith("wds:") or spec.startswith(WDS_SCHEMES) or "{split}" in spec:
        return True
    return bool(re.search(r"\{[^}]*(\.\.|,)[^}]*\}", spec))


def wds_urls(spec: str, split: str) -> list[str]:
    """Shard URLs of a webdataset spec: '{split}' filled in, braces expanded, a directory's *.tar listed."""
    import braceexpand
    spec = spec[4:] if spec.startswith("wds:") else spec
    spec = spec.replace("{split}", split)
    path = Path(spec).expanduser()
    if not spec.startswith(WDS_SCHEMES) and path.is_dir():
        base = path / split if (path / split).is_dir() else path
        urls = [str(p) for p in sorted(base.glob("*.tar"))]
        if not urls:
            raise DDCodecError(f"{base} holds no .tar shards", "pass shard files, a brace pattern or a directory of shards")
        return urls
    return list(braceexpand.braceexpand(spec))


def _local(url: str) -> Path | None:
    if url.startswith("file:"):
        url = url[5:]
    if url.startswith(WDS_SCHEMES) or url == "-":
        return None
    return Path(url).expanduser()


def _is_wds_tar(path: Path, peek: int = 64) -> bool:
    """A local tar whose first members look like webdataset samples (a .cls member, no class folders)."""
    try:
        with tarfile.open(path) as tar:
            for i, m in enumerate(tar):
                if i >= peek:
                    break
                m_ext = _KEY_EXT.match(m.name)
                if m.isfile() and m_ext and m_ext.group(2).lower() in WDS_LABEL_EXTS:
                    return True
    except (tarfile.TarError, OSError):
        return False
    return False


def _group_members(tar: tarfile.TarFile, image: Callable[[tarfile.TarInfo], Any], groups: dict[str, dict[str, Any]]) -> None:
    """Add each regular member of a webdataset shard to groups[key]: "cls" its label text, "img" image(member)."""
    for m in tar:
        key_ext = _KEY_EXT.match(m.name) if m.isreg() else None
        if key_ext is None:
            continue
        key, ext = key_ext.group(1), key_ext.group(2).lower()
        if ext in WDS_LABEL_EXTS:
            groups.setdefault(key, {})["cls"] = tar.extractfile(m).read().decode().strip()
        elif ext in WDS_IMAGE_EXTS:
            groups.setdefault(key, {})["img"] = image(m)


class WebDatasetSource(Dataset):
    """Webdataset tar shards of samples with an image member (.jpg/.png/...) and a .cls label, random access.

    Local shards are indexed by member offset and read on demand; remote shards (http, s3, pipe:) are streamed
    once with `webdataset.gopen` and their encoded images kept in memory. Integer labels take their class
    names from `class_names`, else a classes.txt (one per line) or classes.json beside local shards, else
    '0'..'K-1'; text labels are class names themselves (sorted).
    """

    def __init__(self, urls: list[str], class_names: list[str] | None = None) -> None:
        if not urls:
            raise DDCodecError("no webdataset shards given", "pass e.g. wds:shards/train-{000000..000009}.tar")
        self.urls = urls
        self.items: list[tuple[int, int, int] | bytes] = []  # (shard, offset, size) for local shards, else bytes
        raw_labels: list[str] = []
        for s, url in enumerate(urls):
            for image, label in self._index(s, url):
                self.items.append(image)
                raw_labels.append(label)
        if not self.items:
            raise DDCodecError(f"the shards {urls[0]}{' ...' if len(urls) > 1 else ''} hold no samples with an image "
                               "and a .cls label", "write each sample as KEY.jpg (or .png) plus KEY.cls")
        if all(re.fullmatch(r"-?\d+", v) for v in raw_labels):
            self.targets = [int(v) for v in raw_labels]
            self.classes = class_names or self._sidecar_names() or [str(i) for i in range(max(self.targets) + 1)]
        else:
            self.classes = class_names or sorted(set(raw_labels))
            lookup = {c: i for i, c in enumerate(self.classes)}
            missing = sorted(set(raw_labels) - set(lookup))
            if missing:
                raise DDCodecError(f"webdataset labels {missing[:3]} are not among the class names", "check the .cls members")
            self.targets = [lookup[v] for v in raw_labels]
        if min(self.targets) < 0 or max(self.targets) >= len(self.classes):
            raise DDCodecError(f"webdataset labels run from {min(self.targets)} to {max(self.targets)} but there are "
                               f"{len(self.classes)} class names", "check the .cls members and the class names")

    def _index(self, s: int, url: str) -> list[tuple[tuple[int, int, int] | bytes, str]]:
        """(image reference, raw label) of every complete sample in one shard, in shard order."""
        local = _local(url)
        groups: dict[str, dict[str, Any]] = {}
        try:
            if local is not None:
                if not local.is_file():
                    raise DDCodecError(f"webdataset shard {local} does not exist", "check the shard path or pattern")
                with tarfile.open(local) as tar:
                    _group_members(tar, lambda m: (s, m.offset_data, m.size), groups)  # read images later, by offset
            else:
                import webdataset as wds
                stream = wds.gopen(url, "rb")
                try:
                    with tarfile.open(fileobj=stream, mode="r|*") as tar:
                        _group_members(tar, lambda m: tar.extractfile(m).read(), groups)  # a stream cannot seek back
                finally:
                    stream.close()
        except DDCodecError:
            raise
        except (tarfile.TarError, OSError, EOFError, UnicodeDecodeError, ValueError) as e:
            raise DDCodecError(f"cannot read webdataset shard {url} ({type(e).__name__}: {str(e)[:80]})",
                               "check that it is a complete tar") from None
        return [(g["img"], g["cls"]) for g in groups.values() if "img" in g and "cls" in g]

    def _sidecar_names(self) -> list[str] | None:
        local = _local(self.urls[0])
        if local is None:
            return None
        txt, js = local.parent / "classes.txt", local.parent / "classes.json"
        if txt.is_file():
            return [line.strip() for line in txt.read_text().splitlines() if line.strip()]
        if js.is_file():
            names = json.loads(js.read_text())
            return [str(n) for n in (names if isinstance(names, list) else names.get("classes", []))] or None
        return None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        ref = self.items[i]
        if isinstance(ref, bytes):
            data = ref
        else:
            s, offset, size = ref
            with open(_local(self.urls[s]), "rb") as f:
                f.seek(offset)
                data = f.read(size)
        try:
            with Image.open(io.BytesIO(data)) as img:
                return to_tensor(img), self.targets[i]
        except (OSError, ValueError) as e:
            raise DDCodecError(f"cannot decode sample {i} of the webdataset shards ({e})", "check the shard") from None


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
    """A labelled image source from a dataset tar, a directory, webdataset shards, 'sample:NAME', or a torchvision name."""
    if is_wds_spec(spec):
        return WebDatasetSource(wds_urls(spec, split), class_names)
    if spec.startswith("sample:"):
        name = spec.split(":", 1)[1]
        path = SAMPLES / f"{name}.tar"
        if not path.exists():
            known = sorted(p.stem for p in SAMPLES.glob("*.tar")) if SAMPLES.exists() else []
            raise DDCodecError(f"no shipped sample {name!r}", "known samples: " + (", ".join(known) or "none"))
        return ImageFolderSource(split_dir(extract_tar(path), split), class_names)
    path = Path(spec).expanduser()
    if path.is_file() and tarfile.is_tarfile(path):
        if _is_wds_tar(path):
            return WebDatasetSource([str(path)], class_names)
        return ImageFolderSource(split_dir(extract_tar(path), split), class_names)
    if path.is_dir():
        return ImageFolderSource(split_dir(path, split), class_names)
    if path.suffix or os.sep in spec:
        raise DDCodecError(f"data source {spec} does not exist or is not a tar, directory or webdataset shard",
                           "check the --data path")
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
