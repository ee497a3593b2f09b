"""`kdjax.report`'s cell helpers against values worked out by hand."""

import numpy as np
import pytest

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


def _row(name, accuracies, seeds=(0, 1, 2)):
  """A results row as `experiment.stage_result` gives it, reduced to what the table reads."""
  return {'name': name, 'model': 'plain_cnn_2', 'teacher': '', 'loss': 'ce',
          'test_accuracy': float(np.mean(accuracies)),
          'test_accuracy_std': float(np.std(accuracies, ddof=1)) if len(accuracies) > 1 else None,
          'replicas': {'seeds': list(seeds), 'test_accuracy': list(accuracies)}
                      if len(accuracies) > 1 else None,
          'test_nontrue_mass': 0.1, 'test_entropy': 0.2, 'params': 3194, 'wall_s': 1.0}


def test_paired_cell_is_the_mean_difference_and_its_t_interval_in_points():
  nokd = _row('nokd', [0.90, 0.91, 0.92])
  # Per-seed differences 1, 2, 3 points: mean 2, sample std 1; t(0.975, 2) = 4.303, so the
  # half-width is 4.303 · 1 / √3 = 2.484 points → [−0.48, +4.48]: within spread.
  blkd = _row('blkd', [0.91, 0.93, 0.95])
  # Differences 2.0, 2.1, 2.2 points: mean 2.1, std 0.1, half-width 0.248 → [+1.85, +2.35].
  takd = _row('takd', [0.920, 0.931, 0.942])
  teacher = _row('teacher', [0.99])  # trained once: nothing to pair.
  other_seeds = _row('other', [0.80, 0.81, 0.82], seeds=(3, 4, 5))
  rows = [teacher, nokd, blkd, takd, other_seeds]
  comparisons = report.paired_vs_baseline(rows, 'nokd')
  assert set(comparisons) == {'blkd', 'takd'}
  assert report.paired_cell(comparisons['blkd']) == '+2.00 [-0.48, +4.48] (n=3)'
  assert report.paired_cell(comparisons['takd']) == '+2.10 [+1.85, +2.35] (n=3)'
  assert (report.paired_vs_baseline(rows, 'blkd')['nokd']['ci95'][1] * 100
          == pytest.approx(-2 + 4.303 / np.sqrt(3), abs=1e-3))
  table = report.markdown_table(rows, 'nokd')
  cells = {line.split('|')[1].strip(): line.split('|')[6].strip()
           for line in table.splitlines()[2:]}
  assert table.splitlines()[0].split('|')[6].strip() == 'vs nokd (points, 95 % CI)'
  assert cells == {'teacher': '—', 'nokd': 'baseline', 'blkd': '+2.00 [-0.48, +4.48] (n=3)',
                   'takd': '+2.10 [+1.85, +2.35] (n=3)', 'other': '—'}
  assert report.paired_verdicts(comparisons, 'nokd').endswith(
      'blkd within spread (3/3 seeds ahead), takd above (3/3 seeds ahead).')


def test_no_baseline_or_an_unpaired_one_gives_no_paired_column():
  rows = [_row('teacher', [0.99]), _row('nokd', [0.90, 0.91, 0.92])]
  assert 'vs ' not in report.markdown_table(rows)
  assert report.markdown_table(rows, 'teacher') == report.markdown_table(rows)  # trained once.


def test_top5_column_follows_the_test_accuracy_only_where_some_stage_has_it():
  with_top5 = dict(_row('student', [0.7]), test_top5_accuracy=0.9123)
  without = _row('teacher', [0.8])
  table = report.markdown_table([without, with_top5]).splitlines()
  assert [c.strip() for c in table[0].split('|')[5:7]] == ['test accuracy (%)',
                                                          'top-5 accuracy (%)']
  assert [c.strip() for c in table[2].split('|')[5:7]] == ['80.00', '—']
  assert [c.strip() for c in table[3].split('|')[5:7]] == ['70.00', '91.23']
  assert 'top-5' not in report.markdown_table([without])
