"""Turns a finished reproduction run into its committed folder `experiments/results/<name>/`.

  python experiments/repro_report.py --config=experiments/configs/repro_takd_cifar10_cnn.py \
      --workdir=runs/repro_takd_cifar10_cnn --out=experiments/results/repro_takd_cifar10_cnn \
      --command='python -m kdjax.main --config=... --workdir=... --config.data.npz=...'

Reads the run's `results.json` and each stage's `metrics.jsonl` (per-replica accuracies) and the
config module's `paper()` (the paper's numbers and claims). Writes `results.json`, `results.md`
(our table beside the paper's, every claim with its paired comparison) and `accuracy.png`.

Statistics (no selection ever looks at the test set):
  * a row's accuracy is the last epoch's test accuracy, mean ± sample std over its replicas (seeds);
    "test @ best val" is each replica's test accuracy at its best validation epoch;
  * `{'best_on_val': [stages]}` in a claim stands for the stage of that list with the highest mean
    last-epoch validation accuracy (a hyper-parameter choice made on validation data);
  * a claim "A > B" is tested on paired differences d_r = acc_A(seed r) − acc_B(seed r): rows
    that share seeds share the initialisation seed and every batch. The verdict is "holds" when
    the 95 % t-interval of the mean difference lies above 0, "reversed" when it lies below 0,
    and "within spread" otherwise (with the sign of the mean said).
"""

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
from typing import Dict, List

import numpy as np

from kdjax import experiment, report as run_report
# One paired test for the reproductions and every run's own table.
from kdjax.report import HOLDS, REVERSED, WITHIN, paired_comparison


def load_run(workdir: str) -> dict:
  """The finished run's `results.json`."""
  with open(os.path.join(workdir, 'results.json')) as f:
    return json.load(f)


def stage_rows(workdir: str, run: dict) -> Dict[str, dict]:
  """Per stage: seeds, last-epoch test/val accuracy and test @ best val, one value per replica."""
  rows = {}
  for result in run['stages']:
    name = result['name']
    history = experiment.read_metrics(os.path.join(workdir, 'stages', name, 'metrics.jsonl'))
    test = run_report.history_array(history, 'test_accuracy')
    val = run_report.history_array(history, 'val_accuracy')
    seeds = (result['replicas'] or {}).get('seeds') or [run.get('seed', 0)]
    base = {'model': result['model'], 'teacher': result['teacher'], 'loss': result['loss'],
            'seeds': seeds, 'epochs': len(history), 'wall_s': result['wall_s'],
            # The last epoch's running mean over its (augmented) training batches, all replicas.
            'train_accuracy': float(np.mean(history[-1]['train_accuracy']))}
    rows[name] = {'name': name, **base, **_accuracies(val, test)}
    if 'test_accuracy_exits' in history[-1]:  # `[replicas, E]` (or `[E]`) per epoch.
      exits_of = lambda key: np.array([np.reshape(m[key], (-1, np.shape(m[key])[-1]))
                                       for m in history], np.float64)  # [epochs, R, E]
      test_exits, val_exits = exits_of('test_accuracy_exits'), exits_of('val_accuracy_exits')
      for i in range(test_exits.shape[-1]):
        exit_name = f'{name}@exit{i + 1}'
        rows[exit_name] = {'name': exit_name, **base, 'exit_of': name, 'exit': i + 1,
                           **_accuracies(val_exits[..., i], test_exits[..., i])}
  return rows


def _accuracies(val: np.ndarray, test: np.ndarray) -> dict:
  """`[epochs, replicas]` histories → last-epoch and validation-selected values per replica."""
  return {'test': test[-1].tolist(), 'val': val[-1].tolist(),
          'test_at_best_val': experiment.accuracy_at_best_validation(val, test)[1].tolist(),
          'test_curve': test.mean(axis=1).tolist()}


def resolve(spec, rows: Dict[str, dict]) -> str:
  """The row a claim means, by name (added to `rows` if derived).

  `'name'` or `'stage@exitN'`: that row. `{'best_on_val': [names]}`: the one with the best mean
  validation accuracy. `{'gain': (a, b, n)}`: per seed, exit n of stage a minus exit n of b.
  """
  if isinstance(spec, str):
    if spec not in rows:
      raise KeyError(f"claim names stage '{spec}', which the run does not have.")
    return spec
  if 'gain' in spec:
    a, b, n = spec['gain']
    better, worse = rows[resolve(f'{a}@exit{n}', rows)], rows[resolve(f'{b}@exit{n}', rows)]
    name = f'gain {a} − {b} @exit{n}'
    rows[name] = {'name': name, 'seeds': better['seeds'], 'derived': True, **{
        key: (np.subtract(better[key], worse[key])).tolist()
        for key in ('test', 'val', 'test_at_best_val')}}
    return name
  candidates = spec['best_on_val']
  return max(candidates, key=lambda name: (np.mean(rows[name]['val']), -candidates.index(name)))


