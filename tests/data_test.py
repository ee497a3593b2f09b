"""Data sources (embedded, npz, TFDS via mock_data) and on-device augmentation."""

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

import kdjax
from kdjax import data

from conftest import write_npz


def test_embedded_digits():
  d = data.load('digits')
  assert d.x_train.shape == (1438, 8, 8, 1) and d.x_test.shape == (359, 8, 8, 1)
  assert d.x_train.dtype == np.uint8 and d.x_train.max() == 255
  assert d.num_classes == 10
  assert set(np.unique(d.y_test)) == set(range(10))


def test_npz_round_trip(tmp_path):
  path = write_npz(tmp_path / 'd.npz')
  d = data.load(npz=path)
  with np.load(path) as raw:
    np.testing.assert_array_equal(d.x_train, raw['x_train'])
    np.testing.assert_array_equal(d.y_test, raw['y_test'])
  assert d.y_train.dtype == np.int32


@pytest.mark.parametrize('overrides,num_classes,match', [
    (dict(y_test=None), None, r"lacks the arrays \['y_test'\]"),
    (dict(x_train=np.zeros((20, 6, 6, 3), np.float32)), None, 'dtype float32.*uint8'),
    (dict(x_train=np.zeros((20, 6, 6), np.uint8)), None, 'add a channel axis'),
    (dict(y_train=np.arange(20) % 5), 3, r'labels span \[0, 4\] but num_classes is 3'),
    (dict(y_train=-np.ones(20, np.int64)), None, 'labels span'),
    (dict(x_test=np.zeros((0, 6, 6, 3), np.uint8), y_test=np.zeros(0, np.int64)), None, 'empty'),
    (dict(y_train=np.zeros(19, np.int64)), None, 'one integer per image'),
    (dict(y_train=np.zeros(20, np.float32)), None, 'integer class'),
    (dict(x_test=np.zeros((8, 5, 5, 3), np.uint8)), None, 'same image shape'),
])
def test_bad_npz_is_refused(tmp_path, overrides, num_classes, match):
  path = write_npz(tmp_path / 'bad.npz', **overrides)
  with pytest.raises(kdjax.KdjaxError, match=match):
    data.load(npz=path, num_classes=num_classes)


def test_missing_and_corrupt_npz(tmp_path):
  with pytest.raises(kdjax.KdjaxError, match='does not exist'):
    data.load(npz=str(tmp_path / 'nope.npz'))
  corrupt = tmp_path / 'corrupt.npz'
  corrupt.write_bytes(b'not a zip archive')
  with pytest.raises(kdjax.KdjaxError, match='could not read'):
    data.load(npz=str(corrupt))


def test_tfds_path_with_mock_data():
  with tfds.testing.mock_data(num_examples=12):
    d = data.load('cifar10')
  assert d.x_train.shape == (12, 32, 32, 3) and d.x_test.shape == (12, 32, 32, 3)
  assert d.x_train.dtype == np.uint8 and d.num_classes <= 10


def test_unknown_dataset_is_refused():
  with pytest.raises(kdjax.KdjaxError, match="unknown dataset 'no_such_set'"):
    data.load('no_such_set')


def test_normalize_matches_numpy():
  x = np.random.default_rng(1).integers(0, 256, (2, 4, 4, 3), dtype=np.uint8)
  mean, std = np.array([0.1, 0.5, 0.9], np.float32), np.array([0.2, 0.3, 0.4], np.float32)
  np.testing.assert_allclose(data.normalize(x, mean, std), (x / 255.0 - mean) / std, rtol=1e-5)


