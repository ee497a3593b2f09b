"""The end of a run: `results.json`, a markdown table in `results.md`, and a test-accuracy plot."""

import datetime
import io
import json
import os
from typing import Dict, List, Sequence

import jax
import numpy as np
from scipy import stats

from kdjax import files

# Everything `write` puts in a workdir (beside `config.json` and `stages/`).
OUTPUT_FILES = ('results.json', 'results.md', 'test_accuracy.png', 'exits_accuracy_vs_macs.png')

TABLE_COLUMNS = (('stage', 'name'), ('model', 'model'), ('teacher', 'teacher'),
                 ('loss', 'loss'), ('test accuracy (%)', 'test_accuracy'),
                 ('non-true mass', 'test_nontrue_mass'), ('entropy (nats)', 'test_entropy'),
                 ('parameters', 'params'), ('wall time (s)', 'wall_s'))


HOLDS, REVERSED, WITHIN = 'holds', 'reversed', 'within spread'
# How a run's table words a paired verdict against its baseline stage.
VERDICT_VS_BASELINE = {HOLDS: 'above', REVERSED: 'below', WITHIN: WITHIN}


def paired_comparison(better: Sequence[float], worse: Sequence[float]) -> dict:
  """Tests "better > worse" on paired values (same seeds, same order); accuracies in [0, 1].

  Returns the differences, their mean and sample std, the 95 % t-interval of the mean, and the
  verdict: `'holds'` (interval above 0), `'reversed'` (below 0) or `'within spread'`.
  """
  better, worse = np.asarray(better, np.float64), np.asarray(worse, np.float64)
  if better.shape != worse.shape or better.ndim != 1:
    raise ValueError(f'paired values must be two equal-length lists, got {better.shape} and '
                     f'{worse.shape}.')
  diffs = better - worse
  n = len(diffs)
  mean = float(diffs.mean())
  if n < 2:
    return {'diffs': diffs.tolist(), 'mean': mean, 'std': None, 'ci95': None, 'n': n,
            'verdict': WITHIN, 'wins': int(np.sum(diffs > 0))}
  std = float(diffs.std(ddof=1))
  half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n))
  low, high = mean - half, mean + half
  verdict = HOLDS if low > 0 else REVERSED if high < 0 else WITHIN
  return {'diffs': diffs.tolist(), 'mean': mean, 'std': std, 'ci95': [low, high], 'n': n,
          'verdict': verdict, 'wins': int(np.sum(diffs > 0))}


def paired_vs_baseline(rows: List[dict], baseline: str) -> Dict[str, dict]:
  """Each stage that shares the baseline stage's seeds, compared with it seed by seed.

  Replicas with the same seeds start from the same initialisation seed and see every batch in
  the same order, so the per-seed differences of last-epoch test accuracy remove most of the
  seed-to-seed spread (`paired_comparison`). Stages trained once, or on other seeds, are left out.
  """
  by_name = {row['name']: row for row in rows}
  base = (by_name.get(baseline) or {}).get('replicas')
  if not base or len(base['seeds']) < 2:
    return {}
  return {row['name']: paired_comparison(row['replicas']['test_accuracy'], base['test_accuracy'])
          for row in rows if row['name'] != baseline and row.get('replicas')
          and list(row['replicas']['seeds']) == list(base['seeds'])}


def paired_cell(comparison: dict) -> str:
  """`+1.23 [+0.40, +2.06] (n=5)`: mean per-seed difference and its 95 % t-interval, points."""
  low, high = (100 * x for x in comparison['ci95'])
  return f"{100 * comparison['mean']:+.2f} [{low:+.2f}, {high:+.2f}] (n={comparison['n']})"


def paired_verdicts(comparisons: Dict[str, dict], baseline: str) -> str:
  """One line: each compared stage above, below or within spread of the baseline."""
  words = [f"{name} {VERDICT_VS_BASELINE[c['verdict']]} ({c['wins']}/{c['n']} seeds ahead)"
           for name, c in comparisons.items()]
  return (f"Paired with {baseline} (same seeds, same batches; 95 % Student-t interval of the "
          f"mean per-seed difference, above or below when it excludes 0): {', '.join(words)}.")


