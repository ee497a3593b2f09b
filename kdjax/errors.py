"""The one exception kdjax raises for a user's mistake, and how it tells a fault of the environment.

The CLI catches a `KdjaxError` and prints its message without a traceback, and reports an
`OSError` (full disk, read-only folder, ...) in one paragraph; everything else is a bug and keeps
its traceback.
"""

import errno
import os
import re
from typing import Optional


class KdjaxError(ValueError):
  """A bad config, dataset, checkpoint or argument; the message says what to fix."""


class Preempted(Exception):
  """SIGTERM or SIGINT arrived; the run stopped at a safe point, its work saved. Re-running resumes.

  `signum` is the signal: the CLI exits with 128 + signum (143 for SIGTERM, 130 for Ctrl-C), as if
  the signal had ended it.
  """

  def __init__(self, message: str, signum: int = 15):
    super().__init__(message)
    self.signum = signum


# TensorStore's status for a failed local file operation without an OS error code.
_TENSORSTORE_STATUS = {'NOT_FOUND': errno.ENOENT, 'PERMISSION_DENIED': errno.EACCES,
                       'RESOURCE_EXHAUSTED': errno.ENOSPC}


def environment_fault(error: BaseException) -> Optional[OSError]:
  """The OS error behind `error`, or None: an `OSError` in its chain, or one that TensorStore
  (Orbax's writer) reports inside a `ValueError` as `RESOURCE_EXHAUSTED: ... local file "..." ...
  No space left on device [os_error_code='28']`, or as `NOT_FOUND: ... local file "..."`."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError):
      return error
    code = re.search(r"os_error_code='?(\d+)", str(error))
    path = re.search(r'local file "([^"]+)"', str(error))
    status = re.match(r'(\w+): ', str(error))
    number = (int(code.group(1)) if code else
              _TENSORSTORE_STATUS.get(status.group(1)) if status and path else None)
    if number:
      return OSError(number, os.strerror(number), path.group(1) if path else None)
    error = error.__cause__ or error.__context__
  return None
