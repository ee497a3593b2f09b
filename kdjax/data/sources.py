"""Where images come from: an embedded dataset, a user's `.npz`, or TFDS.

Every source returns the same `Dataset`: uint8 `[N, H, W, C]` images and int32 `[N]` labels for a
train and a test split, checked once here so nothing downstream has to guess.
"""

import dataclasses
import hashlib
import os
from typing import Optional

import numpy as np

from kdjax.errors import KdjaxError

EMBEDDED = ('digits',)
NPZ_KEYS = ('x_train', 'y_train', 'x_test', 'y_test')


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Images as uint8 `[N, H, W, C]`, labels as int32 `[N]`, for train, test and (optionally)
  a validation split held out of the training set (`hold_out_validation`)."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  x_val: Optional[np.ndarray] = None
  y_val: Optional[np.ndarray] = None

  @property
  def image_shape(self):
    return self.x_train.shape[1:]


def fingerprint(dataset: Dataset) -> str:
  """SHA-256 of the arrays a run trains, selects and tests on (their bytes, dtypes and shapes,
  split by split), not of the file they came from: a stage records it, and a resume on other
  data of the same shape is refused (`experiment.run_stage`)."""
  digest = hashlib.sha256()
  for split in ('x_train', 'y_train', 'x_val', 'y_val', 'x_test', 'y_test'):
    array = getattr(dataset, split)
    digest.update(split.encode())
    if array is not None:
      digest.update(f'{array.dtype}{array.shape}'.encode())
      digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def hold_out_validation(dataset: Dataset, size: int) -> Dataset:
  """Moves `size` training images into a validation split; `size = 0` returns `dataset`.

  The images are chosen by a fixed permutation (seed 0), independent of the run's seed, so every
  seed and every stage of every config is validated on the same images. Model selection on this
  split, never on the test set, is the protocol of kdjax's reproductions.
  """
  if size == 0:
    return dataset
  num_train = len(dataset.x_train)
  if not isinstance(size, int) or size < 0 or size >= num_train:
    raise KdjaxError(f'{dataset.name}: validation_size must be an integer in [0, {num_train}) '
                     f'(the training set has {num_train} images), got {size!r}.')
  order = np.random.default_rng(0).permutation(num_train)
  val, train = np.sort(order[:size]), np.sort(order[size:])
  return dataclasses.replace(dataset, x_train=dataset.x_train[train],
                             y_train=dataset.y_train[train], x_val=dataset.x_train[val],
                             y_val=dataset.y_train[val])


def subsample_train(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
  """Keeps `size` training images, class-balanced; `size = 0` returns `dataset`.

  A label-scarce training split: each class keeps `size // num_classes` images or one more (when
  the classes do not divide `size`; a class with too few keeps all it has, the others fill in),
  chosen by a fixed permutation (`seed`, 0 by default, independent of the run's seed) so
  every seed and stage trains on the same images. Apply it after `hold_out_validation`: the
  validation and test splits keep their size.
  """
  if size == 0:
    return dataset
  num_train = len(dataset.x_train)
  if not isinstance(size, int) or size < 0 or size > num_train:
    raise KdjaxError(f'{dataset.name}: train_size must be an integer in [0, {num_train}] (0: all '
                     f'{num_train} training images), got {size!r}.')
  order = np.random.default_rng(seed).permutation(num_train)
  labels = dataset.y_train[order]
  # Each image's rank among the images of its class in `order`: taking images by rank, then by
  # position, takes one of every class before a second of any.
  rank = np.empty(num_train, np.int64)
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    rank[members] = np.arange(len(members))
  keep = np.sort(order[np.lexsort((np.arange(num_train), rank))[:size]])
  return dataclasses.replace(dataset, x_train=dataset.x_train[keep], y_train=dataset.y_train[keep])


def load(name: str = 'digits', npz: str = '', num_classes: Optional[int] = None,
         tfds_data_dir: Optional[str] = None, npy_dir: str = '') -> Dataset:
  """Loads a dataset: `npy_dir` if given (`.npy` files, memory-mapped: `kdjax.data.stream`),
  else `npz`, else the embedded `name`, else the TFDS builder `name`."""
  if npy_dir:
    from kdjax.data import stream
    arrays = stream.open_npy_folder(npy_dir)
    arrays = tuple(arrays[s] for s in NPZ_KEYS)
    label = os.path.basename(os.path.normpath(npy_dir))
  elif npz:
    arrays = _load_npz(npz)
    label = os.path.basename(npz)
  elif name in EMBEDDED:
    arrays = _load_digits()
    label = name
  else:
    arrays = _load_tfds(name, tfds_data_dir)
    label = name
  return _validated(label, *arrays, num_classes=num_classes)


def _load_digits():
  """scikit-learn's 8×8 UCI digits (1,797 images, 10 classes), shipped inside its wheel.

  The pixel values 0..16 are rescaled to 0..255. The data has no official split; a fixed
  permutation (seed 0) puts 1,438 images in train and 359 (a fifth) in test.
  """
  from sklearn import datasets as sk_datasets  # imported here: only this source needs it.
  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))
  num_test = len(labels) // 5
  test, train = order[:num_test], order[num_test:]
  return images[train], labels[train], images[test], labels[test]


