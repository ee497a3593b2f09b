"""The reproduction report: paired statistics against hand-computed values, and a real tiny run."""

import glob
import json
import os
import types

import numpy as np
import pytest
from scipy import stats

from conftest import REPO, finished_run
from experiments import repro_report

TINY = 'tests/configs/tiny_chain.py'


def test_t_quantiles_are_the_tabulated_ones():
  # Student's t, two-sided 95 %, from any printed table.
  for df, tabulated in ((1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262)):
    assert abs(stats.t.ppf(0.975, df) - tabulated) < 1e-3


@pytest.mark.parametrize('better,worse,verdict', [
    # d = (1, 2, 3) points: mean 2, std 1, half-width 4.303 / √3 = 2.484 → [−0.48, 4.48].
    ([0.71, 0.72, 0.73], [0.70, 0.70, 0.70], 'within spread'),
    # d = (1.0, 1.1, 1.2) points: mean 1.1, std 0.1, half-width 0.248 → [0.85, 1.35].
    ([0.710, 0.711, 0.712], [0.70, 0.70, 0.70], 'holds'),
    ([0.70, 0.70, 0.70], [0.710, 0.711, 0.712], 'reversed'),
])
def test_paired_comparison_matches_hand_computation(better, worse, verdict):
  got = repro_report.paired_comparison(better, worse)
  diffs = np.subtract(better, worse)
  half = {3: 4.303}[len(diffs)] * diffs.std(ddof=1) / np.sqrt(3)
  np.testing.assert_allclose(got['diffs'], diffs, atol=1e-12)
  np.testing.assert_allclose(got['mean'], diffs.mean(), atol=1e-12)
  np.testing.assert_allclose(got['ci95'], [diffs.mean() - half, diffs.mean() + half], atol=1e-5)
  assert got['verdict'] == verdict and got['n'] == 3
  assert got['wins'] == int(np.sum(diffs > 0))


def test_paired_comparison_refuses_unpaired_lists():
  with pytest.raises(ValueError, match='equal-length'):
    repro_report.paired_comparison([0.1, 0.2], [0.1, 0.2, 0.3])


@pytest.fixture(scope='module')
def validated_run(cli_env, tmp_path_factory):
  return finished_run(cli_env, tmp_path_factory, 'repro', TINY, '--config.num_replicas=3',
                      '--config.data.validation_size=300', '--config.train.epochs=2')


def test_report_of_a_real_run(validated_run, tmp_path):
  config_module = types.ModuleType('tiny_repro')
  config_module.__doc__ = 'Tiny reproduction.\n\nSetup text.'
  config_module.paper = lambda: {
      'source': 'nowhere', 'rows': {'student': 50.0},
      'claims': [('student beats teacher', [('student', 'teacher')]),
                 ('best on val beats teacher', [({'best_on_val': ['teacher', 'student']},
                                                 'student')])]}
  report = repro_report.build_report(config_module, str(validated_run), 'cmd', 'report cmd')
  results = json.loads((validated_run / 'results.json').read_text())['stages']
  rows = {r['name']: r for r in report['rows']}
  for result in results:
    assert rows[result['name']]['test'] == result['replicas']['test_accuracy']
    assert rows[result['name']]['seeds'] == [0, 1, 2]
    np.testing.assert_allclose(np.mean(rows[result['name']]['test_at_best_val']),
                               result['selected_test_accuracy'], rtol=1e-6)
  first = report['claims'][0]['comparisons'][0]
  np.testing.assert_allclose(first['diffs'], np.subtract(rows['student']['test'],
                                                         rows['teacher']['test']), atol=1e-12)
  chosen = max(('teacher', 'student'), key=lambda n: np.mean(rows[n]['val']))
  assert report['claims'][1]['comparisons'][0]['better'] == chosen
  repro_report.write(report, str(tmp_path))
  markdown = (tmp_path / 'results.md').read_text()
  assert '| student > teacher |' in markdown and '50.00' in markdown
  assert (tmp_path / 'accuracy.png').stat().st_size > 1000
  assert json.loads((tmp_path / 'results.json').read_text())['run']['command'] == 'cmd'


def test_report_of_a_multi_exit_run(cli_env, tmp_path_factory, tmp_path):
  run = finished_run(cli_env, tmp_path_factory, 'repro_mate', 'tests/configs/tiny_mate.py',
                     '--config.num_replicas=2', '--config.data.validation_size=300',
                     '--config.train.epochs=1')
  config_module = types.ModuleType('tiny_mate_repro')
  config_module.__doc__ = 'Tiny MATE reproduction.\n\nSetup.'
  config_module.paper = lambda: {'source': 'nowhere', 'rows': {}, 'claims': [
      ('gain shallow > gain deep', [({'gain': ('mate', 'byot', 1)},
                                     {'gain': ('mate', 'byot', 3)})])]}
  report = repro_report.build_report(config_module, str(run), 'cmd', 'report cmd')
  rows = {r['name']: r for r in report['rows']}
  last = {}
  for stage in ('mate', 'byot'):
    with open(run / 'stages' / stage / 'metrics.jsonl') as f:
      last[stage] = np.array(json.loads(f.readlines()[-1])['test_accuracy_exits'])  # [R, E]
    for i in range(3):
      np.testing.assert_allclose(rows[f'{stage}@exit{i + 1}']['test'], last[stage][:, i])
  comparison = report['claims'][0]['comparisons'][0]
  gain = last['mate'] - last['byot']
  np.testing.assert_allclose(comparison['diffs'], gain[:, 0] - gain[:, 2], atol=1e-12)
  repro_report.write(report, str(tmp_path))
  page = (tmp_path / 'results.md').read_text()
  exit_rows = [line for line in page.splitlines()  # the per-exit table: stage + 3 exits.
               if line.startswith('| mate ') and line.count('|') == 5]
  assert len(exit_rows) == 1
  assert f'{100 * last["mate"][:, 0].mean():.2f} ± ' in exit_rows[0].split('|')[2]


@pytest.mark.parametrize('folder', sorted(
    glob.glob(os.path.join(REPO, 'experiments', 'results', 'repro_*'))))
def test_committed_reproductions_are_their_json_rendered(folder):
  # The page is the JSON rendered, and every verdict follows from the per-seed values kept.
  report = json.loads(open(os.path.join(folder, 'results.json')).read())
  assert open(os.path.join(folder, 'results.md')).read() == repro_report.render_markdown(report)
  rows = {r['name']: r for r in report['rows']}
  for claim in report['claims']:
    for c in claim['comparisons']:
      again = repro_report.paired_comparison(rows[c['better']]['test'], rows[c['worse']]['test'])
      assert again['verdict'] == c['verdict']
      np.testing.assert_allclose(again['diffs'], c['diffs'])
  assert os.path.getsize(os.path.join(folder, 'accuracy.png')) > 1000
  assert {'command', 'machine', 'versions', 'wall_s', 'seeds'} <= set(report['run'])
