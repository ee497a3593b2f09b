"""Killed, preempted, corrupted and repeated runs: each ends where an uninterrupted run ends."""

import glob
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, cli_command, finished_run, folder_digest, run_cli

TINY = 'tests/configs/tiny_chain.py'
TIMING_KEYS = {'wall_s', 'compile_s', 'images_per_s', 'finished_at'}


def final_arrays(workdir, stage):
  """The final checkpoint's params and batch_stats of `stage`, as numpy leaves."""
  directory = os.path.join(workdir, 'stages', stage, 'checkpoints')
  mgr = ocp.CheckpointManager(directory, item_names=('model', 'meta'),
                              options=ocp.CheckpointManagerOptions(read_only=True))
  step = mgr.latest_step()
  restored = mgr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(),
                                                       meta=ocp.args.JsonRestore()))
  assert restored.meta['final']
  import jax
  return step, [np.asarray(x) for x in jax.tree_util.tree_leaves(restored.model)]


def assert_same_final_state(workdir_a, workdir_b):
  for stage in ('teacher', 'student'):
    step_a, a = final_arrays(workdir_a, stage)
    step_b, b = final_arrays(workdir_b, stage)
    assert step_a == step_b and len(a) == len(b)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)  # bitwise: same program, same inputs, same order.


def results_without_timing(workdir):
  results = json.loads((workdir / 'results.json').read_text())
  results.pop('finished_at')
  for stage in results['stages']:
    for key in TIMING_KEYS:
      stage.pop(key, None)
  return results


@pytest.fixture(scope='module')
def reference_run(cli_env, tmp_path_factory):
  return finished_run(cli_env, tmp_path_factory, 'reference', TINY)


