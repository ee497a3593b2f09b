"""Several JAX processes on this machine (gloo collectives over 127.0.0.1), as on a pod slice.

Each process gets 2 virtual CPU devices; 2 processes train the tiny chain on a 4-device mesh that
spans both. Every test uses a fresh port, waits for every process it starts, and kills whatever
is left if it fails.
"""

import contextlib
import json
import signal
import socket
import subprocess
import time

import numpy as np
import pytest

from conftest import REPO, cli_command
from reliability_test import TIMING_KEYS, assert_same_final_state, checkpoint_steps, final_arrays

TINY = 'tests/configs/tiny_chain.py'
# 44 steps per stage (22 a epoch); a 10-step checkpoint cadence gives the signals a target.
SHORT = ('--config.train.epochs=2', '--config.train.batch_size=64',
         '--config.train.checkpoint_every_steps=10', '--config.progress_bar=False')
# Gloo sums the gradients' all-reduce in another order than XLA does within one process, and SGD
# amplifies that last-bit difference as it does any other: at the default lr 0.05 to 1e-2 within
# 44 steps, at a constant 0.005 to 1e-6 in 44 steps but 1e-7 in 22 (measured here). The
# comparison with one process therefore trains 22 steps per stage at the small rate.
COMPARED = ('--config.train.epochs=1', '--config.train.lr_schedule=constant',
            '--config.train.learning_rate=0.005')
TIMEOUT_S = 10  # heartbeat: a process silent this long is taken for dead.


def free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def environment(cli_env, devices):
  return dict(cli_env, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


def start_processes(cli_env, workdir, *overrides, processes=2, devices=2):
  """`processes` CLI processes of one distributed run, each with `devices` CPU devices."""
  port = free_port()
  cache = f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}"
  return [subprocess.Popen(
      cli_command(workdir, TINY, cache, *SHORT, *overrides, '--distributed',
                  f'--coordinator_address=127.0.0.1:{port}', f'--num_processes={processes}',
                  f'--process_id={i}', f'--distributed_timeout_s={TIMEOUT_S}'),
      cwd=REPO, env=environment(cli_env, devices), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(processes)]


def finish(processes, timeout=240):
  """Waits for every process; returns `[(returncode, stdout, stderr)]`. Kills any left over."""
  try:
    outputs = [p.communicate(timeout=timeout) for p in processes]
    return [(p.returncode, *output) for p, output in zip(processes, outputs)]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()


def run_processes(cli_env, workdir, *overrides, **kwargs):
  done = finish(start_processes(cli_env, workdir, *overrides, **kwargs))
  for i, (code, out, err) in enumerate(done):
    assert code == 0, f'process {i}: {err[-3000:]}'
  return done


def wait_for_checkpoint(workdir, processes, step=10, timeout=180):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if any(s >= step for s in checkpoint_steps(workdir, 'teacher')):
      return
    if any(p.poll() is not None for p in processes):
      break
    time.sleep(0.05)
  finish(processes, timeout=5)
  pytest.fail('the distributed run wrote no checkpoint in time')


@pytest.fixture(scope='module')
def two_process_run(cli_env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp('two_processes') / 'run'
  run_processes(cli_env, workdir)
  return workdir


def test_two_processes_train_as_one_process_with_as_many_devices(cli_env, tmp_path):
  one, two = tmp_path / 'one_process', tmp_path / 'two_processes'
  done = subprocess.run(cli_command(one, TINY, *SHORT, *COMPARED,
                                    f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}"),
                        cwd=REPO, env=environment(cli_env, 4), capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  run_processes(cli_env, two, *COMPARED)
  for stage in ('teacher', 'student'):
    step_a, a = final_arrays(one, stage)
    step_b, b = final_arrays(two, stage)
    assert step_a == step_b == 22
    for x, y in zip(a, b):  # the same global program; only the all-reduces' order may differ.
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  rows = {w: json.loads((w / 'results.json').read_text()) for w in (one, two)}
  assert len(rows[one]['devices']) == len(rows[two]['devices']) == 4
  for a, b in zip(rows[one]['stages'], rows[two]['stages']):
    for key, value in a.items():
      # Timing, and the teacher's checksum: its parameters agree to float tolerance, not bits.
      if key in TIMING_KEYS or key == 'teacher_fingerprints':
        continue
      if isinstance(value, float):
        np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
      else:
        assert b[key] == value, key
  # Process 0 alone wrote the run's files: one line per epoch, not one per process.
  metrics = (two / 'stages/student/metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['epoch'] for line in metrics] == [1]


def test_sigterm_to_one_process_checkpoints_both_at_one_step_and_resumes(cli_env, tmp_path,
                                                                         two_process_run):
  workdir = tmp_path / 'run'
  processes = start_processes(cli_env, workdir)
  wait_for_checkpoint(workdir, processes)
  processes[1].send_signal(signal.SIGTERM)
  done = finish(processes, timeout=120)
  assert [code for code, _, _ in done] == [143, 143], [err[-2000:] for _, _, err in done]
  stopped = {err.split('stopped by SIGTERM at step ')[1].split(';')[0] for _, _, err in done}
  assert len(stopped) == 1  # both processes stopped at the same step,
  step = int(stopped.pop())
  assert max(checkpoint_steps(workdir, 'teacher')) == step  # and checkpointed it.
  assert not (workdir / 'results.json').exists()
  resumed = run_processes(cli_env, workdir)
  assert f'[teacher] resuming from step {step}' in resumed[0][1]
  assert_same_final_state(two_process_run, workdir)


def test_sigkill_to_one_process_stops_the_other_and_the_run_resumes(cli_env, tmp_path,
                                                                    two_process_run):
  workdir = tmp_path / 'run'
  processes = start_processes(cli_env, workdir)
  wait_for_checkpoint(workdir, processes)
  processes[1].send_signal(signal.SIGKILL)
  killed_at = time.time()
  (code, _, err), _ = finish(processes, timeout=120)
  assert code != 0 and time.time() - killed_at < 3 * TIMEOUT_S + 30, err[-2000:]
  assert 'another process of this run stopped' in err or 'distributed service' in err, \
      err[-2000:]
  resumed = run_processes(cli_env, workdir)
  assert '[teacher] resuming from step' in resumed[0][1]
  assert_same_final_state(two_process_run, workdir)
