"""No pickle and no remote code anywhere in the package, tools or tests."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATTERNS = [r"^\s*import pickle", r"^\s*from pickle", r"pickle\.loads?\(", r"trust_remote_code\s*=\s*True",
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
    assert re.search(r"(?<![\w.])torch\.load\(", "x = torch.load(f)")
    assert not re.search(r"(?<![\w.])torch\.load\(", "x = safetensors.torch.load(b)")
