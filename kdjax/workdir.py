"""A run's folder: the recorded config that guards it, and each stage's `metrics.jsonl`.

  WORKDIR/kdjax.lock                  held (flock) by the one run writing here; names it
  WORKDIR/config.json                 the config the run was started with (current layout)
  WORKDIR/stages/<name>/checkpoints/  Orbax checkpoints (`kdjax.checkpoints`)
  WORKDIR/stages/<name>/metrics.jsonl one line per finished epoch
  WORKDIR/stages/<name>/tensorboard/  the same epochs as TensorBoard scalars (`kdjax.tensorboard`)

Files are replaced atomically (`kdjax.files`); `metrics.jsonl` is appended a line at a time, and
a line torn by a killed run is skipped when read.

One writer per workdir: `claim` takes an exclusive `flock` on `kdjax.lock` before it writes
anything, and the run holds it until it ends (`release`, or the process's exit: the kernel drops
the lock of a killed process, so a lock is never stale). The file records the holder (pid, host,
start time in UTC, command line); a second run is refused at once with that record, and a run
that finds the record of a holder that is gone takes the lock over and says so. A clean end
empties the record. With several processes only process 0 locks and broadcasts the outcome, so
every process stops with the same message. Where the file system has no `flock` (some FUSE and
old NFS mounts) the run continues unguarded with a warning; where `flock` is local to each
client (some network file systems), runs on different hosts are not guarded either.
"""

import atexit
import contextlib
import dataclasses
import datetime
import errno
import fcntl
import json
import os
import shlex
import shutil
import socket
import sys
import time
from typing import Dict, Iterator, List, Optional

import jax
import ml_collections
import numpy as np

from kdjax import config_layout
from kdjax import files
from kdjax import parallel
from kdjax import report
from kdjax.errors import KdjaxError

LOCK_FILE = 'kdjax.lock'
# flock itself is missing here: run unguarded (with a warning) rather than not at all.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}
_HELD_BY_ANOTHER = {errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES}
_CANNOT_WRITE = {errno.EROFS, errno.EACCES, errno.EPERM}
_MESSAGE_BYTES = 4096  # a refusal's message, broadcast from process 0 to the others.


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, 'stages', name)


def metrics_path(workdir: str, name: str) -> str:
  return os.path.join(stage_dir(workdir, name), 'metrics.jsonl')


def read_metrics(path: str) -> List[dict]:
  """A stage's `metrics.jsonl`: one dict per finished epoch; `[]` if the file does not exist.

  A last line that does not parse was torn by a run killed while appending it: it is skipped,
  with one line saying so (`resumed_metrics` then drops it from the file). Any other unreadable
  line is damage, refused with a `KdjaxError`.
  """
  data = files.read_bytes(path)
  if data is None:
    return []
  lines = [(number, line) for number, line in
           enumerate(data.decode('utf-8', errors='replace').split('\n'), 1) if line.strip()]
  epochs = []
  for index, (number, line) in enumerate(lines):
    try:
      epoch = json.loads(line)
      if not isinstance(epoch, dict):
        raise ValueError('not a JSON object')
    except ValueError:
      if index == len(lines) - 1:
        print(f'{path}: skipping its last line, cut short when a run stopped while writing it '
              f'({len(line)} characters: {line[:40]!r}…).')
        break
      raise KdjaxError(
          f'{path}: line {number} of {len(lines)} is not a JSON object, so the file is damaged '
          '(only a last line can be cut short by a stopped run). Restore it, or delete the '
          "stage's folder to train the stage again.") from None
    epochs.append(epoch)
  return epochs


def append_metrics(path: str, summary: dict) -> None:
  """Adds an epoch's line (process 0 writes; the others computed the same values). One write
  and an fsync: a killed run leaves at most a torn last line, which `read_metrics` skips."""
  if parallel.is_primary():
    with open(path, 'a') as f:
      f.write(json.dumps(summary) + '\n')
      f.flush()
      os.fsync(f.fileno())


