"""The one error type ddcodec raises for bad input, with a one-line message."""

from __future__ import annotations


class DDCodecError(Exception):
    """A user-facing failure: what is wrong and what to do, on one line."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        message = problem.rstrip(".") + "."
        if fix:
            message += " " + fix.rstrip(".") + "."
        super().__init__(" ".join(message.split()))


class BundleError(DDCodecError):
    """A bundle or shard that cannot be read as it is."""


class GeneratorError(DDCodecError):
    """A generator that cannot be built, or whose weights differ from the bundle's."""
