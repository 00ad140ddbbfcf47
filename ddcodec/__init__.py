"""ddcodec: distilled image datasets as compact, deterministic, regenerable bundles."""

__version__ = "0.1.0"

from .errors import BundleError, DDCodecError, GeneratorError  # noqa: E402


def __getattr__(name: str):  # lazy: importing ddcodec stays fast for the CLI
    if name in ("DistilledDataset", "StreamingDistilledDataset"):
        from . import loader
        return getattr(loader, name)
    if name == "Bundle":
        from .bundle import Bundle
        return Bundle
    raise AttributeError(name)


__all__ = ["Bundle", "DistilledDataset", "StreamingDistilledDataset", "DDCodecError", "BundleError", "GeneratorError", "__version__"]