def resumed_metrics(path: str, completed_epochs: int) -> List[dict]:
  """The epochs a restored checkpoint covers: later lines (and a torn last one) are dropped from
  the file (process 0, atomically, and only if that changes it), so a resumed run neither
  repeats nor loses an epoch, and returned (every process)."""
  kept = [m for m in read_metrics(path) if m['epoch'] <= completed_epochs]
  if parallel.is_primary():
    files.update_text(path, ''.join(json.dumps(m) + '\n' for m in kept))
  return kept


def write_metrics(path: str, history: List[dict]) -> None:
  """`metrics.jsonl` holding exactly `history` (from a checkpoint): process 0 writes it,
  atomically and only if that changes it, so an intact file in a read-only folder is left be."""
  if parallel.is_primary():
    files.update_text(path, ''.join(json.dumps(m) + '\n' for m in history))


sync_processes = parallel.sync_processes  # one barrier, named where it is used.


def experiment_json(config) -> str:
  """The config as recorded in `config.json` (display-only settings left out)."""
  settings = config_layout.without_runtime_only(config.to_dict())
  return ml_collections.ConfigDict(settings).to_json_best_effort(indent=2, sort_keys=True)


def same_experiment(recorded_json: str, wanted_json: str) -> bool:
  """Whether two recorded configs compute the same run (`config_layout.effective_settings`)."""
  try:
    recorded = json.loads(recorded_json)
    return (config_layout.effective_settings(recorded)
            == config_layout.effective_settings(json.loads(wanted_json)))
  except (ValueError, KeyError, TypeError, AttributeError, KdjaxError):
    return False  # an unreadable record is not this experiment.


def check(config, workdir: str, overwrite: bool) -> None:
  """Refuses (`KdjaxError`) a workdir that holds another experiment, unless `overwrite`; reads
  only. `claim` checks the same, again, under the lock."""
  _judge(workdir, experiment_json(config), overwrite, announce=False)


def claim(config, workdir: str, overwrite: bool) -> None:
  """Locks `workdir` for this run (`lock`) and records the config in it; refuses a different
  experiment unless `overwrite`, and a workdir another run is writing.

  A record that differs only in how it is written (the earlier config layout, defaults written
  out or left implicit, a setting no stage uses) is the same experiment: the run continues and
  the record is brought up to date. An identical record is not rewritten (a finished run can be
  reported again from a read-only folder). A different experiment is refused before the lock
  file is touched, and judged again once the lock is held (another run may have just written
  it). With several processes every one reads and judges the record, and process 0 alone locks
  and writes (or deletes, with `overwrite`) once all have read it.
  """
  path = os.path.join(workdir, 'config.json')
  wanted = experiment_json(config)
  _judge(workdir, wanted, overwrite, announce=False)  # a foreign run: refused, folder untouched.
  lock(workdir)
  try:
    existing, same = _judge(workdir, wanted, overwrite, announce=True)
  except KdjaxError:
    release(workdir)
    raise
  sync_processes('kdjax: workdir checked')
  if parallel.is_primary():
    if not same:
      _delete_run(workdir)
    if existing != wanted or not same:
      os.makedirs(workdir, exist_ok=True)
      files.write_text_atomic(path, wanted)
  sync_processes('kdjax: workdir claimed')


def _judge(workdir: str, wanted: str, overwrite: bool, announce: bool):
  """`(recorded config.json or None, whether it is this experiment)`; raises for another
  experiment without `overwrite`."""
  existing = files.read_bytes(os.path.join(workdir, 'config.json'))
  existing = None if existing is None else existing.decode('utf-8', errors='replace')
  same = existing is None or existing == wanted or same_experiment(existing, wanted)
  if announce and existing is not None and existing != wanted and same:
    layout1 = config_layout.is_layout1(json.loads(existing))
    print(f'{workdir}: recorded '
          + ('in the earlier config layout (one `kd` block)' if layout1 else 'differently')
          + '; it computes the same run as this config, so the run continues (config.json '
          'rewritten in the current layout).')
  if not same and not overwrite:
    raise KdjaxError(
        f"'{workdir}' holds a run of a different config (see its config.json); kdjax will not "
        'mix two experiments in one folder. Use another --workdir, re-run with the original '
        'config to resume, or pass --overwrite to delete that run and start this one.')
  return existing, same


