"""The bundle manifest: version, schema validation and seed derivation."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from ..errors import BundleError
from .payload import DTYPES, MAX_RAW_BYTES, SUFFIX

FORMAT = "ddcodec-bundle"
VERSION = 1
MAX_MANIFEST_BYTES = 64 << 20
MAX_DEPTH = 32
SEED_DERIVATION = "sha256('{seed}:{item}:{variant}:{stream}') first 8 bytes, little-endian, masked to 63 bits"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
CHECKSUM = "manifest_sha256"


def derive_seed(seed: int, item: int, variant: int, stream: str = "noise") -> int:
    """The seed of one (item, variant) draw: a pure function of the bundle seed, stable on every platform."""
    digest = hashlib.sha256(f"{seed}:{item}:{variant}:{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def parse_manifest(data: bytes, where: str = "manifest.json") -> dict[str, Any]:
    """Parse and validate manifest bytes; raise BundleError with one line on any problem."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{where} is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} byte limit", "this is not a ddcodec bundle")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError(f"{where} is not UTF-8 text", "download the bundle again") from None
    try:
        manifest = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer literal past Python's digit limit
        reason = str(e).splitlines()[0][:80] if str(e) else type(e).__name__
        raise BundleError(f"{where} is not valid JSON ({reason})", "download the bundle again") from None
    validate_head(manifest, where)
    check_checksum(manifest, where)
    validate(manifest, where)
    return manifest


def manifest_sha256(m: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces, ASCII), without its own checksum field."""
    body = {k: v for k, v in m.items() if k != CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def sign_manifest(m: dict[str, Any]) -> dict[str, Any]:
    """A copy of `m` with its manifest_sha256 set (write_bundle does this; so must anyone editing a manifest)."""
    out = {k: v for k, v in m.items() if k != CHECKSUM}
    out[CHECKSUM] = manifest_sha256(out)
    return out


def check_checksum(m: dict[str, Any], where: str) -> None:
    """Refuse a manifest whose manifest_sha256 is missing or does not match its content (a flipped bit, an edit)."""
    value = m.get(CHECKSUM)
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise BundleError(f"{where} has no valid {CHECKSUM} (damaged, or not written by ddcodec)",
                          "download the bundle again")
    if manifest_sha256(m) != value:
        raise BundleError(f"{where} fails its {CHECKSUM} check (corrupted or edited)",
                          "download the bundle again; after editing a manifest, re-sign it with "
                          "ddcodec.bundle.manifest.sign_manifest")


def short(value: Any, limit: int = 80) -> str:
    """repr(value), cut to `limit` characters: untrusted values never make an error message long."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _fail(where: str, msg: str) -> BundleError:
    msg = msg if len(msg) <= 240 else msg[:240] + "..."
    return BundleError(f"{where}: {msg}", "the manifest is malformed; re-encode or download the bundle again")


def _get(obj: dict, key: str, typ: type | tuple, where: str, optional: bool = False) -> Any:
    if key not in obj:
        if optional:
            return None
        raise _fail(where, f"missing field '{key}'")
    value = obj[key]
    if typ is int and isinstance(value, bool) or not isinstance(value, typ):
        names = typ.__name__ if isinstance(typ, type) else "/".join(t.__name__ for t in typ)
        raise _fail(where, f"field '{key}' must be {names}, not {type(value).__name__}")
    return value


def _depth(obj: Any, limit: int) -> int:
    """The nesting depth of a JSON value (stops counting past `limit`); raises ValueError on a lone surrogate."""
    stack = [(obj, 1)]
    deepest = 0
    while stack:
        node, d = stack.pop()
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        if isinstance(node, dict):
            stack.extend((v, d + 1) for v in node.values())
            stack.extend((k, d + 1) for k in node)
        elif isinstance(node, list):
            stack.extend((v, d + 1) for v in node)
        elif isinstance(node, str):
            node.encode("utf-8")  # "\ud800" escapes parse to strings no UTF-8 output can hold
    return deepest


def validate_head(m: Any, where: str = "manifest.json") -> None:
    """The checks that come before the checksum: a bounded JSON object of this format and version."""
    if not isinstance(m, dict):
        raise _fail(where, "top level must be an object")
    try:
        depth = _depth(m, MAX_DEPTH)
    except UnicodeEncodeError:
        raise _fail(where, "a string holds a lone surrogate escape (not valid Unicode)") from None
    if depth > MAX_DEPTH:
        raise _fail(where, f"nested deeper than {MAX_DEPTH} levels")
    if m.get("format") != FORMAT:
        raise BundleError(f"{where} is not a ddcodec bundle manifest (format={short(m.get('format'))})", "point ddcodec at a bundle directory or its shards")
    version = _get(m, "version", int, where)
    if version != VERSION:
        raise BundleError(f"{where} has format version {short(version, 20)}; this ddcodec reads version {VERSION}",
                          "upgrade ddcodec" if version > VERSION else "re-encode the bundle with this ddcodec")


