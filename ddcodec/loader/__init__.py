"""DistilledDataset and its elastic, resumable order."""

from .dataset import DistilledDataset, TrackingLoader
from .stream import StreamingDistilledDataset

__all__ = ["DistilledDataset", "StreamingDistilledDataset", "TrackingLoader"]
