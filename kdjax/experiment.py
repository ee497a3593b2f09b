"""Stages and chains: train teacher → assistant(s) → student, each stage checkpointed and resumable.

`run(config, workdir)` loads the data, plans every stage (`kdjax.plan`: all checks, before
anything is written), claims the workdir (`kdjax.workdir`) and runs the stages in order with
`run_stage`, whose loop reads only its `StagePlan`. Each stage lives in `WORKDIR/stages/<name>/`:

  checkpoints/   Orbax `CheckpointManager`: every epoch (and every `checkpoint_every_steps`), the
                 last few kept; the final one carries `"final": true` in its metadata.
  metrics.jsonl  one line per epoch: loss, accuracy, learning rate, images/s.
  tensorboard/   the same epochs as TensorBoard scalars (`kdjax.tensorboard`).

Running the same command again resumes an interrupted stage from its last checkpoint and skips
finished ones. The run ends with `results.json`, `results.md` and `test_accuracy.png`.
"""

import contextlib
import dataclasses
import functools
import os
import signal
import time
import zlib
from typing import List, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import checkpoints
from kdjax import config_layout
from kdjax import data as kd_data
from kdjax import models
from kdjax import parallel
from kdjax import plan as planning
from kdjax import report
from kdjax import stop_signals
from kdjax import teachers
from kdjax import tensorboard
from kdjax import train
from kdjax import workdir as workdirs
from kdjax.data import stream
from kdjax.errors import KdjaxError, Preempted
from kdjax.workdir import read_metrics  # re-exported: the reproduction reports read metrics.

@dataclasses.dataclass
class StageResult:
  name: str
  model: str
  teacher: str
  loss: str
  test_accuracy: float
  test_loss: float
  test_nontrue_mass: float  # mean probability on non-true classes (secondary information).
  test_entropy: float       # mean prediction entropy, nats.
  params: int
  epochs: int
  wall_s: float
  compile_s: float
  images_per_s: float
  skipped_steps: int = 0  # steps dropped for a non-finite loss (nan_policy 'skip').
  # More than `train.TOP5_MIN_CLASSES` classes: top-5 test accuracy (a replica mean).
  test_top5_accuracy: Optional[float] = None
  # Multi-exit models only: per-exit test accuracy, the exits' ensemble, and MACs per exit.
  exits: Optional[dict] = None
  # num_replicas > 1: the accuracy and loss above are means over the replicas; this holds their
  # standard deviation (ddof 1) and the per-replica values with their seeds.
  test_accuracy_std: Optional[float] = None
  replicas: Optional[dict] = None
  # data.validation_size > 0: the last epoch's validation accuracy, and the epoch with the best
  # validation accuracy (earliest of ties) with its test accuracy: model selection that never
  # looks at the test set. Replicas: each selects its own epoch; both values are means, and
  # `selected_epoch` is a list.
  val_accuracy: Optional[float] = None
  selected_epoch: Optional[object] = None
  selected_test_accuracy: Optional[float] = None
  # Provenance (SHA-256): each teacher's final checkpoint (or file), the data's arrays and the
  # stage's effective settings, as they were when it trained. A resume or a skip that finds one
  # changed is refused (`restore_checked`).
  teacher_fingerprints: Optional[dict] = None
  data_fingerprint: Optional[str] = None
  settings_fingerprint: Optional[str] = None


class Splits(NamedTuple):
  """The dataset on device, replicated on every device of the mesh, and its fingerprint."""
  train: train.DeviceData
  test: train.DeviceData
  validation: Optional[train.DeviceData]
  fingerprint: str = ''  # `kdjax.data.fingerprint`: SHA-256 of the arrays.


# data.pipeline 'auto': the splits go on every device up to this size, else they are streamed.
DEVICE_BUDGET_MB = 4096


def host_splits(dataset: kd_data.Dataset) -> Splits:
  """The dataset left on the host, to be streamed batch by batch (`kdjax.data.stream`)."""
  return Splits(train.HostData(dataset.x_train, dataset.y_train),
                train.HostData(dataset.x_test, dataset.y_test),
                None if dataset.x_val is None else train.HostData(dataset.x_val, dataset.y_val))


