"""kdjax as a user installs it from a wheel: a fresh venv outside the repo, a working command.

Building the wheel needs the package registry (pip's isolated build fetches setuptools). The
fresh venv gets the wheel alone (`--no-deps`); its dependencies come from this environment's
site-packages through a `.pth` line, which adds that folder without running its `.pth` files,
so this checkout's editable install is not visible there: `import kdjax` must find the wheel's
copy.
"""

import os
import shutil
import site
import subprocess
import sys

import pytest

from conftest import REPO


def run(command, **kwargs):
  done = subprocess.run(command, capture_output=True, text=True, **kwargs)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return done


@pytest.fixture(scope='module')
def wheel_venv(tmp_path_factory):
  root = tmp_path_factory.mktemp('wheel')
  source = root / 'source'  # a copy without build leftovers of the developer's checkout.
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
      '.git', '.venv*', 'runs', 'build', '*.egg-info', '__pycache__', '.pytest_cache'))
  run([sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--quiet', '-w', str(root / 'dist'),
       str(source)])
  wheels = list((root / 'dist').glob('kdjax-*.whl'))
  assert len(wheels) == 1, wheels
  venv = root / 'venv'
  run([sys.executable, '-m', 'venv', str(venv)])
  python = venv / 'bin' / 'python'
  run([str(python), '-m', 'pip', 'install', '--quiet', '--no-deps', str(wheels[0])])
  packages = run([str(python), '-c', 'import site; print(site.getsitepackages()[0])']).stdout
  with open(os.path.join(packages.strip(), 'kdjax_test_dependencies.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  return venv


def clean_env():
  env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'VIRTUAL_ENV')}
  env['PATH'] = os.pathsep.join(p for p in env['PATH'].split(os.pathsep) if '.venv' not in p)
  return env


def test_the_wheel_gives_a_library_and_a_command(wheel_venv, tmp_path):
  python, command = wheel_venv / 'bin' / 'python', wheel_venv / 'bin' / 'kdjax'
  env = clean_env()
  where = run([str(python), '-c', 'import kdjax, kdjax.losses, kdjax.stage_losses, kdjax.plan; '
               'print(kdjax.__file__)'], cwd=tmp_path, env=env).stdout
  assert str(wheel_venv) in where and REPO not in where, where
  listing = run([str(python), '-m', 'pip', 'show', '--files', 'kdjax'], env=env).stdout
  assert 'kdjax/main.py' in listing and 'experiments' not in listing  # the package alone.
  helped = run([str(command), '--help'], cwd=tmp_path, env=env).stdout
  assert '--workdir' in helped and '--config' in helped and len(helped.splitlines()) < 60
  # A config file of the user's own (here: the default one, copied out of the repo).
  shutil.copy(os.path.join(REPO, 'experiments/configs/takd_default.py'), tmp_path / 'config.py')
  trained = run([str(command), '--config=config.py', '--workdir=run', '--config.train.epochs=1',
                 '--config.progress_bar=False', '--config.compilation_cache_dir='],
                cwd=tmp_path, env=env)
  assert '| takd ' in trained.stdout and (tmp_path / 'run' / 'results.json').exists()
  as_module = run([str(python), '-m', 'kdjax', '--help'], cwd=tmp_path, env=env).stdout
  assert as_module == helped