def start(cli_env, workdir):
  overrides = (f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}",)
  return subprocess.Popen(cli_command(workdir, TINY, *overrides), cwd=REPO, env=cli_env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return
    if process.poll() is not None:
      pytest.fail(f'the run ended before the kill point: {process.communicate()}')
    time.sleep(0.02)
  process.kill()
  pytest.fail('kill point not reached in time')


def checkpoint_steps(workdir, stage):
  return [int(os.path.basename(p)) for p in
          glob.glob(os.path.join(workdir, 'stages', stage, 'checkpoints', '*'))
          if os.path.basename(p).isdigit()]


@pytest.mark.parametrize('seed', [0, 1])
def test_sigkill_at_a_random_point_resumes_bitwise(cli_env, tmp_path, reference_run, seed):
  rng = random.Random(seed)
  stage = rng.choice(['teacher', 'student'])
  threshold = rng.choice([10, 30, 50, 90, 150])  # steps; epochs are 44 steps long.
  workdir = tmp_path / 'run'
  process = start(cli_env, workdir)
  wait_for(lambda: any(s >= threshold for s in checkpoint_steps(workdir, stage)), process)
  time.sleep(rng.uniform(0, 0.3))  # land mid-step or mid-save.
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert_same_final_state(reference_run, workdir)
  assert results_without_timing(reference_run) == results_without_timing(workdir)


def test_sigkill_between_stages_resumes_bitwise(cli_env, tmp_path, reference_run):
  workdir = tmp_path / 'run'
  process = start(cli_env, workdir)
  final_teacher = max(checkpoint_steps(reference_run, 'teacher'))
  wait_for(lambda: final_teacher in checkpoint_steps(workdir, 'teacher') and
           os.path.exists(os.path.join(workdir, 'stages', 'teacher', 'checkpoints',
                                       str(final_teacher), 'commit_success.txt')), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert '[teacher] finished earlier' in resumed.stdout
  assert_same_final_state(reference_run, workdir)


def test_sigterm_saves_and_exits_within_seconds(cli_env, tmp_path, reference_run):
  workdir = tmp_path / 'run'
  process = start(cli_env, workdir)
  wait_for(lambda: any(s >= 20 for s in checkpoint_steps(workdir, 'teacher')), process)
  sent = time.time()
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=30)
  assert time.time() - sent < 10
  assert process.returncode == 143 and 'stopped by SIGTERM' in stderr
  assert 'Traceback' not in stderr
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert_same_final_state(reference_run, workdir)


def committed(workdir, stage, step):
  return os.path.exists(os.path.join(workdir, 'stages', stage, 'checkpoints', str(step),
                                     'commit_success.txt'))


# When the signal is sent, by what the run has left behind so far.
MOMENTS = {
    'while starting': lambda workdir, reference: False,  # after a fixed delay instead.
    'while the teacher compiles': lambda workdir, reference: (
        workdir / 'stages' / 'teacher').exists(),
    'mid-student': lambda workdir, reference: any(
        s >= 20 for s in checkpoint_steps(workdir, 'student')),
    'between stages': lambda workdir, reference: committed(
        workdir, 'teacher', max(checkpoint_steps(reference, 'teacher'))),
    'at the final write': lambda workdir, reference: committed(
        workdir, 'student', max(checkpoint_steps(reference, 'student'))),
}


@pytest.mark.parametrize('signum,times,moment', [
    (signal.SIGTERM, 1, 'while starting'),
    (signal.SIGTERM, 1, 'while the teacher compiles'),
    (signal.SIGTERM, 3, 'mid-student'),
    (signal.SIGTERM, 2, 'between stages'),
    (signal.SIGTERM, 1, 'at the final write'),
    (signal.SIGINT, 1, 'mid-student'),
])
def test_a_stop_signal_at_any_moment_saves_and_resumes_bitwise(cli_env, tmp_path, reference_run,
                                                               signum, times, moment):
  # SIGTERM (once or again and again) or Ctrl-C, wherever the run is: it finishes what it is
  # doing, saves, exits 128 + signal without a traceback, and the same command then ends
  # exactly where an uninterrupted run ends.
  workdir = tmp_path / 'run'
  process = start(cli_env, workdir)
  if moment == 'while starting':
    time.sleep(1.5)  # importing JAX: the handlers are installed once the flags are parsed.
  else:
    wait_for(lambda: MOMENTS[moment](workdir, reference_run), process)
  for _ in range(times):
    process.send_signal(signum)
    time.sleep(0.2)
  _, stderr = process.communicate(timeout=120)
  assert 'Traceback' not in stderr, stderr
  if process.returncode == 0:  # the run had ended before the signal could reach it.
    assert moment == 'at the final write' and 'received' not in stderr, stderr
  else:
    assert process.returncode == 128 + signum, stderr
    # Each signal the process's handler sees is answered; signals of one kind are not queued
    # by the kernel, so two that arrive while the main thread is inside one C call (a save)
    # reach Python's handler as one.
    assert 1 <= stderr.count('received') <= times, stderr
    name = 'Ctrl-C (SIGINT)' if signum == signal.SIGINT else 'SIGTERM'
    assert f'stopped by {name}' in stderr, stderr
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert_same_final_state(reference_run, workdir)
  assert results_without_timing(reference_run) == results_without_timing(workdir)


def damage(path, how):
  data = bytearray(open(path, 'rb').read())
  if how == 'truncate':
    data = data[:len(data) // 3]
  else:
    for i in range(len(data) // 2, min(len(data), len(data) // 2 + 64)):
      data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


@pytest.mark.parametrize('how,target', [
    ('flip', 'model/ocdbt.process_0/d/*'),       # Orbax restores these bytes without complaint.
    ('truncate', 'model/ocdbt.process_0/d/*'),
    ('truncate', 'meta/metadata'),
])
def test_damaged_latest_checkpoint_falls_back(cli_env, tmp_path, reference_run, how, target):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(reference_run), str(workdir)], check=True)
  latest = max(checkpoint_steps(workdir, 'teacher'))
  files = glob.glob(os.path.join(workdir, 'stages', 'teacher', 'checkpoints', str(latest),
                                 target))
  assert files
  for path in files:
    damage(path, how)
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert f'checkpoint {latest}' in resumed.stdout and 'damaged' in resumed.stdout
  assert os.path.isdir(os.path.join(workdir, 'stages', 'teacher', 'damaged_checkpoints',
                                    str(latest)))
  assert_same_final_state(reference_run, workdir)  # retrained from the older one, bitwise.


def test_moving_damaged_checkpoints_aside_deletes_nothing_and_follows_no_link(cli_env, tmp_path,
                                                                             reference_run):
  workdir, outside = tmp_path / 'run', tmp_path / 'outside'
  subprocess.run(['cp', '-r', str(reference_run), str(workdir)], check=True)
  latest = max(checkpoint_steps(workdir, 'teacher'))
  meta = os.path.join(workdir, 'stages', 'teacher', 'checkpoints', str(latest), 'meta', 'metadata')
  damage(meta, 'truncate')
  aside = workdir / 'stages' / 'teacher' / 'damaged_checkpoints'
  outside.mkdir()
  aside.symlink_to(outside)  # a link out of the workdir where kdjax would put them.
  refused = run_cli(cli_env, workdir, TINY)
  assert refused.returncode == 2 and 'is a symbolic link' in refused.stderr, refused.stderr
  assert list(outside.iterdir()) == [] and os.path.exists(meta)
  aside.unlink()
  (aside / str(latest)).mkdir(parents=True)  # a folder of that name, with someone's notes.
  (aside / str(latest) / 'notes.txt').write_text('mine')
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert (aside / str(latest) / 'notes.txt').read_text() == 'mine'
  assert (aside / f'{latest}.1' / 'meta' / 'metadata').exists()
  assert_same_final_state(reference_run, workdir)


def test_every_checkpoint_damaged_stops_with_the_path(cli_env, tmp_path, reference_run):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(reference_run), str(workdir)], check=True)
  for path in glob.glob(os.path.join(workdir, 'stages', 'teacher', 'checkpoints', '*',
                                     'model', 'ocdbt.process_0', 'd', '*')):
    damage(path, 'flip')
  done = run_cli(cli_env, workdir, TINY)
  assert done.returncode == 2 and 'every checkpoint in' in done.stderr and 'damaged' in done.stderr
  assert 'stages/teacher/checkpoints' in done.stderr and 'Traceback' not in done.stderr


