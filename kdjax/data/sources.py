"""Where images come from: an embedded dataset, a user's `.npz`, or TFDS.

Every source returns the same `Dataset`: uint8 `[N, H, W, C]` images and int32 `[N]` labels for a
train and a test split, checked once here so nothing downstream has to guess. A TFDS dataset
streamed from the host (`data.pipeline='stream'`) is read by random access instead of into
memory: its splits are `RandomAccessSplit` columns that read, decode and resize only the rows a
batch asks for (`load(..., streamed=True)`), for datasets such as ImageNet that fit no memory.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import threading
from collections import OrderedDict
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
      if isinstance(array, SplitColumn):  # what it reads, not every byte (a whole ImageNet).
        digest.update(array.fingerprint().encode())
      else:
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
  return dataclasses.replace(dataset, x_train=_take(dataset.x_train, train),
                             y_train=_take(dataset.y_train, train),
                             x_val=_take(dataset.x_train, val, evaluation=True),
                             y_val=_take(dataset.y_train, val, evaluation=True))


def _take(array, rows: np.ndarray, evaluation: bool = False):
  """`array[rows]`; of a random-access column, a view of those rows that reads nothing yet
  (`evaluation`: its images in the test split's view, `RandomAccessSplit.subset`)."""
  if isinstance(array, SplitColumn):
    return array.take(rows, evaluation)
  return array[rows]


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
  if isinstance(dataset.y_train, SplitColumn):
    raise KdjaxError(f'{dataset.name}: data.train_size needs every training label, and a TFDS '
                     'dataset streamed by random access would read (and decode) every image to '
                     'get them; leave train_size 0, or load the dataset into memory '
                     "(data.pipeline 'device' or 'auto').")
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
         tfds_data_dir: Optional[str] = None, npy_dir: str = '', *, streamed: bool = False,
         image_size: int = 0, test_split: str = 'test') -> Dataset:
  """Loads a dataset: `npy_dir` if given (`.npy` files, memory-mapped: `kdjax.data.stream`),
  else `npz`, else the embedded `name`, else the TFDS builder `name`.

  TFDS only: `streamed` reads the splits by random access (`tfds.data_source`, which needs the
  dataset prepared in the array_record format) instead of into memory; `image_size` > 0 stores
  every image as `image_size`² (`fit_image`: the training split's shorter side resized to it and
  center-cropped, the test split's resized to `image_size / TEST_CROP_FRACTION` first, the
  ImageNet protocol); `test_split` is the split to test on ('validation' for ImageNet, whose
  'test' split has no labels).
  """
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
  elif streamed:
    return _tfds_random_access(name, tfds_data_dir, image_size, test_split, num_classes)
  else:
    arrays = _load_tfds(name, tfds_data_dir, image_size, test_split)
    label = name
  return _validated(label, *arrays, num_classes=num_classes)


def load_from_config(data_config) -> Dataset:
  """`load` with the settings of a config's `data` block (`experiment.load_dataset`); the TFDS
  ones (`pipeline`, `image_size`, `test_split`) may be absent, as in configs written before."""
  return load(data_config.name, data_config.npz, num_classes=data_config.num_classes or None,
              tfds_data_dir=data_config.tfds_data_dir or None,
              npy_dir=data_config.get('npy_dir', ''),
              streamed=data_config.get('pipeline', 'auto') == 'stream',
              image_size=data_config.get('image_size', 0),
              test_split=data_config.get('test_split', 'test'))


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


def _load_tfds(name: str, data_dir: Optional[str], image_size: int = 0,
               test_split: str = 'test'):
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
  for split in ('train', test_split):
    images, labels = [], []
    if image_size:  # images of any size, one at a time, each stored as image_size².
      fraction = 1.0 if split == 'train' else TEST_CROP_FRACTION
      for x, y in tfds.as_numpy(builder.as_dataset(split=split, as_supervised=True)):
        images.append(fit_image(x, image_size, fraction)[None])
        labels.append(np.asarray(y)[None])
    else:
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


# ---------------------------------------------------------------------------------------------
# TFDS by random access (`load(..., streamed=True)`, `data.pipeline='stream'`).

# The test split's view when images are stored at `image_size`: the shorter side resized to
# image_size / TEST_CROP_FRACTION, then the central image_size² crop: ImageNet's "resize 256,
# center-crop 224". Training images keep more of the image for the random crops: the shorter
# side resized to image_size, then the central square.
TEST_CROP_FRACTION = 0.875
READ_THREADS = 8  # records decoded and resized at once per batch (PIL releases the GIL).


