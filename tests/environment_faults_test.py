"""Faults of the environment: a full disk, a read-only, unwritable or vanished folder, a path too
long. Each ends in one paragraph and a non-zero exit, and nothing saved before it is lost: the
same command, once the fault is gone, ends exactly where an uninterrupted run ends.

The full disk is a small tmpfs and the read-only folder a read-only bind mount, each made in a
mount namespace of its own (`unshare -rm`), so nothing on the machine changes; where the machine
forbids that, those tests are skipped and say why. The tests run as root, whom file permissions
do not stop, so "permission denied" runs the command as user nobody (`setpriv`).
"""

import os
import re
import pathlib
import shlex
import shutil
import subprocess
import tempfile
import time

import pytest

from conftest import REPO, cli_command, finished_run, folder_digest, run_cli
from reliability_test import assert_same_final_state, checkpoint_steps, results_without_timing

TINY = 'tests/configs/tiny_chain.py'
EPOCHS = '--config.train.epochs=2'


def namespaces_available() -> str:
  """'' if this machine lets a test mount a tmpfs in a mount namespace, else why not."""
  if shutil.which('unshare') is None:
    return 'unshare(1) is not installed'
  probe = subprocess.run(['unshare', '-rm', 'sh', '-c', 'mount -t tmpfs -o size=64k tmpfs /mnt'],
                         capture_output=True, text=True)
  return '' if probe.returncode == 0 else f'mounting is forbidden here: {probe.stderr.strip()}'


NO_NAMESPACES = namespaces_available()
needs_mounts = pytest.mark.skipif(bool(NO_NAMESPACES), reason=NO_NAMESPACES or 'n/a')


@pytest.fixture(scope='module')
def reference(cli_env, tmp_path_factory):
  return finished_run(cli_env, tmp_path_factory, 'reference', TINY, EPOCHS)


def run_in_namespace(cli_env, tmp_path, mount: str, workdir, after: str = ''):
  """The command on `workdir` after the shell commands `mount`, in a mount namespace that ends
  with it; `after` runs there too (to copy out what a tmpfs holds). Returns its outcome."""
  command = ' '.join(shlex.quote(str(part)) for part in cli_command(workdir, TINY, EPOCHS))
  out, err, rc = (tmp_path / name for name in ('out', 'err', 'rc'))
  script = f"set -e; {mount}; set +e; {command} > '{out}' 2> '{err}'; echo $? > '{rc}'; {after}"
  subprocess.run(['unshare', '-rm', 'sh', '-c', script], cwd=REPO, env=cli_env, timeout=600,
                 check=True)
  return subprocess.CompletedProcess([], int(rc.read_text()), out.read_text(), err.read_text())


# Every word of TensorStore's `Event loop is closed` tracebacks (asyncio's frames, any path).
EVENT_LOOP_CLOSED_WORDS = set(re.findall(r'[A-Za-z_]+', '''
Traceback (most recent call last):
  File "/usr/lib/python3.11/asyncio/base_events.py", line 806, in call_soon_threadsafe
    self._check_closed()
  File "/usr/lib/python3.11/asyncio/base_events.py", line 519, in _check_closed
    raise RuntimeError('Event loop is closed')
RuntimeError: Event loop is closed
''')) | {'root', 'pyenv', 'versions', 'usr', 'local', 'lib', 'site', 'packages', 'opt', 'python'}


def assert_one_paragraph(done, *phrases, status=1, tensorstore_noise=False):
  """kdjax's words are one paragraph, and the only thing on stderr. With `tensorstore_noise`,
  where Orbax's background writes failed, TensorStore's threads may print `RuntimeError: Event
  loop is closed` tracebacks of their own before it, from C++ where Python's hooks do not reach
  (a blemish of upstream's, left as it is): the paragraph is then the last line, and nothing
  else may be there. Several such threads write at once, so their lines can interleave mid-line
  (CI saw 'RuntimeErrorTraceback (most recent call last):'): what comes before the paragraph is
  checked to be made of those tracebacks' words and nothing else."""
  assert done.returncode == status, (done.returncode, done.stderr)
  lines = done.stderr.strip().splitlines()
  if tensorstore_noise:
    rest = '\n'.join(lines[:-1])
    for word in sorted(EVENT_LOOP_CLOSED_WORDS, key=len, reverse=True):  # glued ones too.
      rest = rest.replace(word, ' ')
    assert not re.search('[A-Za-z]', rest), (rest, done.stderr)
    lines = lines[-1:]
  assert 'Traceback' not in lines[0] and len(lines) == 1, done.stderr
  assert lines[0].startswith('kdjax: error: '), done.stderr
  for phrase in phrases:
    assert phrase in lines[0], done.stderr


def folder_bytes(folder) -> int:
  return sum(os.path.getsize(os.path.join(root, name))
             for root, _, names in os.walk(folder) for name in names)


def assert_resumes_to(cli_env, workdir, reference):
  resumed = run_cli(cli_env, workdir, TINY, EPOCHS)
  assert resumed.returncode == 0, resumed.stderr
  assert_same_final_state(reference, workdir)
  assert results_without_timing(reference) == results_without_timing(workdir)


