"""One writer per workdir (`workdir.lock`), atomic writes (`kdjax.files`), torn metrics lines.

The lock is tested with real processes: a holder that sleeps, a second process refused at once,
the holder SIGKILLed, a third that takes over; two `jax.distributed` processes that both refuse;
and two CLI runs on one workdir.
"""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import pytest

from conftest import REPO, cli_command, run_cli
from experiments.configs import takd_default
from kdjax import files
from kdjax import report
from kdjax import workdir as workdirs
from kdjax.errors import KdjaxError

TINY = 'tests/configs/tiny_chain.py'

# A process that locks argv[1] and then sleeps (`hold`), or tries once and reports (`try`).
LOCKER = textwrap.dedent('''
    import json, sys, time
    from kdjax import workdir
    from kdjax.errors import KdjaxError
    mode, folder = sys.argv[1], sys.argv[2]
    start = time.perf_counter()
    try:
      workdir.lock(folder)
      outcome = 'locked'
    except KdjaxError as e:
      outcome = str(e)
    print(json.dumps({'outcome': outcome, 'seconds': time.perf_counter() - start}), flush=True)
    if mode == 'hold':
      time.sleep(600)
''')


def env():
  return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))


def start_locker(mode, folder):
  return subprocess.Popen([sys.executable, '-c', LOCKER, mode, str(folder)], cwd=REPO, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def first_line(process, timeout=120):
  """The locker's JSON report (the rest of stdout: what it printed before it)."""
  deadline = time.time() + timeout
  printed = []
  while time.time() < deadline:
    line = process.stdout.readline()
    if not line:
      pytest.fail(f'the locker ended: {process.communicate()}')
    if line.startswith('{'):
      return json.loads(line), ''.join(printed)
    printed.append(line)
  pytest.fail('the locker did not report in time')


def run_locker(folder):
  """A `try` locker run to its end: `(its report, what it printed before it)`."""
  done = subprocess.run([sys.executable, '-c', LOCKER, 'try', str(folder)], cwd=REPO, env=env(),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  *printed, last = done.stdout.strip().splitlines()
  return json.loads(last), '\n'.join(printed)


@contextlib.contextmanager
def killed_at_exit(*processes):
  try:
    yield
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
      p.wait()


def test_a_second_run_is_refused_at_once_and_a_killed_holders_lock_is_taken_over(tmp_path):
  folder = tmp_path / 'run'
  holder = start_locker('hold', folder)
  with killed_at_exit(holder):
    held, _ = first_line(holder)
    assert held['outcome'] == 'locked'
    record = json.loads((folder / workdirs.LOCK_FILE).read_text())
    assert record['pid'] == holder.pid and record['host'] == socket.gethostname()
    assert record['started'].endswith('+00:00') and 'kdjax' in record['command']

    refused, _ = run_locker(folder)
    assert refused['seconds'] < 2  # at once, not after a wait.
    message = refused['outcome']
    assert f'pid {holder.pid}' in message and socket.gethostname() in message
    assert 'another --workdir' in message and 'Wait for it' in message and '\n' not in message

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    taken, printed = run_locker(folder)
    assert taken['outcome'] == 'locked'
    assert f'taking over the lock of a run that ended (pid {holder.pid}, host ' in printed
  assert (folder / workdirs.LOCK_FILE).read_text() == ''  # the third ended cleanly: released.


MULTI = textwrap.dedent('''
    import json, sys
    import jax
    port, index, held, free = sys.argv[1:]
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{port}', num_processes=2,
                               process_id=int(index))
    from kdjax import workdir
    from kdjax.errors import KdjaxError
    try:
      workdir.lock(held)
      outcome = 'locked'
    except KdjaxError as e:
      outcome = str(e)
    workdir.lock(free)
    print(json.dumps({'held': outcome, 'free': 'locked'}), flush=True)
''')


def test_every_process_of_a_distributed_run_is_refused_alike(tmp_path):
  """Process 0 locks and broadcasts: process 1 raises the same error instead of waiting."""
  held, free = tmp_path / 'held', tmp_path / 'free'
  holder = start_locker('hold', held)
  with killed_at_exit(holder):
    # The run starts once the holder holds the lock: started together, a slow holder (CI's
    # load) let the run lock, finish and release the folder before the holder took it.
    assert first_line(holder)[0]['outcome'] == 'locked'
    with contextlib.closing(socket.socket()) as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    processes = [subprocess.Popen([sys.executable, '-c', MULTI, str(port), str(i), str(held),
                                   str(free)], cwd=REPO, env=env(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for i in range(2)]
    with killed_at_exit(*processes):
      outputs = [p.communicate(timeout=120) for p in processes]
  reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert reports[0] == reports[1]
  assert f'pid {holder.pid}' in reports[0]['held'] and 'in use by' in reports[0]['held']
  assert reports[0]['free'] == 'locked'
  assert (free / workdirs.LOCK_FILE).exists()


def test_a_second_cli_run_on_a_busy_workdir_exits_2_and_the_first_finishes(cli_env, tmp_path):
  workdir = tmp_path / 'run'
  cache = f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}"
  first = subprocess.Popen(cli_command(workdir, TINY, cache, '--config.train.epochs=2'),
                           cwd=REPO, env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
  with killed_at_exit(first):
    lock_file = workdir / workdirs.LOCK_FILE
    deadline = time.time() + 180
    while not (lock_file.exists() and lock_file.read_text().strip()):
      assert first.poll() is None, first.communicate()
      assert time.time() < deadline, 'the first run did not lock its workdir in time'
      time.sleep(0.05)
    first.send_signal(signal.SIGSTOP)  # it holds the lock for as long as the second one runs.
    try:
      start = time.perf_counter()
      second = run_cli(cli_env, workdir, TINY, '--config.train.epochs=2', timeout=180)
      seconds = time.perf_counter() - start
    finally:
      first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=300)
  assert second.returncode == 2, second.stdout + second.stderr
  assert 'Traceback' not in second.stderr and len(second.stderr.strip().splitlines()) <= 2
  assert f'pid {first.pid}' in second.stderr and 'in use by another kdjax run' in second.stderr
  print(f'refused after {seconds:.1f} s (start-up included)')
  assert first.returncode == 0, err[-3000:]
  for stage in ('teacher', 'student'):
    epochs = [m['epoch'] for m in workdirs.read_metrics(workdirs.metrics_path(workdir, stage))]
    assert epochs == [1, 2]
  assert lock_file.read_text() == ''


# The lock inside one process.


def test_the_lock_is_reentrant_in_a_process_and_release_empties_its_record(tmp_path):
  folder = tmp_path / 'run'
  workdirs.lock(str(folder))
  workdirs.lock(str(folder))  # a second `experiment.run` in the same process.
  assert json.loads((folder / workdirs.LOCK_FILE).read_text())['pid'] == os.getpid()
  workdirs.release(str(folder))
  assert (folder / workdirs.LOCK_FILE).read_text() == ''
  workdirs.release(str(folder))  # a no-op.


def test_a_file_system_without_flock_runs_unguarded_with_a_warning(tmp_path, monkeypatch, capsys):
  def no_flock(fd, operation):
    raise OSError(errno.ENOLCK, 'No locks available')
  monkeypatch.setattr(workdirs.fcntl, 'flock', no_flock)
  workdirs.lock(str(tmp_path / 'run'))
  assert 'does not support flock' in capsys.readouterr().out
  assert os.path.realpath(tmp_path / 'run') not in workdirs._HELD


def read_only(monkeypatch):
  """`os.open` as on a read-only mount (the tests run as root, so chmod would not stop them)."""
  real_open = os.open

  def refuse_writes(path, flags, *args, **kwargs):
    if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
      raise OSError(errno.EROFS, 'Read-only file system', path)
    return real_open(path, flags, *args, **kwargs)
  monkeypatch.setattr(os, 'open', refuse_writes)
  monkeypatch.setattr(files, 'write_bytes_atomic', lambda *a: pytest.fail(f'wrote {a[0]}'))


def test_claiming_a_finished_run_again_rewrites_nothing_even_read_only(tmp_path, monkeypatch,
                                                                         capsys):
  folder = tmp_path / 'run'
  config = takd_default.get_config()
  workdirs.claim(config, str(folder), overwrite=False)
  recorded = os.stat(folder / 'config.json')
  workdirs.release(str(folder))
  workdirs.claim(config, str(folder), overwrite=False)
  assert os.stat(folder / 'config.json').st_ino == recorded.st_ino  # not replaced.
  workdirs.release(str(folder))

  read_only(monkeypatch)  # with its (empty) lock file: locked read-only.
  workdirs.claim(config, str(folder), overwrite=False)
  workdirs.release(str(folder))
  monkeypatch.undo()
  os.remove(folder / workdirs.LOCK_FILE)
  read_only(monkeypatch)  # no lock file, none can be made: a note, and on.
  workdirs.claim(config, str(folder), overwrite=False)
  assert 'not writable here' in capsys.readouterr().out
  assert sorted(os.listdir(folder)) == ['config.json']


def test_a_different_config_is_refused_before_the_lock_file_is_made(tmp_path):
  folder = tmp_path / 'run'
  folder.mkdir()
  (folder / 'config.json').write_text('{"not": "this experiment"}')
  with pytest.raises(KdjaxError, match='different config'):
    workdirs.claim(takd_default.get_config(), str(folder), overwrite=False)
  assert os.listdir(folder) == ['config.json']


def test_overwrite_replaces_the_record_under_the_lock_and_releasing_frees_it(tmp_path):
  folder = tmp_path / 'run'
  first, second = takd_default.get_config(), takd_default.get_config()
  second.seed = 7
  workdirs.claim(first, str(folder), overwrite=False)
  (folder / 'stages').mkdir()
  with workdirs.releasing(str(folder)):
    workdirs.claim(second, str(folder), overwrite=True)
    assert json.loads((folder / workdirs.LOCK_FILE).read_text())['pid'] == os.getpid()
  assert json.loads((folder / 'config.json').read_text())['seed'] == 7
  assert not (folder / 'stages').exists()
  assert (folder / workdirs.LOCK_FILE).read_text() == ''
  assert os.path.realpath(folder) not in workdirs._HELD


# Atomic writes.


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path):
  target = tmp_path / 'results.md'
  files.write_text_atomic(str(target), 'old')
  with pytest.raises(RuntimeError):
    with files.atomic_path(str(target)) as tmp:
      with open(tmp, 'w') as f:
        f.write('half of the new')
      raise RuntimeError('stopped mid-write')
  with pytest.raises(TypeError):
    files.write_bytes_atomic(str(target), 'not bytes')
  assert target.read_text() == 'old'
  assert os.listdir(tmp_path) == ['results.md']


def test_an_unchanged_file_is_not_rewritten(tmp_path):
  target = tmp_path / 'config.json'
  assert files.update_text(str(target), 'same')
  inode = os.stat(target).st_ino
  assert not files.update_text(str(target), 'same')
  assert os.stat(target).st_ino == inode
  assert files.update_text(str(target), 'changed') and target.read_text() == 'changed'


WRITER = textwrap.dedent('''
    import sys
    from kdjax import files
    size, n = int(sys.argv[2]), 0
    while True:
      n += 1
      files.write_bytes_atomic(sys.argv[1], bytes([n % 251]) * size)
''')


def test_a_writer_killed_mid_write_never_leaves_a_partial_file(tmp_path):
  target, size = tmp_path / 'big.bin', 8 << 20
  for attempt in range(5):
    writer = subprocess.Popen([sys.executable, '-c', WRITER, str(target), str(size)], cwd=REPO,
                              env=env())
    with killed_at_exit(writer):
      deadline = time.time() + 60
      while not target.exists() and time.time() < deadline:
        time.sleep(0.01)
      time.sleep(0.05 + 0.07 * attempt)  # somewhere inside a later write.
      writer.send_signal(signal.SIGKILL)
    data = target.read_bytes()
    assert len(data) == size and data == data[:1] * size  # one whole write, never a mix.
  leftovers = [p for p in os.listdir(tmp_path) if p != 'big.bin']
  assert all(p.startswith('.big.bin.tmp-') for p in leftovers)  # recognisable, if killed.


# metrics.jsonl.


def test_a_torn_last_metrics_line_is_skipped_and_dropped_on_resume(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2, "train_loss": 1.5}\n'
                  '{"epoch": 3, "tra')
  assert [m['epoch'] for m in workdirs.read_metrics(str(path))] == [1, 2]
  out = capsys.readouterr().out
  assert 'skipping its last line' in out and len(out.strip().splitlines()) == 1
  assert [m['epoch'] for m in workdirs.resumed_metrics(str(path), 2)] == [1, 2]
  assert path.read_text() == '{"epoch": 1, "train_loss": 2.0}\n{"epoch": 2, "train_loss": 1.5}\n'
  inode = os.stat(path).st_ino
  workdirs.resumed_metrics(str(path), 2)
  assert os.stat(path).st_ino == inode  # nothing to drop: not rewritten.
  workdirs.append_metrics(str(path), {'epoch': 3, 'train_loss': 1.0})
  assert [m['epoch'] for m in workdirs.read_metrics(str(path))] == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_refused(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
  with pytest.raises(KdjaxError, match='line 2 of 3 is not a JSON object'):
    workdirs.read_metrics(str(path))


# The report.


def report_inputs():
  dataset = types.SimpleNamespace(name='digits', x_train=[0] * 10, x_test=[0] * 4,
                                  image_shape=(8, 8, 1), num_classes=10)
  rows = [dict(name='teacher', model='plain_cnn_4', teacher='', loss='ce', test_accuracy=0.5,
               test_nontrue_mass=0.1, test_entropy=0.2, params=1234, wall_s=1.0)]
  histories = {'teacher': [{'epoch': 1, 'test_accuracy': 0.4}, {'epoch': 2, 'test_accuracy': 0.5}]}
  return dataset, rows, histories


def test_reporting_the_same_results_again_rewrites_no_file(tmp_path):
  report.write(str(tmp_path), *report_inputs())
  results = json.loads((tmp_path / 'results.json').read_text())
  results['finished_at'] = '2000-01-01T00:00:00+00:00'
  files.write_text_atomic(str(tmp_path / 'results.json'), json.dumps(results, indent=2))
  before = {name: os.stat(tmp_path / name).st_ino for name in os.listdir(tmp_path)}
  assert sorted(before) == ['results.json', 'results.md', 'test_accuracy.png']
  report.write(str(tmp_path), *report_inputs())
  assert {name: os.stat(tmp_path / name).st_ino for name in os.listdir(tmp_path)} == before
  assert json.loads((tmp_path / 'results.json').read_text())['finished_at'].startswith('2000')


def test_the_plot_is_the_same_bytes_for_the_same_data(tmp_path):
  _, _, histories = report_inputs()
  report.plot_test_accuracy(histories, str(tmp_path / 'a.png'))
  report.plot_test_accuracy(histories, str(tmp_path / 'b.png'))
  data = (tmp_path / 'a.png').read_bytes()
  assert data == (tmp_path / 'b.png').read_bytes() and b'Software' not in data