# One writer per workdir (the module docstring).


@dataclasses.dataclass
class _Lock:
  fd: int
  pid: int  # the process that took it: a forked child neither empties nor reuses it.
  writable: bool


_HELD: Dict[str, _Lock] = {}  # realpath of a workdir → its lock, held until released or exit.


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_FILE)


def lock(workdir: str) -> None:
  """Makes this run the one writer of `workdir` (creating the folder), until `release(workdir)`
  or the process ends; again in the same process, a no-op. Refuses with a `KdjaxError` naming
  the run that holds it. With several processes process 0 locks and tells the others (one
  broadcast), so all raise the same error or none does."""
  if jax.process_count() == 1:
    _acquire(workdir)
    return
  from jax.experimental import multihost_utils
  error, message = None, b''
  if parallel.is_primary():
    try:
      _acquire(workdir)
    except Exception as e:  # every process must hear of it, or the others wait at the barrier.
      error = e
      message = (str(e) if isinstance(e, KdjaxError) else
                 f'process 0 could not lock {lock_path(workdir)}: {type(e).__name__}: {e}').encode()
  text = np.zeros(_MESSAGE_BYTES, np.int32)
  text[:min(len(message), _MESSAGE_BYTES)] = np.frombuffer(message[:_MESSAGE_BYTES], np.uint8)
  failed, text = multihost_utils.broadcast_one_to_all(
      (np.array([error is not None], np.int32), text))
  if error is not None:
    raise error
  if int(np.asarray(failed)[0]):
    raise KdjaxError(bytes(np.asarray(text).astype(np.uint8)).rstrip(b'\0')
                     .decode('utf-8', errors='ignore'))


def release(workdir: str) -> None:
  """Ends this process's hold on `workdir`'s lock (its record emptied: no run holds it); a no-op
  if it holds none. A process's exit releases every lock it holds."""
  held = _HELD.pop(os.path.realpath(workdir), None)
  if held is not None:
    _close(held)


@contextlib.contextmanager
def releasing(workdir: str) -> Iterator[None]:
  """Releases `workdir`'s lock (if this process took it, by `claim`) when the block ends, however
  it ends: `experiment.run`'s whole body, so that a library caller's later run, or another
  process, finds the folder free."""
  try:
    yield
  finally:
    release(workdir)


def release_all() -> None:
  for key in list(_HELD):
    _close(_HELD.pop(key))


atexit.register(release_all)


def _close(held: _Lock) -> None:
  if held.pid == os.getpid() and held.writable:
    try:
      os.ftruncate(held.fd, 0)
    except OSError:
      pass
  os.close(held.fd)


def _acquire(workdir: str) -> None:
  key = os.path.realpath(workdir)
  path = lock_path(workdir)
  held = _HELD.get(key)
  if held is not None:
    if held.pid == os.getpid() and _is_same_file(held.fd, path):
      return  # this process holds it already (a second `experiment.run` on the same folder).
    del _HELD[key]
    _close(held)  # the folder was deleted and made again, or this is a forked child.
  opened = _open_lock_file(workdir, path)
  if opened is None:
    return
  fd, writable = opened
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError as e:
    record = _read_record(fd, wait_s=1.0) if e.errno in _HELD_BY_ANOTHER else None
    os.close(fd)
    if e.errno in _HELD_BY_ANOTHER:
      raise KdjaxError(_busy_message(workdir, record)) from None
    if e.errno in _NO_FLOCK:
      print(f'kdjax: warning: {path}: this file system does not support flock ({e.strerror}); '
            'the run continues, but nothing stops a second run from writing into the same '
            'workdir at the same time. Start one run per workdir.')
      return
    raise
  previous = _read_record(fd)
  if previous:
    print(f'{workdir}: taking over the lock of a run that ended ({_describe(previous)}) without '
          'releasing it (killed, or its machine stopped).')
  if writable:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(_holder_record(), indent=1) + '\n').encode(), 0)
    os.fsync(fd)
  _HELD[key] = _Lock(fd, os.getpid(), writable)


