"""Atomic training checkpoints: safetensors for tensors, JSON for everything else (no pickle)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..bundle.atomic import replace_dir
from ..errors import DDCodecError


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer's state dict split into tensors and JSON-safe metadata."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Inverse of optimizer_state."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(path: str | os.PathLike, tensors: dict[str, dict[str, torch.Tensor]], meta: dict[str, Any]) -> None:
    """Write <name>.safetensors per tensor group plus state.json into a temp dir, then swap it in place of `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(tmp / f"{name}.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The complete checkpoint at `path` (or its .old twin, left by an interrupted swap), if any."""
    path = Path(path)
    for p in (path, path.with_name(path.name + ".old")):
        if (p / "state.json").is_file():
            return p
    return None


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Tensor groups and metadata of a checkpoint written by save_checkpoint."""
    found = find_checkpoint(path)
    if found is None:
        raise DDCodecError(f"no checkpoint at {path}", "start without --resume")
    try:
        meta = json.loads((found / "state.json").read_text())
        tensors = {f.stem: load_file(str(f)) for f in sorted(found.glob("*.safetensors"))}
    except Exception as e:
        raise DDCodecError(f"checkpoint {found} is unreadable ({type(e).__name__})",
                           "delete it and start again without --resume") from None
    return tensors, meta


def remove_checkpoint(path: str | os.PathLike) -> None:
    """Delete a checkpoint and any leftovers of an interrupted swap."""
    path = Path(path)
    for p in [path, path.with_name(path.name + ".old"), *path.parent.glob(f".{path.name}.tmp-*")]:
        shutil.rmtree(p, ignore_errors=True)