def device_splits(dataset: kd_data.Dataset, mesh) -> Splits:
  put = lambda x, y: train.DeviceData(parallel.put_replicated(x, mesh),
                                      parallel.put_replicated(y, mesh))
  return Splits(put(dataset.x_train, dataset.y_train), put(dataset.x_test, dataset.y_test),
                None if dataset.x_val is None else put(dataset.x_val, dataset.y_val))


def run_stage(plan: planning.StagePlan, workdir: str, splits: Splits,
              normalization: train.Normalization, mesh, progress_bar: bool = True,
              overwrite: bool = False) -> StageResult:
  """Trains (or resumes, or skips if finished) one stage and returns its result.

  With N > 1 replicas it trains N students in one step: replica r is initialised from seed
  `seed + r` and draws its loss noise from it; all share the batches, their order and
  augmentation (seed `seed`), and the teacher source the plan names.
  """
  t, name = plan.train, plan.name
  os.makedirs(workdirs.stage_dir(workdir, name), exist_ok=True)
  provenance = stage_provenance(plan, workdir, splits)
  # Closed on every way out (finished, preempted, or an error), waiting for pending saves.
  with checkpoints.opened(os.path.join(workdirs.stage_dir(workdir, name), 'checkpoints'),
                          t.checkpoints_to_keep) as manager:
    state, meta = restore_checked(plan, manager, workdir, provenance, overwrite)
    if meta.get('final'):
      return finished_earlier(plan, workdir, meta, _step_of(state))
    start, wall_s_before = time.perf_counter(), meta.get('wall_s', 0.0)
    wall_s = lambda: wall_s_before + time.perf_counter() - start
    save = lambda **kw: save_checkpoint(manager, state, wall_s=wall_s(), history=history,
                                        provenance=provenance, epoch_steps=epoch_metrics, **kw)
    state = parallel.put_replicated(state, mesh)
    metrics_file = workdirs.metrics_path(workdir, name)
    history = resumed_history(meta, metrics_file, _step_of(state) // t.steps_per_epoch)
    teacher = teachers.make_source(plan, workdir, splits.train, normalization, mesh,
                                   data_fingerprint=splits.fingerprint,
                                   fingerprints=provenance['teachers'])
    train_step, eval_step, compile_s = compile_steps(plan, state, teacher, splits.train,
                                                     normalization, mesh)
    augment_keys = _replica_keys(plan, 'augment')
    step = _step_of(state)
    inputs = training_inputs(plan, splits.train, teacher, step, mesh)
    progress = _progress_bar(progress_bar, name, t.total_steps, step)
    epoch_metrics, unchecked = resumed_epoch_steps(meta), []
    epoch_start, epoch_images = time.perf_counter(), 0
    with _preemption_guard() as preempted, tensorboard.open_writer(
        workdirs.stage_dir(workdir, name), history) as events:  # rewritten from history.
      while step < t.total_steps:
        step_teacher, train_data, batch = next(inputs)
        state, step_metrics = train_step(state, step_teacher, train_data, batch, augment_keys)
        step += 1
        epoch_metrics.append(step_metrics)
        _bound_run_ahead(epoch_metrics)
        unchecked.append(step_metrics)
        epoch_images += t.batch_size
        progress.update(1)
        end_of_epoch = step % t.steps_per_epoch == 0
        if end_of_epoch:
          _check_finite(unchecked, name, step, plan.loss_name)
          unchecked = []  # checked: the save below need not fetch them again.
          summary = epoch_summary(plan, eval_step, state, splits, mesh, epoch_metrics, step,
                                  epoch_images / (time.perf_counter() - epoch_start),
                                  time.perf_counter() - epoch_start)
          history.append(summary)
          workdirs.append_metrics(metrics_file, summary)
          tensorboard.write_epoch(events, summary)
          progress.set_postfix(loss=f"{summary['train_loss']:.3f}",
                               test_acc=f"{np.mean(summary['test_accuracy']):.3f}")
          _check_skipped(plan, history, step)
          epoch_metrics, epoch_start, epoch_images = [], time.perf_counter(), 0
        periodic = t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0
        if step < t.total_steps and (end_of_epoch or periodic or preempted(step)):
          _check_finite(unchecked, name, step, plan.loss_name)  # never checkpoint a NaN state.
          unchecked = []
          save(final=False)
        if preempted(step) and step < t.total_steps:
          progress.close()
          raise Preempted(f"[{name}] stopped by {stop_signals.signal_name(preempted.signum)} at step {step}; "
                          f'checkpoint saved in {workdirs.stage_dir(workdir, name)}. Re-run the '
                          'same command to resume.', preempted.signum)
    progress.close()
    _check_finite(unchecked, name, step, plan.loss_name)
    result = stage_result(plan, history, state, wall_s(), compile_s, provenance)
    save(final=True, result=dataclasses.asdict(result))
    return result


def stage_provenance(plan: planning.StagePlan, workdir: str, splits: 'Splits') -> dict:
  """What the stage is trained from, as fingerprints: the data's arrays, its effective settings
  and each teacher's final checkpoint (or file). Every checkpoint of the stage records it."""
  return {'data': splits.fingerprint, 'settings': plan.settings_fingerprint,
          'teachers': teachers.fingerprints(plan, workdir)}


def provenance_changes(recorded: Optional[dict], now: dict) -> List[str]:
  """What differs between a checkpoint's recorded provenance and the current one, in words.

  A fingerprint the checkpoint does not hold (written by an earlier kdjax) cannot be judged
  and counts as unchanged.
  """
  recorded = recorded or {}
  changes = []
  if recorded.get('data') and recorded['data'] != now['data']:
    changes.append('the data: its arrays differ from those it trained on (another file, or '
                   'the same file changed)')
  if recorded.get('settings') and recorded['settings'] != now['settings']:
    changes.append("the config: the stage's effective settings differ from those it trained "
                   'with (config.json deleted or edited, and another config given?)')
  for teacher, fingerprint in sorted((recorded.get('teachers') or {}).items()):
    if teacher in now['teachers'] and now['teachers'][teacher] != fingerprint:
      changes.append(f"its teacher '{teacher}': retrained or replaced since this stage used it")
  return changes


def refuse_changed_stages(plans, workdir: str, data_fingerprint: str) -> None:
  """Before a run writes anything: refuses it if a stage's checkpoints were trained on other
  data or with other settings than now (teachers are checked as each stage starts, once its
  teachers are final: `restore_checked`)."""
  for plan in plans:
    meta = checkpoints.latest_meta(
        os.path.join(workdirs.stage_dir(workdir, plan.name), 'checkpoints'))
    now = {'data': data_fingerprint, 'settings': plan.settings_fingerprint, 'teachers': {}}
    changes = provenance_changes(meta.get('provenance'), now)
    if changes:
      raise KdjaxError(_changed_message(plan.name, workdirs.stage_dir(workdir, plan.name),
                                        '; '.join(changes)))


def _changed_message(name: str, folder: str, what: str) -> str:
  return (f"stage '{name}' in {folder} was trained from something else than this run gives it "
          f'now: {what}. kdjax will not resume it or report it as if nothing had changed. '
          'Re-run with what it was trained from; or pass --overwrite to train this stage (and '
          'any stage it teaches) again from what is there now; or use a new --workdir.')


def restore_checked(plan: planning.StagePlan, manager, workdir: str, provenance: dict,
                    overwrite: bool):
  """`restore_or_init_state`, refusing a checkpoint trained from something else than now.

  With `overwrite`, such a stage's checkpoints are deleted and it starts again instead.
  """
  state, meta = restore_or_init_state(plan, manager)
  recorded = meta.get('provenance')
  if recorded is None and meta.get('result'):  # a finished stage recorded by an earlier kdjax.
    recorded = {'teachers': meta['result'].get('teacher_fingerprints')}
  changes = provenance_changes(recorded, provenance)
  if not changes:
    return state, meta
  what = '; '.join(changes)
  folder = workdirs.stage_dir(workdir, plan.name)
  if not overwrite:
    raise KdjaxError(_changed_message(plan.name, folder, what))
  print(f'[{plan.name}] --overwrite: {what}; deleting its checkpoints and training it again.')
  if parallel.is_primary():
    for step in manager.all_steps():
      manager.delete(step)
  workdirs.sync_processes(f'kdjax: {plan.name} checkpoints deleted')
  manager.reload()
  return restore_or_init_state(plan, manager)


def resumed_history(meta: dict, metrics_file: str, completed_epochs: int) -> List[dict]:
  """The epochs a restored checkpoint covers, from the checkpoint itself, written back to
  `metrics.jsonl`: a torn or lost file is repaired, lines of epochs after the checkpoint are
  dropped. A checkpoint of an earlier kdjax (no history in it) keeps the file's lines instead."""
  if 'history' not in meta:
    return workdirs.resumed_metrics(metrics_file, completed_epochs)
  history = list(meta['history'])
  workdirs.write_metrics(metrics_file, history)
  return history


def resumed_epoch_steps(meta: dict) -> List[dict]:
  """The metrics of the steps a checkpoint saved mid-epoch (`save_checkpoint`), one dict each."""
  stacked = {k: np.asarray(values, dtype) for k, (dtype, values) in
             meta.get('epoch_steps', {}).items()}
  count = len(next(iter(stacked.values()))) if stacked else 0
  return [{k: v[i] for k, v in stacked.items()} for i in range(count)]


def finished_earlier(plan: planning.StagePlan, workdir: str, meta: dict, step: int) -> StageResult:
  """A finished stage's recorded result (its provenance was checked by `restore_checked`)."""
  fields = {f.name for f in dataclasses.fields(StageResult)}
  result = StageResult(**{k: v for k, v in meta['result'].items() if k in fields})
  if 'history' in meta:  # a torn or lost metrics.jsonl comes back; an intact one is not touched.
    workdirs.write_metrics(workdirs.metrics_path(workdir, plan.name), meta['history'])
  print(f"[{plan.name}] finished earlier (step {step}); not retrained.")
  return result


def restore_or_init_state(plan: planning.StagePlan, manager):
  """The stage's newest intact checkpoint as `(state, meta)`, or a fresh state and `{}`.

  Every checkpoint is verified before use, a finished stage's too: a later stage reads it.
  A resume restores into shapes only, so it never pays for compiling the initialisers.
  """
  tx = plan.train.optimizer
  make_state = lambda variables: train.create_train_state(plan.model, variables, tx)
  if plan.replica_axis:
    make_state = jax.vmap(make_state)
  shapes = models.variable_shapes(plan.model, plan.image_shape)
  if plan.replica_axis:
    shapes = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((plan.num_replicas, *s.shape), s.dtype), shapes)
  latest, meta, restored = checkpoints.restore_latest_good(
      manager, jax.eval_shape(make_state, shapes), plan.name)
  if restored is not None:
    if not meta.get('final'):
      print(f'[{plan.name}] resuming from step {latest} '
            f'(epoch {latest / plan.train.steps_per_epoch:.2f}).')
    return restored, meta
  variables = models.init_variables(plan.model, plan.image_shape, _replica_keys(plan, 'init'))
  return make_state(variables), {}


