"""Command line: `kdjax --config=experiments/configs/takd_default.py --workdir=DIR`.

The same as `python -m kdjax` and `python -m kdjax.main`.

Any config value can be overridden, e.g. `--config.train.epochs=3`. A mistake in the config or
the data prints one message and exits with status 2, a fault of the environment (disk full,
read-only folder) with 1; SIGTERM and Ctrl-C stop at the next safe point, work saved, with 143
and 130.

On Linux the command restarts itself once with glibc's malloc on transparent huge pages
(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, see `malloc_huge_pages_env`); set
`KDJAX_MALLOC_HUGE_PAGES=0` to keep glibc's defaults.
"""

import errno
import os
import sys
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Path to a config file (get_config()).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Folder for checkpoints, metrics and results.')
flags.DEFINE_bool('overwrite', False, 'Delete an earlier run of a different config in --workdir, '
                  'and retrain any stage whose data, settings or teacher changed since it trained.')
flags.DEFINE_bool('distributed', False, 'Run as one of several processes (jax.distributed): the '
                  'same command on every host; the cluster is detected on Cloud TPU, SLURM and '
                  'the other environments JAX knows, or given by the three flags below.')
flags.DEFINE_string('coordinator_address', None, 'With --distributed: host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes in all.')
flags.DEFINE_integer('process_id', None, 'With --distributed: this process, 0 … num_processes-1.')
flags.DEFINE_integer('distributed_timeout_s', 60, 'With --distributed: a process silent this long '
                     'is taken for dead and the others stop (heartbeat and shutdown timeout).')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from kdjax import stop_signals
  sys.excepthook = _quiet_closed_event_loop(sys.excepthook)
  if not FLAGS.distributed:  # several processes: JAX's preemption service owns SIGTERM.
    stop_signals.install()
  # Orbax logs every file it writes, warns on reads, and logs the traceback of a failed
  # background write that it then raises to kdjax, which reports it in one paragraph.
  logging.set_verbosity(logging.FATAL)
  import jax
  if FLAGS.distributed:
    _join_processes(jax)
  from kdjax import errors
  from kdjax import experiment
  from kdjax.errors import KdjaxError, Preempted

  config = FLAGS.config
  try:
    config.keys()
  except (IOError, OSError) as e:  # config_flags loads the file lazily, on first access.
    _exit_config_not_loaded(e)
  if config.get('compilation_cache_dir'):
    # Compiled steps are reused across runs and resumes instead of recompiled.
    jax.config.update('jax_compilation_cache_dir', os.path.expanduser(config.compilation_cache_dir))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)
  try:
    experiment.run(config, FLAGS.workdir, overwrite=FLAGS.overwrite)
    stop_signals.ignore_from_now()  # the run is over: later signals have nothing to stop,
    stop_signals.stop_if_signalled('as the run ended')  # and one before is never ignored.
  except KdjaxError as e:
    print(f'kdjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  except Preempted as e:  # work saved; 128 + the signal (143 SIGTERM, 130 Ctrl-C), as if it ended it.
    stop_signals.ignore_from_now()  # more signals while exiting must not turn 143 into -15.
    print(f'kdjax: {e}', file=sys.stderr)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:  # only with --distributed: Ctrl-C keeps Python's default there.
    print('kdjax: interrupted by Ctrl-C; the checkpoints written so far are kept. Re-run the '
          'same command on every host to resume.', file=sys.stderr)
    sys.exit(130)
  except OSError as e:
    _exit_environment_fault(e)
  except (ValueError, RuntimeError) as e:  # Orbax's TensorStore reports its OS errors so.
    fault = errors.environment_fault(e)
    if fault is None:
      if not (FLAGS.distributed and isinstance(e, jax.errors.JaxRuntimeError)):
        raise
      _exit_peer_stopped(e)
    _exit_environment_fault(fault)


def _exit_peer_stopped(error: Exception) -> None:
  # A collective failed: another process died. Waiting for it at exit (JAX's shutdown barrier)
  # would only end, after the timeout, in the same verdict and a C++ stack trace.
  print(f'kdjax: error: another process of this run stopped ({str(error).splitlines()[0][:200]}); '
        'the checkpoints written so far are kept. Re-run the same command on every host to '
        'resume.', file=sys.stderr, flush=True)
  os._exit(1)


def _quiet_closed_event_loop(excepthook):
  """`sys.excepthook`, less the 'Event loop is closed' that TensorStore's threads print (through
  it) when Orbax's background writer has already failed: kdjax reports that failure itself."""
  def hook(kind, value, trace):
    if not (kind is RuntimeError and str(value) == 'Event loop is closed'):
      excepthook(kind, value, trace)
  return hook


# What to do about a fault of the environment, by errno: the message's last sentence.
_ENVIRONMENT_ADVICE = {
    errno.ENOSPC: 'The disk is full: free space or choose a --workdir elsewhere',
    errno.EDQUOT: 'The disk quota is used up: free space or choose a --workdir elsewhere',
    errno.EROFS: 'The filesystem is read-only: choose a writable --workdir',
    errno.EACCES: 'Permission denied: make the folder writable or choose another --workdir',
    errno.EPERM: 'Permission denied: make the folder writable or choose another --workdir',
    errno.ENAMETOOLONG: 'A path is too long for this filesystem: choose a shorter --workdir',
    errno.ENOENT: 'A file or folder vanished while kdjax used it (deleted, or its disk '
                  'unmounted?): make it available again',
    errno.EIO: 'The disk reported an I/O error: check it, or choose a --workdir elsewhere',
}


def _exit_environment_fault(error: OSError) -> None:
  """A failed write or read of the environment (full disk, read-only or vanished folder, ...):
  one paragraph and exit status 1. Files are written atomically and checkpoints by Orbax, so
  everything saved before is intact."""
  # Orbax's background writers may fail too as the process exits; this paragraph says it all.
  threading.excepthook = lambda args: None
  sys.unraisablehook = lambda unraisable: None
  where = f' ({error.filename})' if error.filename else ''
  advice = _ENVIRONMENT_ADVICE.get(error.errno, 'Fix the cause')
  print(f'kdjax: error: {error.strerror or error}{where}. {advice}, then re-run the same '
        'command: it resumes from the last checkpoint, and every checkpoint and result written '
        'before this error is intact.', file=sys.stderr)
  sys.exit(1)


def _join_processes(jax) -> None:
  """`jax.distributed.initialize`, before any computation; only process 0 prints progress."""
  timeout = FLAGS.distributed_timeout_s
  try:
    jax.distributed.initialize(
        coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
        process_id=FLAGS.process_id, initialization_timeout=max(timeout, 60),
        heartbeat_timeout_seconds=timeout, shutdown_timeout_seconds=timeout)
  except (RuntimeError, ValueError) as e:
    print(f'kdjax: error: --distributed could not join the other processes '
          f"({str(e).splitlines()[0][:300]}); check --coordinator_address, --num_processes and "
          '--process_id, or run without --distributed.', file=sys.stderr)
    sys.exit(2)
  if jax.process_index() != 0:  # the same lines as process 0's; errors still go to stderr.
    sys.stdout = open(os.devnull, 'w')


MALLOC_HUGE_PAGES = 'glibc.malloc.hugetlb=1'


def malloc_huge_pages_env(environ, platform=sys.platform):
  """The environment to restart with so that glibc's malloc uses transparent huge pages, or None.

  XLA's CPU backend mallocs each step's large temporaries afresh, and without huge pages every
  4 KiB page of them is faulted in again on every step. With them a step of three ResNet-8
  students took 0.71 s instead of 0.85 s on 2 cores (`experiments/bench/huge_pages.sh`);
  `experiments/bench/README.md` has the per-op measurement. glibc reads `GLIBC_TUNABLES` once at
  start, hence a restart rather than a setting. Nothing changes numerically. None when not on
  Linux, when the tunable is already set, or when `KDJAX_MALLOC_HUGE_PAGES=0`.
  """
  tunables = environ.get('GLIBC_TUNABLES', '')
  if (not platform.startswith('linux') or MALLOC_HUGE_PAGES in tunables
      or environ.get('KDJAX_MALLOC_HUGE_PAGES', '1') == '0'):
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(filter(None, [tunables, MALLOC_HUGE_PAGES]))}