def fit_image(image: np.ndarray, size: int, crop_fraction: float = 1.0) -> np.ndarray:
  """uint8 `[h, w, C]` → `[size, size, C]`: torchvision's `Resize(round(size / crop_fraction))`
  (the shorter side, bilinear, antialiased: PIL's `BILINEAR`) then `CenterCrop(size)`. An image
  already `size × size` is kept as it is, so a dataset stored at that size is not resampled."""
  height, width, channels = image.shape
  if (height, width) == (size, size):
    return image
  from PIL import Image  # imported here: only images stored at a new size need it.
  short = int(round(size / crop_fraction))
  if height <= width:
    new_h, new_w = short, int(short * width / height)
  else:
    new_h, new_w = int(short * height / width), short
  resize = lambda x: np.asarray(Image.fromarray(x).resize((new_w, new_h), Image.BILINEAR))
  if channels == 3:
    resized = resize(image)
  else:  # PIL has no mode for other channel counts: one 'L' image per channel.
    resized = np.stack([resize(image[..., c]) for c in range(channels)], axis=-1)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.ascontiguousarray(resized[top:top + size, left:left + size])


_POOL = None
_POOL_LOCK = threading.Lock()


def _read_pool() -> concurrent.futures.ThreadPoolExecutor:
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(READ_THREADS, 'kdjax-read')
    return _POOL


class RandomAccessSplit:
  """A TFDS split read by random access: `tfds.data_source` over its array_record files.

  `images[rows]` reads those records only, decodes them and stores each image as `image_shape`
  (`fit_image`, or as it is with `image_size` 0), and `labels[rows]` their int32 labels: those
  of the last batches read are kept (`_LabelCache`), so `images[rows]` then `labels[rows]`, the
  order every reader in kdjax asks them in, reads a batch once. Nothing is read until a batch
  asks. `images` and `labels` stand in for a `Dataset`'s arrays wherever kdjax
  reads rows of them (the streaming path, `kdjax.data.stream`; evaluation in batches).
  """

  def __init__(self, source, info: dict, image_shape, keys, num_classes: int,
               crop_fraction: float = 1.0, records: Optional[np.ndarray] = None, cache=None):
    self._source, self._info, self._keys = source, info, keys
    self.image_shape, self.num_classes = tuple(image_shape), num_classes
    self.crop_fraction = crop_fraction
    self._records = records  # None: every record, in order; else the records' indices.
    self._cache = cache if cache is not None else _LabelCache()
    self.images, self.labels = SplitColumn(self, 0), SplitColumn(self, 1)

  def __len__(self) -> int:
    return len(self._source) if self._records is None else len(self._records)

  def subset(self, rows, crop_fraction: Optional[float] = None) -> 'RandomAccessSplit':
    """These rows as a split of their own (nothing read), in another view if `crop_fraction`."""
    return RandomAccessSplit(self._source, self._info, self.image_shape, self._keys,
                             self.num_classes, crop_fraction or self.crop_fraction,
                             self._record_indices(rows), self._cache)

  def fingerprint(self) -> str:
    """SHA-256 of what the split reads: the TFDS dataset, version, split and record count, the
    stored size and view, and which records; not their bytes (a whole pass over ImageNet)."""
    digest = hashlib.sha256(json.dumps({**self._info, 'image_shape': self.image_shape,
                                        'crop_fraction': self.crop_fraction},
                                       sort_keys=True).encode())
    if self._records is not None:
      digest.update(np.asarray(self._records, np.int64).tobytes())
    return digest.hexdigest()

  def read(self, rows):
    """`(images [n, *image_shape] uint8, labels [n] int32)` of `rows` (ints, or an int array),
    decoded on `READ_THREADS` threads."""
    records = self._record_indices(rows)
    chunks = [c for c in np.array_split(records, READ_THREADS) if len(c)]
    parts = list(_read_pool().map(self._decode, chunks)) if len(chunks) > 1 else [
        self._decode(c) for c in chunks]
    images = (np.concatenate([p[0] for p in parts]) if parts else
              np.zeros((0, *self.image_shape), np.uint8))
    labels = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    self._cache.put(records.tobytes(), labels)
    return images, labels

  def labels_of(self, rows) -> np.ndarray:
    """The int32 labels of `rows`: kept from the read of their images, or read now."""
    labels = self._cache.get(self._record_indices(rows).tobytes())
    return self.read(rows)[1] if labels is None else labels

  def _record_indices(self, rows) -> np.ndarray:
    if isinstance(rows, slice):
      rows = np.arange(*rows.indices(len(self)))
    rows = np.asarray(rows, np.int64).reshape(-1)
    if rows.size and (rows.min() < -len(self) or rows.max() >= len(self)):
      raise IndexError(f'rows {rows.min()}..{rows.max()} are outside a split of {len(self)}.')
    rows = np.where(rows < 0, rows + len(self), rows)
    return rows if self._records is None else np.asarray(self._records)[rows]

  def _decode(self, records: np.ndarray):
    image_key, label_key = self._keys
    examples = self._source.__getitems__([int(r) for r in records])
    size = self.image_shape[0]
    images = np.empty((len(records), *self.image_shape), np.uint8)
    labels = np.empty(len(records), np.int32)
    for i, (record, example) in enumerate(zip(records, examples)):
      image = np.asarray(example[image_key])
      if self._info['image_size']:
        image = fit_image(image, size, self.crop_fraction)
      if image.shape != self.image_shape:
        raise KdjaxError(f"{self._info['name']} {self._info['split']}: record {record} is an "
                         f'image of {image.shape}, the others {self.image_shape}; set '
                         '--config.data.image_size to store every image at one size.')
      images[i], labels[i] = image, int(example[label_key])
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise KdjaxError(f"{self._info['name']} {self._info['split']}: a label outside [0, "
                       f'{self.num_classes}) (labels {labels.min()}..{labels.max()}); an '
                       "unlabelled split (ImageNet's 'test') cannot be tested on: set "
                       '--config.data.test_split, e.g. to validation.')
    return images, labels