def validate(m: Any, where: str = "manifest.json") -> None:
    """Check a parsed manifest against the v1 schema (the checksum is checked by parse_manifest)."""
    validate_head(m, where)
    _get(m, "seed", int, where)
    if not 0 <= m["seed"] < 2**63:
        raise _fail(where, "seed must be in [0, 2**63)")
    method = _get(m, "method", dict, where)
    _get(method, "name", str, where + " method")
    _get(method, "params", dict, where + " method")
    classes = _get(m, "classes", dict, where)
    names = _get(classes, "names", list, where + " classes")
    prompts = _get(classes, "prompts", list, where + " classes")
    if not names or len(names) != len(prompts) or not all(isinstance(s, str) for s in names + prompts):
        raise _fail(where, "classes.names and classes.prompts must be equal-length, non-empty lists of strings")
    variants = _get(m, "variants", int, where)
    if not 1 <= variants <= 1 << 20:
        raise _fail(where, "variants must be between 1 and 2**20")
    image = _get(m, "image", dict, where)
    size = _get(image, "size", list, where + " image")
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and 1 <= s <= 8192 for s in size):
        raise _fail(where, "image.size must be [height, width] with each in 1..8192")
    payloads = _get(m, "payloads", dict, where)
    for name, info in payloads.items():
        _validate_payload(name, info, where)
    items = _get(m, "items", dict, where)
    count = _get(items, "count", int, where + " items")
    payload = _get(items, "payload", str, where + " items")
    if payload not in payloads:
        raise _fail(where, f"items.payload {short(payload)} is not among the payloads")
    tensors = payloads[payload]["tensors"]
    if "class_ids" not in tensors or tensors["class_ids"]["dtype"] != "int64":
        raise _fail(where, "the items payload must hold an int64 'class_ids' tensor")
    for key, spec in tensors.items():
        if not spec["shape"] or spec["shape"][0] != count:
            raise _fail(where, f"items tensor {short(key)} has shape {short(spec['shape'])}, expected {count} rows")
    if count < 1:
        raise _fail(where, "a bundle needs at least one item")
    labels = _get(m, "labels", dict, where)
    kind = _get(labels, "kind", str, where + " labels")
    if kind not in ("hard", "soft"):
        raise _fail(where, f"labels.kind must be 'hard' or 'soft', not {short(kind)}")
    if kind == "soft":
        lp = _get(labels, "payload", str, where + " labels")
        if lp not in payloads:
            raise _fail(where, f"labels.payload {short(lp)} is not among the payloads")
        _get(labels, "codec", dict, where + " labels")
    elif "codec" in labels:
        _get(labels, "codec", dict, where + " labels")
    gen = _get(m, "generator", dict, where)
    _get(gen, "pipeline", str, where + " generator")
    model = _get(gen, "model", dict, where + " generator")
    _get(model, "source", str, where + " generator.model")
    _get(model, "components", dict, where + " generator.model")
    _get(gen, "scheduler", dict, where + " generator")
    _get(gen, "params", dict, where + " generator")
    mb = _get(gen, "micro_batch", int, where + " generator")
    if not 1 <= mb <= 4096:
        raise _fail(where, "generator.micro_batch must be in 1..4096")
    dtype = _get(gen, "dtype", str, where + " generator")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise _fail(where, f"generator.dtype {short(dtype)} is not float32, float16 or bfloat16")
    fp = _get(m, "fingerprints", dict, where, optional=True)
    if fp is not None:
        entries = _get(fp, "entries", list, where + " fingerprints")
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("item"), int) or not isinstance(e.get("variant"), int) \
                    or not isinstance(e.get("sha256"), str) or not 0 <= e["item"] < count:
                raise _fail(where, "each fingerprint entry needs an in-range item, a variant and a sha256")
        fpp = _get(fp, "payload", str, where + " fingerprints", optional=True)
        if fpp is not None and (fpp not in payloads or "thumbnails" not in payloads[fpp]["tensors"]):
            raise _fail(where, f"fingerprints.payload {short(fpp)} is not among the payloads or has no thumbnails")
        mb = _get(fp, "micro_batch", int, where + " fingerprints", optional=True)
        if mb is not None and not 1 <= mb <= 4096:
            raise _fail(where, "fingerprints.micro_batch must be in 1..4096")
        tol = _get(fp, "tolerance", (int, float), where + " fingerprints", optional=True)
        if tol is not None and not 0 <= tol <= 1:
            raise _fail(where, "fingerprints.tolerance must be in [0, 1]")


def _validate_payload(name: Any, info: Any, where: str) -> None:
    w = f"{where} payload '{name}'"
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise _fail(where, f"payload name {short(name)} is not a plain name")
    if not isinstance(info, dict):
        raise _fail(w, "must be an object")
    if _get(info, "file", str, w) != name + SUFFIX:
        raise _fail(w, f"file must be '{name}{SUFFIX}'")
    sha = _get(info, "sha256", str, w)
    if not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise _fail(w, "sha256 must be 64 hex digits")
    for key in ("bytes", "raw_bytes"):
        n = _get(info, key, int, w)
        if not 0 <= n <= MAX_RAW_BYTES:
            raise _fail(w, f"{key} {n} is out of range")
    tensors = _get(info, "tensors", dict, w)
    total = 0
    for key, spec in tensors.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("dtype"), str) or spec["dtype"] not in DTYPES \
                or not isinstance(spec.get("shape"), list):
            raise _fail(w, f"tensor {short(key)} needs a known dtype and a shape list")
        if len(spec["shape"]) > 8 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 1 << 40 for d in spec["shape"]):
            raise _fail(w, f"tensor {short(key)} has an invalid shape {short(spec['shape'])}")
        n = DTYPES[spec["dtype"]].itemsize
        for d in spec["shape"]:
            n *= d
        total += n
    if total > info["raw_bytes"]:
        raise _fail(w, f"tensors need {total} bytes but raw_bytes is {info['raw_bytes']}")