def test_channel_stats_match_numpy():
  x = np.random.default_rng(2).integers(0, 256, (10, 5, 5, 2), dtype=np.uint8)
  mean, std = data.channel_stats(x)
  np.testing.assert_allclose(mean, (x / 255.0).mean((0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(std, (x / 255.0).std((0, 1, 2)), rtol=1e-5)


def test_crop_and_flip_are_windows_of_the_zero_padded_image():
  rng = np.random.default_rng(3)
  x = rng.integers(1, 256, (64, 6, 6, 2), dtype=np.uint8)  # no zeros: padding is visible.
  out = np.asarray(jax.jit(lambda k, im: data.random_crop_and_flip(k, im, padding=2, flip=True))(
      jax.random.key(0), x))
  padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
  offsets, flips = set(), 0
  for i in range(len(x)):
    matches = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
               if np.array_equal(out[i], (padded[i, dy:dy + 6, dx:dx + 6][:, ::-1] if f
                                          else padded[i, dy:dy + 6, dx:dx + 6]))]
    assert matches, f'image {i} is not a (flipped) window of its padded input'
    offsets.add(matches[0][:2])
    flips += matches[0][2]
  assert len(offsets) > 10  # offsets really vary across the batch...
  assert 15 < flips < 49    # ...and about half the images are flipped.


def test_augmentation_off_is_identity():
  x = np.random.default_rng(4).integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
  out = data.random_crop_and_flip(jax.random.key(0), x, padding=0, flip=False)
  np.testing.assert_array_equal(out, x)


def test_validation_is_held_out_of_train_the_same_way_every_time():
  from kdjax import data as kd_data
  dataset = kd_data.load('digits')
  split = kd_data.hold_out_validation(dataset, 300)
  again = kd_data.hold_out_validation(dataset, 300)
  assert len(split.x_val) == 300 and len(split.x_train) == len(dataset.x_train) - 300
  np.testing.assert_array_equal(split.x_val, again.x_val)
  # Train and validation partition the original training set; the test split is untouched.
  rows = lambda x: {bytes(r) for r in x.reshape(len(x), -1)}
  assert rows(split.x_train) | rows(split.x_val) == rows(dataset.x_train)
  np.testing.assert_array_equal(split.x_test, dataset.x_test)
  assert kd_data.hold_out_validation(dataset, 0) is dataset
  with pytest.raises(kdjax.KdjaxError, match=r'validation_size must be an integer in \[0, 1438\)'):
    kd_data.hold_out_validation(dataset, 1438)


def test_epoch_selection_uses_validation_only():
  from kdjax.experiment import _select_on_validation
  history = [{'epoch': 1, 'val_accuracy': 0.5, 'test_accuracy': 0.9},
             {'epoch': 2, 'val_accuracy': 0.8, 'test_accuracy': 0.6},
             {'epoch': 3, 'val_accuracy': 0.8, 'test_accuracy': 0.7}]
  assert _select_on_validation(history) == (2, 0.6)  # best validation, earliest of ties.
  replicas = [{'epoch': 1, 'val_accuracy': [0.5, 0.9], 'test_accuracy': [0.1, 0.2]},
              {'epoch': 2, 'val_accuracy': [0.7, 0.3], 'test_accuracy': [0.3, 0.4]}]
  epochs, test = _select_on_validation(replicas)
  assert epochs == [2, 1] and abs(test - (0.3 + 0.2) / 2) < 1e-12


def test_best_validation_epoch_is_per_replica_and_earliest_of_ties():
  from kdjax.experiment import accuracy_at_best_validation
  val = np.array([[0.5, 0.9], [0.7, 0.9], [0.7, 0.8]])    # [epochs, replicas]
  test = np.array([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
  # Replica 0: best val 0.7 first at epoch 1 → 0.3; replica 1: 0.9 first at epoch 0 → 0.2.
  epochs, selected = accuracy_at_best_validation(val, test)
  np.testing.assert_array_equal(epochs, [1, 0])
  np.testing.assert_array_equal(selected, [0.3, 0.2])


def test_label_scarce_split_is_class_balanced_and_the_same_every_time():
  from kdjax import data as kd_data
  dataset = kd_data.hold_out_validation(kd_data.load('digits'), 400)
  scarce = kd_data.subsample_train(dataset, 205)
  # 205 = 10 classes × 20 + 5: every class keeps 20 or 21 images.
  assert len(scarce.x_train) == 205 and set(np.bincount(scarce.y_train)) == {20, 21}
  np.testing.assert_array_equal(scarce.x_train, kd_data.subsample_train(dataset, 205).x_train)
  # A subset of the training images, each with its own label; validation and test untouched.
  pairs = lambda d: {(bytes(x), int(y)) for x, y in zip(d.x_train.reshape(len(d.x_train), -1),
                                                       d.y_train)}
  assert pairs(scarce) <= pairs(dataset)
  np.testing.assert_array_equal(scarce.x_val, dataset.x_val)
  np.testing.assert_array_equal(scarce.x_test, dataset.x_test)
  assert kd_data.subsample_train(dataset, 0) is dataset
  with pytest.raises(kdjax.KdjaxError, match=r'train_size must be an integer in \[0, 1038\]'):
    kd_data.subsample_train(dataset, 1039)


def test_label_scarce_split_fills_in_from_other_classes_when_one_runs_out():
  from kdjax import data as kd_data
  # Class 1 has 2 images, class 0 has 8: 6 images are 2 of class 1 and 4 of class 0.
  labels = np.array([0] * 8 + [1] * 2, np.int32)
  images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
  dataset = kd_data.Dataset('toy', images, labels, images[:2], labels[:2], 2)
  assert np.bincount(kd_data.subsample_train(dataset, 6).y_train).tolist() == [4, 2]


# ---------------------------------------------------------------------------------------------
# Random-resized-crop (ImageNet's augmentation) and TFDS read by random access.

from kdjax.data import augment  # noqa: E402
from kdjax.data import sources  # noqa: E402


def pil_bilinear_1d(line, out_size):
  """PIL's antialiased bilinear resample of a float64 `[n, ...]` line to `out_size` samples,
  written from its algorithm (ImagingResample: center, support, triangle filter, normalised)."""
  n = len(line)
  scale = n / out_size
  filterscale = max(scale, 1.0)
  support = 1.0 * filterscale
  out = np.zeros((out_size, *line.shape[1:]))
  for o in range(out_size):
    center = (o + 0.5) * scale
    lo, hi = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), n)
    weights = np.array([max(0.0, 1.0 - abs((i - center + 0.5) / filterscale))
                        for i in range(lo, hi)])
    weights /= weights.sum()
    out[o] = np.tensordot(weights, line[lo:hi], axes=1)
  return out


def reference_resized_crop(image, box, out_h, out_w):
  """The box cropped first, then resized: rows, then columns, in float64."""
  top, left, h, w = box
  crop = image[top:top + h, left:left + w].astype(np.float64)
  rows = pil_bilinear_1d(crop, out_h)
  return np.swapaxes(pil_bilinear_1d(np.swapaxes(rows, 0, 1), out_w), 0, 1)


@pytest.mark.parametrize('box,size', [((3, 5, 11, 17), (16, 16)),   # both axes up
                                      ((0, 0, 20, 30), (8, 12)),    # the whole image, down
                                      ((7, 2, 13, 5), (9, 14)),     # rows down, columns up
                                      ((19, 29, 1, 1), (4, 4))])    # one pixel
def test_resized_crops_match_a_numpy_reference_and_pil(box, size):
  from PIL import Image
  x = np.random.default_rng(5).integers(0, 256, (2, 20, 30, 3), dtype=np.uint8)
  boxes = np.array([box, (0, 0, 20, 30)], np.int32)
  out = np.asarray(jax.jit(lambda im, b: augment.resized_crops(im, b, size))(x, boxes))
  assert out.shape == (2, *size, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0], reference_resized_crop(x[0], box, *size), atol=2e-3)
  np.testing.assert_allclose(out[1], reference_resized_crop(x[1], (0, 0, 20, 30), *size),
                             atol=2e-3)
  # PIL itself, on the cropped image (uint8 passes, each rounded): within one grey level.
  top, left, h, w = box
  pil = np.asarray(Image.fromarray(x[0, top:top + h, left:left + w]).resize(size[::-1],
                                                                            Image.BILINEAR))
  assert np.abs(np.round(out[0]) - pil).max() <= 1


def torchvision_get_params(rng, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
  """torchvision's `RandomResizedCrop.get_params`, transcribed, with numpy's generator."""
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect_ratio = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target_area * aspect_ratio)))
    h = int(round(np.sqrt(target_area / aspect_ratio)))
    if 0 < w <= width and 0 < h <= height:
      return rng.integers(0, height - h + 1), rng.integers(0, width - w + 1), h, w
  return None  # the fallback (not reached at these sizes in practice).