def without_student(reference, tmp_path):
  """A copy of the finished run whose student has not trained yet."""
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir, symlinks=True)
  shutil.rmtree(workdir / 'stages' / 'student')
  os.remove(workdir / 'results.json')
  return workdir


@needs_mounts
def test_a_full_disk_stops_with_one_paragraph_and_loses_nothing(cli_env, tmp_path, reference):
  # A disk with room for half of what the run writes fills mid-run, in a checkpoint or a file.
  disk, saved = tmp_path / 'disk', tmp_path / 'saved'
  disk.mkdir()
  done = run_in_namespace(cli_env, tmp_path,
                          f"mount -t tmpfs -o size={folder_bytes(reference) // 2048}k tmpfs "
                          f"'{disk}'", disk / 'run', after=f"cp -a '{disk}/run' '{saved}'")
  assert_one_paragraph(done, 'No space left on device', 'The disk is full',
                       tensorstore_noise=True)
  assert checkpoint_steps(saved, 'teacher'), 'the disk filled before the first checkpoint'
  assert_resumes_to(cli_env, saved, reference)  # on a disk with room: as if never stopped.


@needs_mounts
def test_a_finished_run_is_reported_from_a_read_only_folder(cli_env, tmp_path, reference):
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir, symlinks=True)
  before = folder_digest(workdir)
  done = run_in_namespace(cli_env, tmp_path,
                          f"mount --bind '{workdir}' '{workdir}'; "
                          f"mount -o remount,bind,ro '{workdir}'", workdir)
  assert done.returncode == 0, done.stderr
  assert '[student] finished earlier' in done.stdout and '| student |' in done.stdout
  assert folder_digest(workdir) == before


@needs_mounts
def test_an_unfinished_run_in_a_read_only_folder_stops_and_resumes(cli_env, tmp_path, reference):
  workdir = without_student(reference, tmp_path)
  done = run_in_namespace(cli_env, tmp_path,
                          f"mount --bind '{workdir}' '{workdir}'; "
                          f"mount -o remount,bind,ro '{workdir}'", workdir)
  assert_one_paragraph(done, 'Read-only file system', 'choose a writable --workdir')
  assert_resumes_to(cli_env, workdir, reference)


def test_permission_denied_stops_with_one_paragraph_and_resumes(cli_env, reference):
  if shutil.which('setpriv') is None or os.geteuid() != 0:
    pytest.skip('needs root and setpriv(1) to run the command as another user')
  # A folder user nobody can read but not write (pytest's own are private to root).
  readable = tempfile.mkdtemp(prefix='kdjax-permission-')
  try:
    os.chmod(readable, 0o755)
    workdir = without_student(reference, pathlib.Path(readable))
    # No restart for huge pages, whose exec of the interpreter nobody may not be allowed.
    env = {**cli_env, 'HOME': readable, 'KDJAX_MALLOC_HUGE_PAGES': '0'}
    done = subprocess.run(['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups',
                           *cli_command(workdir, TINY, EPOCHS, '--config.compilation_cache_dir=',
                                        '--config.progress_bar=False')],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0 and 'Traceback' not in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert 'ermission denied' in done.stderr, done.stderr
    assert_resumes_to(cli_env, workdir, reference)
  finally:
    shutil.rmtree(readable)


def test_a_path_too_long_stops_with_one_paragraph(cli_env, tmp_path):
  workdir = tmp_path / ('w' * 256)
  done = run_cli(cli_env, workdir, TINY, EPOCHS)
  assert done.returncode != 0 and 'Traceback' not in done.stderr, done.stderr
  assert len(done.stderr.strip().splitlines()) == 1 and 'too long' in done.stderr, done.stderr


def test_a_workdir_deleted_mid_run_stops_with_one_paragraph(cli_env, tmp_path, reference):
  # `rm -rf` of the workdir, again and again for two seconds, while the run writes into it. The
  # run either fails on a write with one paragraph, or (the folders made again by its next
  # save) ends as an uninterrupted run ends, from the state it holds in memory.
  workdir = tmp_path / 'run'
  process = subprocess.Popen(cli_command(workdir, TINY, EPOCHS, '--config.progress_bar=False'),
                             cwd=REPO, env=cli_env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not checkpoint_steps(workdir, 'teacher') and time.time() < deadline:
    assert process.poll() is None, process.communicate()
    time.sleep(0.05)
  until = time.time() + 2
  while time.time() < until and process.poll() is None:
    shutil.rmtree(workdir, ignore_errors=True)
    time.sleep(0.01)
  _, stderr = process.communicate(timeout=300)
  if process.returncode == 0:
    assert 'Traceback' not in stderr, stderr
    assert_same_final_state(reference, workdir)
  else:
    assert_one_paragraph(subprocess.CompletedProcess([], process.returncode, '', stderr),
                         'vanished', tensorstore_noise=True)
