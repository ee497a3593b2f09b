"""SIGTERM and Ctrl-C as requests to stop at the next safe point, never as a kill mid-write.

A preempted VM, a scheduler or a user sends SIGTERM (once, or again when it seems slow) or
presses Ctrl-C at any moment: while data loads, a step compiles, a checkpoint or the results
are written, between stages. The handlers here only record the signal. The run answers it at its
next safe point (after the current training step, which saves a checkpoint, or between stages,
or after the file being written) by raising `Preempted`, and the CLI exits with 128 + the signal
(143, 130). A second signal stops no sooner: it is said to have arrived, and the work in flight
still finishes saving.

One process only. With several (`jax.distributed`) JAX's preemption service owns SIGTERM and
stops every process at the same step (`experiment._preemption_guard`), and Ctrl-C keeps Python's
default: nothing here is installed. The CLI installs the handlers as soon as its flags are
parsed; a signal in the half second before that ends the process as the default would.
"""

import contextlib
import os
import signal
import threading
from typing import List

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: List[int] = []
_installed: List[dict] = []  # the handlers replaced, while ours are installed.


def signal_name(signum: int) -> str:
  return 'Ctrl-C (SIGINT)' if signum == signal.SIGINT else signal.Signals(signum).name


def received() -> int:
  """The first stop signal received (0 if none)."""
  return _received[0] if _received else 0


def _record(signum, frame) -> None:
  again = ' again' if _received else ''
  _received.append(signum)
  # os.write, not print: the handler may run while the main thread is inside a print.
  os.write(2, f'\nkdjax: {signal_name(signum)} received{again}; stopping at the next safe '
              'point (the current step, checkpoint or file finishes and is saved first).\n'
           .encode())


def install() -> bool:
  """Records SIGTERM and SIGINT from now on (the main thread only); False if it cannot."""
  if _installed:
    return True
  if threading.current_thread() is not threading.main_thread():
    return False
  _installed.append({signum: signal.signal(signum, _record) for signum in _STOP_SIGNALS})
  return True


def uninstall() -> None:
  """Puts back the handlers `install` replaced and forgets the signals received."""
  if _installed:
    for signum, handler in _installed.pop().items():
      signal.signal(signum, handler)
  _received.clear()


def ignore_from_now() -> None:
  """Stop signals are ignored from here on, process-wide: for the CLI once a run's outcome is
  decided. While the process exits, Python's finalisation puts the default handlers back, so a
  SIGTERM then (a second one, say) would kill it with that outcome unreported (status -15
  instead of 143). A signal recorded before this call still counts (`stop_if_signalled`)."""
  if threading.current_thread() is threading.main_thread():
    for signum in _STOP_SIGNALS:
      signal.signal(signum, signal.SIG_IGN)


@contextlib.contextmanager
def stop_on_signals():
  """Records stop signals while open (for `kdjax.experiment.run` from Python or a notebook,
  where Ctrl-C, the notebook's interrupt, then stops the run safely too); a no-op where the CLI
  installed them for the whole process, or with several processes."""
  import jax
  if _installed or jax.process_count() > 1 or not install():
    yield
    return
  try:
    yield
  finally:
    uninstall()


def stop_if_signalled(where: str) -> None:
  """Raises `Preempted` if a stop signal has arrived."""
  from kdjax.errors import Preempted
  if _received:
    raise Preempted(f'stopped by {signal_name(_received[0])} {where}; everything finished so '
                    'far is saved. Re-run the same command to resume.', _received[0])