def _load_npz(path: str):
  if not os.path.isfile(path):
    raise KdjaxError(f"npz file '{path}' does not exist; pass an existing file with "
                     f"--config.data.npz=/path/to/file.npz (arrays: {', '.join(NPZ_KEYS)}).")
  try:
    with np.load(path, allow_pickle=False) as archive:
      missing = [k for k in NPZ_KEYS if k not in archive.files]
      if missing:
        raise KdjaxError(f"npz file '{path}' lacks the arrays {missing}; it has "
                         f"{sorted(archive.files)}. kdjax needs {', '.join(NPZ_KEYS)}: uint8 "
                         'images [N, H, W, C] and integer labels [N].')
      return tuple(archive[k] for k in NPZ_KEYS)
  except KdjaxError:
    raise
  except Exception as e:  # a truncated or non-npz file: say which file, not numpy's internals.
    raise KdjaxError(f"could not read '{path}' as an .npz archive ({type(e).__name__}: {e}); "
                     'check that the file is complete and was written by np.savez.') from e


def _load_tfds(name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds  # imported here: it is slow to import and needs TensorFlow.
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:
    raise KdjaxError(
        f"unknown dataset '{name}': not an embedded dataset ({', '.join(EMBEDDED)}) and TFDS "
        f'says: {str(e).splitlines()[0]} Use an embedded name, a TFDS name such as cifar10, '
        'cifar100 or mnist, or --config.data.npz=/path/to/file.npz.') from e
  try:
    import tensorflow  # noqa: F401  (TFDS needs it to read its records)
  except ImportError as e:
    raise KdjaxError("TFDS datasets need TensorFlow: pip install 'kdjax[tfds]'.") from e
  builder.download_and_prepare()
  splits = []
  for split in ('train', 'test'):
    images, labels = [], []
    # Batched iteration rather than batch_size=-1, which TFDS's mock_data cannot serve.
    for x, y in tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True,
                                                 batch_size=4096)):
      images.append(x)
      labels.append(y)
    splits += [np.concatenate(images), np.concatenate(labels)]
  return tuple(splits)


def _validated(name, x_train, y_train, x_test, y_test, num_classes: Optional[int]) -> Dataset:
  for split, x, y in (('train', x_train, y_train), ('test', x_test, y_test)):
    if x.dtype != np.uint8:
      raise KdjaxError(f'{name}: x_{split} has dtype {x.dtype}; kdjax needs uint8 pixels 0..255 '
                       '(convert with np.clip(x * 255, 0, 255).astype(np.uint8) if in [0, 1]).')
    if x.ndim == 3:
      raise KdjaxError(f'{name}: x_{split} has shape {x.shape}; kdjax needs [N, H, W, C] — add '
                       'a channel axis with x[..., None].')
    if x.ndim != 4:
      raise KdjaxError(f'{name}: x_{split} has shape {x.shape}; kdjax needs [N, H, W, C].')
    if len(x) == 0:
      raise KdjaxError(f'{name}: the {split} split is empty; both splits need examples.')
    if y.ndim != 1 or len(y) != len(x):
      raise KdjaxError(f'{name}: y_{split} has shape {y.shape} but x_{split} has {len(x)} '
                       'images; labels must be [N], one integer per image.')
    if not np.issubdtype(y.dtype, np.integer):
      raise KdjaxError(f'{name}: y_{split} has dtype {y.dtype}; labels must be integer class '
                       'indices.')
  if x_train.shape[1:] != x_test.shape[1:]:
    raise KdjaxError(f'{name}: train images are {x_train.shape[1:]} but test images are '
                     f'{x_test.shape[1:]}; both splits need the same image shape.')
  low = int(min(y_train.min(), y_test.min()))
  high = int(max(y_train.max(), y_test.max()))
  if num_classes is None:
    num_classes = high + 1
  if low < 0 or high >= num_classes:
    raise KdjaxError(f'{name}: labels span [{low}, {high}] but num_classes is {num_classes}; '
                     'labels must lie in [0, num_classes). Fix the labels or set '
                     '--config.data.num_classes.')
  if num_classes < 2:
    raise KdjaxError(f'{name}: only {num_classes} class found; classification needs at least 2.')
  return Dataset(name, np.ascontiguousarray(x_train), y_train.astype(np.int32),
                 np.ascontiguousarray(x_test), y_test.astype(np.int32), int(num_classes))
