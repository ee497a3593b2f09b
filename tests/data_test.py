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
