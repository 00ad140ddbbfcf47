"""DistilledDataset and its elastic, resumable order."""

from .dataset import DistilledDataset, TrackingLoader

__all__ = ["DistilledDataset", "TrackingLoader"]