def evaluate_claims(claims, rows: Dict[str, dict]) -> List[dict]:
  """Every claim's pairwise comparisons; a claim holds only if each of its comparisons does."""
  out = []
  for text, pairs in claims:
    comparisons = []
    for better_spec, worse_spec in pairs:
      better, worse = resolve(better_spec, rows), resolve(worse_spec, rows)
      if rows[better]['seeds'] != rows[worse]['seeds']:
        raise ValueError(f"'{better}' and '{worse}' do not share seeds; they cannot be paired.")
      comparison = paired_comparison(rows[better]['test'], rows[worse]['test'])
      comparison['selected'] = paired_comparison(rows[better]['test_at_best_val'],
                                                 rows[worse]['test_at_best_val'])
      comparisons.append({'better': better, 'worse': worse, **comparison})
    verdicts = {c['verdict'] for c in comparisons}
    verdict = HOLDS if verdicts == {HOLDS} else REVERSED if REVERSED in verdicts else WITHIN
    out.append({'claim': text, 'verdict': verdict, 'comparisons': comparisons})
  return out


def _verdict_words(comparison) -> str:
  if comparison['verdict'] != WITHIN:
    return comparison['verdict']
  side = 'ahead' if comparison['mean'] > 0 else 'behind'
  return f"within spread ({side} on average)"


def _fence_indented(text: str) -> str:
  """A docstring as Markdown: its indented blocks (stage lists, commands) in code fences."""
  out, block = [], []
  for line in text.splitlines() + ['']:
    if line.startswith('  '):
      block.append(line[2:])
      continue
    if block:
      out += ['```text', *block, '```']
      block = []
    out.append(line)
  return '\n'.join(out).strip()


def render_markdown(report: dict) -> str:
  rows, claims = report['rows'], report['claims']
  paper_rows = report['paper']['rows']
  pct = run_report.percent_mean_std
  lines = [f"# {report['title']}", '', _fence_indented(report['setup'].strip()), '',
           f"Paper: {report['paper']['source']}.", '',
           '## Results', '',
           'Test accuracy (%) after the last epoch, mean ± sample std over seeds (n = seeds); '
           '"test @ best val" is each seed\'s test accuracy at its best validation epoch.', '']
  table = [['stage', 'model', 'teacher', 'seeds', 'test (last epoch)', 'test @ best val',
            'paper']]
  for row in rows:
    if not row.get('exit_of') and not row.get('derived'):
      paper = paper_rows.get(row['name'])
      table.append([row['name'], row['model'], row['teacher'] or '—', str(len(row['seeds'])),
                    pct(row['test']), pct(row['test_at_best_val']),
                    '' if paper is None else f'{paper:.2f}'])
  lines.append(run_report.format_table(table))
  exits = {}
  for r in rows:
    if r.get('exit_of'):
      exits.setdefault(r['exit_of'], []).append(r)
  if exits:
    n_exits = max(len(v) for v in exits.values())
    lines += ['', 'Per exit: test accuracy (%) after the last epoch, mean ± std over seeds '
              '(test @ best val in brackets):', '']
    table = [['stage', *(f'exit {i + 1}' for i in range(n_exits))]]
    for stage, exit_rows in exits.items():
      table.append([stage, *(f"{pct(r['test'])} ({pct(r['test_at_best_val'])})"
                             for r in exit_rows)])
    lines.append(run_report.format_table(table))
  lines += ['', '## Claims', '',
            'Paired differences A − B in test accuracy points over the shared seeds: mean ± '
            'std, the 95 % t-interval, and how many seeds A wins. "holds" = the interval lies '
            'above 0; "reversed" = below 0; otherwise the difference is within the seed spread.',
            '']
  table = [['claim', 'A > B', 'A − B (last epoch)', '95 % interval', 'wins', 'verdict',
            'A − B (test @ best val)']]
  for claim in claims:
    for i, c in enumerate(claim['comparisons']):
      interval = (f"[{100 * c['ci95'][0]:+.2f}, {100 * c['ci95'][1]:+.2f}]"
                  if c['ci95'] else '—')
      std = f" ± {100 * c['std']:.2f}" if c['std'] is not None else ''
      selected = c['selected']
      table.append([claim['claim'] if i == 0 else '', f"{c['better']} > {c['worse']}",
                    f"{100 * c['mean']:+.2f}{std}", interval, f"{c['wins']}/{c['n']}",
                    _verdict_words(c),
                    f"{100 * selected['mean']:+.2f} ({_verdict_words(selected)})"])
  lines.append(run_report.format_table(table))
  if report.get('extra'):
    lines += ['', report['extra'].strip()]
  lines += ['', '## Summary', '']
  for claim in claims:
    lines.append(f"- {claim['claim']}: **{claim['verdict']}**.")
  run = report['run']
  lines += ['', '## How this was produced', '', f"- Command: `{run['command']}`",
            f"- Report: `{run['report_command']}`",
            f"- Machine: {run['machine']}", f"- Versions: {run['versions']}",
            f"- Wall time (sum of stages): {run['wall_s'] / 60:.1f} min",
            f"- Seeds: {run['seeds']}", f"- Finished: {run['finished_at']}", '']
  return '\n'.join(lines)


