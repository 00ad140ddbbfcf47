"""Payload files: a dict of tensors as safetensors bytes, compressed with zstandard."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import zstandard

from ..errors import BundleError
from .atomic import atomic_write_bytes

SUFFIX = ".safetensors.zst"
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_RAW_BYTES = 1 << 34  # 16 GiB: a bound on what any declared payload may decompress to


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    """The manifest's record of one tensor: dtype name and shape."""
    if t.dtype not in DTYPE_NAMES:
        raise BundleError(f"dtype {t.dtype} cannot be stored in a bundle", "use one of " + ", ".join(DTYPES))
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def encode_payload(tensors: dict[str, torch.Tensor], level: int = 19) -> tuple[bytes, dict[str, Any]]:
    """Serialise tensors to zstd-compressed safetensors; return the bytes and their manifest record."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    raw = safetensors.torch.save(tensors)
    data = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(raw)
    info = {
        "sha256": sha256_bytes(data),
        "bytes": len(data),
        "raw_bytes": len(raw),
        "tensors": {k: tensor_spec(v) for k, v in tensors.items()},
    }
    return data, info


def write_payload(directory: str | os.PathLike, name: str, tensors: dict[str, torch.Tensor],
                  level: int = 19) -> dict[str, Any]:
    """Write payload `name` into `directory` atomically; return its manifest record."""
    data, info = encode_payload(tensors, level)
    info = {"file": name + SUFFIX, **info}
    atomic_write_bytes(Path(directory) / info["file"], data)
    return info


def decode_payload(data: bytes, info: dict[str, Any], where: str) -> dict[str, torch.Tensor]:
    """Check and decode payload bytes against their manifest record."""
    if len(data) != info["bytes"]:
        raise BundleError(f"{where} is {len(data)} bytes but the manifest says {info['bytes']} (truncated or replaced)",
                          "download the bundle again")
    if sha256_bytes(data) != info["sha256"]:
        raise BundleError(f"{where} fails its sha256 check (corrupted or tampered)", "download the bundle again")
    expected = sum(_nbytes(spec) for spec in info["tensors"].values())
    raw = decompress_bounded(data, min(info["raw_bytes"], MAX_RAW_BYTES), where)
    if len(raw) != info["raw_bytes"] or len(raw) < expected:
        raise BundleError(f"{where} decompresses to {len(raw)} bytes, not the declared {info['raw_bytes']}",
                          "download the bundle again")
    try:
        tensors = safetensors.torch.load(raw)
    except Exception as e:  # safetensors raises several types for malformed headers
        raise BundleError(f"{where} is not a valid safetensors payload ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})",
                          "download the bundle again") from None
    check_tensors(tensors, info, where)
    return tensors


def check_tensors(tensors: dict[str, torch.Tensor], info: dict[str, Any], where: str) -> None:
    """Refuse tensors whose names, dtypes or shapes differ from the payload's manifest record."""
    if sorted(tensors) != sorted(info["tensors"]):
        raise BundleError(f"{where} holds tensors {sorted(tensors)}, the manifest declares {sorted(info['tensors'])}",
                          "download the bundle again")
    for key, spec in info["tensors"].items():
        if tensor_spec(tensors[key]) != {"dtype": spec["dtype"], "shape": list(spec["shape"])}:
            raise BundleError(f"{where}: tensor '{key}' is {tensor_spec(tensors[key])}, the manifest says {spec}",
                              "download the bundle again")


def decompress_bounded(data: bytes, limit: int, where: str) -> bytes:
    """Decompress zstd `data`, never holding more than `limit` + 1 MiB of output, whatever the frame headers claim.

    zstandard's one-shot decompress() trusts a frame's declared content size over max_output_size, so the
    frames are streamed in 1 MiB reads instead; all frames are read, so trailing frames count too.
    """
    try:
        declared = zstandard.get_frame_parameters(data).content_size
        if declared != zstandard.CONTENTSIZE_UNKNOWN and declared != limit:
            raise BundleError(f"{where} declares {declared} decompressed bytes, not the {limit} of the manifest",
                              "download the bundle again")
        chunks, total = [], 0
        with zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True) as reader:
            while True:
                chunk = reader.read(min(_CHUNK, limit + 1 - total))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
                if total > limit:
                    raise BundleError(f"{where} decompresses to more than the declared {limit} bytes",
                                      "download the bundle again")
    except zstandard.ZstdError as e:
        raise BundleError(f"{where} is not valid zstd data ({e})", "download the bundle again") from None
    return b"".join(chunks)


_CHUNK = 1 << 20


def _nbytes(spec: dict[str, Any]) -> int:
    n = DTYPES[spec["dtype"]].itemsize
    for d in spec["shape"]:
        n *= d
    return n
