"""Orbax checkpoints of a stage: save, verify, fall back past damage, and load a teacher.

A checkpoint `<stage>/checkpoints/<step>/` holds three items: `model` (params + batch_stats, all a
later stage needs from this one as a teacher), `optimizer` (opt_state + step) and `meta` (JSON:
`final`, accumulated `wall_s`, a SHA-256 `fingerprint` of the model and optimizer arrays, and for
the final checkpoint the stage's result row).

Orbax writes into a temporary folder and renames it when complete, so a kill mid-save leaves the
previous checkpoint as the latest. Damage after that (a truncated or corrupted file, an edited
array) is caught on restore — by Orbax, or by the fingerprint — and kdjax falls back to the
newest checkpoint that is intact, saying so; it never trains on from garbage silently.
"""

import contextlib
import errno
import hashlib
import os
from typing import Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdjax.errors import KdjaxError, environment_fault


def manager(directory: str, keep: Optional[int], read_only: bool = False):
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('model', 'optimizer', 'meta'))


def fingerprint(tree) -> str:
  """SHA-256 over the bytes, dtypes and shapes of every array leaf, in tree order."""
  digest = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(tree):
    array = np.asarray(leaf)
    digest.update(f'{array.dtype}{array.shape}'.encode())
    digest.update(np.ascontiguousarray(array).tobytes())
  return digest.hexdigest()


def _items(state):
  return ({'params': state.params, 'batch_stats': state.batch_stats},
          {'opt_state': state.opt_state, 'step': state.step})


def save(mgr, state, meta: dict) -> None:
  """Saves `state` asynchronously from a host copy (the next step donates the device buffers).

  A failed write (this one or the previous, still in flight) raises an `OSError`.
  """
  model, optimizer = jax.device_get(_items(state))
  meta = {**meta, 'fingerprint': fingerprint((model, optimizer))}
  step = int(np.ravel(optimizer['step'])[0])  # replicated states share one step count.
  with _writes_of(mgr):
    mgr.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), optimizer=ocp.args.StandardSave(optimizer),
        meta=ocp.args.JsonSave(meta)))


@contextlib.contextmanager
def opened(directory: str, keep: Optional[int]):
  """A manager for `directory`, closed however the block ends. Closing waits for the saves in
  flight, and one that failed raises an `OSError`. (An Orbax manager left open also prints
  asyncio tracebacks at interpreter exit.)"""
  mgr = manager(directory, keep)
  try:
    yield mgr
  finally:
    with _writes_of(mgr):
      mgr.close()


@contextlib.contextmanager
def _writes_of(mgr):
  """Orbax's and TensorStore's errors while writing a checkpoint, as the `OSError` behind them:
  the disk filled, the folder vanished or became read-only. Writes fail for such reasons, not
  for the arrays' sake (which were just read from memory)."""
  try:
    yield
  except Exception as e:  # an OSError already, or a ValueError / RuntimeError around one.
    fault = environment_fault(e)
    if fault is None:
      directory = str(mgr.directory)
      first_line = (str(e).splitlines() or [type(e).__name__])[0][:300]
      fault = (OSError(errno.ENOENT, os.strerror(errno.ENOENT), directory)
               if not os.path.isdir(directory) else
               OSError(errno.EIO, f'writing a checkpoint failed ({first_line})', directory))
    raise fault from e


def _restore(mgr, step: int, abstract_state):
  shapes = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  model, optimizer = _items(abstract_state)
  restored = mgr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(shapes(model)),
      optimizer=ocp.args.StandardRestore(shapes(optimizer)), meta=ocp.args.JsonRestore()))
  meta = restored.meta
  if meta.get('fingerprint') != fingerprint((restored.model, restored.optimizer)):
    raise ValueError('the arrays do not match the fingerprint saved with them')
  state = abstract_state.replace(
      params=restored.model['params'], batch_stats=restored.model['batch_stats'],
      opt_state=restored.optimizer['opt_state'], step=restored.optimizer['step'])
  return state, meta


def restore_latest_good(mgr, abstract_state, where: str) -> Tuple[Optional[int], dict, object]:
  """The newest intact checkpoint as `(step, meta, state)`, or `(None, {}, None)` if none exist.

  A damaged checkpoint is reported and skipped. If checkpoints exist but none is intact, raises
  a `KdjaxError` naming the folder.
  """
  steps = sorted(mgr.all_steps(), reverse=True)
  damaged = []
  for step in steps:
    try:
      state, meta = _restore(mgr, step, abstract_state)
    except Exception as e:  # Orbax/TensorStore errors, bad JSON, a fingerprint mismatch.
      print(f'[{where}] checkpoint {step} in {mgr.directory} is damaged '
            f'({type(e).__name__}: {str(e).splitlines()[0][:200]}); falling back to an older one.')
      damaged.append(step)
      continue
    _quarantine(mgr, damaged, where)
    return step, meta, state
  if steps:
    raise KdjaxError(f'[{where}] every checkpoint in {mgr.directory} failed to restore (steps '
                     f'{steps}): they are damaged, or were written for a different model than '
                     'the config names. Nothing safe to resume from; delete that folder to '
                     'restart the stage.')
  return None, {}, None


