"""Datasets (embedded, `.npz`, TFDS) and on-device preprocessing."""

from kdjax.data.augment import channel_stats, normalize, random_crop_and_flip
from kdjax.data.sources import Dataset, EMBEDDED, hold_out_validation, load

__all__ = ['Dataset', 'EMBEDDED', 'hold_out_validation', 'load', 'channel_stats', 'normalize', 'random_crop_and_flip']