def save_checkpoint(manager, state, *, final: bool, wall_s: float, history: List[dict],
                    provenance: dict, epoch_steps: List[dict] = (),
                    result: Optional[dict] = None) -> None:
  """Saves the state with its meta: `final` (the stage is done), the accumulated wall time, the
  epochs' metrics so far (`metrics.jsonl` is rebuilt from them on resume), the steps of the
  epoch in progress (so a resumed epoch's training means are those of an uninterrupted one), the
  stage's provenance and, for the final checkpoint, the stage's result row."""
  meta = {'final': final, 'wall_s': wall_s, 'history': history, 'provenance': provenance}
  if epoch_steps and not final:
    stacked = _stack_on_host(epoch_steps)
    meta['epoch_steps'] = {k: [str(v.dtype), v.tolist()] for k, v in stacked.items()}
  if result is not None:
    meta['result'] = result
  checkpoints.save(manager, state, meta)


def compile_steps(plan: planning.StagePlan, state, teacher, train_data, normalization, mesh):
  """The stage's jitted train step (compiled here, timed) and eval step."""
  t = plan.train
  streamed = isinstance(train_data, train.HostData)
  train_step = train.make_train_step(
      plan.model, plan.loss, plan.augment, normalization, skip_nonfinite=t.skip_nonfinite,
      num_replicas=plan.replica_axis, mesh=mesh, replica_batching=plan.replica_batching,
      streamed=streamed, views=plan.views)
  eval_step = train.make_eval_step(normalization, num_replicas=plan.replica_axis, mesh=mesh,
                                   streamed=streamed)
  if streamed:  # the shapes of a streamed batch (as `kdjax.data.stream` makes them).
    train_data = train.StreamedBatch(*(jax.ShapeDtypeStruct(
        (t.batch_size, *x.shape[1:]), x.dtype, sharding=parallel.batch_sharded(mesh))
        for x in train_data))
    teacher = teachers.with_rows(teacher, teachers.batch_row_shapes(teacher, t.batch_size, mesh))
  compile_start = time.perf_counter()
  train_step = train_step.lower(state, teacher, train_data,
                                parallel.global_batch(np.zeros(t.batch_size, np.int32), mesh),
                                _replica_keys(plan, 'augment')).compile()
  return train_step, eval_step, time.perf_counter() - compile_start


