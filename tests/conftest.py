import glob
import hashlib
import os
import subprocess
import sys

import numpy as np
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


def finished_run(env, tmp_path_factory, name, config, *overrides):
  """A completed CLI run in a fresh folder, for module fixtures that read or resume it."""
  workdir = tmp_path_factory.mktemp(name) / 'run'
  done = run_cli(env, workdir, config, *overrides)
  assert done.returncode == 0, done.stderr
  return workdir


def write_npz(path, image_shape=(6, 6, 3), num_train=20, num_test=8, num_classes=3, **changes):
  """A small random dataset in kdjax's npz layout; `changes` replace arrays (None drops one)."""
  rng = np.random.default_rng(0)
  arrays = dict(x_train=rng.integers(0, 256, (num_train, *image_shape), dtype=np.uint8),
                y_train=rng.integers(0, num_classes, num_train),
                x_test=rng.integers(0, 256, (num_test, *image_shape), dtype=np.uint8),
                y_test=rng.integers(0, num_classes, num_test))
  arrays.update(changes)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return str(path)


def numeric_gradient(f, x, eps=1e-5):
  """Central finite differences of a float64 numpy function `f` at `x`."""
  x = np.asarray(x, np.float64)
  grad = np.zeros_like(x)
  for index in np.ndindex(x.shape):
    up, down = x.copy(), x.copy()
    up[index] += eps
    down[index] -= eps
    grad[index] = (f(up) - f(down)) / (2 * eps)
  return grad


def folder_digest(folder):
  """SHA-256 over every file's path and bytes below `folder`."""
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(folder, '**'), recursive=True)):
    if os.path.isfile(path):
      digest.update(path.encode() + open(path, 'rb').read())
  return digest.hexdigest()
