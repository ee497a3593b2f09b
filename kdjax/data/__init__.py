"""Datasets (embedded, `.npz`, TFDS) and on-device preprocessing."""

from kdjax.data.augment import channel_stats, normalize, random_crop_and_flip
from kdjax.data.sources import Dataset, EMBEDDED, load

__all__ = ['Dataset', 'EMBEDDED', 'load', 'channel_stats', 'normalize', 'random_crop_and_flip']