def test_random_resized_crop_boxes_follow_torchvision_statistics():
  height, width, draws = 40, 60, 4000
  boxes = np.asarray(jax.jit(lambda k: augment.random_resized_crop_boxes(k, draws, height, width))(
      jax.random.key(7)))
  top, left, h, w = boxes.T
  assert (h >= 1).all() and (w >= 1).all() and (top >= 0).all() and (left >= 0).all()
  assert (top + h <= height).all() and (left + w <= width).all()
  area, aspect = h * w / (height * width), w / h
  # Within the bounds up to the rounding of h and w to whole pixels.
  slack = lambda side: 1.0 / side
  assert (area >= 0.08 * (1 - slack(h)) * (1 - slack(w)) - 1e-9).all() and (area <= 1).all()
  assert (aspect >= 0.75 * (1 - slack(w)) / (1 + slack(h))).all()
  assert (aspect <= 4 / 3 * (1 + slack(w)) / (1 - slack(h))).all()
  rng = np.random.default_rng(0)
  reference = np.array([torchvision_get_params(rng, height, width) for _ in range(draws)])
  ref_area = reference[:, 2] * reference[:, 3] / (height * width)
  ref_log_aspect = np.log(reference[:, 3] / reference[:, 2])
  # Same distribution: means within 4 standard errors, spreads within 10 %.
  for ours, theirs in ((area, ref_area), (np.log(aspect), ref_log_aspect)):
    se = np.sqrt(ours.var() / draws + theirs.var() / draws)
    assert abs(ours.mean() - theirs.mean()) < 4 * se
    assert abs(ours.std() / theirs.std() - 1) < 0.1
  # Positions uniform over the room left: the box's offset is on average half of it.
  room = (height - h) > 0
  assert abs(np.mean(top[room] / (height - h[room])) - 0.5) < 0.03


