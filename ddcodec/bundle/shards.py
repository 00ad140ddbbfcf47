"""Webdataset shards of a bundle: one sample per item, the manifest in every shard."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path
from typing import Iterable, Iterator

import braceexpand
import safetensors.torch
import torch
import webdataset as wds

from ..errors import BundleError
from .atomic import atomic_write_bytes
from .bundle import Bundle, content_sha256
from .manifest import MAX_MANIFEST_BYTES, parse_manifest

MANIFEST_KEY = "bundle"
MAX_MEMBER_BYTES = 256 << 20


def item_payload_names(manifest: dict) -> list[str]:
    """Payloads with one row per item; they are split across samples."""
    n = manifest["items"]["count"]
    return [name for name, info in manifest["payloads"].items()
            if name != "reference" and all(s["shape"] and s["shape"][0] == n for s in info["tensors"].values())]


def write_shards(bundle: Bundle, out: str | os.PathLike, items_per_shard: int = 1000) -> list[Path]:
    """Write the bundle as shard-000000.tar, ...; each holds the manifest plus its items' rows."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if items_per_shard < 1:
        raise BundleError("--items-per-shard must be at least 1")
    split = item_payload_names(bundle.manifest)
    whole = {name: t for name, t in bundle.payloads.items() if name not in split}
    manifest_bytes = json.dumps(bundle.manifest, indent=2).encode()
    paths = []
    for s, start in enumerate(range(0, bundle.num_items, items_per_shard)):
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0.0) as sink:
            head = {"__key__": MANIFEST_KEY, "manifest.json": manifest_bytes}
            for name, tensors in whole.items():
                head[f"{name}.safetensors"] = safetensors.torch.save(tensors)
            sink.write(head)
            for i in range(start, min(start + items_per_shard, bundle.num_items)):
                rows = {f"{name}/{k}": t[i:i + 1].contiguous() for name in split for k, t in bundle.payloads[name].items()}
                sink.write({"__key__": f"item-{i:09d}", "item.safetensors": safetensors.torch.save(rows)})
        path = out / f"shard-{s:06d}.tar"
        atomic_write_bytes(path, buf.getvalue())
        paths.append(path)
    return paths


def expand_urls(urls: Iterable[str]) -> list[str]:
    """Brace-expand shard URL patterns ('shard-{000000..000009}.tar')."""
    out = []
    for u in urls:
        out.extend(braceexpand.braceexpand(str(u)))
    return out


def iter_members(url: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar at `url`; refuses links, devices and unsafe names."""
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:
        raise BundleError(f"cannot open shard {url} ({type(e).__name__}: {str(e)[:100]})", "check the shard URL") from None
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                name = member.name
                if not member.isreg():
                    raise BundleError(f"shard {url} holds a non-regular member {name!r} (link or device)", "do not use this shard")
                if name.startswith("/") or ".." in Path(name).parts:
                    raise BundleError(f"shard {url} holds an unsafe member name {name!r}", "do not use this shard")
                if member.size > MAX_MEMBER_BYTES:
                    raise BundleError(f"shard {url} member {name!r} is {member.size} bytes, over the limit", "do not use this shard")
                f = tar.extractfile(member)
                data = f.read() if f else b""
                if len(data) != member.size:
                    raise BundleError(f"shard {url} is truncated inside {name!r}", "download the shard again")
                yield name, data
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise BundleError(f"shard {url} is not a readable tar ({type(e).__name__}: {str(e)[:80]})", "download the shard again") from None
    finally:
        try:
            stream.close()
        except Exception:
            pass


def _load_st(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load(data)
    except Exception as e:
        raise BundleError(f"{where} is not valid safetensors ({str(e).splitlines()[0][:80] if str(e) else type(e).__name__})",
                          "download the shard again") from None


def read_shards(urls: list[str]) -> Bundle:
    """Reassemble a bundle from its shards and verify every payload's content hash against the manifest."""
    urls = expand_urls(urls)
    if not urls:
        raise BundleError("no shard URLs given", "pass shard paths or URLs, e.g. 'dir/shard-{000000..000003}.tar'")
    manifest = None
    manifest_bytes = None
    whole: dict[str, dict[str, torch.Tensor]] = {}
    rows: dict[int, dict[str, torch.Tensor]] = {}
    for url in urls:
        for name, data in iter_members(url):
            key, _, ext = name.partition(".")
            where = f"shard {url} member {name}"
            if key == MANIFEST_KEY and ext == "manifest.json":
                if len(data) > MAX_MANIFEST_BYTES:
                    raise BundleError(f"{where} is too large", "do not use this shard")
                if manifest_bytes is None:
                    manifest_bytes, manifest = data, parse_manifest(data, where)
                elif data != manifest_bytes:
                    raise BundleError(f"{where} differs from the first shard's manifest (shards of different bundles?)",
                                      "pass the shards of one bundle")
            elif key == MANIFEST_KEY and ext.endswith(".safetensors"):
                whole[ext[: -len(".safetensors")]] = _load_st(data, where)
            elif key.startswith("item-") and ext == "item.safetensors":
                try:
                    i = int(key[5:])
                except ValueError:
                    raise BundleError(f"{where} has a malformed item key", "do not use this shard") from None
                if i in rows:
                    raise BundleError(f"item {i} appears twice (in {url})", "pass each shard once")
                rows[i] = _load_st(data, where)
    if manifest is None:
        raise BundleError(f"no manifest found in {len(urls)} shard(s) starting {urls[0]}", "pass the shards written by 'ddcodec shard'")
    n = manifest["items"]["count"]
    missing = [i for i in range(n) if i not in rows]
    if missing or len(rows) != n:
        raise BundleError(f"the shards hold {len(rows)} of {n} items (first missing: {missing[:3]})",
                          "pass all shards of the bundle")
    payloads = dict(whole)
    for name in item_payload_names(manifest):
        keys = manifest["payloads"][name]["tensors"]
        try:
            payloads[name] = {k: torch.cat([rows[i][f"{name}/{k}"] for i in range(n)]) for k in keys}
        except (KeyError, RuntimeError):
            raise BundleError(f"item rows for payload '{name}' are missing or mis-shaped in the shards", "re-shard the bundle") from None
    for name, info in manifest["payloads"].items():
        if name not in payloads:
            raise BundleError(f"payload '{name}' is missing from the shards", "re-shard the bundle")
        if content_sha256(payloads[name]) != info.get("content_sha256"):
            raise BundleError(f"payload '{name}' reassembled from shards fails its content hash (corrupted shard)",
                              "download the shards again")
    return Bundle(manifest, payloads, source=urls[0] if len(urls) == 1 else f"{urls[0]} (+{len(urls) - 1} shards)")