def test_nan_loss_stops_or_is_skipped(cli_env, tmp_path):
  overrides = ('--config.train.learning_rate=1e30', '--config.train.epochs=1')
  stopped = run_cli(cli_env, tmp_path / 'stop', TINY, *overrides)
  assert stopped.returncode == 2
  assert "the 'ce' loss became nan at step" in stopped.stderr
  assert checkpoint_steps(tmp_path / 'stop', 'teacher') == []  # nothing non-finite was saved.
  # Skipping every step is not a result: over max_skipped_fraction (1 %) the stage fails, with
  # the count, and the same command with the fraction raised resumes and reports it.
  skipped = run_cli(cli_env, tmp_path / 'skip', TINY, *overrides,
                    '--config.train.nan_policy=skip')
  assert skipped.returncode == 2 and 'Traceback' not in skipped.stderr
  dropped = re.search(r"stage 'teacher': nan_policy 'skip' has dropped (\d+) of 44 steps",
                      skipped.stderr)
  assert dropped and int(dropped.group(1)) >= 40, skipped.stderr  # all but the first few.
  accepted = run_cli(cli_env, tmp_path / 'skip', TINY, *overrides,
                     '--config.train.nan_policy=skip', '--config.max_skipped_fraction=1')
  assert accepted.returncode == 0, accepted.stderr
  teacher = json.loads((tmp_path / 'skip' / 'results.json').read_text())['stages'][0]
  assert teacher['skipped_steps'] == int(dropped.group(1))
  assert re.search(rf"\| teacher .* \| {teacher['skipped_steps']} +\|",
                   (tmp_path / 'skip' / 'results.md').read_text())


def test_same_seed_same_results(cli_env, tmp_path, reference_run):
  again = tmp_path / 'again'
  assert run_cli(cli_env, again, TINY).returncode == 0
  assert results_without_timing(again) == results_without_timing(reference_run)
  other_seed = tmp_path / 'seed1'
  assert run_cli(cli_env, other_seed, TINY, '--config.seed=1').returncode == 0
  assert results_without_timing(other_seed) != results_without_timing(reference_run)


def test_a_different_config_in_a_used_workdir_is_refused(cli_env, tmp_path, reference_run):
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(reference_run), str(workdir)], check=True)
  before = folder_digest(workdir)
  refused = run_cli(cli_env, workdir, TINY, '--config.train.epochs=2')
  assert refused.returncode == 2 and 'different config' in refused.stderr
  assert folder_digest(workdir) == before
  replaced = run_cli(cli_env, workdir, TINY, '--config.train.epochs=1', '--overwrite')
  assert replaced.returncode == 0, replaced.stderr
  assert json.loads((workdir / 'results.json').read_text())['stages'][0]['epochs'] == 1


def test_a_run_recorded_in_the_earlier_config_layout_resumes(cli_env, tmp_path, reference_run):
  # config.json as kdjax recorded TINY before the plan/run split (one `kd` block), less the
  # settings that were added later still (an older record): the same experiment in today's layout.
  workdir = tmp_path / 'run'
  subprocess.run(['cp', '-r', str(reference_run), str(workdir)], check=True)
  recorded = json.loads((pathlib.Path(REPO) / 'tests/data/tiny_chain_layout1_config.json')
                        .read_text())
  del recorded['kd']['noise_on'], recorded['kd']['teacher_replica']
  for stage in recorded['stages'].values():
    del stage['num_replicas']
  (workdir / 'config.json').write_text(json.dumps(recorded, indent=2, sort_keys=True))
  stages_before = folder_digest(workdir / 'stages')
  # A setting at another value than the record's (or its neutral default) is another experiment.
  refused = run_cli(cli_env, workdir, TINY, '--config.teacher_source.cache_logits=False')
  assert refused.returncode == 2 and 'different config' in refused.stderr
  refused = run_cli(cli_env, workdir, TINY, '--config.losses.kd.temperature=2.0')
  assert refused.returncode == 2 and 'different config' in refused.stderr
  resumed = run_cli(cli_env, workdir, TINY)
  assert resumed.returncode == 0, resumed.stderr
  assert 'recorded in the earlier config layout' in resumed.stdout
  assert '[student] finished earlier' in resumed.stdout  # nothing retrained.
  assert folder_digest(workdir / 'stages') == stages_before
  rewritten = json.loads((workdir / 'config.json').read_text())
  assert 'kd' not in rewritten and rewritten['teacher_source']['replica'] == 'first'
