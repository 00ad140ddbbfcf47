"""Webdataset shards of a bundle: one sample per item, the manifest and a shard index in every shard."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import re
import tarfile
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import hashlib

import braceexpand
import safetensors.torch
import torch
import webdataset as wds

from ..errors import BundleError
from .atomic import atomic_write_bytes
from .bundle import Bundle, check_items, content_sha256
from .manifest import MAX_MANIFEST_BYTES, parse_manifest, short
from .payload import DTYPES, check_tensors

MANIFEST_KEY = "bundle"
MAX_MEMBER_BYTES = 256 << 20
MEMBER_SLACK = 4096        # tar header, a possible pax header and padding, per member
HEAD_SLACK = 64 << 10      # end-of-archive blocks and tarfile's read-ahead, per shard
_ITEM = re.compile(r"item-[0-9]{9,18}")
CURL_EXITS = {6: " (unknown host)", 7: " (connection refused)", 22: " (HTTP error, e.g. 404 not found)", 28: " (timed out)"}
INDEX_BYTES = 256, 80      # bound on bundle.shard.json: fixed part, plus per item of the shard


def shard_index(shard: int, shards: int, first: int, digests: list[str]) -> bytes:
    """The `bundle.shard.json` member: where this shard sits and the sha256 of each item member it holds."""
    return json.dumps({"shard": shard, "shards": shards, "first": first, "count": len(digests),
                       "sha256": digests}).encode()


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
    for stale in out.glob(".shard-*.tar.*.tmp"):  # temporary files of a run that was killed mid-write
        stale.unlink(missing_ok=True)
    split = item_payload_names(bundle.manifest)
    whole = {name: t for name, t in bundle.payloads.items() if name not in split}
    manifest_bytes = json.dumps(bundle.manifest, indent=2).encode()
    paths = []
    starts = range(0, bundle.num_items, items_per_shard)
    for s, start in enumerate(starts):
        ids = range(start, min(start + items_per_shard, bundle.num_items))
        members = [safetensors.torch.save({f"{name}/{k}": t[i:i + 1].contiguous()
                                           for name in split for k, t in bundle.payloads[name].items()}) for i in ids]
        buf = io.BytesIO()
        with wds.TarWriter(buf, encoder=False, mtime=0.0) as sink:
            head = {"__key__": MANIFEST_KEY, "manifest.json": manifest_bytes,
                    "shard.json": shard_index(s, len(starts), start, [hashlib.sha256(m).hexdigest() for m in members])}
            for name, tensors in whole.items():
                head[f"{name}.safetensors"] = safetensors.torch.save(tensors)
            sink.write(head)
            for i, member in zip(ids, members):
                sink.write({"__key__": f"item-{i:09d}", "item.safetensors": member})
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


class _Budget:
    """Bytes all shards together may still deliver: a fixed allowance until the manifest, then what it declares."""

    def __init__(self) -> None:
        self.used = 0
        self.limit = MAX_MANIFEST_BYTES + HEAD_SLACK

    def allow(self, more: int) -> None:
        self.limit = self.used + more


class _Counted(io.RawIOBase):
    """A read-only stream that charges every byte (after decompression) to a _Budget."""

    def __init__(self, read: Callable[[int], bytes], budget: _Budget, url: str) -> None:
        self._read, self.budget, self.url = read, budget, url

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self._read(n if n is not None and n >= 0 else 1 << 20)
        self.budget.used += len(data)
        if self.budget.used > self.budget.limit:
            raise BundleError(f"shard {self.url} holds more data than its manifest declares ({self.budget.limit} bytes)",
                              "do not use this shard")
        return data


def _decompressed(stream: Any) -> Callable[[int], bytes]:
    """A read function over `stream`, transparently decompressing gzip, bzip2 or xz."""
    head = stream.read(6)
    rest = _Prefixed(head, stream)
    if head[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=rest, mode="rb").read
    if head[:3] == b"BZh":
        return bz2.BZ2File(rest, mode="rb").read
    if head[:6] == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(rest, mode="rb").read
    return rest.read


class _Prefixed:
    """`head` followed by the rest of `stream`."""

    def __init__(self, head: bytes, stream: Any) -> None:
        self.head, self.stream = head, stream

    def read(self, n: int = -1) -> bytes:
        if self.head:
            if n is None or n < 0:
                data, self.head = self.head + self.stream.read(), b""
                return data
            data, self.head = self.head[:n], self.head[n:]
            return data
        return self.stream.read(n)


def iter_members(url: str, budget: _Budget | None = None,
                 max_size: Callable[[str, int], int] | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file in a tar at `url`; refuses links, devices, unsafe names and oversize members.

    Every byte read (after decompression) is charged to `budget`; `max_size(name, index)` gives the largest
    size allowed for a member (or raises), checked before its data is read.
    """
    budget = budget or _Budget()
    try:
        stream = wds.gopen(url, "rb")
    except Exception as e:
        raise BundleError(f"cannot open shard {url} ({type(e).__name__}: {str(e)[:100]})", "check the shard URL") from None
    try:
        counted = _Counted(_decompressed(stream), budget, url)
        with tarfile.open(fileobj=counted, mode="r|") as tar:
            index = 0
            for member in tar:
                if member.isdir():
                    continue
                name = member.name
                if not member.isreg():
                    raise BundleError(f"shard {url} holds a non-regular member {short(name)} (link or device)", "do not use this shard")
                if name.startswith("/") or ".." in Path(name).parts:
                    raise BundleError(f"shard {url} holds an unsafe member name {short(name)}", "do not use this shard")
                limit = max_size(name, index) if max_size else MAX_MEMBER_BYTES
                if member.size > min(limit, MAX_MEMBER_BYTES):
                    raise BundleError(f"shard {url} member {short(name)} is {member.size} bytes, over its limit of "
                                      f"{min(limit, MAX_MEMBER_BYTES)}", "do not use this shard")
                f = tar.extractfile(member)
                data = f.read() if f else b""
                if len(data) != member.size:
                    raise BundleError(f"shard {url} is truncated inside {short(name)}", "download the shard again")
                index += 1
                yield name, data
    except BundleError:
        raise
    except (tarfile.TarError, OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        status = re.search(r"\): exit (-?\d+) ", str(e)) if isinstance(e, OSError) else None
        if status is None:  # a failed download often reads as an empty tar first; the exit status comes on close
            try:
                stream.close()
            except OSError as closing:
                status = re.search(r"\): exit (-?\d+) ", str(closing))
        if status:  # webdataset's Pipe: the download (curl) or pipe: command failed
            code = int(status.group(1))
            why = CURL_EXITS.get(code, "") if url.split(":", 1)[0] in ("http", "https") else ""
            raise BundleError(f"shard {url} could not be read: the command exited with status {code}{why}",
                              "check that the shard exists and the URL or command is right") from None
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


def _nbytes(spec: dict) -> int:
    n = DTYPES[spec["dtype"]].itemsize
    for d in spec["shape"]:
        n *= d
    return n


def _st_overhead(keys: list[str]) -> int:
    """A generous bound on a safetensors header for these tensor names."""
    return 64 + sum(len(k) + 160 for k in keys)


class _Layout:
    """What the shards of one manifest may hold, member by member: the reader's size limits."""

    def __init__(self, manifest: dict, manifest_bytes: bytes, shards: int) -> None:
        self.manifest, self.manifest_bytes = manifest, manifest_bytes
        self.n = manifest["items"]["count"]
        self.split = item_payload_names(manifest)
        self.whole = {name: info["raw_bytes"] for name, info in manifest["payloads"].items() if name not in self.split}
        keys = [f"{name}/{k}" for name in self.split for k in manifest["payloads"][name]["tensors"]]
        self.row_bytes = sum(_nbytes(spec) // max(1, spec["shape"][0]) for name in self.split
                             for spec in manifest["payloads"][name]["tensors"].values()) + _st_overhead(keys)
        per_shard = (len(manifest_bytes) + INDEX_BYTES[0] + sum(self.whole.values()) + (len(self.whole) + 2) * MEMBER_SLACK
                     + HEAD_SLACK)
        self.total = shards * per_shard + self.n * (self.row_bytes + INDEX_BYTES[1] + MEMBER_SLACK)

    def max_size(self, name: str) -> int:
        key, _, ext = name.partition(".")
        if key == MANIFEST_KEY and ext == "manifest.json":
            return len(self.manifest_bytes)
        if key == MANIFEST_KEY and ext == "shard.json":
            return INDEX_BYTES[0] + INDEX_BYTES[1] * self.n
        if key == MANIFEST_KEY and ext.endswith(".safetensors") and ext[: -len(".safetensors")] in self.whole:
            return self.whole[ext[: -len(".safetensors")]] + MEMBER_SLACK
        if _ITEM.fullmatch(key) and ext == "item.safetensors":
            return self.row_bytes
        raise BundleError(f"unexpected member {short(name)} (not part of this bundle's shard layout)", "do not use this shard")


def _member_limit(url: str, layout: _Layout | None, name: str, index: int) -> int:
    """Largest size allowed for member `index` of shard `url`: first the manifest, then what `layout` declares."""
    if index == 0:
        if name != f"{MANIFEST_KEY}.manifest.json":
            raise BundleError(f"shard {url} does not start with the bundle manifest (first member {short(name)})",
                              "pass the shards written by 'ddcodec shard'")
        return MAX_MANIFEST_BYTES if layout is None else len(layout.manifest_bytes)
    assert layout is not None
    try:
        return layout.max_size(name)
    except BundleError as e:
        raise BundleError(f"shard {url}: {e}") from None


def read_shards(urls: list[str]) -> Bundle:
    """Reassemble a bundle from its shards and verify every payload's content hash against the manifest.

    Each shard must start with the bundle manifest; after it, a shard may deliver only what the manifest
    declares (its payload sizes plus per-member slack), so a hostile shard cannot make the reader allocate more.
    """
    urls = expand_urls(urls)
    if not urls:
        raise BundleError("no shard URLs given", "pass shard paths or URLs, e.g. 'dir/shard-{000000..000003}.tar'")
    budget = _Budget()
    layout: _Layout | None = None
    whole: dict[str, dict[str, torch.Tensor]] = {}
    rows: dict[int, dict[str, torch.Tensor]] = {}
    for url in urls:
        # `layout` is read at each call: None until the first shard's manifest is parsed
        for name, data in iter_members(url, budget, lambda name, index, url=url: _member_limit(url, layout, name, index)):
            key, _, ext = name.partition(".")
            where = f"shard {url} member {name}"
            if key == MANIFEST_KEY and ext == "manifest.json":
                if layout is None:
                    layout = _Layout(parse_manifest(data, where), data, len(urls))
                    budget.allow(layout.total)
                elif data != layout.manifest_bytes:
                    raise BundleError(f"{where} differs from the first shard's manifest (shards of different bundles?)",
                                      "pass the shards of one bundle")
            elif key == MANIFEST_KEY and ext == "shard.json":
                pass  # the streaming reader's index; the content hashes below check the items here
            elif key == MANIFEST_KEY:
                whole[ext[: -len(".safetensors")]] = _load_st(data, where)
            else:
                i = int(key[5:])
                if not 0 <= i < layout.n:
                    raise BundleError(f"{where}: item {i} is outside 0..{layout.n - 1}", "do not use this shard")
                if i in rows:
                    raise BundleError(f"item {i} appears twice (in {url})", "pass each shard once")
                rows[i] = _load_st(data, where)
    if layout is None:
        raise BundleError(f"no manifest found in {len(urls)} shard(s) starting {urls[0]}", "pass the shards written by 'ddcodec shard'")
    manifest, n = layout.manifest, layout.n
    missing = [i for i in range(n) if i not in rows]
    if missing:
        raise BundleError(f"the shards hold {len(rows)} of {n} items (first missing: {missing[:3]})",
                          "pass all shards of the bundle")
    payloads = dict(whole)
    for name in layout.split:
        keys = manifest["payloads"][name]["tensors"]
        try:
            payloads[name] = {k: torch.cat([rows[i][f"{name}/{k}"] for i in range(n)]) for k in keys}
        except (KeyError, RuntimeError, TypeError):
            raise BundleError(f"item rows for payload '{name}' are missing or mis-shaped in the shards", "re-shard the bundle") from None
    for name, info in manifest["payloads"].items():
        if name not in payloads:
            raise BundleError(f"payload '{name}' is missing from the shards", "re-shard the bundle")
        check_tensors(payloads[name], info, f"payload '{name}' reassembled from shards")
        if content_sha256(payloads[name]) != info.get("content_sha256"):
            raise BundleError(f"payload '{name}' reassembled from shards fails its content hash (corrupted shard)",
                              "download the shards again")
    check_items(manifest, payloads, f"shards starting {urls[0]}")
    return Bundle(manifest, payloads, source=urls[0] if len(urls) == 1 else f"{urls[0]} (+{len(urls) - 1} shards)")


_HEX64 = re.compile(r"[0-9a-f]{64}")


class ShardReader:
    """One shard read as a stream: its head (manifest and index) on opening, then `items()` one by one.

    With `manifest_bytes` and `position` it checks that the shard belongs to that bundle and sits at that
    place in the shard list; each item member is checked against the digest the shard's index lists.
    """

    def __init__(self, url: str, manifest_bytes: bytes | None = None, position: int | None = None) -> None:
        self.url = url
        self.layout: _Layout | None = None
        self.index: dict[str, Any] | None = None
        self._budget = _Budget()
        self._members = iter_members(url, self._budget, lambda name, index: _member_limit(url, self.layout, name, index))
        self._pending: tuple[str, bytes] | None = None
        for name, data in self._members:
            key, _, ext = name.partition(".")
            if self.layout is None:
                if manifest_bytes is not None and data != manifest_bytes:
                    self.close()
                    raise BundleError(f"shard {url} holds another bundle's manifest (shards of different bundles?)",
                                      "pass the shards of one bundle")
                self.layout = _Layout(parse_manifest(data, f"shard {url} member {name}"), data, 1)
                self._budget.allow(self.layout.total)
            elif key == MANIFEST_KEY and ext == "shard.json":
                self.index = self._parse_index(data, position)
            elif key != MANIFEST_KEY:
                self._pending = (name, data)
                break
        if self.layout is None or self.index is None:
            self.close()
            raise BundleError(f"shard {url} has no {'manifest' if self.layout is None else 'shard index (bundle.shard.json)'}",
                              "re-shard the bundle with this ddcodec ('ddcodec shard')")

    @property
    def manifest(self) -> dict[str, Any]:
        assert self.layout is not None
        return self.layout.manifest

    @property
    def manifest_bytes(self) -> bytes:
        assert self.layout is not None
        return self.layout.manifest_bytes

    def _parse_index(self, data: bytes, position: int | None) -> dict[str, Any]:
        assert self.layout is not None
        n, where = self.layout.n, f"shard {self.url} index"
        try:
            index = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise BundleError(f"{where} is not valid JSON", "download the shard again") from None
        ints = ("shard", "shards", "first", "count")
        if not isinstance(index, dict) or not all(isinstance(index.get(k), int) and not isinstance(index.get(k), bool)
                                                  for k in ints) or not isinstance(index.get("sha256"), list):
            raise BundleError(f"{where} lacks shard/shards/first/count/sha256", "re-shard the bundle")
        if not (0 <= index["shard"] < index["shards"] <= n and 0 <= index["first"] and 1 <= index["count"]
                and index["first"] + index["count"] <= n and len(index["sha256"]) == index["count"]
                and all(isinstance(d, str) and _HEX64.fullmatch(d) for d in index["sha256"])):
            raise BundleError(f"{where} is inconsistent with the bundle's {n} items", "re-shard the bundle")
        if position is not None and index["shard"] != position:
            raise BundleError(f"shard {self.url} is shard {index['shard']} of its bundle, but was listed at position "
                              f"{position}", "list the shards in order, all of them: 'shard-{000000..NNNNNN}.tar'")
        return index

    def items(self) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(item id, rows keyed 'payload/tensor') of every item in the shard, each checked against the index."""
        assert self.index is not None
        first, count, digests = self.index["first"], self.index["count"], self.index["sha256"]
        seen: set[int] = set()
        members = self._members if self._pending is None else _chain([self._pending], self._members)
        self._pending = None
        for name, data in members:
            key, _, ext = name.partition(".")
            if key == MANIFEST_KEY:
                continue
            i, where = int(key[5:]), f"shard {self.url} member {name}"
            if not first <= i < first + count or i in seen:
                raise BundleError(f"{where}: item {i} is not listed in the shard's index, or appears twice", "do not use this shard")
            if hashlib.sha256(data).hexdigest() != digests[i - first]:
                raise BundleError(f"{where} fails its digest (corrupted shard)", "download the shard again")
            seen.add(i)
            yield i, self._check_rows(_load_st(data, where), where)
        if len(seen) != count:
            raise BundleError(f"shard {self.url} holds {len(seen)} of the {count} items its index lists (truncated?)",
                              "download the shard again")

    def _check_rows(self, rows: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
        """Refuse rows whose names, dtypes or shapes differ from the manifest's, or out-of-range class ids."""
        m = self.manifest
        for name in self.layout.split:
            for k, spec in m["payloads"][name]["tensors"].items():
                t = rows.get(f"{name}/{k}")
                if t is None or t.dtype != DTYPES[spec["dtype"]] or list(t.shape) != [1, *spec["shape"][1:]]:
                    raise BundleError(f"{where}: row '{name}/{k}' is missing or mis-shaped", "re-shard the bundle")
        if len(rows) != sum(len(m["payloads"][name]["tensors"]) for name in self.layout.split):
            raise BundleError(f"{where} holds rows the manifest does not declare", "do not use this shard")
        check_items(m, {m["items"]["payload"]: {"class_ids": rows[f"{m['items']['payload']}/class_ids"]}}, where)
        return rows

    def close(self) -> None:
        self._members.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _chain(*parts: Iterable[Any]) -> Iterator[Any]:
    for part in parts:
        yield from part
