"""Reading and writing bundles: a directory of manifest.json plus zstd-compressed safetensors payloads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import BundleError
from .atomic import atomic_write_json, replace_dir
from .manifest import FORMAT, MAX_MANIFEST_BYTES, SEED_DERIVATION, VERSION, parse_manifest, sign_manifest, validate
from .payload import decode_payload, write_payload

MANIFEST = "manifest.json"


def content_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over each tensor's (name, dtype, shape, bytes) in key order; independent of serialisation."""
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Bundle:
    """A loaded, verified bundle: its manifest and payload tensors."""

    def __init__(self, manifest: dict[str, Any], payloads: dict[str, dict[str, torch.Tensor]],
                 root: Path | None = None, source: str | None = None) -> None:
        self.manifest = manifest
        self.payloads = {n: {k: t.contiguous() for k, t in ts.items()} for n, ts in payloads.items()}
        self.root = root
        self.source = source or (str(root) if root else "<memory>")

    # reading ------------------------------------------------------------------------------
    @classmethod
    def open(cls, source: str | os.PathLike | Iterable[str]) -> "Bundle":
        """Open a bundle directory, its manifest.json, or webdataset shard URL(s)."""
        if not isinstance(source, (str, os.PathLike)):
            from .shards import read_shards
            return read_shards(list(source))
        text = os.fspath(source)
        path = Path(text)
        if path.is_dir():
            return cls._open_dir(path)
        if path.name == MANIFEST and path.is_file():
            return cls._open_dir(path.parent)
        if text.endswith(".tar") or "://" in text or text.startswith("pipe:") or "{" in text:
            from .shards import read_shards
            return read_shards([text])
        raise BundleError(f"no bundle at {text}", "pass a bundle directory, its manifest.json, or shard URLs")

    @classmethod
    def _open_dir(cls, root: Path) -> "Bundle":
        mpath = root / MANIFEST
        if not mpath.is_file():
            raise BundleError(f"{root} has no {MANIFEST}", "this is not a bundle directory, or its encode did not finish")
        manifest = parse_manifest(read_at_most(mpath, MAX_MANIFEST_BYTES), str(mpath))
        payloads = {}
        for name, info in manifest["payloads"].items():
            file = root / info["file"]
            if not file.is_file():
                raise BundleError(f"payload file {file} is missing", "download the bundle again")
            size = file.stat().st_size
            if size != info["bytes"]:
                raise BundleError(f"{file} is {size} bytes but the manifest says {info['bytes']} (truncated or replaced)",
                                  "download the bundle again")
            payloads[name] = decode_payload(read_at_most(file, info["bytes"]), info, str(file))
            if "content_sha256" in info and content_sha256(payloads[name]) != info["content_sha256"]:
                raise BundleError(f"{file} fails its content hash (its tensors differ from the ones the manifest records)",
                                  "download the bundle again")
        check_items(manifest, payloads, str(root))
        return cls(manifest, payloads, root=root)

    # views --------------------------------------------------------------------------------
    @property
    def items(self) -> dict[str, torch.Tensor]:
        return self.payloads[self.manifest["items"]["payload"]]

    @property
    def num_items(self) -> int:
        return int(self.manifest["items"]["count"])

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["classes"]["names"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"]["names"])

    @property
    def variants(self) -> int:
        return int(self.manifest["variants"])

    @property
    def seed(self) -> int:
        return int(self.manifest["seed"])

    @property
    def labels(self) -> dict[str, torch.Tensor] | None:
        lab = self.manifest["labels"]
        return self.payloads[lab["payload"]] if lab["kind"] == "soft" else None

    def bytes_by_part(self) -> dict[str, int]:
        """Compressed bytes of each payload and of the manifest."""
        parts = {name: int(info["bytes"]) for name, info in self.manifest["payloads"].items()}
        parts["manifest"] = len(json.dumps(self.manifest, indent=2)) + 1
        return parts

    def digest(self) -> str:
        """A short id of this bundle's content (manifest and payloads)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()[:16]


def read_at_most(path: Path, limit: int) -> bytes:
    """The bytes of a regular file, reading no more than `limit` + 1; FIFOs and devices are refused, never waited on."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as e:
        raise BundleError(f"cannot read {path} ({e.strerror or type(e).__name__})", "download the bundle again") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BundleError(f"{path} is not a regular file", "download the bundle again")
        if st.st_size > limit:
            raise BundleError(f"{path} is {st.st_size} bytes, over the {limit} byte limit", "this is not a ddcodec bundle")
        try:
            return f.read(limit + 1)
        except OSError as e:
            raise BundleError(f"cannot read {path} ({e.strerror or type(e).__name__})", "download the bundle again") from None


def check_items(manifest: dict[str, Any], payloads: dict[str, dict[str, torch.Tensor]], where: str) -> None:
    """Refuse item tensors whose values the loader would index with: class ids outside the class list."""
    ids = payloads[manifest["items"]["payload"]]["class_ids"]
    if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < len(manifest["classes"]["names"]):
        raise BundleError(f"{where}: class ids must lie in 0..{len(manifest['classes']['names']) - 1}, "
                          f"found {int(ids.min())}..{int(ids.max())}", "re-encode or download the bundle again")


def new_manifest(*, method: str, params: dict[str, Any], seed: int, class_names: list[str], prompts: list[str],
                 image_size: tuple[int, int], variants: int, generator: dict[str, Any],
                 labels: dict[str, Any] | None = None) -> dict[str, Any]:
    """A manifest skeleton; write_bundle fills in payloads, items and fingerprints."""
    from .. import __version__
    return {
        "format": FORMAT, "version": VERSION, "created_by": f"ddcodec {__version__}",
        "method": {"name": method, "params": params},
        "seed": int(seed), "seed_derivation": SEED_DERIVATION,
        "classes": {"names": list(class_names), "prompts": list(prompts)},
        "image": {"size": [int(image_size[0]), int(image_size[1])], "channels": 3},
        "variants": int(variants),
        "generator": generator,
        "labels": labels or {"kind": "hard"},
        "items": {"count": 0, "payload": "items"},
        "payloads": {},
    }


def write_bundle(out: str | os.PathLike, manifest: dict[str, Any], payloads: dict[str, dict[str, torch.Tensor]],
                 fingerprints: int = 4, overwrite: bool = False, prior: Any = None) -> Bundle:
    """Write a complete bundle atomically: payloads and manifest into a staging directory, then rename.

    The manifest is written last, so a directory with a manifest is a finished bundle. It carries
    manifest_sha256, a checksum of its own content, so a damaged manifest is refused, not misread.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists", "choose another --out or pass --overwrite")
    manifest = json.loads(json.dumps(manifest))
    manifest["items"]["count"] = int(payloads[manifest["items"]["payload"]]["class_ids"].shape[0])
    staging = out.with_name(out.name + ".writing")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    for name, tensors in payloads.items():
        info = write_payload(staging, name, tensors)
        info["content_sha256"] = content_sha256(tensors)
        manifest["payloads"][name] = info
    if fingerprints:
        from .fingerprint import make_fingerprints
        ref = make_fingerprints(Bundle(manifest, payloads), count=fingerprints, prior=prior)
        tensors = ref.pop("tensors")
        info = write_payload(staging, "reference", tensors)
        info["content_sha256"] = content_sha256(tensors)
        manifest["payloads"]["reference"] = info
        manifest["fingerprints"] = {**ref, "payload": "reference"}
    validate(manifest, "new manifest")
    manifest = sign_manifest(manifest)  # readers refuse a manifest that does not match its manifest_sha256
    atomic_write_json(staging / MANIFEST, manifest)
    replace_dir(staging, out)
    return Bundle.open(out)
