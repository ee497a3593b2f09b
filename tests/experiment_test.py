"""The command line end to end: a chain runs, resumes after SIGKILL, and refuses bad input."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, cli_command, finished_run, folder_digest, run_cli, write_npz
from experiments.configs import takd_default
from kdjax import experiment
from kdjax.errors import KdjaxError
from kdjax.main import malloc_huge_pages_env

TINY = 'tests/configs/tiny_chain.py'


def test_chain_runs_writes_results_and_skips_finished_stages(cli_env, tmp_path):
  workdir = tmp_path / 'run'
  done = run_cli(cli_env, workdir, TINY, '--config.train.epochs=2')
  assert done.returncode == 0, done.stderr
  results = json.loads((workdir / 'results.json').read_text())
  assert [s['name'] for s in results['stages']] == ['teacher', 'student']
  student = results['stages'][1]
  assert student['teacher'] == 'teacher' and student['loss'] == 'kd'
  assert 0.0 <= student['test_accuracy'] <= 1.0 and student['params'] == 3194
  table = (workdir / 'results.md').read_text()
  assert '| student' in table and 'test accuracy (%)' in table
  assert (workdir / 'test_accuracy.png').stat().st_size > 1000
  metrics = [json.loads(l) for l in (workdir / 'stages/teacher/metrics.jsonl').read_text()
             .splitlines()]
  assert [m['epoch'] for m in metrics] == [1, 2]
  assert {'train_loss', 'test_accuracy', 'learning_rate', 'images_per_s'} <= set(metrics[0])

  again = run_cli(cli_env, workdir, TINY, '--config.train.epochs=2')
  assert again.returncode == 0, again.stderr
  assert again.stdout.count('not retrained') == 2


def test_sigkill_mid_stage_resumes_from_last_checkpoint(cli_env, tmp_path):
  workdir = tmp_path / 'killed'
  overrides = (f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}",)
  process = subprocess.Popen(cli_command(workdir, TINY, *overrides), cwd=REPO, env=cli_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / 'stages' / 'teacher' / 'checkpoints'
  deadline = time.time() + 120
  while time.time() < deadline:
    steps = [int(p.name) for p in checkpoints.glob('*') if p.name.isdigit()] \
        if checkpoints.exists() else []
    if steps and max(steps) >= 20:
      break
    time.sleep(0.05)
  else:
    process.kill()
    pytest.fail('the run wrote no checkpoint within 120 s')
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (workdir / 'results.json').exists()  # really killed mid-run.

  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  line = next(l for l in resumed.stdout.splitlines() if l.startswith('[teacher] resuming'))
  assert int(line.split('step ')[1].split()[0]) >= 20
  metrics = [json.loads(l) for l in (workdir / 'stages/teacher/metrics.jsonl').read_text()
             .splitlines()]
  assert [m['epoch'] for m in metrics] == [1, 2, 3, 4, 5, 6]  # no epoch repeated or lost.
  results = json.loads((workdir / 'results.json').read_text())
  assert [s['name'] for s in results['stages']] == ['teacher', 'student']


def bad_npz(tmp_path, **changes):
  path = write_npz(tmp_path / 'data.npz', image_shape=(8, 8, 1), num_train=64, num_test=16,
                   num_classes=10, **changes)
  return ('data.npz', path)


def student_named(name):
  """The tiny chain with its student stage named `name`."""
  return [('stages', {'teacher': takd_default.stage('plain_cnn_4'),
                      name: takd_default.stage('plain_cnn_2', 'kd', teacher='teacher')}),
          ('stage_order', ('teacher', name))]


def corrupt_npz(tmp_path):
  path = tmp_path / 'corrupt.npz'
  path.write_bytes(b'PK\x03\x04 this is not really a zip archive')
  return ('data.npz', str(path))


# (what to change in the tiny teacher → student config: `(dotted key, value)` pairs, what the
# message must say). `experiment.run` must refuse each with a one-paragraph `KdjaxError` before it
# writes anything: an existing run folder stays exactly as it was.
BAD_INPUTS = {
    # Config values.
    'unknown model': (lambda p: [('stages.teacher.model', 'resnet9')], "unknown model 'resnet9'"),
    'unknown user model': (lambda p: [('stages.teacher.model', 'no_such_package.nets:TinyNet')],
                           'no_such_package'),
    'epochs zero': (lambda p: [('train.epochs', 0)], 'epochs must be an integer >= 1'),
    'negative lr': (lambda p: [('train.learning_rate', -0.1)], 'learning_rate must be > 0'),
    'momentum': (lambda p: [('train.momentum', 1.5)], r'momentum must lie in \[0, 1\)'),
    'lr boundaries': (lambda p: [('train.lr_boundaries', (0.5, 1.5))], 'lr_boundaries'),
    'lr schedule': (lambda p: [('train.lr_schedule', 'linear')], "unknown lr_schedule"),
    'nan policy': (lambda p: [('train.nan_policy', 'ignore')], 'nan_policy must be'),
    'temperature': (lambda p: [('losses.kd.temperature', 0.0)], 'temperature must be > 0'),
    'kd_weight': (lambda p: [('losses.kd.kd_weight', 1.5)], r'kd_weight must lie in \[0, 1\]'),
    'stage temperature': (lambda p: [('stages.student.loss_kw', {'temperature': -1.0})],
                          "stage 'student': temperature must be > 0"),
    'unknown loss setting': (lambda p: [('stages.student.loss_kw', {'temprature': 2.0})],
                             "loss 'kd' has no setting 'temprature'"),
    'num_replicas': (lambda p: [('num_replicas', 0)], 'num_replicas must be an integer >= 1'),
    'stage num_replicas': (lambda p: [('stages.teacher.num_replicas', -1)],
                           "stage 'teacher': num_replicas must be an integer >= 1, or 0"),
    'replica batching': (lambda p: [('replica_batching', 'pmap')],
                         "unknown replica_batching 'pmap'; choose one of: auto, vmap, unroll"),
    'conv': (lambda p: [('model.conv', 'im2col')],
             "unknown conv 'im2col'; choose one of: xla, matmul_dw"),
    'validation size': (lambda p: [('data.validation_size', 5000)],
                        r'validation_size must be an integer in \[0, 1438\)'),
    'teacher dtype': (lambda p: [('teacher_source.dtype', 'float16')],
                      "unknown teacher_source.dtype 'float16'; choose one of: float32, bfloat16"),
    'eta': (lambda p: [('losses.kd.eta', -0.2)], r'eta must lie in \[0, 1\]'),
    'noise alpha': (lambda p: [('losses.noisy_l2.noise_alpha', 2.0)], 'noise_alpha must lie'),
    'noise sigma': (lambda p: [('losses.noisy_l2.noise_sigma', -1.0)],
                    'noise_sigma must be >= 0'),
    'teacher replica': (lambda p: [('teacher_source.replica', 'own')],
                        "unknown teacher_source.replica 'own'; choose one of: first, matching"),
    'noise on': (lambda p: [('losses.noisy_l2.noise_on', 'both')],
                 "unknown noise_on 'both'; choose one of: teacher, student"),
    'primary weight': (lambda p: [('losses.mate.primary_weight', 0.0)],
                       'primary_weight must lie'),
    'tsd k vs classes': (lambda p: [('losses.kd.eta', 0.5), ('losses.kd.tsd_k', 10)],
                         'tsd_k = 10 needs more than 10 classes'),
    'batch larger than data': (lambda p: [('train.batch_size', 5000)],
                               'exceeds the 1438 training images'),
    'input too small': (lambda p: [('stages.teacher.model', 'plain_cnn_10')], 'input too small'),
    # Stage chains.
    'teacher not earlier': (lambda p: [('stage_order', ('student', 'teacher'))],
                            'not an earlier stage'),
    'unknown teacher': (lambda p: [('stages.student.teacher', 'ghost')],
                        "teacher 'ghost' is not a stage"),
    'kd without teacher': (lambda p: [('stages.student.teacher', '')],
                           "uses loss 'kd' but names no teacher"),
    'ce with teacher': (lambda p: [('stages.student.loss', 'ce')], "its loss 'ce' ignores it"),
    'unknown loss': (lambda p: [('stages.student.loss', 'hinton')], "unknown loss 'hinton'"),
    'multi-exit mismatch': (lambda p: [('stages.teacher.model', 'multi_exit_resnet8')],
                            'multi-exit'),
    'stage order incomplete': (lambda p: [('stage_order', ('teacher',))],
                               'must list every stage exactly once'),
    'teacher and teachers': (lambda p: [('stages.student.teachers', {'teacher': 1.0})],
                             "sets both teacher 'teacher' and teachers"),
    'own teacher': (lambda p: [('stages.student.teacher', ''),
                               ('stages.student.teachers', {'teacher': 0.5, 'student': 0.5})],
                    "is its own teacher"),
    'several teachers for kd': (lambda p: [('stages.extra', takd_default.stage('plain_cnn_2')),
                                           ('stage_order', ('teacher', 'extra', 'student')),
                                           ('stages.student.teacher', ''),
                                           ('stages.student.teachers',
                                            {'teacher': 0.5, 'extra': 0.5})],
                                "names 2 teachers but loss 'kd' learns from one"),
    'teacher weight': (lambda p: [('stages.student.teacher', ''),
                                  ('stages.student.loss', 'multi_teacher_kd'),
                                  ('stages.student.teachers', {'teacher': -1.0})],
                       'teacher weights must be numbers > 0'),
    'max_skipped_fraction': (lambda p: [('max_skipped_fraction', 1.5)],
                             r'max_skipped_fraction must be a number in \[0, 1\].*got 1.5'),
    # Stage names: a stage writes only inside its own folder of the workdir.
    'stage name an absolute path': (lambda p: student_named(f'{p}/outside'),
                                    'cannot be a folder name inside the workdir'),
    'stage name with a separator': (lambda p: student_named('stages/student'),
                                    'cannot be a folder name inside the workdir'),
    'stage name with a backslash': (lambda p: student_named('a\\b'),
                                    'cannot be a folder name inside'),
    'stage names differing in case': (lambda p: student_named('Teacher'),
                                      'differ only in upper and lower case'),
    # Data.
    'unknown dataset': (lambda p: [('data.name', 'no_such_dataset')], 'unknown dataset'),
    'missing npz': (lambda p: [('data.npz', f'{p}/missing.npz')], 'does not exist'),
    'corrupt npz': (lambda p: [corrupt_npz(p)], 'could not read'),
    'npz wrong keys': (lambda p: [bad_npz(p, y_test=None)], 'lacks the arrays'),
    'npz wrong shape': (lambda p: [bad_npz(p, x_train=np.zeros((64, 8, 8), np.uint8))],
                        'channel axis'),
    'npz float pixels with NaN': (lambda p: [bad_npz(p, x_train=np.full((64, 8, 8, 1), np.nan,
                                                                        np.float32))],
                                  'dtype float32.*uint8'),
    'npz float labels': (lambda p: [bad_npz(p, y_train=np.zeros(64, np.float32))],
                         'integer class'),
    'labels out of range': (lambda p: [bad_npz(p, y_train=np.arange(64) % 12),
                                       ('data.num_classes', 10)], 'labels span'),
    'empty split': (lambda p: [bad_npz(p, x_test=np.zeros((0, 8, 8, 1), np.uint8),
                                       y_test=np.zeros(0, np.int64))], 'empty'),
    'split shapes differ': (lambda p: [bad_npz(p, x_test=np.zeros((16, 9, 9, 1), np.uint8))],
                            'same image shape'),
}

# The command line on a few of them, and on the mistakes only its parser sees: exit status 2, one
# paragraph on stderr, no traceback, nothing written.
BAD_COMMAND_LINES = {
    'unknown config key': (lambda p: ['--config.train.epoch=3'], 'Did you mean "epochs"'),
    'wrong type': (lambda p: ['--config.train.epochs=abc'], 'invalid literal for int'),
    'unknown model': (lambda p: ['--config.stages.teacher.model=resnet9'],
                      "unknown model 'resnet9'"),
    'temperature': (lambda p: ['--config.losses.kd.temperature=0'], 'temperature must be > 0'),
    'kd without teacher': (lambda p: ['--config.stages.student.teacher='],
                           "uses loss 'kd' but names no teacher"),
    'corrupt npz': (lambda p: [f'--config.data.npz={corrupt_npz(p)[1]}'], 'could not read'),
}


def tiny_config(epochs=1):
  spec = importlib.util.spec_from_file_location('tiny_chain', os.path.join(REPO, TINY))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.epochs = epochs
  return config


def overridden(config, changes):
  """`config` with each `(dotted key, value)` of `changes` set, as `--config.KEY=VALUE` would."""
  for key, value in changes:
    *parents, last = key.split('.')
    target = config
    for parent in parents:
      target = target[parent]
    target[last] = value
  return config


@pytest.fixture(scope='module')
def existing_run(cli_env, tmp_path_factory):
  return finished_run(cli_env, tmp_path_factory, 'existing', TINY, '--config.train.epochs=1')


def test_the_bad_input_table_is_large_enough():
  assert len(BAD_INPUTS) + len(BAD_COMMAND_LINES) >= 43


@pytest.mark.parametrize('case', list(BAD_INPUTS))
def test_bad_input_is_refused_before_anything_is_written(tmp_path, existing_run, case):
  make_changes, message = BAD_INPUTS[case]
  config = overridden(tiny_config(), make_changes(tmp_path))
  before = folder_digest(existing_run)
  with pytest.raises(KdjaxError, match=message) as refused:
    experiment.run(config, str(existing_run))
  assert '\n' not in str(refused.value)  # one paragraph, not a wall.
  assert folder_digest(existing_run) == before


@pytest.mark.parametrize('case', list(BAD_COMMAND_LINES))
def test_bad_command_line_exits_with_a_message_and_touches_nothing(cli_env, tmp_path,
                                                                   existing_run, case):
  make_args, message = BAD_COMMAND_LINES[case]
  before = folder_digest(existing_run)
  done = run_cli(cli_env, existing_run, TINY, '--config.train.epochs=1', *make_args(tmp_path))
  assert done.returncode == 2, done.stdout + done.stderr
  assert 'Traceback' not in done.stderr
  assert re.search(message, done.stderr), done.stderr
  assert len(done.stderr.strip().splitlines()) <= 2  # one paragraph, not a wall.
  assert folder_digest(existing_run) == before


def test_missing_config_file_is_refused(cli_env, tmp_path):
  done = run_cli(cli_env, tmp_path / 'run', 'experiments/configs/no_such_config.py')
  assert done.returncode == 2
  assert 'cannot load --config' in done.stderr and 'Traceback' not in done.stderr


def test_malloc_huge_pages_env():
  tunable = 'glibc.malloc.hugetlb=1'
  assert malloc_huge_pages_env({'A': '1'}, 'linux') == {'A': '1', 'GLIBC_TUNABLES': tunable}
  assert malloc_huge_pages_env({'GLIBC_TUNABLES': 'glibc.malloc.check=0'}, 'linux') == {
      'GLIBC_TUNABLES': 'glibc.malloc.check=0:' + tunable}  # the user's tunables are kept.
  assert malloc_huge_pages_env({'GLIBC_TUNABLES': tunable}, 'linux') is None  # restarts once.
  assert malloc_huge_pages_env({'KDJAX_MALLOC_HUGE_PAGES': '0'}, 'linux') is None
  assert malloc_huge_pages_env({}, 'darwin') is None


def test_the_command_restarts_before_importing_jax():
  # The restart would import jax a second time (about a second) if `kdjax` loaded it eagerly.
  code = ('import sys, kdjax, kdjax.main\n'
          'print(sorted(m for m in ("jax", "flax", "optax") if m in sys.modules))\n'
          'print(kdjax.losses.__name__, kdjax.models.__name__, kdjax.KdjaxError.__name__)\n'
          'print("jax" in sys.modules)\n')
  done = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0, done.stderr
  assert done.stdout.splitlines() == ['[]', 'kdjax.losses kdjax.models KdjaxError', 'True']
  with pytest.raises(AttributeError, match="no attribute 'lossess'"):
    import kdjax
    kdjax.lossess


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='a glibc tunable: Linux only')
@pytest.mark.parametrize('opt_out', [False, True])
def test_the_command_runs_with_malloc_huge_pages(cli_env, tmp_path, opt_out):
  config = tmp_path / 'print_environment.py'  # loaded after the restart: it sees the final env.
  config.write_text('import os, sys\n'
                    'def get_config():\n'
                    '  print("GLIBC_TUNABLES=" + os.environ.get("GLIBC_TUNABLES", ""))\n'
                    '  sys.exit(0)\n')
  env = {key: value for key, value in cli_env.items()
         if key not in ('GLIBC_TUNABLES', 'KDJAX_MALLOC_HUGE_PAGES')}
  if opt_out:
    env['KDJAX_MALLOC_HUGE_PAGES'] = '0'
  done = subprocess.run(cli_command(tmp_path / 'run', str(config)), env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  expected = '' if opt_out else 'glibc.malloc.hugetlb=1'
  assert f'GLIBC_TUNABLES={expected}\n' in done.stdout


def test_multi_exit_stages_report_every_exit(cli_env, tmp_path):
  workdir = tmp_path / 'mate'
  done = run_cli(cli_env, workdir, 'tests/configs/tiny_mate.py')
  assert done.returncode == 0, done.stderr
  results = json.loads((workdir / 'results.json').read_text())
  for stage in results['stages']:
    exits = stage['exits']
    assert len(exits['test_accuracy']) == 3 and 0 <= exits['ensemble_test_accuracy'] <= 1
    assert exits['macs'][0] < exits['macs'][1] < exits['macs'][2]
    assert stage['test_accuracy'] == exits['test_accuracy'][-1]  # the deepest exit.
  assert 'exit 1 (' in (workdir / 'results.md').read_text()
  assert (workdir / 'exits_accuracy_vs_macs.png').exists()


def test_a_teacher_without_batchnorm_teaches(cli_env, tmp_path):
  # LeNet-5 and the MLPs have no batch_stats; their checkpoints hold `{}` there. (The MNIST
  # noisy-teacher reproduction stopped at its first student before this was handled.)
  npz = write_npz(tmp_path / 'mnist_like.npz', image_shape=(28, 28, 1), num_train=64,
                  num_test=16, num_classes=10)
  done = run_cli(cli_env, tmp_path / 'run', TINY, f'--config.data.npz={npz}',
                 '--config.stages.teacher.model=lenet5', '--config.stages.student.model=mlp_1x100',
                 '--config.stages.student.loss=noisy_l2', '--config.train.epochs=1')
  assert done.returncode == 0, done.stderr
  rows = json.loads((tmp_path / 'run' / 'results.json').read_text())['stages']
  assert [r['name'] for r in rows] == ['teacher', 'student']


def test_a_users_own_module_by_import_path_trains_and_teaches(cli_env, tmp_path):
  workdir = tmp_path / 'run'
  done = run_cli(cli_env, workdir, TINY, '--config.train.epochs=1',
                 '--config.stages.teacher.model=tests.user_models:TinyNet')
  assert done.returncode == 0, done.stderr
  rows = json.loads((workdir / 'results.json').read_text())['stages']
  assert rows[0]['model'] == 'tests.user_models:TinyNet' and rows[1]['teacher'] == 'teacher'
  assert rows[0]['test_accuracy'] > 0.2  # it learnt something in one epoch (chance: 0.1).


def test_a_module_registered_from_python_runs_by_its_name(tmp_path):
  from kdjax import models
  from tests.user_models import TinyNet
  models.register_model('tiny_net_for_test', TinyNet)
  config = tiny_config()
  config.stages.student.model = 'tiny_net_for_test'
  config.compilation_cache_dir = ''
  try:
    rows = experiment.run(config, str(tmp_path / 'run'))
  finally:  # later tests (models_test's list of known names) must not see it.
    del models.MODELS['tiny_net_for_test']
  assert rows[1].model == 'tiny_net_for_test' and rows[1].params == models.count_params(
      models.variable_shapes(TinyNet(num_classes=10), (8, 8, 1))['params'])
