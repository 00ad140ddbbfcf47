"""Bundle format v1: manifest, payloads, integrity, fingerprints and shards."""

from .bundle import Bundle, new_manifest, write_bundle
from .manifest import VERSION, derive_seed

__all__ = ["Bundle", "new_manifest", "write_bundle", "derive_seed", "VERSION"]