def markdown_table(rows: List[dict], baseline: str = '') -> str:
  """One line per stage; accuracy in percent, parameters with thousands separators.

  Non-true mass (mean probability on wrong classes) and entropy are on the test set: Yang et
  al.'s measures of the secondary information a model passes on when it teaches. Stages trained
  as N replicas show accuracy as mean ± sample standard deviation, the other columns as means.
  With a validation split, the validation accuracy and the test accuracy at the epoch of best
  validation accuracy are added (each replica selects its own epoch). With more than
  `train.TOP5_MIN_CLASSES` classes the top-5 test accuracy follows the test accuracy. With a
  `baseline` stage
  trained as replicas, a column gives each stage on the same seeds its paired difference from it
  (`paired_cell`, test accuracy in points).
  """
  validated = any(row.get('val_accuracy') is not None for row in rows)
  comparisons = paired_vs_baseline(rows, baseline) if baseline else {}
  header = [label for label, _ in TABLE_COLUMNS]
  top5 = any(row.get('test_top5_accuracy') is not None for row in rows)
  extra = (['top-5 accuracy (%)'] if top5 else []) + (
      [f'vs {baseline} (points, 95 % CI)'] if comparisons else []) + (
      ['val accuracy (%)', 'test @ best val epoch (%)'] if validated else [])
  header[5:5] = extra  # after the test accuracy: the paired and validation-selected views.
  # nan_policy 'skip' dropped steps somewhere: how many, per stage (all replicas together).
  skipped = any(row.get('skipped_steps') for row in rows)
  if skipped:
    header.append('skipped steps')
  cells = [header]
  for row in rows:
    line = [row['name'], row['model'],
            row['teacher'] or '—', row['loss'],
            _accuracy_cell(row), f"{row['test_nontrue_mass']:.4f}",
            f"{row['test_entropy']:.4f}", f"{row['params']:,}", f"{row['wall_s']:.1f}"]
    extra = []
    if top5:
      value = row.get('test_top5_accuracy')
      extra.append('—' if value is None else f'{100 * value:.2f}')
    if comparisons:
      extra.append('baseline' if row['name'] == baseline else
                   paired_cell(comparisons[row['name']]) if row['name'] in comparisons else '—')
    if validated:
      extra += [f"{100 * row['val_accuracy']:.2f}",
                f"{100 * row['selected_test_accuracy']:.2f} (epoch {row['selected_epoch']})"]
    line[5:5] = extra
    if skipped:
      line.append(f"{row.get('skipped_steps', 0)}")
    cells.append(line)
  return format_table(cells)


def _accuracy_cell(row: dict) -> str:
  """`99.07` for one model; `99.07 ± 0.58 (n=3)` (mean ± sample std) for replicas."""
  if row.get('replicas'):
    return (f"{100 * row['test_accuracy']:.2f} ± {100 * row['test_accuracy_std']:.2f} "
            f"(n={len(row['replicas']['seeds'])})")
  return f"{100 * row['test_accuracy']:.2f}"