def epoch_summary(plan, eval_step, state, splits: Splits, mesh, epoch_metrics, step: int,
                  images_per_s: float, seconds: float) -> dict:
  """The line `metrics.jsonl` gets for an epoch: training means and every evaluator's metrics."""
  summary = _train_summary(epoch_metrics)
  evaluate = lambda split: train.evaluate(eval_step, state, split, plan.train.eval_batch_size,
                                          mesh)
  summary.update(evaluate(splits.test))
  if 'validation' in plan.evaluators:
    summary.update({'val_' + key[len('test_'):]: value
                    for key, value in evaluate(splits.validation).items()})
  summary.update(epoch=step // plan.train.steps_per_epoch, step=step,
                 learning_rate=float(plan.train.schedule(step - 1)),
                 images_per_s=images_per_s, epoch_s=seconds)
  return summary


def stage_result(plan: planning.StagePlan, history: List[dict], state, wall_s: float,
                 compile_s: float, provenance: Optional[dict] = None) -> StageResult:
  """The stage's row of the results table, from its metrics history and final state."""
  last = history[-1]
  mean = lambda key: float(np.mean(last[key]))  # a replica list, or one number.
  first = (lambda tree: train.replica(tree, 0)) if plan.replica_axis else (lambda tree: tree)
  result = StageResult(
      name=plan.name, model=plan.model_name, teacher=plan.teacher.names, loss=plan.loss_name,
      test_accuracy=mean('test_accuracy'), test_loss=mean('test_loss'),
      test_nontrue_mass=mean('test_nontrue_mass'), test_entropy=mean('test_entropy'),
      params=models.count_params(first(state.params)), epochs=plan.train.epochs,
      wall_s=wall_s, compile_s=compile_s,
      images_per_s=float(np.median([m['images_per_s'] for m in history])),
      skipped_steps=int(sum(m.get('skipped_steps', 0) for m in history)),
      teacher_fingerprints=(provenance or {}).get('teachers') or None,
      data_fingerprint=(provenance or {}).get('data'),
      settings_fingerprint=(provenance or {}).get('settings'))
  if 'test_top5_accuracy' in last:
    result.test_top5_accuracy = mean('test_top5_accuracy')
  if 'val_accuracy' in last:
    result.val_accuracy = mean('val_accuracy')
    result.selected_epoch, result.selected_test_accuracy = _select_on_validation(history)
  if plan.replica_axis:
    result.test_accuracy_std = float(np.std(last['test_accuracy'], ddof=1))
    result.replicas = {'seeds': plan.seeds, 'test_accuracy': last['test_accuracy'],
                       'test_loss': last['test_loss']}
  if plan.multi_exit:
    variables = first({'params': state.params, 'batch_stats': state.batch_stats})
    result.exits = {'test_accuracy': np.mean(last['test_accuracy_exits'], axis=0).tolist()
                                     if plan.replica_axis else last['test_accuracy_exits'],
                    'ensemble_test_accuracy': mean('test_accuracy_ensemble'),
                    'macs': models.exit_macs(plan.model, variables, plan.image_shape)}
  return result


