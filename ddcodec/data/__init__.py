"""Labelled image sources."""

from .sources import ImageFolderSource, load_source, readable_names

__all__ = ["ImageFolderSource", "load_source", "readable_names"]