@pytest.mark.parametrize('height,width,expected', [
    (20, 60, (0, 16, 20, 27)),   # too wide: the full height, 4/3 of it wide, centred.
    (60, 20, (16, 0, 27, 20)),   # too tall: the full width, 4/3 of it high.
    (30, 32, (0, 0, 30, 32)),    # within the ratio bounds: the whole image.
])
def test_random_resized_crop_falls_back_to_torchvisions_central_crop(height, width, expected):
  # An area of 2–3 times the image never fits, so all 10 tries fail.
  boxes = augment.random_resized_crop_boxes(jax.random.key(0), 3, height, width, scale=(2, 3))
  assert np.asarray(boxes).tolist() == [list(expected)] * 3


def test_random_resized_crop_and_flip_is_a_resized_box_or_its_mirror_under_jit():
  x = np.random.default_rng(8).integers(0, 256, (64, 24, 20, 3), dtype=np.uint8)
  key = jax.random.key(3)
  out = np.asarray(jax.jit(lambda k, im: augment.random_resized_crop_and_flip(k, im, size=12))(
      key, x))
  assert out.shape == (64, 12, 12, 3) and out.dtype == np.uint8
  boxes = augment.random_resized_crop_boxes(jax.random.split(key)[0], 64, 24, 20)
  expected = np.asarray(augment.resized_crops(x, boxes, 12))
  # Rounded to the nearest level (outside jit the sums may round a hair differently).
  close = lambda a, b: (np.abs(a - b) <= 0.5 + 1e-3).all(axis=(1, 2, 3))
  plain, mirrored = close(out, expected), close(out, expected[:, :, ::-1])
  assert (plain | mirrored).all()
  assert 15 < mirrored.sum() < 49  # about half are flipped.
  assert len({tuple(b) for b in np.asarray(boxes)}) > 50  # every image its own box.
  # The augmenter a config names gives the same, and normalisation runs after it.
  block = type('Block', (), dict(kind='random_resized_crop', size=12, flip=True,
                                 crop_padding=0))()
  np.testing.assert_array_equal(jax.jit(augment.augmenter(block))(key, x), out)
  assert np.isfinite(data.normalize(out, np.full(3, 0.5), np.full(3, 0.25))).all()


def test_fit_image_is_resize_of_the_shorter_side_then_center_crop():
  from PIL import Image
  image = np.random.default_rng(9).integers(0, 256, (30, 40, 3), dtype=np.uint8)
  # Test view at 16 / 0.875: shorter side to 18, so 18 × 24, then the central 16 × 16.
  resized = np.asarray(Image.fromarray(image).resize((24, 18), Image.BILINEAR))
  np.testing.assert_array_equal(sources.fit_image(image, 16, 0.875), resized[1:17, 4:20])
  resized = np.asarray(Image.fromarray(image).resize((21, 16), Image.BILINEAR))
  np.testing.assert_array_equal(sources.fit_image(image, 16), resized[:, 2:18])  # train view.
  gray = image[..., :1]
  np.testing.assert_array_equal(sources.fit_image(gray, 16)[..., 0],
                                np.asarray(Image.fromarray(gray[..., 0]).resize(
                                    (21, 16), Image.BILINEAR))[:, 2:18])
  np.testing.assert_array_equal(sources.fit_image(image[:16, :16], 16, 0.875), image[:16, :16])