def _epoch_permutation(plan, epoch: int, num_train: int) -> np.ndarray:
  """The epoch's order of the training set, on the host: every process computes the same one."""
  key = jax.random.fold_in(_stage_key(plan.seed, plan.name, 'shuffle'), epoch)
  return np.asarray(jax.random.permutation(key, num_train))


def batch_order(plan, num_train: int):
  """`order(step)`: the training set's rows in step `step`'s batch, `[batch_size]` int32; the
  same for the device-resident and the streamed path, and for a resumed run."""
  steps_per_epoch, batch_size = plan.train.steps_per_epoch, plan.train.batch_size

  @functools.lru_cache(maxsize=2)  # streamed: read ahead from grain's threads, into the next.
  def permutation(epoch: int) -> np.ndarray:
    return _epoch_permutation(plan, epoch, num_train)

  def order(step: int) -> np.ndarray:
    epoch, position = divmod(step, steps_per_epoch)
    return permutation(epoch)[position * batch_size:(position + 1) * batch_size]
  return order


def training_inputs(plan, train_data, teacher, start_step: int, mesh):
  """`(teacher, data, indices)` for each step from `start_step` on, the train step's arguments
  that change: the device-resident split and the batch's rows; or a batch streamed from the host
  (`kdjax.data.stream`), its rows, and the teacher with those rows of its logits file
  (`teachers.DiskCachedTeacher`) if it has one."""
  order = batch_order(plan, train_data.labels.shape[0])
  if isinstance(train_data, train.HostData):
    tables = [(t.reader(plan.train.steps_per_epoch), t.per_replica)
              for t in teachers.disk_tables(teacher)]
    for batch, indices, rows in stream.training_batches(
        train_data, order, start_step, plan.train.total_steps, mesh, tables):
      yield teachers.with_rows(teacher, rows), batch, indices
    return
  epoch = None
  for step in range(start_step, plan.train.total_steps):
    if step // plan.train.steps_per_epoch != epoch:  # a views table looks at the epoch's views.
      epoch = step // plan.train.steps_per_epoch
      teacher = teachers.at_epoch(teacher, epoch, mesh)
    yield teacher, train_data, parallel.global_batch(order(step), mesh)