def format_table(cells: List[List[str]]) -> str:
  """A markdown table from a header row and body rows, columns padded to align."""
  widths = [max(len(c[i]) for c in cells) for i in range(len(cells[0]))]
  line = lambda c: '| ' + ' | '.join(x.ljust(w) for x, w in zip(c, widths)) + ' |'
  return '\n'.join([line(cells[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, cells[1:])])


def multi_exit_table(rows: List[dict]) -> str:
  """Stage × exit accuracy, plus the exits' ensemble; empty if no stage has exits."""
  rows = [r for r in rows if r.get('exits')]
  if not rows:
    return ''
  macs = rows[0]['exits']['macs']
  header = ['stage'] + [f'exit {i + 1} ({m / 1e6:.2f}M MACs)' for i, m in enumerate(macs)] + [
      'ensemble']
  body = [[r['name'], *[f'{100 * a:.2f}' for a in r['exits']['test_accuracy']],
           f"{100 * r['exits']['ensemble_test_accuracy']:.2f}"] for r in rows]
  return format_table([header, *body])


def plot_exits(rows: List[dict], path: str) -> None:
  def draw(ax):
    for r in rows:
      if r.get('exits'):
        ax.plot([m / 1e6 for m in r['exits']['macs']],
                [100 * a for a in r['exits']['test_accuracy']], marker='o', label=r['name'])
  save_plot(path, 'MACs per image to reach the exit (millions)', 'test accuracy (%)', draw)


def write(workdir: str, dataset, rows: List[dict], histories: Dict[str, List[dict]],
          baseline: str = '') -> None:
  """Writes the run's outputs; `baseline` (`config.report.baseline`) names the stage the table
  compares the others with, seed by seed ('' for none)."""
  names = [row['name'] for row in rows]
  if baseline and baseline not in names:  # the run is done: say so, and keep its table.
    print(f"kdjax: report.baseline '{baseline}' is not a stage of this run ({', '.join(names)}); "
          'the table has no paired column.')
    baseline = ''
  comparisons = paired_vs_baseline(rows, baseline) if baseline else {}
  meta = {
      'dataset': dataset.name, 'num_train': int(len(dataset.x_train)),
      'num_test': int(len(dataset.x_test)), 'image_shape': list(dataset.image_shape),
      'num_classes': dataset.num_classes, 'devices': [str(d) for d in jax.devices()],
      'jax_version': jax.__version__,
      'finished_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  paired = {'baseline': baseline, 'stages': comparisons}
  _write_results_json(os.path.join(workdir, 'results.json'),
                      {**meta, **({'paired_vs_baseline': paired} if baseline else {}),
                       'stages': rows})
  table = markdown_table(rows, baseline)
  if comparisons:
    table += '\n\n' + paired_verdicts(comparisons, baseline)
  exits_table = multi_exit_table(rows)
  if exits_table:
    table += '\n\nMulti-exit stages, per exit (MACs per image to reach the exit):\n\n' + exits_table
    plot_exits(rows, os.path.join(workdir, 'exits_accuracy_vs_macs.png'))
  files.update_text(os.path.join(workdir, 'results.md'),
                    f"# Results: {dataset.name}\n\nTest accuracy after the last epoch "
                    f"({meta['num_test']} test images), on {', '.join(meta['devices'])}.\n\n"
                    f"{table}\n")
  plot_test_accuracy(histories, os.path.join(workdir, 'test_accuracy.png'))
  print('\n' + table)


def _write_results_json(path: str, results: dict) -> None:
  """Atomically, and only if the results changed: a run reported again with the same results
  keeps the file (and its `finished_at`), so a finished run can be re-reported read-only."""
  text = json.dumps(results, indent=2)
  try:
    with open(path) as f:
      recorded = json.load(f)
    if {**recorded, 'finished_at': None} == {**json.loads(text), 'finished_at': None}:
      return
  except (OSError, ValueError, TypeError):  # none yet, or unreadable: write it.
    pass
  files.update_text(path, text)


def percent_mean_std(values) -> str:
  """Accuracies (fractions) over seeds as `68.19 ± 0.43` (%, sample std); one value alone."""
  values = 100 * np.asarray(values, np.float64)
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{values.mean():.2f} ± {values.std(ddof=1):.2f}'


def fit_summary(rows: Dict[str, dict], names) -> str:
  """How far training got, per stage: `nokd 74.0 % train / 68.2 % test` (last epoch).

  `rows` maps a stage name to its report row: `train_accuracy`, a fraction, and `test`, the
  last-epoch test accuracy of each seed (their mean is shown).
  """
  return ', '.join(f"{name} {100 * rows[name]['train_accuracy']:.1f} % train / "
                   f"{100 * np.mean(rows[name]['test']):.1f} % test" for name in names)


def history_array(history: List[dict], key: str) -> np.ndarray:
  """One metric over a stage's epochs as `[epochs, replicas]` (one column without replicas)."""
  return np.array([np.atleast_1d(m[key]) for m in history], np.float64)


def plot_test_accuracy(histories: Dict[str, List[dict]], path: str) -> None:
  """Test accuracy per epoch; for replicas, the mean with a band of ± one standard deviation."""
  def draw(ax):
    for name, history in histories.items():
      epochs = [m['epoch'] for m in history]
      accuracy = 100 * history_array(history, 'test_accuracy')
      lines = ax.plot(epochs, accuracy.mean(axis=1), marker='.', label=name)
      if accuracy.shape[1] > 1:
        spread = accuracy.std(axis=1, ddof=1)
        ax.fill_between(epochs, accuracy.mean(axis=1) - spread, accuracy.mean(axis=1) + spread,
                        color=lines[0].get_color(), alpha=0.2)
  save_plot(path, 'epoch', 'test accuracy (%)', draw)


def save_plot(path: str, xlabel: str, ylabel: str, draw, figsize=(6.4, 4.0)) -> None:
  """One-axes figure: `draw(ax)` plots, then labels, a grid and the legend (if any) are added."""
  import matplotlib  # imported here: only the end of a run draws.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=figsize, dpi=120)
  draw(ax)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if ax.get_legend_handles_labels()[1]:
    ax.legend()
  fig.tight_layout()
  # Rendered in memory and written only if the bytes differ (`files.update_bytes`); without the
  # matplotlib version in the metadata, the same data gives the same bytes.
  kind = os.path.splitext(path)[1].lstrip('.').lower() or 'png'
  image = io.BytesIO()
  fig.savefig(image, format=kind, metadata={'Software': None} if kind == 'png' else None)
  plt.close(fig)
  files.update_bytes(path, image.getvalue())
