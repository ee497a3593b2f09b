"""The end of a run: `results.json`, a markdown table in `results.md`, and a test-accuracy plot."""

import datetime
import json
import os
from typing import Dict, List

import jax

TABLE_COLUMNS = (('stage', 'name'), ('model', 'model'), ('teacher', 'teacher'),
                 ('loss', 'loss'), ('test accuracy (%)', 'test_accuracy'),
                 ('parameters', 'params'), ('wall time (s)', 'wall_s'))


def markdown_table(rows: List[dict]) -> str:
  """One line per stage; accuracy in percent, parameters with thousands separators."""
  cells = [[label for label, _ in TABLE_COLUMNS]]
  for row in rows:
    cells.append([
        row['name'], row['model'], row['teacher'] or '—', row['loss'],
        f"{100 * row['test_accuracy']:.2f}", f"{row['params']:,}", f"{row['wall_s']:.1f}"])
  widths = [max(len(c[i]) for c in cells) for i in range(len(TABLE_COLUMNS))]
  line = lambda c: '| ' + ' | '.join(x.ljust(w) for x, w in zip(c, widths)) + ' |'
  return '\n'.join([line(cells[0]), '|' + '|'.join('-' * (w + 2) for w in widths) + '|',
                    *map(line, cells[1:])])


def write(workdir: str, dataset, rows: List[dict], histories: Dict[str, List[dict]]) -> None:
  meta = {
      'dataset': dataset.name, 'num_train': int(len(dataset.x_train)),
      'num_test': int(len(dataset.x_test)), 'image_shape': list(dataset.image_shape),
      'num_classes': dataset.num_classes, 'devices': [str(d) for d in jax.devices()],
      'jax_version': jax.__version__,
      'finished_at': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }
  with open(os.path.join(workdir, 'results.json'), 'w') as f:
    json.dump({**meta, 'stages': rows}, f, indent=2)
  table = markdown_table(rows)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(f"# Results: {dataset.name}\n\nTest accuracy after the last epoch "
            f"({meta['num_test']} test images), on {', '.join(meta['devices'])}.\n\n{table}\n")
  plot_test_accuracy(histories, os.path.join(workdir, 'test_accuracy.png'))
  print('\n' + table)


def plot_test_accuracy(histories: Dict[str, List[dict]], path: str) -> None:
  import matplotlib  # imported here: only the end of a run draws.
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
  for name, history in histories.items():
    ax.plot([m['epoch'] for m in history], [100 * m['test_accuracy'] for m in history],
            marker='.', label=name)
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy (%)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