def _stage_key(seed: int, stage_name: str, purpose: str) -> jax.Array:
  """An independent key per (seed, stage, purpose), stable across runs and resumes."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f'{stage_name}/{purpose}'.encode()))


def _replica_keys(plan, purpose: str) -> jax.Array:
  """One key, or `[N]` keys: replica r draws from seed `seed + r`."""
  if not plan.replica_axis:
    return _stage_key(plan.seed, plan.name, purpose)
  return jnp.stack([_stage_key(seed, plan.name, purpose) for seed in plan.seeds])


def _step_of(state) -> int:
  return int(np.ravel(jax.device_get(state.step))[0])  # replicas share one step count.


@contextlib.contextmanager
def _preemption_guard():
  """A `preempted(step)` poll, true once a stop signal has arrived; `preempted.signum` names it.

  One process: the handlers of `kdjax.stop_signals` (installed here if the caller has not)
  record SIGTERM and SIGINT, which the training loop polls after each step. Several processes
  (`jax.distributed`): JAX's preemption service receives the SIGTERM sent to any of them and
  `reached_preemption_sync_point(step)` turns true on every process at the same step, so all of
  them checkpoint that step.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    answered = {}

    def sync_point(step: int) -> bool:  # to be called exactly once per step on every process.
      if step not in answered:
        answered.clear()
        answered[step] = multihost_utils.reached_preemption_sync_point(step)
      return answered[step]

    sync_point.signum = signal.SIGTERM
    yield sync_point
    return

  def received(step: int) -> bool:
    received.signum = stop_signals.received() or signal.SIGTERM
    return bool(stop_signals.received())

  received.signum = signal.SIGTERM
  with stop_signals.stop_on_signals():
    yield received


def accuracy_at_best_validation(val: np.ndarray, test: np.ndarray):
  """Per replica, the best validation epoch (earliest of ties) and the test accuracy at it.

  `val`, `test`: `[epochs, replicas]`. Returns (epoch indices `[replicas]`, test `[replicas]`).
  """
  best = np.argmax(val, axis=0)  # argmax returns the first maximum: the earliest epoch.
  return best, test[best, np.arange(test.shape[1])]