class _LabelCache:
  """The labels of the last batches read (by their records' indices), shared by a split and
  its subsets (kilobytes: a batch's images are not kept)."""

  def __init__(self, size: int = 64):
    self._entries, self._size, self._lock = OrderedDict(), size, threading.Lock()

  def get(self, key):
    with self._lock:
      return self._entries.get(key)

  def put(self, key, value) -> None:
    with self._lock:
      self._entries[key] = value
      while len(self._entries) > self._size:
        self._entries.popitem(last=False)


class SplitColumn:
  """A `RandomAccessSplit`'s images (`which` 0: uint8 `[N, *image_shape]`) or labels (1: int32
  `[N]`), indexed like an array by row numbers: `column[rows]` is a numpy array."""

  def __init__(self, split: RandomAccessSplit, which: int):
    self.split, self._which = split, which
    self.dtype = np.dtype(np.uint8 if which == 0 else np.int32)

  @property
  def shape(self):
    return (len(self.split), *self.split.image_shape) if self._which == 0 else (len(self.split),)

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape)) * self.dtype.itemsize

  def __len__(self) -> int:
    return len(self.split)

  def __getitem__(self, rows) -> np.ndarray:
    one = isinstance(rows, (int, np.integer))
    rows = [rows] if one else rows
    values = self.split.read(rows)[0] if self._which == 0 else self.split.labels_of(rows)
    return values[0] if one else values

  def take(self, rows, evaluation: bool = False) -> 'SplitColumn':
    """These rows as a column of their own split (nothing is read); `evaluation`: its images in
    the test split's view (`TEST_CROP_FRACTION`), for a validation split held out of train."""
    view = self.split.subset(rows, TEST_CROP_FRACTION if evaluation else None)
    return view.images if self._which == 0 else view.labels

  def fingerprint(self) -> str:
    return f'{self.split.fingerprint()}/{self._which}'

  def __array__(self, dtype=None, copy=None):  # every row: a whole pass over the split.
    rows = self[np.arange(len(self))]
    return rows if dtype is None else rows.astype(dtype)


def _tfds_random_access(name: str, data_dir: Optional[str], image_size: int, test_split: str,
                        num_classes: Optional[int]) -> Dataset:
  """The train and `test_split` splits of TFDS's `name` as `RandomAccessSplit`s."""
  import tensorflow_datasets as tfds  # imported here: it is slow to import.
  sources = {}
  for split in ('train', test_split):
    try:
      sources[split] = tfds.data_source(name, split=split, data_dir=data_dir,
                                        builder_kwargs={'file_format': 'array_record'})
    except Exception as e:  # not a TFDS name, not prepared, prepared as tfrecord, no split, …
      first = (str(e).strip().splitlines() or [type(e).__name__])[0]
      raise KdjaxError(
          f"TFDS could not open '{name}' split '{split}' for random access ({first}). "
          "data.pipeline='stream' reads a TFDS dataset with tfds.data_source, which needs it "
          f'prepared in the array_record format: `tfds build {name} --file_format=array_record '
          '--data_dir=DIR` (ImageNet: with --manual_dir holding its tar files), then '
          "--config.data.tfds_data_dir=DIR. Or read it into memory with data.pipeline 'device' "
          "or 'auto'.") from e
  info = sources['train'].dataset_info
  keys = tuple(info.supervised_keys or ('image', 'label'))
  stored = tuple(info.features[keys[0]].shape)
  image_shape = (image_size, image_size, stored[-1]) if image_size else stored
  if None in image_shape or len(image_shape) != 3:
    raise KdjaxError(f"{name}: its images have no fixed size ({stored}); set "
                     '--config.data.image_size (e.g. 224) to store each one at that size.')
  num_classes = num_classes or info.features[keys[1]].num_classes
  splits = {}
  for split, fraction in (('train', 1.0), (test_split, TEST_CROP_FRACTION)):
    described = {'name': name, 'version': str(info.version), 'split': split,
                 'records': len(sources[split]), 'image_size': image_size,
                 'resize': 'shorter side bilinear (PIL), center crop'}
    splits[split] = RandomAccessSplit(sources[split], described, image_shape, keys,
                                      num_classes, fraction)
  train, test = splits['train'], splits[test_split]
  for split in (train, test):
    if not len(split):
      raise KdjaxError(f'{name}: a split is empty; both splits need examples.')
  test.read([0])  # an unlabelled test split is refused now, not after an epoch's training.
  return Dataset(name, train.images, train.labels, test.images, test.labels, int(num_classes))
