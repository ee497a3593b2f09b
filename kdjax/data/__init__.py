"""Datasets (embedded, `.npz`, TFDS) and on-device preprocessing."""

from kdjax.data.augment import channel_stats, normalize, random_crop_and_flip
from kdjax.data.sources import (Dataset, EMBEDDED, fingerprint, hold_out_validation, load,
                                subsample_train)

__all__ = ['Dataset', 'EMBEDDED', 'fingerprint', 'hold_out_validation', 'load', 'subsample_train',
           'channel_stats', 'normalize', 'random_crop_and_flip']