def _select_on_validation(history: List[dict]):
  """(epoch(s) of best validation accuracy, mean test accuracy at them), per replica."""
  val = report.history_array(history, 'val_accuracy')
  test = report.history_array(history, 'test_accuracy')
  best, selected_test = accuracy_at_best_validation(val, test)
  epochs = [int(history[i]['epoch']) for i in best]
  return (epochs if val.shape[1] > 1 else epochs[0]), float(np.mean(selected_test))


def _check_finite(step_metrics, name, step, loss_name) -> None:
  """Raises if any step since the last check had a non-finite loss (policy 'stop')."""
  if not step_metrics:
    return
  # [steps, replicas]: one column without replicas.
  stacked = {k: v.reshape(len(step_metrics), -1) for k, v in _stack_on_host(step_metrics).items()}
  bad = ~np.isfinite(stacked['loss']) & (stacked['skipped'] == 0)  # skipped steps were undone.
  if not bad.any():
    return
  first, replica = np.unravel_index(int(np.argmax(bad)), bad.shape)
  at = step - len(step_metrics) + first + 1
  blame = ('the teacher\'s logits were already non-finite'
           if not stacked['teacher_finite'][first, replica]
           else 'the student\'s logits were non-finite'
           if not stacked['student_finite'][first, replica]
           else 'the logits were finite, so a loss term itself overflowed')
  which = f' (replica {replica})' if bad.shape[1] > 1 else ''
  raise KdjaxError(
      f"stage '{name}': the '{loss_name}' loss became {stacked['loss'][first, replica]} at step "
      f"{at}{which} "
      f'({blame}). Nothing after the last good checkpoint was saved; lower the learning rate or '
      "check the data and re-run to resume, or set --config.train.nan_policy=skip to drop such "
      'steps.')


def _check_skipped(plan: planning.StagePlan, history: List[dict], step: int) -> None:
  """Raises if nan_policy 'skip' has dropped more than `max_skipped_fraction` of a student's
  steps so far in this stage: its result would be trained on what happened to be left."""
  counts = [np.atleast_1d(m.get('skipped_steps_by_replica', m.get('skipped_steps', 0)))
            for m in history]
  if not counts:
    return
  skipped = sum(counts, np.zeros(1, int))  # an epoch with none dropped records one 0.
  worst = int(np.argmax(skipped))
  if skipped[worst] <= plan.max_skipped_fraction * step:
    return
  which = f' of replica {worst} (seed {plan.seeds[worst]})' if plan.replica_axis else ''
  raise KdjaxError(
      f"stage '{plan.name}': nan_policy 'skip' has dropped {int(skipped[worst])} of {step} "
      f'steps{which} ({100 * skipped[worst] / step:.1f} %) for a non-finite loss, more than '
      f'max_skipped_fraction = {plan.max_skipped_fraction:g}; a result trained on the steps that '
      'happened to be left would not be trustworthy. Lower the learning rate or check the data '
      'and teacher; or accept it with --config.max_skipped_fraction=F and re-run the same '
      'command, which resumes from the last checkpoint.')


# Steps the host may dispatch ahead of the device: each holds its batch (streamed: the images)
# until it has run, so an unbounded run-ahead would put a whole epoch's batches on the device.
RUN_AHEAD_STEPS = 4


def _bound_run_ahead(epoch_metrics) -> None:
  if len(epoch_metrics) > RUN_AHEAD_STEPS:
    jax.block_until_ready(epoch_metrics[-RUN_AHEAD_STEPS - 1])


def _stack_on_host(step_metrics) -> dict:
  """Per-step metric dicts (device scalars) → one dict of numpy arrays, in one transfer."""
  return jax.device_get(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *step_metrics))


def _train_summary(epoch_metrics) -> dict:
  stacked = _stack_on_host(epoch_metrics)
  kept = stacked['skipped'] == 0
  mean = lambda x: float(np.mean(x[kept])) if kept.any() else float('nan')
  summary = {'train_loss': mean(stacked['loss']), 'train_accuracy': mean(stacked['accuracy']),
             'skipped_steps': int((~kept).sum())}
  if kept.ndim == 2 and summary['skipped_steps']:  # [steps, replicas]: whose steps were dropped.
    summary['skipped_steps_by_replica'] = (~kept).sum(axis=0).tolist()
  return summary