def _quarantine(mgr, steps, where: str) -> None:
  """Moves damaged checkpoints aside (kept for inspection) so the resumed stage can save anew.

  `<stage>/damaged_checkpoints/<step>` (then `<step>.1`, ... if that name is taken): a rename
  within the stage folder, which never follows a symbolic link, never copies and never deletes
  anything. With several processes, process 0 moves them and the others wait for it before
  reloading.
  """
  if not steps:
    return
  if jax.process_index() == 0:
    aside = os.path.join(os.path.dirname(str(mgr.directory)), 'damaged_checkpoints')
    if os.path.islink(aside) or (os.path.lexists(aside) and not os.path.isdir(aside)):
      raise KdjaxError(f'[{where}] {aside} is a symbolic link or a file, not a folder kdjax '
                       'made; kdjax moves damaged checkpoints only into a folder of its own. '
                       'Move it away and re-run.')
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target, copy = os.path.join(aside, f'{step}'), 0
      while os.path.lexists(target):
        copy += 1
        target = os.path.join(aside, f'{step}.{copy}')
      os.rename(os.path.join(str(mgr.directory), str(step)), target)
    print(f'[{where}] moved damaged checkpoints {steps} to {aside}.')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices('kdjax: damaged checkpoints moved')
  mgr.reload()


def latest_meta(directory: str) -> dict:
  """The `meta` item of the newest checkpoint in `directory` whose meta reads (`{}` if none):
  its arrays are not read, so the provenance of every stage can be checked before a run writes
  anything. The restore itself verifies the arrays."""
  if not os.path.isdir(directory):
    return {}
  with contextlib.closing(manager(directory, keep=None, read_only=True)) as mgr:
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        return mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
      except Exception:  # damaged: the restore falls back past it and says so.
        continue
  return {}


def _final_meta(mgr, stage_dir: str) -> Tuple[int, dict]:
  step = mgr.latest_step() if os.path.isdir(str(mgr.directory)) else None
  try:
    meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta \
        if step is not None else {}
  except Exception:  # damaged metadata: treated as unfinished, and the message says what to do.
    meta = {}
  if not meta.get('final'):
    raise KdjaxError(f"no intact final checkpoint in '{stage_dir}'; the teacher stage must "
                     'finish first (re-run the same command to resume it).')
  return step, meta


def final_fingerprint(stage_dir: str) -> str:
  """The SHA-256 recorded with a finished stage's final checkpoint (raises if unfinished)."""
  with contextlib.closing(manager(os.path.join(stage_dir, 'checkpoints'), keep=None,
                                  read_only=True)) as mgr:
    return _final_meta(mgr, stage_dir)[1].get('fingerprint', '')


def load_final_variables(stage_dir: str, shapes, fingerprint: str = '') -> dict:
  """The `{params, batch_stats}` of a finished stage, for use as a teacher.

  Args:
    stage_dir: the teacher stage's folder.
    shapes: `models.variable_shapes(...)` of the model the config names for that stage.
    fingerprint: if given, the final checkpoint's recorded SHA-256 must still be this one.
  """
  with contextlib.closing(manager(os.path.join(stage_dir, 'checkpoints'), keep=None,
                                  read_only=True)) as mgr:
    step, meta = _final_meta(mgr, stage_dir)
    if fingerprint and meta.get('fingerprint') != fingerprint:
      raise KdjaxError(f"the teacher in '{stage_dir}' changed after this run was planned (its "
                       'final checkpoint is another one now); re-run the command to plan anew.')
    # Saved as a TrainState's `{params, batch_stats}`: a model without BatchNorm has `{}` there.
    shapes = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
    try:
      restored = mgr.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(shapes)))
    except Exception as e:  # a tree or shape mismatch, in Orbax's words.
      raise KdjaxError(f"the checkpoint in '{stage_dir}' does not match the model the config "
                       f'names for that stage ({type(e).__name__}: {str(e)[:300]}). Use the '
                       'model it was trained with, or delete the stage folder to retrain it.') from e
    return restored.model
