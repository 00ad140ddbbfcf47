"""Producers: methods that turn a labelled dataset into a bundle.

Each method module defines `add_arguments(group)` for its own CLI options (default None, so that
methods may share an option name) and `run(args) -> Bundle`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

METHODS: dict[str, str] = {
    "random": "ddcodec.methods.random_subset",
    "d4m": "ddcodec.methods.d4m",
    "dace": "ddcodec.methods.dace",
    "rded": "ddcodec.methods.rded",
    "ld3m": "ddcodec.methods.ld3m",
}


def method_module(name: str) -> ModuleType:
    """The module that implements method `name`."""
    return importlib.import_module(METHODS[name])
