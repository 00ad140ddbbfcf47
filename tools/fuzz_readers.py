"""Fuzz the bundle directory reader (Bundle.open) and the shard reader (read_shards).

Every input is built from a small valid bundle (and its shards) by one of the mutation families in
FAMILIES: truncations, bit flips, hostile manifests, re-signed hostile payloads and zstd bombs,
hostile tar members, odd files. Pass condition for each input: it loads into a consistent bundle,
or it raises a ddcodec error (DDCodecError) whose message is one printable line; no other
exception, no hang (SIGALRM per input), nothing written outside the case directory, and the
process's peak RSS grows by less than a bound (with an address-space limit as a second guard).
Families in DAMAGE model accidental damage (flips and truncations nobody re-signed): an input of
theirs that loads must load as exactly the original bundle, or the damage went unnoticed.

Hostile manifests are re-signed (manifest_sha256 recomputed) the way a forger would, so they reach
the schema checks behind the checksum; damaged ones are not.

    python tools/fuzz_readers.py --inputs 10000 --seed 0 --json fuzz.json

The same families run under hypothesis in tests/test_fuzz.py (a few hundred inputs).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gzip
import io
import json
import os
import random
import resource
import shutil
import signal
import stat
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import safetensors.torch
import torch
import zstandard

from ddcodec.bundle import Bundle, new_manifest, write_bundle
from ddcodec.bundle.manifest import CHECKSUM, manifest_sha256, sign_manifest, validate
from ddcodec.bundle.payload import DTYPES, sha256_bytes
from ddcodec.bundle.shards import write_shards
from ddcodec.errors import DDCodecError

ESCAPE = "/tmp/ddcodec-fuzz-escape"  # absolute tar member names point here; it must never appear
RSS_BOUND_MB = 256
MAX_MESSAGE = 1000  # characters; a one-line message stays readable even when it quotes hostile values


# randomness: random.Random for the tool, hypothesis draws for the test ------------------------
class Source(Protocol):
    """What a mutation family may ask for; implemented over random.Random and over hypothesis data."""

    def randint(self, a: int, b: int) -> int: ...
    def choice(self, seq: list) -> Any: ...
    def randbytes(self, n: int) -> bytes: ...


class RandomSource:
    """A Source over a seeded random.Random."""

    def __init__(self, seed: int) -> None:
        self.r = random.Random(seed)

    def randint(self, a: int, b: int) -> int:
        return self.r.randint(a, b)

    def choice(self, seq: list) -> Any:
        return seq[self.r.randrange(len(seq))]

    def randbytes(self, n: int) -> bytes:
        return self.r.randbytes(n)


# the valid seed bundle --------------------------------------------------------------------
@dataclass
class Seeds:
    """A valid bundle directory and its shards, plus the pieces the families recombine."""

    root: Path
    bundle: Path
    shards: list[Path]
    manifest: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)   # bundle file name -> bytes
    raw: dict[str, bytes] = field(default_factory=dict)     # payload name -> uncompressed safetensors
    shard_bytes: list[bytes] = field(default_factory=list)
    shard_members: list[list[tuple[str, bytes]]] = field(default_factory=list)
    reference: Bundle | None = None                          # the seed bundle as loaded


def make_seeds(root: Path, num_items: int = 12, items_per_shard: int = 5) -> Seeds:
    """Write a small valid bundle (soft labels, reference payload, fingerprints) without any generator."""
    root.mkdir(parents=True, exist_ok=True)
    generator = {"pipeline": "img2img", "model": {"source": "builtin:tiny", "revision": None, "kind": "class",
                                                  "components": {"vae": "0" * 64, "unet": "1" * 64}},
                 "scheduler": {"class": "DDIMScheduler", "config": {"num_train_timesteps": 1000}},
                 "dtype": "float32", "micro_batch": 8, "params": {"strength": 0.5, "steps": 2}}
    names = ["airplane", "cat", "dog", "ship"]
    m = new_manifest(method="random", params={"ipc": 3, "source_indices": list(range(num_items))}, seed=7,
                     class_names=names, prompts=[f"a photo of a {n}" for n in names], image_size=(8, 8), variants=2,
                     generator=generator, labels={"kind": "soft", "payload": "labels",
                                                  "codec": {"name": "topk", "k": 2, "quant": "uint8"}})
    m["fingerprints"] = {"entries": [{"item": 0, "variant": 0, "sha256": "a" * 64},
                                     {"item": num_items - 1, "variant": 1, "sha256": "b" * 64}],
                         "device": "cpu", "dtype": "float32", "micro_batch": 8, "tolerance": 0.02,
                         "thumbnail": 16, "payload": "reference"}
    g = torch.Generator().manual_seed(0)
    payloads = {
        "items": {"class_ids": torch.arange(num_items) % len(names),
                  "latents": torch.randn(num_items, 4, 2, 2, generator=g).half()},
        "labels": {"topk_idx": torch.randint(0, 4, (num_items, 2, 2), generator=g, dtype=torch.int16),
                   "topk_val": torch.randint(0, 255, (num_items, 2, 2), generator=g, dtype=torch.uint8)},
        "reference": {"thumbnails": torch.rand(2, 3, 8, 8, generator=g).half()},
    }
    bundle = root / "seed-bundle"
    b = write_bundle(bundle, m, payloads, fingerprints=0, overwrite=True)
    shard_dir = root / "seed-shards"
    shards = write_shards(b, shard_dir, items_per_shard=items_per_shard)
    s = Seeds(root, bundle, shards, json.loads((bundle / "manifest.json").read_text()), reference=b)
    s.files = {p.name: p.read_bytes() for p in bundle.iterdir()}
    for name, info in s.manifest["payloads"].items():
        s.raw[name] = zstandard.ZstdDecompressor().decompress(s.files[info["file"]])
    s.shard_bytes = [p.read_bytes() for p in shards]
    for data in s.shard_bytes:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            s.shard_members.append([(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()])
    return s


# helpers used by the families ---------------------------------------------------------------
def write_dir(case: Path, seeds: Seeds, files: dict[str, bytes] | None = None,
              manifest: dict | bytes | None = None) -> str:
    """A bundle directory from the seed's files with some replaced."""
    d = case / "bundle"
    d.mkdir(parents=True)
    out = dict(seeds.files)
    out.update(files or {})
    if manifest is not None:
        out["manifest.json"] = manifest if isinstance(manifest, bytes) else json.dumps(sign_manifest(manifest)).encode()
    for name, data in out.items():
        (d / name).write_bytes(data)
    return str(d)


