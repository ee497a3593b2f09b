import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs import each other as `experiments.configs.*`.


def cli_command(workdir, config='experiments/configs/takd_default.py', *overrides):
  return [sys.executable, '-m', 'kdjax.main', f'--config={config}', f'--workdir={workdir}',
          *overrides]


@pytest.fixture(scope='session')
def cli_env(tmp_path_factory):
  """Environment for CLI subprocesses: the repo importable, one shared compilation cache."""
  env = dict(os.environ)
  env['PYTHONPATH'] = REPO + os.pathsep + env.get('PYTHONPATH', '')
  env['KDJAX_TEST_CACHE'] = str(tmp_path_factory.mktemp('xla_cache'))
  return env


def run_cli(env, workdir, config='experiments/configs/takd_default.py', *overrides, **kwargs):
  overrides = (f"--config.compilation_cache_dir={env['KDJAX_TEST_CACHE']}",
               '--config.progress_bar=False', *overrides)
  return subprocess.run(cli_command(workdir, config, *overrides), cwd=REPO, env=env,
                        capture_output=True, text=True, **kwargs)
