"""Atomic file writes: a reader (or a run killed mid-write) sees the old file or the new one whole.

Every file kdjax writes into a workdir goes through here, except `metrics.jsonl`'s appended lines
(`workdir.append_metrics`; `workdir.read_metrics` skips a torn last line) and what Orbax and
tensorboardX write themselves. The new bytes go to a temporary file in the target's folder,
named `.<name>.tmp-<pid>` so a leftover is recognisable (and the pid names its writer); it is
flushed and fsynced, `os.replace`d onto the target (atomic on POSIX within one file system), and
the folder is fsynced so the rename itself survives a power cut. On any error the temporary file
is removed and the target is left as it was.

`update_bytes` / `update_text` write only when the content differs, so re-reporting a finished run
rewrites nothing (and works from a read-only folder).
"""

import contextlib
import hashlib
import os
from typing import Iterator


def temporary_path(path: str) -> str:
  """`.<name>.tmp-<pid>` beside `path`."""
  folder, name = os.path.split(os.path.abspath(path))
  return os.path.join(folder, f'.{name}.tmp-{os.getpid()}')


def fsync_dir(folder: str) -> None:
  """Makes a rename or a new file in `folder` durable (a no-op where folders cannot be opened)."""
  try:
    fd = os.open(folder, os.O_RDONLY | getattr(os, 'O_DIRECTORY', 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some file systems refuse fsync on a folder; the rename is still atomic.
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """Yields a temporary path for a writer that takes a file name (e.g. `savefig`); when the block
  ends normally that file is fsynced and replaces `path`; on an error it is removed."""
  tmp = temporary_path(path)
  try:
    yield tmp
    fd = os.open(tmp, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise
  fsync_dir(os.path.dirname(os.path.abspath(path)))


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Replaces `path` with `data`, atomically and durably (the module docstring)."""
  with atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()  # `atomic_path` fsyncs it before the rename.


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode('utf-8'))


def read_bytes(path: str):
  """The file's bytes, or None if it does not exist."""
  try:
    with open(path, 'rb') as f:
      return f.read()
  except FileNotFoundError:
    return None


def update_bytes(path: str, data: bytes) -> bool:
  """`write_bytes_atomic` unless `path` already holds exactly `data`; whether it wrote."""
  if read_bytes(path) == data:
    return False
  write_bytes_atomic(path, data)
  return True


def update_text(path: str, text: str) -> bool:
  return update_bytes(path, text.encode('utf-8'))


def sha256_of(path: str, chunk_bytes: int = 1 << 24) -> str:
  """The SHA-256 of a file's bytes, read in chunks (a table larger than memory is fine)."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(chunk_bytes), b''):
      digest.update(chunk)
  return digest.hexdigest()
