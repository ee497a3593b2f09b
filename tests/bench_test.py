"""The committed benchmark tables are their committed JSON, rendered (no PyTorch needed)."""

import importlib.util
import json
import os

import pytest

from conftest import REPO

BENCH = os.path.join(REPO, 'experiments', 'bench')


def load_bench(name='bench'):
  """`experiments/bench/<name>.py` as a module (the folder is not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCH, f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_committed_results_md_is_rendered_from_results_json(tmp_path):
  with open(os.path.join(BENCH, 'results.json')) as f:
    result = json.load(f)
  required = {'pair', 'group', 'framework', 'variant', 'batch', 'images_per_s', 'compile_s',
              'peak_mib'}
  assert result['rows'] and all(required <= set(row) for row in result['rows'])
  assert {'machine', 'versions', 'date', 'command', 'wall_s'} <= set(result)
  load_bench().write_markdown(tmp_path / 'results.md', result)
  with open(os.path.join(BENCH, 'results.md')) as f:
    assert f.read() == (tmp_path / 'results.md').read_text()


def test_committed_processes_md_is_rendered_from_processes_json(tmp_path):
  module = load_bench('processes')
  with open(os.path.join(BENCH, 'processes.json')) as f:
    result = json.load(f)
  assert [(r['processes'], r['devices_per_process']) for r in result['rows']] == [(1, 2), (2, 1)]
  assert {'machine', 'versions', 'date', 'command', 'wall_s'} <= set(result)
  module.write_markdown(tmp_path / 'processes.md', result)
  with open(os.path.join(BENCH, 'processes.md')) as f:
    assert f.read() == (tmp_path / 'processes.md').read_text()


def test_committed_streaming_md_is_rendered_from_streaming_json(tmp_path):
  module = load_bench('streaming')
  with open(os.path.join(BENCH, 'streaming.json')) as f:
    result = json.load(f)
  assert {'machine', 'versions', 'date', 'kdjax', 'command', 'load_average', 'wall_s',
          'host_batch', 'summary', 'runs'} <= set(result)
  # Every workload ran both pipelines in every round, taking turns.
  for name in {r['workload'] for r in result['runs']}:
    pipelines = [r['pipeline'] for r in result['runs'] if r['workload'] == name]
    assert pipelines == ['device', 'stream'] * result['rounds']
  for line in result['summary']:
    assert line['ratio'] == line['stream_images_per_s'] / line['device_images_per_s']
    if 'target' in line:
      assert line['met'] == (line['ratio'] >= line['target'])
  module.write_markdown(tmp_path / 'streaming.md', result)
  with open(os.path.join(BENCH, 'streaming.md')) as f:
    assert f.read() == (tmp_path / 'streaming.md').read_text()


@pytest.mark.parametrize('name', ['workload', 'workload_newest_jax'])
def test_committed_workload_md_is_rendered_from_workload_json(tmp_path, name):
  module = load_bench('workload')
  with open(os.path.join(BENCH, f'{name}.json')) as f:
    result = json.load(f)
  # The summary is what the runs say: speed-ups are the wall-time ratios, verdicts the checks.
  assert result['summary'] == json.loads(json.dumps(module.summarise(result['runs'])))
  module.write_markdown(tmp_path / f'{name}.md', result)
  with open(os.path.join(BENCH, f'{name}.md')) as f:
    assert f.read() == (tmp_path / f'{name}.md').read_text()


def test_committed_programs_md_is_rendered_from_programs_json(tmp_path):
  module = load_bench('programs')
  with open(os.path.join(BENCH, 'programs.json')) as f:
    result = json.load(f)
  assert {'0.10.2'} <= set(result)  # the lowest supported JAX, and the newest beside it.
  module.write_markdown(tmp_path / 'programs.md', result)
  with open(os.path.join(BENCH, 'programs.md')) as f:
    assert f.read() == (tmp_path / 'programs.md').read_text()