def resign(m: dict, name: str, data: bytes, raw_bytes: int | None = None) -> dict:
    """The manifest with payload `name`'s sha256 and size set to match `data` (a hostile but consistent bundle)."""
    m = copy.deepcopy(m)
    info = m["payloads"][name]
    info["sha256"], info["bytes"] = sha256_bytes(data), len(data)
    if raw_bytes is not None:
        info["raw_bytes"] = raw_bytes
    return m


def flip_bits(data: bytes, src: Source, most: int = 8) -> bytes:
    """`data` with 1..most random bits flipped."""
    if not data:
        return data
    b = bytearray(data)
    for _ in range(src.randint(1, most)):
        i = src.randint(0, len(b) - 1)
        b[i] ^= 1 << src.randint(0, 7)
    return bytes(b)


def json_paths(obj: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (tuple of keys/indices) into a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from json_paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from json_paths(v, prefix + (i,))


RAW = "\x00RAW\x00"  # placeholder replaced by raw JSON text after dumping
HOSTILE: list[Any] = [
    None, True, False, 0, 1, -1, 2, 7, 2**31, 2**53 + 1, 2**63, 2**64, -2**63, 10**30, 1 << 34, (1 << 34) + 1,
    0.5, -0.0, 1e308, float("nan"), float("inf"), "", "x" * 5000, "\u0000", "\ud800", "é", "../../../etc/passwd",
    "/etc/passwd", "items.safetensors.zst", "float64", "object", "int64", "bool", [], {}, [1, 2], [-1, 4],
    [1 << 40, 1 << 40], [0], [[[]]], {"a": 1}, {"dtype": "float16", "shape": [1]},
    RAW + "9" * 5000, RAW + "[" * 5000 + "]" * 5000, RAW + "{\"a\":" * 3000 + "1" + "}" * 3000, RAW + "-1e999",
]


def set_path(obj: Any, path: tuple, value: Any) -> Any:
    """`obj` with the value at `path` replaced (the root when path is empty)."""
    if not path:
        return value
    node = obj
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return obj


def dump_hostile(m: Any, sign: bool = False) -> bytes:
    """json.dumps, with RAW-prefixed strings spliced in as raw JSON text (huge ints, deep nesting).

    sign: prepend a manifest_sha256 that matches the text as a reader parses it (when it parses to an object).
    """
    raws: list[str] = []
    if sign and isinstance(m, dict):
        m = {k: v for k, v in m.items() if k != CHECKSUM}

    def swap(node: Any) -> Any:
        if isinstance(node, str) and node.startswith(RAW):
            raws.append(node[len(RAW):])
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(node, dict):
            return {k: swap(v) for k, v in node.items()}
        if isinstance(node, list):
            return [swap(v) for v in node]
        return node

    text = json.dumps(swap(m), allow_nan=True)
    for k, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{k}@@"', raw)
    if sign:
        text = _signed(text)
    return text.encode("utf-8", "surrogatepass")


def _signed(text: str) -> str:
    """JSON object text with a matching manifest_sha256 member first (unchanged if it is not an object a reader can hash)."""
    try:
        parsed = json.loads(text)
        if not isinstance(parsed, dict) or CHECKSUM in parsed or not text.startswith("{"):
            return text
        digest = manifest_sha256(parsed)
    except (ValueError, RecursionError, TypeError):
        return text
    body = text[1:]
    return f'{{"{CHECKSUM}": "{digest}"' + ("" if body.lstrip().startswith("}") else ", ") + body


def forged(m: Any, seeds: Seeds) -> bool:
    """Re-sign a hostile manifest unless the mutation itself went for its checksum field."""
    return isinstance(m, dict) and m.get(CHECKSUM) == seeds.manifest[CHECKSUM]


def zstd(data: bytes, content_size: bool = True, level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level, write_content_size=content_size).compress(data)


def zstd_with_size(data: bytes, declared: int) -> bytes:
    """A zstd frame whose header declares `declared` bytes of content (a lying frame header)."""
    frame = bytearray(zstd(data, content_size=False))
    # frame header: magic (4), descriptor (1); set Frame_Content_Size_flag=3 (8 bytes) and Single_Segment=1
    fhd = frame[4]
    has_window = not (fhd & 0x20)
    did = {0: 0, 1: 1, 2: 2, 3: 4}[fhd & 3]
    head_end = 5 + (1 if has_window else 0) + did
    new_fhd = (fhd & 0x1F) | 0xC0  # keep checksum/dict flags and the window descriptor; 8-byte FCS
    fcs = declared.to_bytes(8, "little")
    return bytes(frame[:4]) + bytes([new_fhd]) + bytes(frame[5:head_end]) + fcs + bytes(frame[head_end:])


def safetensors_bytes(header: Any, body: bytes = b"", header_len: int | None = None) -> bytes:
    """Hand-made safetensors bytes: 8-byte little-endian header length, JSON header, data."""
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if header_len is None else header_len
    return n.to_bytes(8, "little", signed=False) + h + body


def tar_bytes(members: list[tuple[Any, bytes | None]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    """A tar of (name, data) regular files and/or (TarInfo, data or None) entries."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for head, data in members:
            info = head if isinstance(head, tarfile.TarInfo) else tarfile.TarInfo(head)
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def special(name: str, kind: bytes, link: str = "", data: bytes | None = None) -> tuple[tarfile.TarInfo, bytes | None]:
    """A tar entry of any type (symlink, hardlink, device, FIFO, directory, or regular with data)."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = link
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = 1, 5
    return info, data


def write_shard_set(case: Path, blobs: list[bytes], suffix: str = ".tar") -> list[str]:
    d = case / "shards"
    d.mkdir(parents=True)
    paths = []
    for k, data in enumerate(blobs):
        p = d / f"shard-{k:06d}{suffix}"
        p.write_bytes(data)
        paths.append(str(p))
    return paths


_BOMBS: dict[str, bytes] = {}


def gzip_zeros(n_mib: int) -> bytes:
    """gzip of n MiB of zeros, built from repeated 16 MiB gzip members (multi-member gzip is valid)."""
    key = f"gz{n_mib}"
    if key not in _BOMBS:
        unit = gzip.compress(b"\0" * (16 << 20), compresslevel=1, mtime=0)
        _BOMBS[key] = unit * max(1, n_mib // 16)
    return _BOMBS[key]


def zstd_zeros(n_mib: int, content_size: bool) -> bytes:
    """zstd of n MiB of zeros, compressed in 1 MiB steps (the header declares the size when content_size)."""
    key = f"zst{n_mib}{content_size}"
    if key not in _BOMBS:
        c = zstandard.ZstdCompressor(level=1, write_content_size=content_size)
        out = io.BytesIO()
        with c.stream_writer(out, size=(n_mib << 20) if content_size else -1, closefd=False) as w:
            zeros = bytes(1 << 20)
            for _ in range(n_mib):
                w.write(zeros)
        _BOMBS[key] = out.getvalue()
    return _BOMBS[key]


# mutation families: each builds one input under `case` and returns its target ----------------
Family = Callable[[Source, Seeds, Path], "str | list[str]"]
FAMILIES: dict[str, Family] = {}


def family(fn: Family) -> Family:
    FAMILIES[fn.__name__] = fn
    return fn


def _payload_name(src: Source, seeds: Seeds) -> str:
    return src.choice(sorted(seeds.manifest["payloads"]))


@family
def dir_truncate_payload(src: Source, seeds: Seeds, case: Path) -> str:
    name = _payload_name(seeds=seeds, src=src)
    f = seeds.manifest["payloads"][name]["file"]
    data = seeds.files[f]
    return write_dir(case, seeds, {f: data[: src.randint(0, len(data) - 1)]})


@family
def dir_truncate_payload_resigned(src: Source, seeds: Seeds, case: Path) -> str:
    name = _payload_name(src, seeds)
    f = seeds.manifest["payloads"][name]["file"]
    data = seeds.files[f][: src.randint(0, len(seeds.files[f]) - 1)]
    return write_dir(case, seeds, {f: data}, resign(seeds.manifest, name, data))


@family
def dir_flip_payload(src: Source, seeds: Seeds, case: Path) -> str:
    f = seeds.manifest["payloads"][_payload_name(src, seeds)]["file"]
    return write_dir(case, seeds, {f: flip_bits(seeds.files[f], src)})


@family
def dir_flip_payload_resigned(src: Source, seeds: Seeds, case: Path) -> str:
    name = _payload_name(src, seeds)
    f = seeds.manifest["payloads"][name]["file"]
    data = flip_bits(seeds.files[f], src)
    return write_dir(case, seeds, {f: data}, resign(seeds.manifest, name, data))


@family
def dir_flip_raw_resigned(src: Source, seeds: Seeds, case: Path) -> str:
    """Bit flips in the uncompressed safetensors, recompressed and re-signed: reaches the safetensors parser."""
    name = _payload_name(src, seeds)
    raw = flip_bits(seeds.raw[name], src, most=4)
    data = zstd(raw, content_size=bool(src.randint(0, 1)))
    return write_dir(case, seeds, {seeds.manifest["payloads"][name]["file"]: data},
                     resign(seeds.manifest, name, data, raw_bytes=len(raw)))


@family
def dir_flip_manifest(src: Source, seeds: Seeds, case: Path) -> str:
    return write_dir(case, seeds, manifest=flip_bits(seeds.files["manifest.json"], src, most=16))


@family
def dir_truncate_manifest(src: Source, seeds: Seeds, case: Path) -> str:
    data = seeds.files["manifest.json"]
    return write_dir(case, seeds, manifest=data[: src.randint(0, len(data) - 1)])


@family
def dir_non_utf8_manifest(src: Source, seeds: Seeds, case: Path) -> str:
    data = bytearray(seeds.files["manifest.json"])
    i = src.randint(0, len(data))
    bad = src.choice([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xfe\xff", b"\x80\x80", b"\xf4\x90\x80\x80"])
    data[i:i] = bad
    if src.randint(0, 1):
        data = bytearray(b"\xef\xbb\xbf") + data  # a BOM
    return write_dir(case, seeds, manifest=bytes(data))


@family
def dir_json_mutation(src: Source, seeds: Seeds, case: Path) -> str:
    """A random path in the manifest replaced by a hostile value, deleted, or given an extra key."""
    m = copy.deepcopy(seeds.manifest)
    for _ in range(src.randint(1, 3)):
        paths = list(json_paths(m))
        path = src.choice(paths)
        op = src.randint(0, 3)
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        if op == 0 and path and isinstance(parent, dict):
            del parent[path[-1]]
        elif op == 1 and isinstance(parent, dict):
            parent[src.choice(["extra", "__proto__", "\u00e9", "payloads", ""])] = copy.deepcopy(src.choice(HOSTILE))
        else:
            m = set_path(m, path, copy.deepcopy(src.choice(HOSTILE)))
            if not isinstance(m, dict):
                break
    return write_dir(case, seeds, manifest=dump_hostile(m, sign=forged(m, seeds)))


TARGETED = [
    ("version",), ("format",), ("seed",), ("variants",), ("image", "size"), ("items", "count"), ("items", "payload"),
    ("payloads", "items", "bytes"), ("payloads", "items", "raw_bytes"), ("payloads", "items", "file"),
    ("payloads", "items", "sha256"), ("payloads", "items", "tensors", "latents", "shape"),
    ("payloads", "items", "tensors", "latents", "dtype"), ("payloads", "items", "tensors", "class_ids", "dtype"),
    ("payloads", "items", "tensors", "class_ids", "shape"), ("payloads", "labels", "tensors"),
    ("labels", "kind"), ("labels", "payload"), ("labels", "codec"), ("fingerprints", "payload"),
    ("fingerprints", "entries"), ("fingerprints",), ("classes", "names"), ("classes", "prompts"),
    ("generator", "micro_batch"), ("generator", "dtype"), ("generator", "model"), ("generator", "scheduler"),
    ("method", "params"), ("payloads",),
]


@family
def dir_hostile_field(src: Source, seeds: Seeds, case: Path) -> str:
    """A field the reader relies on set to a hostile value: huge sizes, negative shapes, wrong dtypes, versions."""
    m = copy.deepcopy(seeds.manifest)
    path = src.choice(TARGETED)
    value = src.choice(HOSTILE + [[-1, 4, 2, 2], [12, 4, 2, -2], [12] + [1] * 9, [1 << 40] * 4, [12, 4.0, 2, 2],
                                  "float64", "complex64", 99, 0, 2, -1, 1 << 40])
    m = set_path(m, path, copy.deepcopy(value))
    return write_dir(case, seeds, manifest=dump_hostile(m, sign=forged(m, seeds)))


@family
def dir_hostile_safetensors(src: Source, seeds: Seeds, case: Path) -> str:
    """Hand-made safetensors headers (huge lengths, bad offsets, unknown dtypes), compressed and re-signed."""
    n = seeds.manifest["items"]["count"]
    good = {"class_ids": {"dtype": "I64", "shape": [n], "data_offsets": [0, 8 * n]}}
    kind = src.randint(0, 9)
    if kind == 0:
        raw = safetensors_bytes(good, b"\0" * (8 * n), header_len=src.choice([0, 1, 2**31, 2**63, 2**64 - 1]))
    elif kind == 1:
        h = {"class_ids": {"dtype": "I64", "shape": [n], "data_offsets": [0, src.choice([1 << 40, 2**63, 8 * n + 8])]}}
        raw = safetensors_bytes(h, b"\0" * (8 * n))
    elif kind == 2:
        h = {"class_ids": {"dtype": src.choice(["F64", "C64", "X", "", "I64 "]), "shape": [n], "data_offsets": [0, 8 * n]}}
        raw = safetensors_bytes(h, b"\0" * (8 * n))
    elif kind == 3:
        h = {"class_ids": {"dtype": "I64", "shape": src.choice([[-1], [1 << 62, 4], [n, 0], [2**64]]), "data_offsets": [0, 8 * n]}}
        raw = safetensors_bytes(h, b"\0" * (8 * n))
    elif kind == 4:
        raw = safetensors_bytes(b"\xff\xfe" + json.dumps(good).encode(), b"\0" * (8 * n))
    elif kind == 5:
        raw = safetensors_bytes(("[" * 10000 + "]" * 10000).encode())
    elif kind == 6:
        h = dict(good, latents={"dtype": "F16", "shape": [n, 4, 2, 2], "data_offsets": [0, 8 * n]})  # overlapping
        raw = safetensors_bytes(h, b"\0" * (8 * n))
    elif kind == 7:
        raw = safetensors_bytes({"__metadata__": {"a": "b" * 1000}, **good}, b"\0" * (8 * n))
    elif kind == 8:
        raw = src.randbytes(src.randint(0, 64))
    else:
        h = {"class_ids": {"dtype": "I64", "shape": [n], "data_offsets": [8 * n, 0]}}
        raw = safetensors_bytes(h, b"\0" * (8 * n))
    data = zstd(raw, content_size=bool(src.randint(0, 1)))
    m = resign(seeds.manifest, "items", data, raw_bytes=src.choice([len(raw), len(raw), max(len(raw), 8 * n + 1000)]))
    return write_dir(case, seeds, {"items.safetensors.zst": data}, m)


@family
def dir_zstd_bomb(src: Source, seeds: Seeds, case: Path) -> str:
    """Re-signed payloads that decompress to far more than declared, or declare far more than they hold."""
    raw = seeds.raw["items"]
    kind = src.randint(0, 6)
    declared = len(raw)
    if kind == 0:
        data = zstd_zeros(512, content_size=True)            # header says 512 MiB, manifest says ~600 B
    elif kind == 1:
        data = zstd_zeros(512, content_size=False)           # no content size: only the output shows it
    elif kind == 2:
        data = zstd_with_size(raw, 1 << 60)                  # frame header lies: 2**60 bytes
    elif kind == 3:
        data, declared = zstd(raw, content_size=False), 1 << 34  # tiny file, 16 GiB declared raw_bytes
    elif kind == 4:
        data, declared = zstd(raw), 1 << 34
    elif kind == 5:
        data = zstd(raw) + zstd(raw)                         # two frames: more output than declared
    else:
        data = zstd(raw) + src.randbytes(src.randint(1, 64))  # trailing garbage after the frame
    m = resign(seeds.manifest, "items", data, raw_bytes=declared)
    if declared > len(raw):  # let the declared tensors fit the declared raw size
        m["payloads"]["items"]["tensors"]["latents"]["shape"] = [m["items"]["count"], 4, 2, 2]
    return write_dir(case, seeds, {"items.safetensors.zst": data}, m)


@family
def dir_hostile_files(src: Source, seeds: Seeds, case: Path) -> str:
    """Payload or manifest replaced by a symlink (outside, dangling, loop, /dev/zero), FIFO, device or directory."""
    d = Path(write_dir(case, seeds))
    target = src.choice(["manifest.json", "items.safetensors.zst", "reference.safetensors.zst"])
    p = d / target
    p.unlink()
    kind = src.randint(0, 8)
    outside = case / "outside.bin"
    outside.write_bytes(seeds.files[target])
    if kind == 0:
        p.symlink_to(outside)                  # same bytes elsewhere: loads (reading only)
    elif kind == 1:
        p.symlink_to("/dev/zero")
    elif kind == 2:
        p.symlink_to(case / "dangling")
    elif kind == 3:
        p.symlink_to(p)                        # a loop
    elif kind == 4:
        os.mkfifo(p)
    elif kind == 5:
        p.mkdir()
    elif kind == 6:
        os.mknod(p, 0o600 | stat.S_IFCHR, os.makedev(1, 5))  # a /dev/zero device node
    elif kind == 7:
        with open(p, "wb") as f:               # a sparse file far larger than any limit
            f.truncate(src.choice([1 << 30, 1 << 36]))
    else:
        p.symlink_to("/proc/self/environ")
    return str(d)


@family
def dir_top_level(src: Source, seeds: Seeds, case: Path) -> str:
    """Not an object at all, or an empty/whitespace file, or a huge JSON value."""
    data = src.choice([b"", b" ", b"null", b"[]", b"1", b"\"x\"", b"[" * 100000, b"{\"format\": \"ddcodec-bundle\"}",
                       b"{}" + b" " * 1000, ("9" * 100000).encode(), b"\x00" * 100, b"{\"a\": \"\\ud800\"}",
                       b"{\"format\": \"ddcodec-bundle\", \"version\": 1e400}", b"NaN", b"Infinity"])
    return write_dir(case, seeds, manifest=data)


def _shard_members(seeds: Seeds, k: int = 0) -> list[tuple[str, bytes]]:
    return [tuple(m) for m in seeds.shard_members[k]]  # type: ignore[misc]


@family
def shard_truncate(src: Source, seeds: Seeds, case: Path) -> list[str]:
    k = src.randint(0, len(seeds.shard_bytes) - 1)
    blobs = list(seeds.shard_bytes)
    blobs[k] = blobs[k][: src.randint(0, len(blobs[k]) - 1)]
    return write_shard_set(case, blobs)


@family
def shard_flip(src: Source, seeds: Seeds, case: Path) -> list[str]:
    k = src.randint(0, len(seeds.shard_bytes) - 1)
    blobs = list(seeds.shard_bytes)
    blobs[k] = flip_bits(blobs[k], src, most=16)
    return write_shard_set(case, blobs)


@family
def shard_flip_member(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """Bit flips inside one member's data (tar headers intact): reaches manifest and safetensors parsing."""
    k = src.randint(0, len(seeds.shard_members) - 1)
    members = _shard_members(seeds, k)
    j = src.randint(0, len(members) - 1)
    members[j] = (members[j][0], flip_bits(members[j][1], src))
    blobs = list(seeds.shard_bytes)
    blobs[k] = tar_bytes(members)
    return write_shard_set(case, blobs)


def _first_item(members: list[Any]) -> int:
    return next(i for i, (name, _) in enumerate(members) if name.startswith("item-"))


@family
def shard_hostile_member(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """A hostile member inserted into a shard: ../ and absolute names, links, devices, FIFOs, duplicates."""
    members: list[Any] = _shard_members(seeds, 0)
    item = members[_first_item(members)]
    kind = src.randint(0, 13)
    evil: Any
    if kind == 0:
        evil = ("../" * src.randint(1, 4) + "escape.item.safetensors", item[1])
    elif kind == 1:
        evil = (ESCAPE + "/item-000000001.item.safetensors", item[1])
    elif kind == 2:
        evil = ("item-000000001/../../x.item.safetensors", item[1])
    elif kind == 3:
        evil = special(item[0], tarfile.SYMTYPE, src.choice(["/etc/passwd", "../../x", ESCAPE]))
    elif kind == 4:
        evil = special(item[0], tarfile.LNKTYPE, src.choice([members[1][0], "/etc/passwd", "../x"]))
    elif kind == 5:
        evil = special(item[0], src.choice([tarfile.CHRTYPE, tarfile.BLKTYPE]))
    elif kind == 6:
        evil = special(item[0], tarfile.FIFOTYPE)
    elif kind == 7:
        evil = item                                                            # duplicate item
    elif kind == 8:
        evil = (members[0][0], members[0][1].replace(b'"seed": 7', b'"seed": 8'))  # second, different manifest
    elif kind == 9:
        evil = ("bundle.manifest.json", members[0][1])                        # identical duplicate manifest
    elif kind == 10:
        evil = special("dir/", tarfile.DIRTYPE)
    elif kind == 11:
        evil = (src.choice(["item-abc.item.safetensors", "item--1.item.safetensors", "item-+1.item.safetensors",
                            "item-99999999999999999999.item.safetensors", "item- 1.item.safetensors",
                            "item-1_0.item.safetensors", "bundle.nope.safetensors", "bundle.items.safetensors",
                            "bundle..safetensors", "other.txt", "", "./item-000000001.item.safetensors"]), item[1])
    elif kind == 12:
        evil = (item[0], src.randbytes(src.randint(0, 300)))
    else:
        evil = special("x" * 200 + ".item.safetensors", tarfile.REGTYPE, data=item[1])  # long (pax) name
    pos = src.randint(0, len(members))
    members.insert(pos, evil)
    blobs = list(seeds.shard_bytes)
    blobs[0] = tar_bytes(members, fmt=src.choice([tarfile.PAX_FORMAT, tarfile.GNU_FORMAT]))
    return write_shard_set(case, blobs)


@family
def shard_reorder(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """Members shuffled, dropped, or moved across shards; shards repeated, missing, or from another bundle."""
    blobs = list(seeds.shard_bytes)
    kind = src.randint(0, 4)
    if kind == 0:
        members = _shard_members(seeds, 0)
        i, j = src.randint(0, len(members) - 1), src.randint(0, len(members) - 1)
        members[i], members[j] = members[j], members[i]
        blobs[0] = tar_bytes(members)
    elif kind == 1:
        members = _shard_members(seeds, 1)
        del members[src.randint(0, len(members) - 1)]
        blobs[1] = tar_bytes(members)
    elif kind == 2:
        blobs.append(blobs[src.randint(0, len(blobs) - 1)])
    elif kind == 3:
        del blobs[src.randint(0, len(blobs) - 1)]
    else:
        members = _shard_members(seeds, 0)
        m = json.loads(members[0][1])
        m["seed"] = 8
        members[0] = (members[0][0], json.dumps(sign_manifest(m), indent=2).encode())
        blobs[src.randint(1, len(blobs) - 1)] = tar_bytes(members)
    return write_shard_set(case, blobs)


@family
def shard_hostile_manifest(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """Every shard's manifest mutated the same way (hostile fields, huge item counts, payload names)."""
    m = copy.deepcopy(seeds.manifest)
    path = src.choice(TARGETED)
    m = set_path(m, path, copy.deepcopy(src.choice(HOSTILE + [1 << 20, 100000, 11, 13])))
    data = dump_hostile(m, sign=forged(m, seeds))
    blobs = []
    for k in range(len(seeds.shard_members)):
        members = _shard_members(seeds, k)
        members[0] = (members[0][0], data)
        blobs.append(tar_bytes(members))
    return write_shard_set(case, blobs)


@family
def shard_hostile_rows(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """Item rows with the wrong dtype, shape, extra or missing keys, or hostile safetensors headers."""
    members = _shard_members(seeds, 0)
    j = src.randint(_first_item(members), len(members) - 1)
    rows = safetensors.torch.load(members[j][1])
    kind = src.randint(0, 5)
    if kind == 0:
        key = src.choice(sorted(rows))
        rows[key] = rows[key].to(src.choice([torch.float32, torch.int64, torch.uint8]))
    elif kind == 1:
        key = src.choice(sorted(rows))
        reps = src.randint(0, 3)
        rows[key] = torch.cat([rows[key]] * reps) if reps else rows[key][:0]
    elif kind == 2:
        rows["items/extra"] = torch.zeros(1, 1000)
    elif kind == 3:
        del rows[src.choice(sorted(rows))]
    elif kind == 4:
        rows["items/class_ids"] = torch.tensor([src.choice([-1, 4, 99, 2**40])])
    data = safetensors_bytes({"x": {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}) \
        if kind == 5 else safetensors.torch.save(rows)
    members[j] = (members[j][0], data)
    blobs = list(seeds.shard_bytes)
    blobs[0] = tar_bytes(members)
    return write_shard_set(case, blobs)


def _raw_header(name: str, size_field: bytes, typeflag: bytes = b"0") -> bytes:
    """A ustar header block with a raw (possibly lying) size field."""
    h = bytearray(512)
    h[0:len(name)] = name.encode()
    h[100:108] = b"0000644\0"
    h[108:116] = b"0000000\0"
    h[116:124] = b"0000000\0"
    h[124:136] = size_field
    h[136:148] = b"00000000000\0"
    h[156:157] = typeflag
    h[257:263] = b"ustar\0"
    h[263:265] = b"00"
    h[148:156] = b" " * 8
    h[148:156] = f"{sum(h):06o}\0 ".encode()
    return bytes(h)


@family
def shard_lying_sizes(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """Tar headers whose size fields claim far more than the file holds (octal, base-256, pax)."""
    kind = src.randint(0, 3)
    if kind == 0:
        head = _raw_header("bundle.manifest.json", b"77777777777\0")            # 8 GiB, octal
    elif kind == 1:
        head = _raw_header("bundle.manifest.json", b"\x80" + b"\0" * 3 + b"\x7f" + b"\xff" * 7)  # base-256
    elif kind == 2:
        head = _raw_header("././@PaxHeader", b"77777777777\0", typeflag=b"x")   # pax header claiming 8 GiB
    else:
        head = _raw_header("././@LongLink", b"77777777777\0", typeflag=b"L")    # GNU long name claiming 8 GiB
    body = src.randbytes(src.randint(0, 4096))
    return write_shard_set(case, [head + body + seeds.shard_bytes[0]])


@family
def shard_compressed(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """gzip'd shards: valid, truncated, and gzip bombs (a pax header or a member of hundreds of MiB of zeros)."""
    kind = src.randint(0, 3)
    if kind == 0:
        blobs = [gzip.compress(b, mtime=0) for b in seeds.shard_bytes]
        return write_shard_set(case, blobs, ".tar.gz")
    if kind == 1:
        g = gzip.compress(seeds.shard_bytes[0], mtime=0)
        return write_shard_set(case, [g[: src.randint(0, len(g) - 1)]], ".tar.gz")
    size = 512 << 20
    name, flag = ("././@PaxHeader", b"x") if kind == 2 else ("bundle.manifest.json", b"0")
    head = gzip.compress(_raw_header(name, f"{size:011o}\0".encode(), typeflag=flag), mtime=0)
    return write_shard_set(case, [head + gzip_zeros(size >> 20)], ".tar.gz")


@family
def shard_odd_urls(src: Source, seeds: Seeds, case: Path) -> list[str]:
    """Empty, missing, directory and zero-filled shard paths."""
    d = case / "shards"
    d.mkdir(parents=True)
    kind = src.randint(0, 4)
    if kind == 0:
        (d / "empty.tar").write_bytes(b"")
        return [str(d / "empty.tar")]
    if kind == 1:
        return [str(d / "missing.tar")]
    if kind == 2:
        return [str(d)]
    if kind == 3:
        (d / "zeros.tar").write_bytes(b"\0" * 10240)
        return [str(d / "zeros.tar")]
    return []


# running one input ----------------------------------------------------------------------------
class Hang(BaseException):
    """Raised by SIGALRM when one input runs past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang()
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """(mode, size, mtime_ns) of everything under root, without following symlinks."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size if not stat.S_ISDIR(st.st_mode) else 0, st.st_mtime_ns)
    return out


def check_loaded(b: Bundle) -> None:
    """A bundle that loaded must be consistent: schema, tensors as declared, labels in range, summary works."""
    from ddcodec.cli import inspect_summary
    validate(b.manifest, "loaded")
    for name, info in b.manifest["payloads"].items():
        tensors = b.payloads[name]
        assert sorted(tensors) == sorted(info["tensors"]), f"payload {name} keys differ from the manifest"
        for k, spec in info["tensors"].items():
            t = tensors[k]
            assert t.dtype == DTYPES[spec["dtype"]] and list(t.shape) == spec["shape"], f"{name}/{k} not as declared"
    ids = b.items["class_ids"]
    assert ids.numel() == b.num_items and (ids.numel() == 0 or 0 <= int(ids.min()) <= int(ids.max()) < b.num_classes), \
        "class ids out of range"
    json.dumps(inspect_summary(b))
    b.digest()


def identical(b: Bundle, ref: Bundle) -> bool:
    """Same manifest and bitwise-equal payload tensors."""
    return b.manifest == ref.manifest and sorted(b.payloads) == sorted(ref.payloads) and all(
        sorted(b.payloads[n]) == sorted(ts) and all(b.payloads[n][k].dtype == t.dtype and b.payloads[n][k].equal(t)
                                                     for k, t in ts.items())
        for n, ts in ref.payloads.items())


# accidental damage nobody re-signed: what loads must be the original bundle, bit for bit
DAMAGE = {"dir_truncate_payload", "dir_flip_payload", "dir_flip_manifest", "dir_truncate_manifest",
          "dir_non_utf8_manifest", "shard_truncate", "shard_flip", "shard_flip_member"}


@dataclass
class Outcome:
    family: str
    outcome: str            # "loaded" or the error class name
    seconds: float
    message: str = ""
    violation: str = ""     # non-empty: the pass condition failed
    identical: bool = False  # loaded, and equal to the seed bundle
    stream: str | None = None  # shard inputs: the streaming reader's outcome ("loaded" or the error class name)


def open_bundle(target: str | list[str], fam: str, seeds: Seeds) -> bool:
    """The whole-bundle reader (Bundle.open: a directory, or every shard reassembled); True if it equals the seed."""
    b = Bundle.open(target if isinstance(target, str) else list(target))
    check_loaded(b)
    same = seeds.reference is not None and identical(b, seeds.reference)
    assert same or fam not in DAMAGE, "damage went unnoticed: it loads as a different bundle"
    return same


def stream_shards(urls: list[str], fam: str, seeds: Seeds) -> bool:
    """The streaming reader (StreamingDistilledDataset: header checks, then each shard through ShardReader) for
    one epoch on one rank and reader, without regenerating; True if it streams exactly the seed's items."""
    from ddcodec.bundle.payload import DTYPES as _DT
    from ddcodec.loader.stream import StreamingDistilledDataset
    ds = StreamingDistilledDataset(list(urls), batch_size=4)
    m = ds.manifest
    validate(m, "streamed")
    n = m["items"]["count"]
    got: dict[int, dict[str, torch.Tensor]] = {}
    for ids, rows in ds.slot_batches(0):
        for j, i in enumerate(ids):
            assert 0 <= i < n and i not in got, f"item {i} streamed twice or out of range"
            got[i] = {k: t[j:j + 1] for k, t in rows.items()}
    assert sorted(got) == list(range(n)), f"streamed {len(got)} of {n} items"
    for i, rows in got.items():
        for key, t in rows.items():
            name, _, k = key.partition("/")
            spec = m["payloads"][name]["tensors"][k]
            assert t.dtype == _DT[spec["dtype"]] and list(t.shape) == [1, *spec["shape"][1:]], f"row {key} not as declared"
        cid = int(rows[f"{m['items']['payload']}/class_ids"])
        assert 0 <= cid < len(m["classes"]["names"]), "class id out of range"
    ref = seeds.reference
    same = ref is not None and m == ref.manifest and all(
        t.dtype == ref.payloads[key.partition("/")[0]][key.partition("/")[2]].dtype
        and t.equal(ref.payloads[key.partition("/")[0]][key.partition("/")[2]][i:i + 1])
        for i, rows in got.items() for key, t in rows.items())
    assert same or fam not in DAMAGE, "damage went unnoticed: it streams as a different bundle"
    return same


def judge(read: Callable[[], bool], timeout: float) -> tuple[str, str, str, bool]:
    """Run one reader on one input: (outcome, message, violation, identical to the seed)."""
    outcome, message, violation, same = "loaded", "", "", False
    try:
        with time_limit(timeout):
            try:
                same = read()
            except DDCodecError as e:
                outcome, message = type(e).__name__, str(e)
                if len(message.splitlines()) != 1 or not message.strip():
                    violation = f"not a one-line message: {message!r}"
                elif len(message) > MAX_MESSAGE:
                    violation = f"a {len(message)}-character message: {message[:200]!r}"
                message.encode("utf-8")
    except Hang:
        outcome, violation = "hang", f"no result within {timeout} s"
    except AssertionError as e:
        outcome, violation = "inconsistent", f"loaded an inconsistent bundle: {e}"
    except BaseException as e:  # noqa: BLE001 - any other exception is the failure being looked for
        if isinstance(e, KeyboardInterrupt):
            raise
        outcome, violation = type(e).__name__, f"{type(e).__name__}: {str(e)[:200]} at {_where(e)}"
    return outcome, message, violation, same


def run_one(fam: str, src: Source, seeds: Seeds, case: Path, timeout: float = 20.0) -> Outcome:
    """Build one input with family `fam` in `case`, open it with each reader that takes it, and judge the results."""
    if case.exists():
        shutil.rmtree(case)
    case.mkdir(parents=True)
    target = FAMILIES[fam](src, seeds, case)
    before = snapshot(seeds.root.parent), sorted(os.listdir("."))
    t0 = time.perf_counter()
    outcome, message, violation, same = judge(lambda: open_bundle(target, fam, seeds), timeout)
    stream = None
    if not isinstance(target, str):
        s_out, s_msg, s_violation, s_same = judge(lambda: stream_shards(list(target), fam, seeds), timeout)
        stream = s_out
        if s_violation:
            violation = violation or f"streaming reader: {s_violation}"
    seconds = time.perf_counter() - t0
    after = snapshot(seeds.root.parent), sorted(os.listdir("."))
    changed = sorted(k for k in set(before[0]) | set(after[0]) if before[0].get(k) != after[0].get(k))
    if before[1] != after[1]:
        changed.append("the working directory")
    if changed:
        violation = violation or f"files changed by reading: {changed[:5]}"
    if os.path.lexists(ESCAPE):
        violation = violation or f"{ESCAPE} was written"
    return Outcome(fam, outcome, seconds, message[:300], violation, same, stream)


def _where(e: BaseException) -> str:
    """file:line of the innermost ddcodec frame of a traceback."""
    import traceback
    frames = [f for f in traceback.extract_tb(e.__traceback__) if "ddcodec" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextlib.contextmanager
def address_space_headroom(mib: int) -> Iterator[None]:
    """Cap virtual memory at the current size plus `mib`, so an over-large allocation fails loudly."""
    with open("/proc/self/statm") as f:
        vm_pages = int(f.read().split()[0])
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm_pages * os.sysconf("SC_PAGE_SIZE") + (mib << 20)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def warm_up(seeds: Seeds, case: Path) -> None:
    """Import lazily loaded modules and build the bombs once, so their memory is not counted."""
    Bundle.open(str(seeds.bundle))
    Bundle.open([str(p) for p in seeds.shards])
    gzip_zeros(512)
    zstd_zeros(512, True)
    zstd_zeros(512, False)
    for fam in FAMILIES:
        run_one(fam, RandomSource(0), seeds, case)


def fuzz(inputs: int, seed: int, workdir: Path, timeout: float = 20.0, headroom_mib: int = 2048,
         progress: bool = True) -> dict[str, Any]:
    """Run `inputs` inputs round-robin over the families; return the figures."""
    seeds = make_seeds(workdir / "seeds")
    case = seeds.root / "case"
    warm_up(seeds, case)
    rss0 = peak_rss_mb()
    src = RandomSource(seed)
    results: list[Outcome] = []
    names = sorted(FAMILIES)
    t0 = time.time()
    with address_space_headroom(headroom_mib):
        for k in range(inputs):
            results.append(run_one(names[k % len(names)], src, seeds, case, timeout))
            if progress and (k + 1) % 500 == 0:
                print(f"  {k + 1}/{inputs} inputs, {sum(bool(r.violation) for r in results)} violation(s), "
                      f"{time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    shutil.rmtree(case, ignore_errors=True)
    return summarise(results, rss0, peak_rss_mb(), time.time() - t0)


REASONS = [  # (phrase in the message, reason); the first match wins
    ("more data than its manifest declares", "shard over its manifest's byte budget"),
    ("over its limit", "shard member over its size limit"), ("over the", "file over a size limit"),
    ("non-regular member", "tar link/device/FIFO member"), ("unsafe member name", "tar ../ or absolute name"),
    ("unexpected member", "unexpected tar member"), ("does not start with the bundle manifest", "shard without manifest first"),
    ("appears twice", "duplicate item"), ("differs from the first shard", "shards of different bundles"),
    ("is outside 0..", "item index out of range"), ("items (first missing", "missing items"),
    ("content hash", "content hash mismatch"), ("not a readable tar", "unreadable tar"),
    ("truncated inside", "truncated tar member"), ("cannot open shard", "cannot open shard"),
    ("no manifest found", "no manifest in shards"), ("fails its manifest_sha256", "manifest checksum mismatch"),
    ("has no valid manifest_sha256", "manifest checksum missing"), ("sha256 check", "sha256 mismatch"),
    ("bytes but the manifest says", "size differs from manifest"), ("not UTF-8", "manifest not UTF-8"),
    ("not valid JSON", "manifest not JSON"), ("format version", "unknown format version"),
    ("not a ddcodec bundle manifest", "not a ddcodec manifest"), ("lone surrogate", "manifest string not Unicode"),
    ("nested deeper", "manifest nested too deep"), ("malformed", "manifest schema violation"),
    ("not valid zstd", "invalid zstd"), ("declares", "zstd frame size differs from manifest"),
    ("decompresses to", "decompressed size differs from manifest"), ("safetensors", "invalid safetensors"),
    ("the manifest says", "tensor dtype/shape differs from manifest"), ("holds tensors", "tensor names differ from manifest"),
    ("class ids", "class ids out of range"), ("not a regular file", "payload/manifest not a regular file"),
    ("is missing", "payload file missing"), ("has no manifest.json", "no manifest.json"), ("no bundle at", "no bundle"),
    ("cannot read", "unreadable file"), ("no shard URLs", "no shard URLs"), ("mis-shaped", "item rows mis-shaped"),
]


def reason(message: str) -> str:
    """A short category for a refusal message."""
    return next((r for phrase, r in REASONS if phrase in message), "other")


def summarise(results: list[Outcome], rss0: float, rss1: float, wall: float) -> dict[str, Any]:
    by_family: dict[str, Counter] = {}
    stream_by_family: dict[str, Counter] = {}
    for r in results:
        by_family.setdefault(r.family, Counter())[r.outcome] += 1
        if r.stream is not None:
            stream_by_family.setdefault(r.family, Counter())[r.stream] += 1
    slowest = max(results, key=lambda r: r.seconds)
    return {
        "inputs": len(results),
        "outcomes": dict(Counter(r.outcome for r in results).most_common()),
        "by_family": {f: dict(c.most_common()) for f, c in sorted(by_family.items())},
        "loaded_identical_to_seed": dict(sorted(Counter(r.family for r in results if r.identical).items())),
        "stream_inputs": sum(r.stream is not None for r in results),
        "stream_outcomes": dict(Counter(r.stream for r in results if r.stream is not None).most_common()),
        "stream_by_family": {f: dict(c.most_common()) for f, c in sorted(stream_by_family.items())},
        "damage_families": sorted(DAMAGE),
        "by_reason": dict(Counter(reason(r.message) for r in results if r.message).most_common()),
        "violations": [{"family": r.family, "outcome": r.outcome, "violation": r.violation} for r in results if r.violation],
        "max_seconds_per_input": round(slowest.seconds, 3), "slowest_family": slowest.family,
        "mean_seconds_per_input": round(sum(r.seconds for r in results) / max(1, len(results)), 4),
        "peak_rss_mb_before": round(rss0, 1), "peak_rss_mb_after": round(rss1, 1),
        "peak_rss_growth_mb": round(rss1 - rss0, 1), "rss_bound_mb": RSS_BOUND_MB,
        "wall_seconds": round(wall, 1),
        "sample_messages": {r.family: r.message for r in _one_per_class(results)},
    }


def _one_per_class(results: list[Outcome]) -> list[Outcome]:
    seen: dict[str, Outcome] = {}
    for r in results:
        if r.message and r.family not in seen:
            seen[r.family] = r
    return list(seen.values())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=10000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds allowed per input")
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--workdir", default=None, help="scratch directory (default: a fresh temporary one)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ddcodec-fuzz-", dir=args.workdir) as tmp:
        figures = fuzz(args.inputs, args.seed, Path(tmp), args.timeout)
    figures["command"] = "python tools/fuzz_readers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"{figures['inputs']} inputs in {figures['wall_seconds']} s: " +
          ", ".join(f"{k} {v}" for k, v in figures["outcomes"].items()))
    print(f"max {figures['max_seconds_per_input']} s per input ({figures['slowest_family']}), "
          f"peak RSS growth {figures['peak_rss_growth_mb']} MiB (bound {RSS_BOUND_MB})")
    for fam, c in figures["by_family"].items():
        stream = figures["stream_by_family"].get(fam)
        print(f"  {fam:32s} " + ", ".join(f"{k} {v}" for k, v in c.items())
              + ("; streaming: " + ", ".join(f"{k} {v}" for k, v in stream.items()) if stream else ""))
    print("refusals by reason: " + ", ".join(f"{k} {v}" for k, v in figures["by_reason"].items()))
    for v in figures["violations"][:20]:
        print(f"VIOLATION {v['family']}: {v['violation']}")
    ok = not figures["violations"] and figures["peak_rss_growth_mb"] < RSS_BOUND_MB
    print("PASS" if ok else "FAIL")
    if args.json:
        from ddcodec.bundle.atomic import atomic_write_json
        atomic_write_json(args.json, figures)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