@pytest.fixture
def mock_tfds():
  """TFDS's mock_data for `tfds.data_source`; its mock answers `__getitems__` wrongly (TFDS
  4.9.10), so the wrapper reads record by record, as `__getitem__` does."""
  from unittest import mock
  from tensorflow_datasets.core.data_sources import base
  with tfds.testing.mock_data(num_examples=24), mock.patch.object(
      base.BaseDataSource, '__getitems__', lambda self, keys: [self[k] for k in keys]):
    yield


def test_streamed_tfds_reads_decodes_and_resizes_only_the_rows_asked_for(mock_tfds):
  raw = {split: tfds.data_source('imagenet2012', split=split) for split in ('train', 'validation')}
  d = data.load('imagenet2012', streamed=True, image_size=16, test_split='validation')
  assert isinstance(d.x_train, sources.SplitColumn) and d.num_classes == 1000
  assert d.x_train.shape == (24, 16, 16, 3) and d.y_train.shape == (24,)
  assert d.image_shape == (16, 16, 3) and d.x_train.dtype == np.uint8
  assert d.x_train.nbytes == 24 * 16 * 16 * 3 and d.y_test.dtype == np.int32
  rows = np.array([5, 0, 17], np.int32)
  split, decoded = d.x_train.split, []
  decode = split._decode
  split._decode = lambda records: decoded.extend(records) or decode(records)
  images, labels = d.x_train[rows], d.y_train[rows]  # as every reader asks: one read.
  assert sorted(decoded) == [0, 5, 17]
  del split._decode
  for row, image, label in zip(rows, images, labels):
    example = raw['train'][int(row)]  # images of any size (mock: 10–47 pixels a side).
    np.testing.assert_array_equal(image, sources.fit_image(example['image'], 16))
    assert label == example['label']
  np.testing.assert_array_equal(d.x_test[np.array([3])][0],  # the test view: 256 → 224 style.
                                sources.fit_image(raw['validation'][3]['image'], 16, 0.875))
  # Held-out validation: views of the training rows (nothing read), in the test view.
  split = data.hold_out_validation(d, 6)
  assert split.x_train.shape == (18, 16, 16, 3) and split.x_val.shape == (6, 16, 16, 3)
  val_rows = np.sort(np.random.default_rng(0).permutation(24)[:6])
  np.testing.assert_array_equal(split.y_val[np.arange(6)], d.y_train[val_rows])
  np.testing.assert_array_equal(split.x_val[np.array([1])][0], sources.fit_image(
      raw['train'][int(val_rows[1])]['image'], 16, 0.875))
  # The fingerprint names what is read, not its bytes: stable, and it changes with the size.
  assert data.fingerprint(d) == data.fingerprint(
      data.load('imagenet2012', streamed=True, image_size=16, test_split='validation'))
  assert data.fingerprint(split) != data.fingerprint(d)
  assert data.fingerprint(d) != data.fingerprint(
      data.load('imagenet2012', streamed=True, image_size=12, test_split='validation'))
  # Channel statistics on a sample (here: every image) read in batches.
  everything = d.x_train[np.arange(24)]
  np.testing.assert_allclose(data.channel_stats(d.x_train), data.channel_stats(everything),
                             rtol=1e-5)
  with pytest.raises(kdjax.KdjaxError, match='train_size needs every training label'):
    data.subsample_train(d, 10)


def test_streamed_tfds_without_a_size_needs_fixed_size_images(mock_tfds):
  d = data.load('mnist', streamed=True)  # 28 × 28 × 1, stored as it is.
  assert d.x_train.shape == (24, 28, 28, 1) and d.num_classes == 10
  np.testing.assert_array_equal(d.x_test[np.array([2])][0],
                                tfds.data_source('mnist', split='test')[2]['image'])
  with pytest.raises(kdjax.KdjaxError, match='no fixed size.*data.image_size'):
    data.load('imagenet2012', streamed=True, test_split='validation')


def test_in_memory_tfds_stores_images_of_any_size_at_image_size(mock_tfds):
  d = data.load('imagenet2012', image_size=12, test_split='validation')
  assert isinstance(d.x_train, np.ndarray)
  assert d.x_train.shape == (24, 12, 12, 3) and d.x_test.shape == (24, 12, 12, 3)


def test_load_from_config_reads_the_tfds_settings(mock_tfds):
  from experiments.configs import imagenet_takd
  config = imagenet_takd.get_config()
  config.data.image_size = 16
  d = sources.load_from_config(config.data)
  assert isinstance(d.x_train, sources.SplitColumn) and d.image_shape == (16, 16, 3)
  config.data.pipeline = 'device'
  assert isinstance(sources.load_from_config(config.data).x_train, np.ndarray)