def _exit_config_not_loaded(error: Exception) -> None:
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  reason = next((l for l in lines if 'No such file' in l or 'Error' in l), lines[-1])
  print(f'kdjax: error: cannot load --config: {reason}; give the path of a Python file that '
        'defines get_config().', file=sys.stderr)
  sys.exit(2)


def parse_flags(argv):
  """absl's parser, but a bad `--config.*` override prints one line instead of a traceback."""
  try:
    return FLAGS(argv)
  except (IOError, OSError) as e:  # the config file is missing or does not import.
    _exit_config_not_loaded(e)
  except flags.Error as e:
    print(f'kdjax: error: {e}\nPass --helpfull to see the flags.', file=sys.stderr)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # raised by config overrides.
    message = str(e).strip('\'"').replace('\\n', ' ').replace('\\\'', "'")
    print(f'kdjax: error: bad config override: {message}', file=sys.stderr)
  sys.exit(2)


USAGE = """kdjax: knowledge distillation in JAX/Flax. Trains a config's stages (teachers first) in
--workdir; the same command again resumes an interrupted run and skips finished stages.

  kdjax --config=experiments/configs/takd_default.py --workdir=runs/takd_default
  kdjax --config=my_config.py --workdir=runs/mine --config.train.epochs=3 \\
      --config.losses.kd.temperature=2
  tensorboard --logdir=runs/mine      # the runs' scalars, per stage

Any config value can be set with --config.KEY=VALUE. Exit status: 0 done, 1 a fault of the
environment (disk full, folder read-only; what was saved is kept), 2 a mistake in the config,
data or flags (nothing written), 143 stopped by SIGTERM and 130 by Ctrl-C (work saved).
"""


def _print_help() -> None:
  print(USAGE)
  print('Flags:')
  text = FLAGS.module_help(__name__)  # less its module heading ('__main__:' or 'kdjax.main:').
  print('\n'.join(line for line in text.splitlines() if line.startswith(' ')))
  print('\n--helpfull lists absl\'s flags too.')


def console():
  """The `kdjax` command; also `python -m kdjax` and `python -m kdjax.main`."""
  restart_env = malloc_huge_pages_env(os.environ)
  if restart_env is not None:  # the same process (and PID), before anything is allocated.
    os.execve(sys.executable, [sys.executable, '-m', 'kdjax.main', *sys.argv[1:]], restart_env)
  if {'-h', '--help', '-help', '--helpshort'} & set(sys.argv[1:]):
    _print_help()
    sys.exit(0)
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  console()