def _open_lock_file(workdir: str, path: str):
  """`(fd, writable)` of the lock file, created (with the folder) if need be; None for a folder
  this process cannot write in and that has no lock file: nothing will be written there."""
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise KdjaxError(f"cannot create the workdir '{workdir}' ({e.strerror}); choose a folder "
                     'this user can write in.') from None
  try:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644), True
  except OSError as e:
    if e.errno not in _CANNOT_WRITE:
      raise
    reason = e.strerror
  try:  # an existing lock file still says whether a run holds it; flock needs no write access.
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
  except OSError:
    print(f'{workdir}: not writable here ({reason}), so not locked; this run can only read what '
          'is there (a finished run reported again writes nothing).')
    return None


def _holder_record() -> dict:
  return {'pid': os.getpid(), 'host': socket.gethostname(),
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
          'command': shlex.join(getattr(sys, 'orig_argv', None) or [sys.executable, *sys.argv])}


def _read_record(fd: int, wait_s: float = 0.0) -> Optional[dict]:
  """The holder recorded in an open lock file, or None if empty or unreadable. `wait_s`: how long
  to wait for a holder that has just locked the file to write its record."""
  deadline = time.monotonic() + wait_s
  while True:
    try:
      record = json.loads(os.pread(fd, 64 * 1024, 0))
      if isinstance(record, dict):
        return record
    except (OSError, ValueError):  # empty, or being written.
      pass
    if time.monotonic() >= deadline:
      return None
    time.sleep(0.05)


def _describe(record: dict) -> str:
  return (f"pid {record.get('pid', '?')}, host {record.get('host', '?')}, "
          f"started {record.get('started', '?')}")


def _busy_message(workdir: str, record: Optional[dict]) -> str:
  """One paragraph: who holds the lock, and what to do."""
  if record is None:
    holder, stop = 'another process (it has not written its record yet)', 'stop it'
  else:
    command = ' '.join(str(record.get('command', '?')).split())
    command = command if len(command) <= 200 else command[:199] + '…'
    holder = f'another kdjax run ({_describe(record)}: {command})'
    stop = f"stop it (kill {record.get('pid', '?')} on {record.get('host', '?')})"
    if record.get('host') == socket.gethostname() and not _pid_alive(record.get('pid')):
      holder += (f"; pid {record.get('pid')} has ended, but a process it started still holds "
                 f'{LOCK_FILE} open')
  return (f"'{workdir}' is in use by {holder}; two runs in one workdir would overwrite each "
          f"other's checkpoints and metrics. Wait for it to finish; or {stop} and run again, "
          'which resumes from its last checkpoint; or use another --workdir.')


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except (TypeError, ValueError, ProcessLookupError):
    return False
  except OSError:  # e.g. another user's process: it exists.
    return True
  return True


def _is_same_file(fd: int, path: str) -> bool:
  try:
    here, there = os.fstat(fd), os.stat(path)
  except OSError:
    return False
  return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _delete_run(workdir: str) -> None:
  """--overwrite: what an earlier run of another config left in `workdir`."""
  print(f'--overwrite: deleting the earlier run in {workdir}.')
  for entry in ('stages', *report.OUTPUT_FILES):
    target = os.path.join(workdir, entry)
    if os.path.isdir(target):
      shutil.rmtree(target)
    elif os.path.exists(target):
      os.remove(target)
