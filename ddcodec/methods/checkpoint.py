"""Resumable encode state: finished work units saved atomically beside the output, reused on re-run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from ..bundle.atomic import atomic_write_bytes, atomic_write_json
from ..errors import DDCodecError
from ..parallel import barrier, is_main


class WorkDir:
    """`{out}.partial/`: one safetensors file per finished unit, valid only for the same parameters."""

    def __init__(self, out: str | os.PathLike, params: dict[str, Any], discard_stale: bool = False) -> None:
        self.dir = Path(str(out) + ".partial")
        self.key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()
        marker = self.dir / "params.json"
        stale = marker.exists() and self._saved_key(marker) != self.key
        barrier()  # every rank reads the marker before any rank changes it
        if stale:
            if not discard_stale:
                raise DDCodecError(f"{self.dir} holds an interrupted encode with different parameters",
                                   "re-run with the same arguments to resume, pass --overwrite to discard it, "
                                   "or delete that directory")
            if is_main():  # --overwrite: the stale work cannot be reused
                shutil.rmtree(self.dir)
            barrier()
        if not marker.exists():
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(marker, {"key": self.key, "params": params})

    @staticmethod
    def _saved_key(marker: Path) -> str | None:
        try:
            return json.loads(marker.read_text()).get("key")
        except (OSError, ValueError, AttributeError):
            return None

    def _path(self, name: str) -> Path:
        return self.dir / f"{name}.safetensors"

    def get(self, name: str) -> dict[str, torch.Tensor] | None:
        """A finished unit's tensors, or None if not done (or damaged, in which case it is redone)."""
        try:
            return safetensors.torch.load(self._path(name).read_bytes())
        except Exception:
            return None

    def put(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Record a finished unit atomically."""
        atomic_write_bytes(self._path(name), safetensors.torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}))

    def done(self) -> None:
        """Remove the state once the bundle is written."""
        shutil.rmtree(self.dir, ignore_errors=True)