def plot(rows: List[dict], paper_rows: dict, path: str) -> None:
  """Each stage's last-epoch test accuracy per seed (dots), mean ± std (bar), paper (cross)."""
  rows = [r for r in rows if not r.get('derived')]

  def draw(ax):
    for y, row in enumerate(rows):
      values = 100 * np.asarray(row['test'])
      ax.scatter(values, [y] * len(values), s=12, color='tab:blue', alpha=0.6, zorder=3)
      if len(values) > 1:
        ax.errorbar(values.mean(), y, xerr=values.std(ddof=1), fmt='o', color='tab:blue',
                    capsize=3, zorder=4)
      if row['name'] in paper_rows:
        ax.scatter(paper_rows[row['name']], y, marker='x', s=40, color='tab:red', zorder=5,
                   label='paper' if 'paper' not in ax.get_legend_handles_labels()[1] else None)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([r['name'] for r in rows])
    ax.invert_yaxis()

  run_report.save_plot(path, 'test accuracy after the last epoch (%): seeds (dots), mean ± std',
                       '', draw, figsize=(7.0, 0.32 * len(rows) + 1.2))


def machine_and_versions() -> tuple:
  import flax
  import jax
  import optax
  cpu = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  machine = f'{os.cpu_count()} × {cpu}, {platform.system()}, devices {jax.devices()}'
  versions = (f'Python {platform.python_version()}, jax {jax.__version__}, flax {flax.__version__},'
              f' optax {optax.__version__}, numpy {np.__version__}')
  return machine, versions


def build_report(config_module, workdir: str, command: str, report_command: str) -> dict:
  run = load_run(workdir)
  rows = stage_rows(workdir, run)
  reference = config_module.paper()
  machine, versions = machine_and_versions()
  seeds = sorted({s for row in rows.values() for s in row['seeds']})
  wall_s = float(sum(r['wall_s'] for r in rows.values() if 'exit_of' not in r))
  return {
      'title': (config_module.__doc__ or '').strip().splitlines()[0],
      'setup': '\n'.join((config_module.__doc__ or '').strip().splitlines()[1:]),
      'paper': {'source': reference['source'], 'rows': reference['rows']},
      'claims': evaluate_claims(reference['claims'], rows),  # may add derived rows.
      'rows': list(rows.values()),
      # A config may add its own section (a grid table, say): `extra_markdown(rows)`.
      'extra': (config_module.extra_markdown(rows)
                if hasattr(config_module, 'extra_markdown') else ''),
      'run': {'command': command, 'report_command': report_command, 'machine': machine,
              'versions': versions, 'wall_s': wall_s,
              'seeds': seeds, 'finished_at': run.get('finished_at'),
              'dataset': run.get('dataset'), 'num_train': run.get('num_train'),
              'num_test': run.get('num_test')},
  }


def write(report: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(render_markdown(report))
  plot(report['rows'], report['paper']['rows'], os.path.join(out, 'accuracy.png'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', required=True, help='the reproduction config file')
  parser.add_argument('--workdir', required=True, help='the finished run folder')
  parser.add_argument('--out', required=True, help='experiments/results/<name>')
  parser.add_argument('--command', required=True, help='the command that made the run')
  args = parser.parse_args(argv)
  module_name = os.path.splitext(os.path.normpath(args.config))[0].replace(os.sep, '.')
  config_module = importlib.import_module(module_name)
  report_command = 'python ' + shlex.join(sys.argv if argv is None else ['repro_report', *argv])
  report = build_report(config_module, args.workdir, args.command, report_command)
  write(report, args.out)
  print(render_markdown(report))
  print(f"written {args.out} at {datetime.datetime.now().isoformat(timespec='seconds')}")


if __name__ == '__main__':
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  main()
