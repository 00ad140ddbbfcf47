"""Supply chain: no pickle and no remote code anywhere; generator weights checked against the bundle before use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = [r"^\s*import pickle", r"^\s*from pickle", r"pickle\.loads?\(", r"trust_remote_code",
            r"import dill", r"import cloudpickle"]


def python_files() -> list[Path]:
    return [p for d in ("ddcodec", "tools", "tests") for p in (ROOT / d).rglob("*.py")]


def test_no_pickle_or_remote_code():
    hits = []
    for path in python_files():
        if path.name == Path(__file__).name:
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if any(re.search(p, line) for p in PATTERNS):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"(?<![\w.])torch\.load\(", line) and "weights_only=True" not in line:
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_the_check_can_fail(tmp_path):
    bad = "import pickle\nx = torch.load(f)\n"
    assert any(re.search(p, bad, re.M) for p in PATTERNS)
    assert any(re.search(p, "m = Auto.from_pretrained(x, trust_remote_code=False)") for p in PATTERNS)
    assert re.search(r"(?<![\w.])torch\.load\(", "x = torch.load(f)")
    assert not re.search(r"(?<![\w.])torch\.load\(", "x = safetensors.torch.load(b)")


# generator weights --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_prior(tmp_path_factory) -> Path:
    """builtin:tiny saved as a local diffusers-layout directory (safetensors weights)."""
    from ddcodec.generators.prior import tiny_class_prior
    path = tmp_path_factory.mktemp("prior") / "tiny"
    tiny_class_prior().save_pretrained(path)
    return path


def test_local_prior_loads_with_the_builtin_hashes(saved_prior):
    from ddcodec.generators.prior import load_prior, tiny_class_prior
    assert load_prior(str(saved_prior)).component_hashes() == tiny_class_prior().component_hashes()


def test_pickled_weights_are_refused_never_unpickled(saved_prior, tmp_path, monkeypatch):
    """A component that ships diffusion_pytorch_model.bin instead of .safetensors is refused without torch.load."""
    import shutil
    import torch
    from ddcodec.errors import GeneratorError
    from ddcodec.generators.prior import load_prior
    d = tmp_path / "prior"
    shutil.copytree(saved_prior, d)
    (d / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (d / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"not a checkpoint, and never to be unpickled")
    calls = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or {})
    with pytest.raises(GeneratorError, match="unet"):
        load_prior(str(d))
    assert not calls, "torch.load (an unpickler) was called on the generator's weights"


def _point_at(bundle: Path, prior: Path, dst: Path) -> Path:
    """A copy of `bundle` whose manifest names the local prior directory (re-signed)."""
    import shutil
    from ddcodec.bundle.manifest import sign_manifest
    shutil.copytree(bundle, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["generator"]["model"]["source"] = str(prior)
    (dst / "manifest.json").write_text(json.dumps(sign_manifest(m)))
    return dst


def test_tampered_weights_refused_before_use_or_warned_when_allowed(tiny_bundle, saved_prior, tmp_path, monkeypatch):
    """Real weights that differ from the manifest's hashes (not a hand-edited hash): refused; allowed, a warning."""
    import shutil
    import safetensors.torch
    from ddcodec.bundle import Bundle
    from ddcodec.errors import GeneratorError
    from ddcodec.generators import pipelines
    from ddcodec.generators.pipelines import build_pipeline
    good = _point_at(tiny_bundle, saved_prior, tmp_path / "good")
    b = Bundle.open(good)
    build_pipeline(b.manifest, b.items)  # the untouched local copy matches the builtin's hashes
    evil = tmp_path / "evil-prior"
    shutil.copytree(saved_prior, evil)
    f = evil / "unet" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(str(f))
    key = sorted(state)[0]
    state[key] = state[key] + 1e-3
    safetensors.torch.save_file(state, str(f))
    bad = Bundle.open(_point_at(tiny_bundle, evil, tmp_path / "bad"))
    used = []
    real = pipelines.RegenerationPipeline.__call__
    monkeypatch.setattr(pipelines.RegenerationPipeline, "__call__", lambda self, *a, **k: used.append(1) or real(self, *a, **k))
    with pytest.raises(GeneratorError, match="weights differ.*unet") as e:
        build_pipeline(bad.manifest, bad.items)
    assert len(str(e.value).splitlines()) == 1 and "--allow-different-weights" in str(e.value)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        pipe = build_pipeline(bad.manifest, bad.items, allow_different_weights=True)
    assert any("weights differ" in str(x.message) for x in w)
    assert not used, "the generator ran before its weights were checked"
    assert pipe([0], 0).shape[0] == 1


def test_cli_refuses_different_weights_and_allow_flag_warns(tiny_bundle, saved_prior, tmp_path):
    import shutil
    import safetensors.torch
    evil = tmp_path / "evil-prior"
    shutil.copytree(saved_prior, evil)
    f = evil / "vae" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(str(f))
    state = {k: v * 1.01 if v.is_floating_point() else v for k, v in state.items()}
    safetensors.torch.save_file(state, str(f))
    bundle = _point_at(tiny_bundle, evil, tmp_path / "b")
    cmd = [sys.executable, "-m", "ddcodec.cli", "verify", str(bundle)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "weights differ" in lines[0] and "vae" in lines[0], r.stderr
    r = subprocess.run(cmd + ["--allow-different-weights"], capture_output=True, text=True, timeout=600)
    warning = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(warning) == 1 and warning[0].startswith("ddcodec: warning: generator weights differ"), r.stderr
    assert "0/4 digests match" in r.stdout, r.stdout  # other weights: no fingerprint matches bitwise any more
