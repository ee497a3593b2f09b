"""`kdjax.report`'s cell helpers against values worked out by hand."""

import numpy as np

from kdjax import report


def test_percent_mean_std_is_percent_mean_and_sample_std():
  # 0.68, 0.70, 0.72 → 70 %; deviations ±2 points, sample variance (4 + 0 + 4) / 2 = 4 → std 2.
  assert report.percent_mean_std([0.68, 0.70, 0.72]) == '70.00 ± 2.00'
  assert report.percent_mean_std([0.6819]) == '68.19'  # one seed: no spread to show.


def test_fit_summary_shows_train_and_mean_test_per_stage_in_order():
  rows = {'nokd': {'train_accuracy': 0.7404, 'test': [0.68, 0.69]},
          'blkd': {'train_accuracy': 0.5, 'test': [0.25]}}
  assert (report.fit_summary(rows, ('blkd', 'nokd'))
          == 'blkd 50.0 % train / 25.0 % test, nokd 74.0 % train / 68.5 % test')


def test_history_array_is_epochs_by_replicas():
  history = [{'test_accuracy': [0.1, 0.2]}, {'test_accuracy': [0.3, 0.4]}]
  np.testing.assert_array_equal(report.history_array(history, 'test_accuracy'),
                                [[0.1, 0.2], [0.3, 0.4]])
  single = [{'test_accuracy': 0.5}, {'test_accuracy': 0.6}]  # no replicas: one column.
  assert report.history_array(single, 'test_accuracy').shape == (2, 1)