def _progress_bar(enabled: bool, name, total, initial):
  import tqdm  # imported here: only the CLI path shows progress.
  return tqdm.tqdm(total=total, initial=initial, desc=f'[{name}]', unit='step',
                   disable=not enabled, dynamic_ncols=True, leave=True)


# ---------------------------------------------------------------------------------------------
# A whole run.


def load_dataset(config) -> kd_data.Dataset:
  """The config's dataset, with `data.validation_size` training images held out for validation
  and, with `data.train_size` > 0, a class-balanced subset of that many left to train on."""
  dataset = kd_data.sources.load_from_config(config.data)
  dataset = kd_data.hold_out_validation(dataset, config.data.validation_size)
  return kd_data.subsample_train(dataset, config.data.get('train_size', 0))


def current_layout(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` itself, or a layout-1 config (one `kd` block) read into the current layout."""
  if not config_layout.is_layout1(config):
    return config
  print('config: written in the earlier layout (one `kd` block); read as `losses`, '
        '`teacher_source` and per-stage `loss_kw` (see kdjax/config_layout.py).')
  return ml_collections.ConfigDict(config_layout.upgrade_layout(config.to_dict()))


def run(config: ml_collections.ConfigDict, workdir: str,
        overwrite: bool = False) -> List[StageResult]:
  """Runs every stage of `config` in `workdir` and writes the results table and plot.

  Every check (config, data, workdir) happens before anything is written. SIGTERM or Ctrl-C
  stop it at the next safe point with `Preempted` (`kdjax.stop_signals`).
  """
  with stop_signals.stop_on_signals(), workdirs.releasing(workdir):
    config = current_layout(config)
    planning.stage_order(config)  # the config's own mistakes first, before any data is read.
    dataset = load_dataset(config)
    mesh = parallel.make_mesh()
    plans = planning.plan(config, planning.DataInfo.of(dataset), num_devices=mesh.devices.size,
                          backend=jax.default_backend())
    data_fingerprint = kd_data.fingerprint(dataset)
    workdirs.check(config, workdir, overwrite)  # another experiment's folder: refused first.
    if not overwrite:
      refuse_changed_stages(plans, workdir, data_fingerprint)
    stop_signals.stop_if_signalled('before anything was written')
    workdirs.claim(config, workdir, overwrite)
    mean, std = kd_data.channel_stats(dataset.x_train)
    normalization = train.Normalization(jnp.asarray(mean), jnp.asarray(std))
    pipeline = stream.choose(config.data.get('pipeline', 'device'), dataset,
                             config.data.get('device_budget_mb', DEVICE_BUDGET_MB))
    splits = (device_splits(dataset, mesh) if pipeline == 'device' else
              host_splits(dataset))._replace(fingerprint=data_fingerprint)
    val = f' / {len(dataset.x_val)} validation' if dataset.x_val is not None else ''
    print(f'{dataset.name}: {len(dataset.x_train)} train{val} / {len(dataset.x_test)} test '
          f'images of {dataset.image_shape}, {dataset.num_classes} classes, '
          f'{"on every device" if pipeline == "device" else "streamed from the host"}; stages: '
          f'{" → ".join(p.name for p in plans)}')
    progress_bar = config.progress_bar and parallel.is_primary()
    rows = []
    for p in plans:
      stop_signals.stop_if_signalled(f"before stage '{p.name}'")
      if p.batching_note:
        print(f'[{p.name}] {p.batching_note}')
      rows.append(run_stage(p, workdir, splits, normalization, mesh, progress_bar, overwrite))
    stop_signals.stop_if_signalled('after the last stage, before the results were written')
    if parallel.is_primary():  # the others computed the same rows; one process writes them.
      histories = {p.name: read_metrics(workdirs.metrics_path(workdir, p.name)) for p in plans}
      report.write(workdir, dataset, [dataclasses.asdict(r) for r in rows], histories,
                   baseline=(config.get('report') or {}).get('baseline', ''))
    workdirs.sync_processes('kdjax: results written')
    stop_signals.stop_if_signalled('after writing the results')
    return rows
