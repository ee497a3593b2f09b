"""Stages and chains: train teacher → assistant(s) → student, each stage checkpointed and resumable.

A config's `stages` maps a stage name to `{model, loss, teacher, num_replicas, train, kd}`.
Stages run teachers first (a topological order, ties broken by name). Each stage lives in
`WORKDIR/stages/<name>/`:

  checkpoints/   Orbax `CheckpointManager`: every epoch (and every `checkpoint_every_steps`), the
                 last few kept; the final one carries `"final": true` in its metadata.
  metrics.jsonl  one line per epoch: loss, accuracy, learning rate, images/s.

Running the same command again resumes an interrupted stage from its last checkpoint and skips
finished ones. The run ends with `results.json`, `results.md` and `test_accuracy.png`.
"""

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import threading
import time
import zlib
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import checkpoints
from kdjax import data as kd_data
from kdjax import models
from kdjax import parallel
from kdjax import report
from kdjax import train
from kdjax.errors import KdjaxError, Preempted

STAGE_KEYS = ('model', 'loss', 'teacher', 'num_replicas', 'train', 'kd')
TEACHER_DTYPES = ('float32', 'bfloat16')
NOISE_ON = ('teacher', 'student')
TEACHER_REPLICA = ('first', 'matching')


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


# ---------------------------------------------------------------------------------------------
# Config checks: every mistake is reported before any training starts.


def stage_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The stage's effective settings: the global `train`/`kd` blocks with its overrides applied."""
  stage = config.stages[name]
  merged = ml_collections.ConfigDict()
  merged.name = name
  merged.model = stage.model
  merged.loss = stage.loss
  merged.teacher = stage.teacher
  # 0 or absent: config.num_replicas. A teacher trained once (1) under students trained N times
  # saves N − 1 teacher trainings when only the students' spread is reported.
  merged.num_replicas = stage.get('num_replicas') or config.num_replicas
  merged.train = ml_collections.ConfigDict(config.train.to_dict())
  merged.kd = ml_collections.ConfigDict(config.kd.to_dict())
  for block in ('train', 'kd'):
    overrides = stage.get(block) or {}
    for key, value in overrides.items():
      if key not in merged[block]:
        raise KdjaxError(f"stage '{name}': unknown {block} setting '{key}'; valid ones are: "
                         f"{', '.join(sorted(merged[block].keys()))}.")
      merged[block][key] = value
  return merged


def stage_order(config: ml_collections.ConfigDict) -> List[str]:
  """Validates every stage and returns the order to run them in.

  `config.stage_order` if given (it must list every stage, teachers first); otherwise teachers
  before their students, ties broken by name.
  """
  if not config.stages or not config.stages.keys():
    raise KdjaxError('config.stages is empty; define at least one stage.')
  if config.get('replica_batching') not in train.REPLICA_BATCHING:
    raise KdjaxError(f"unknown replica_batching '{config.get('replica_batching')}'; choose one "
                     f"of: {', '.join(train.REPLICA_BATCHING)}.")
  replicas = config.get('num_replicas')
  if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
    raise KdjaxError(f'config.num_replicas must be an integer >= 1 (students trained at once), '
                     f'got {replicas!r}.')
  names = list(config.stages.keys())
  for name in names:
    stage = config.stages[name]
    unknown = set(stage.keys()) - set(STAGE_KEYS)
    if unknown:
      raise KdjaxError(f"stage '{name}': unknown keys {sorted(unknown)}; a stage has: "
                       f"{', '.join(STAGE_KEYS)}.")
    if stage.get('model') not in models.MODELS:
      raise KdjaxError(f"stage '{name}': unknown model '{stage.get('model')}'; choose one of: "
                       f"{', '.join(models.MODELS)}.")
    if stage.get('loss') not in train.STAGE_LOSSES:
      raise KdjaxError(f"stage '{name}': unknown loss '{stage.get('loss')}'; choose one of: "
                       f"{', '.join(train.STAGE_LOSSES)}.")
    teacher = stage.get('teacher') or ''
    multi_exit_model = models.is_multi_exit(stage.model)
    if multi_exit_model != (stage.loss in train.MULTI_EXIT_LOSSES):
      raise KdjaxError(
          f"stage '{name}': model '{stage.model}' and loss '{stage.loss}' do not fit: the "
          f"multi-exit losses ({', '.join(train.MULTI_EXIT_LOSSES)}) need a multi_exit_* model "
          'and a multi_exit_* model needs one of them.')
    if multi_exit_model and teacher:
      raise KdjaxError(f"stage '{name}': a multi-exit stage teaches itself; clear its teacher.")
    if teacher in names and models.is_multi_exit(config.stages[teacher].model):
      raise KdjaxError(f"stage '{name}': teacher '{teacher}' is a multi-exit model; use a "
                       'single-exit stage as a teacher.')
    if stage.loss in train.LOSSES_WITH_TEACHER and not teacher:
      raise KdjaxError(f"stage '{name}' uses loss '{stage.loss}' but names no teacher; set "
                       f"--config.stages.{name}.teacher to an earlier stage, or use loss 'ce'.")
    if stage.loss == 'ce' and teacher:
      raise KdjaxError(f"stage '{name}' names teacher '{teacher}' but its loss 'ce' ignores it; "
                       "use a distillation loss or clear the teacher.")
    if teacher and teacher not in names:
      raise KdjaxError(f"stage '{name}': teacher '{teacher}' is not a stage of this config; "
                       f"stages are: {', '.join(names)}.")
    if teacher == name:
      raise KdjaxError(f"stage '{name}' is its own teacher; a teacher must be an earlier stage.")
    own_replicas = stage.get('num_replicas', 0)
    if not isinstance(own_replicas, int) or isinstance(own_replicas, bool) or own_replicas < 0:
      raise KdjaxError(f"stage '{name}': num_replicas must be an integer >= 1, or 0 for "
                       f'config.num_replicas; got {own_replicas!r}.')
    _check_values(stage_config(config, name))
    merged = stage_config(config, name)
    if teacher in names and merged.kd.teacher_replica == 'matching':
      own, theirs = merged.num_replicas, stage_config(config, teacher).num_replicas
      if own < 2 or own != theirs:
        raise KdjaxError(
            f"stage '{name}': teacher_replica 'matching' pairs student replica r with teacher "
            f"replica r, so both need the same number of replicas (>= 2); this stage has {own} "
            f"and its teacher '{teacher}' {theirs}. Set their num_replicas equal, or use "
            "teacher_replica 'first'.")

  requested = list(config.get('stage_order') or ())
  if requested:
    if sorted(requested) != sorted(names):
      raise KdjaxError(f'config.stage_order {requested} must list every stage exactly once; '
                       f'the stages are: {", ".join(names)}.')
    for position, name in enumerate(requested):
      teacher = config.stages[name].teacher
      if teacher and teacher not in requested[:position]:
        raise KdjaxError(f"stage '{name}' has teacher '{teacher}', which is not an earlier stage "
                         'in config.stage_order; move the teacher before its student.')
    return requested

  order, done = [], set()
  while len(order) < len(names):
    ready = sorted(n for n in names if n not in done and
                   (not config.stages[n].teacher or config.stages[n].teacher in done))
    if not ready:
      cycle = sorted(set(names) - done)
      raise KdjaxError(f'the stages {cycle} are teachers of each other in a cycle; every '
                       'teacher must be a stage that can finish before its student starts.')
    order.append(ready[0])
    done.add(ready[0])
  return order


def _check_values(stage: ml_collections.ConfigDict) -> None:
  t, kd, where = stage.train, stage.kd, f"stage '{stage.name}'"
  checks = [
      (isinstance(t.epochs, int) and t.epochs >= 1, f'epochs must be an integer >= 1, got {t.epochs!r}'),
      (isinstance(t.batch_size, int) and t.batch_size >= 1,
       f'batch_size must be an integer >= 1, got {t.batch_size!r}'),
      (t.learning_rate > 0, f'learning_rate must be > 0, got {t.learning_rate}'),
      (t.lr_schedule in train.LR_SCHEDULES,
       f"unknown lr_schedule '{t.lr_schedule}'; choose one of: {', '.join(train.LR_SCHEDULES)}"),
      (all(0 < b < 1 for b in t.lr_boundaries),
       f'lr_boundaries are fractions of training in (0, 1), got {tuple(t.lr_boundaries)}'),
      (0 <= t.momentum < 1, f'momentum must lie in [0, 1), got {t.momentum}'),
      (t.weight_decay >= 0, f'weight_decay must be >= 0, got {t.weight_decay}'),
      (t.checkpoint_every_steps >= 0, 'checkpoint_every_steps must be >= 0 (0: every epoch)'),
      (t.checkpoints_to_keep >= 1, 'checkpoints_to_keep must be >= 1'),
      (t.nan_policy in ('stop', 'skip'),
       f"nan_policy must be 'stop' or 'skip', got {t.nan_policy!r}"),
      (kd.temperature > 0, f'temperature must be > 0, got {kd.temperature}'),
      (0 <= kd.kd_weight <= 1, f'kd_weight must lie in [0, 1], got {kd.kd_weight}'),
      (kd.kl_reduction in train.losses.KL_REDUCTIONS,
       f"unknown kl_reduction '{kd.kl_reduction}'; choose one of: "
       f"{', '.join(train.losses.KL_REDUCTIONS)}"),
      (0 <= kd.eta <= 1, f'eta must lie in [0, 1] (1: plain cross-entropy), got {kd.eta}'),
      (isinstance(kd.tsd_k, int) and kd.tsd_k >= 2, f'tsd_k must be an integer >= 2, got {kd.tsd_k!r}'),
      (kd.tsd_scores in train.losses.TSD_SCORES,
       f"unknown tsd_scores '{kd.tsd_scores}'; choose one of: {', '.join(train.losses.TSD_SCORES)}"),
      (0 <= kd.noise_alpha <= 1, f'noise_alpha must lie in [0, 1], got {kd.noise_alpha}'),
      (kd.noise_sigma >= 0, f'noise_sigma must be >= 0, got {kd.noise_sigma}'),
      (kd.noise_on in NOISE_ON, f"unknown noise_on '{kd.noise_on}'; choose one of: "
                                f"{', '.join(NOISE_ON)}"),
      (0 <= kd.noise_ce_weight <= 1, f'noise_ce_weight must lie in [0, 1], got {kd.noise_ce_weight}'),
      (0 < kd.primary_weight <= 1, f'primary_weight must lie in (0, 1], got {kd.primary_weight}'),
      (kd.teacher_dtype in TEACHER_DTYPES,
       f"unknown teacher_dtype '{kd.teacher_dtype}'; choose one of: {', '.join(TEACHER_DTYPES)}"),
      (kd.teacher_replica in TEACHER_REPLICA,
       f"unknown teacher_replica '{kd.teacher_replica}'; choose one of: "
       f"{', '.join(TEACHER_REPLICA)}"),
      (isinstance(kd.cache_teacher_logits, bool),
       f'cache_teacher_logits must be True or False, got {kd.cache_teacher_logits!r}'),
  ]
  for ok, message in checks:
    if not ok:
      raise KdjaxError(f'{where}: {message}.')


# ---------------------------------------------------------------------------------------------
# One stage.


def _device_data(dataset: kd_data.Dataset, mesh):
  """(train, test, validation or None) splits, replicated on every device of `mesh`."""
  put = lambda x: parallel.put_replicated(x, mesh)
  val = None if dataset.x_val is None else train.DeviceData(put(dataset.x_val),
                                                            put(dataset.y_val))
  return (train.DeviceData(put(dataset.x_train), put(dataset.y_train)),
          train.DeviceData(put(dataset.x_test), put(dataset.y_test)), val)


def _epoch_permutation(seed: int, stage_name: str, epoch: int, num_train: int) -> jax.Array:
  key = jax.random.fold_in(_stage_key(seed, stage_name, 'shuffle'), epoch)
  return jax.random.permutation(key, num_train)


def _stage_key(seed: int, stage_name: str, purpose: str) -> jax.Array:
  """An independent key per (seed, stage, purpose), stable across runs and resumes."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f'{stage_name}/{purpose}'.encode()))


def _stacked_shapes(shapes, num_replicas: int):
  """`ShapeDtypeStruct`s of `num_replicas` models stacked on a leading axis (none for 0)."""
  if not num_replicas:
    return shapes
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct((num_replicas, *s.shape), s.dtype), shapes)


def _replica_keys(config, name: str, purpose: str, num_replicas: int) -> jax.Array:
  """One key, or `[N]` keys: replica r draws from seed `config.seed + r`."""
  if not num_replicas:
    return _stage_key(config.seed, name, purpose)
  return jnp.stack([_stage_key(config.seed + r, name, purpose) for r in range(num_replicas)])


def _first_replica(tree, num_replicas: int):
  """Replica 0 of a stacked tree; the tree itself when there are no replicas."""
  return train.replica(tree, 0) if num_replicas else tree


def _step_of(state) -> int:
  return int(np.ravel(jax.device_get(state.step))[0])  # replicas share one step count.


def run_stage(config, name: str, workdir: str, dataset: kd_data.Dataset, device_data,
              normalization: train.Normalization, mesh) -> StageResult:
  """Trains (or resumes, or skips if finished) one stage and returns its result.

  With N > 1 replicas (the stage's `num_replicas`, else `config.num_replicas`) it trains N
  students in one step (vmapped or unrolled, `config.replica_batching`): replica r is initialised
  from seed `config.seed + r` and draws its loss noise from it; all share the batches, their order
  and augmentation (seed `config.seed`), and the teacher, which is replica 0 of the teacher stage
  (`kd.teacher_replica='first'`: one teacher forward serves all N) or, with 'matching', the
  teacher stage's replica r.
  """
  stage = stage_config(config, name)
  t = stage.train
  num_replicas = stage.num_replicas if stage.num_replicas > 1 else 0
  stage_dir = os.path.join(workdir, 'stages', name)
  os.makedirs(stage_dir, exist_ok=True)
  model_kwargs = {'shortcut': config.model.resnet_shortcut, 'conv': config.model.conv}
  student = models.get_model(stage.model, dataset.num_classes, **model_kwargs)
  num_train = dataset.x_train.shape[0]
  steps_per_epoch = num_train // t.batch_size  # the last partial batch is dropped, as usual.
  total_steps = t.epochs * steps_per_epoch
  schedule = train.learning_rate_schedule(t, steps_per_epoch, stage.model)
  tx = train.make_optimizer(t, schedule)
  make_state = lambda variables: train.create_train_state(student, variables, tx)
  if num_replicas:
    make_state = jax.vmap(make_state)

  # Closed on every way out (finished, preempted, or an error): closing waits for pending saves,
  # and an Orbax manager left open prints asyncio tracebacks at interpreter exit.
  with contextlib.closing(checkpoints.manager(os.path.join(stage_dir, 'checkpoints'),
                                              t.checkpoints_to_keep)) as manager:
    # Every checkpoint is verified before use, a finished stage's too: a later stage reads it.
    abstract_state = jax.eval_shape(make_state, _stacked_shapes(
        models.variable_shapes(student, dataset.image_shape), num_replicas))
    latest, meta, restored = checkpoints.restore_latest_good(manager, abstract_state, name)
    if meta.get('final'):
      print(f"[{name}] finished earlier (step {latest}); not retrained.")
      return StageResult(**meta['result'])

    start = time.perf_counter()
    wall_s_before = 0.0
    if restored is None:
      state = make_state(models.init_variables(student, dataset.image_shape,
                                               _replica_keys(config, name, 'init', num_replicas)))
    else:  # restored into shapes only: a resume never pays for compiling the initialisers.
      state = restored
      wall_s_before = meta.get('wall_s', 0.0)
      print(f'[{name}] resuming from step {latest} (epoch {latest / steps_per_epoch:.2f}).')
    state = parallel.put_replicated(state, mesh)
    metrics_path = os.path.join(stage_dir, 'metrics.jsonl')
    _truncate_metrics(metrics_path, _step_of(state) // steps_per_epoch)

    train_data, test_data, val_data = device_data
    teacher, teacher_input, cached = None, {}, False
    per_replica = bool(stage.teacher) and stage.kd.teacher_replica == 'matching'
    if stage.teacher:
      teacher_stage = config.stages[stage.teacher]
      teacher = models.get_model(teacher_stage.model, dataset.num_classes,
                                 dtype=jnp.dtype(stage.kd.teacher_dtype), **model_kwargs)
      teacher_replicas = stage_config(config, stage.teacher).num_replicas
      teacher_replicas = teacher_replicas if teacher_replicas > 1 else 0
      teacher_input = checkpoints.load_final_variables(
          os.path.join(workdir, 'stages', stage.teacher),
          _stacked_shapes(models.variable_shapes(teacher, dataset.image_shape), teacher_replicas))
      # Every replica learns from the teacher stage's replica 0, or with 'matching' from its own.
      if not per_replica:
        teacher_input = _first_replica(teacher_input, teacher_replicas)
      teacher_input = parallel.put_replicated(teacher_input, mesh)
      cached = stage.kd.cache_teacher_logits and not train.augments(config.data.augment)
      if cached:  # one teacher pass over the training set instead of one per epoch.
        cache_start = time.perf_counter()
        logits_fn = train.make_teacher_logits_fn(teacher, normalization, mesh)
        table = lambda variables: train.teacher_logits_table(
            teacher, variables, train_data, normalization, t.eval_batch_size, mesh, logits_fn)
        teacher_input = jax.block_until_ready(
            jnp.stack([table(train.replica(teacher_input, r)) for r in range(num_replicas)])
            if per_replica else table(teacher_input))
        print(f'[{name}] cached the teacher\'s logits on {num_train} training images in '
              f'{time.perf_counter() - cache_start:.1f} s.')

    train_step = train.make_train_step(student, teacher, _loss_config(stage), config.data.augment,
                                       normalization, skip_nonfinite=t.nan_policy == 'skip',
                                       teacher_logits_cached=cached, num_replicas=num_replicas,
                                       mesh=mesh, replica_batching=config.replica_batching,
                                       teacher_per_replica=per_replica)
    multi_exit = models.is_multi_exit(stage.model)
    eval_step = train.make_eval_step(normalization, multi_exit, num_replicas=num_replicas,
                                     mesh=mesh)
    augment_key = _replica_keys(config, name, 'augment', num_replicas)
    take_batch = jax.jit(
        lambda permutation, position: jax.lax.dynamic_slice_in_dim(
            permutation, position * t.batch_size, t.batch_size),
        out_shardings=parallel.batch_sharded(mesh))
    indices = jnp.zeros((t.batch_size,), jnp.int32)
    compile_start = time.perf_counter()
    train_step = train_step.lower(state, teacher_input, train_data, indices,
                                  augment_key).compile()
    compile_s = time.perf_counter() - compile_start

    def save(final: bool, unchecked_metrics, **extra):
      _check_finite(unchecked_metrics, name, step, stage.loss)  # never checkpoint a NaN state.
      checkpoints.save(manager, state, {'final': final, **extra,
                                        'wall_s': wall_s_before + time.perf_counter() - start})

    progress = _progress_bar(config, name, total_steps, _step_of(state))
    step = _step_of(state)
    permutation = None
    epoch_metrics, unchecked, epoch_start, epoch_images = [], [], time.perf_counter(), 0
    with _preemption_guard() as preempted:
      while step < total_steps:
        epoch, position = divmod(step, steps_per_epoch)
        if permutation is None or position == 0:
          permutation = _epoch_permutation(config.seed, name, epoch, num_train)
        batch_indices = take_batch(permutation, position)
        state, step_metrics = train_step(state, teacher_input, train_data, batch_indices,
                                         augment_key)
        step += 1
        epoch_metrics.append(step_metrics)
        unchecked.append(step_metrics)
        epoch_images += t.batch_size
        progress.update(1)
        end_of_epoch = step % steps_per_epoch == 0
        if end_of_epoch:
          summary = _epoch_summary(epoch_metrics)
          seconds = time.perf_counter() - epoch_start
          summary.update(train.evaluate(eval_step, state, test_data, t.eval_batch_size))
          if val_data is not None:
            summary.update({'val_' + key[len('test_'):]: value for key, value in train.evaluate(
                eval_step, state, val_data, t.eval_batch_size).items()})
          summary.update(epoch=epoch + 1, step=step, learning_rate=float(schedule(step - 1)),
                         images_per_s=epoch_images / seconds, epoch_s=seconds)
          _check_finite(unchecked, name, step, stage.loss)
          unchecked = []  # checked: the save below need not fetch them again.
          with open(metrics_path, 'a') as f:
            f.write(json.dumps(summary) + '\n')
          progress.set_postfix(loss=f"{summary['train_loss']:.3f}",
                               test_acc=f"{np.mean(summary['test_accuracy']):.3f}")
          epoch_metrics, epoch_start, epoch_images = [], time.perf_counter(), 0
        periodic = t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0
        if step < total_steps and (end_of_epoch or periodic or preempted()):
          save(False, unchecked)
          unchecked = []
        if preempted() and step < total_steps:
          progress.close()
          raise Preempted(f"[{name}] stopped by SIGTERM at step {step}; checkpoint saved in "
                          f"{stage_dir}. Re-run the same command to resume.")
    progress.close()

    history = read_metrics(metrics_path)
    last = history[-1]
    mean = lambda key: float(np.mean(last[key]))  # a replica list, or one number.
    result = StageResult(
        name=name, model=stage.model, teacher=stage.teacher, loss=stage.loss,
        test_accuracy=mean('test_accuracy'), test_loss=mean('test_loss'),
        test_nontrue_mass=mean('test_nontrue_mass'), test_entropy=mean('test_entropy'),
        params=models.count_params(_first_replica(state.params, num_replicas)), epochs=t.epochs,
        wall_s=wall_s_before + time.perf_counter() - start, compile_s=compile_s,
        images_per_s=float(np.median([m['images_per_s'] for m in history])),
        skipped_steps=int(sum(m.get('skipped_steps', 0) for m in history)))
    if 'val_accuracy' in last:
      result.val_accuracy = mean('val_accuracy')
      result.selected_epoch, result.selected_test_accuracy = _select_on_validation(history)
    if num_replicas:
      result.test_accuracy_std = float(np.std(last['test_accuracy'], ddof=1))
      result.replicas = {'seeds': [config.seed + r for r in range(num_replicas)],
                         'test_accuracy': last['test_accuracy'], 'test_loss': last['test_loss']}
    if multi_exit:
      variables = _first_replica({'params': state.params, 'batch_stats': state.batch_stats},
                                 num_replicas)
      result.exits = {'test_accuracy': np.mean(last['test_accuracy_exits'], axis=0).tolist()
                                       if num_replicas else last['test_accuracy_exits'],
                      'ensemble_test_accuracy': mean('test_accuracy_ensemble'),
                      'macs': models.exit_macs(student, variables, dataset.image_shape)}
    save(True, unchecked, result=dataclasses.asdict(result))
    return result


@contextlib.contextmanager
def _preemption_guard():
  """Turns SIGTERM (a preemption notice) into a flag the training loop polls after each step."""
  received = []
  if threading.current_thread() is not threading.main_thread():
    yield lambda: False  # signals can only be handled on the main thread.
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
  try:
    yield lambda: bool(received)
  finally:
    signal.signal(signal.SIGTERM, previous)


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


def _loss_config(stage):
  return ml_collections.ConfigDict({'loss': stage.loss, **stage.kd.to_dict()})


def _stack_on_host(step_metrics) -> dict:
  """Per-step metric dicts (device scalars) → one dict of numpy arrays, in one transfer."""
  return jax.device_get(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *step_metrics))


def _epoch_summary(epoch_metrics) -> dict:
  stacked = _stack_on_host(epoch_metrics)
  kept = stacked['skipped'] == 0
  mean = lambda x: float(np.mean(x[kept])) if kept.any() else float('nan')
  return {'train_loss': mean(stacked['loss']), 'train_accuracy': mean(stacked['accuracy']),
          'skipped_steps': int((~kept).sum())}


def _progress_bar(config, name, total, initial):
  import tqdm  # imported here: only the CLI path shows progress.
  return tqdm.tqdm(total=total, initial=initial, desc=f'[{name}]', unit='step',
                   disable=not config.progress_bar, dynamic_ncols=True, leave=True)


def read_metrics(path: str) -> List[dict]:
  """A stage's `metrics.jsonl`: one dict per finished epoch; `[]` if the file does not exist."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, completed_epochs: int) -> None:
  """Drops lines for epochs after the restored checkpoint, so a resumed run does not repeat them."""
  kept = [m for m in read_metrics(path) if m['epoch'] <= completed_epochs]
  with open(path, 'w') as f:
    f.writelines(json.dumps(m) + '\n' for m in kept)


# ---------------------------------------------------------------------------------------------
# A whole run.


def load_dataset(config) -> kd_data.Dataset:
  """The config's dataset, with `data.validation_size` training images held out for validation."""
  dataset = kd_data.load(config.data.name, config.data.npz,
                         num_classes=config.data.num_classes or None,
                         tfds_data_dir=config.data.tfds_data_dir or None)
  return kd_data.hold_out_validation(dataset, config.data.validation_size)


def _check_against_data(config, order, dataset: kd_data.Dataset, mesh) -> None:
  """The checks that need the data or the devices: batch sizes, class counts, input sizes."""
  num_train = len(dataset.x_train)
  for name in order:
    stage = stage_config(config, name)
    parallel.check_batch_size(stage.train.batch_size, mesh, f"stage '{name}': batch_size")
    parallel.check_batch_size(stage.train.eval_batch_size, mesh,
                              f"stage '{name}': eval_batch_size")
    if stage.train.batch_size > num_train:
      raise KdjaxError(f"stage '{name}': batch_size {stage.train.batch_size} exceeds the "
                       f'{num_train} training images; lower --config.train.batch_size.')
    if stage.kd.eta < 1 and stage.kd.tsd_k >= dataset.num_classes:
      raise KdjaxError(f"stage '{name}': tsd_k = {stage.kd.tsd_k} needs more than "
                       f'{dataset.num_classes} classes; set --config.kd.tsd_k below the number '
                       'of classes.')
    model = models.get_model(stage.model, dataset.num_classes,
                             shortcut=config.model.resnet_shortcut, conv=config.model.conv)
    models.variable_shapes(model, dataset.image_shape)  # raises if the images are too small.


# Settings that change how a run is shown or cached, never what it computes.
RUNTIME_ONLY_KEYS = ('progress_bar', 'compilation_cache_dir')


def _same_experiment(recorded_json: str, wanted_json: str) -> bool:
  try:
    recorded = json.loads(recorded_json)
  except ValueError:
    return False
  return recorded == _without_added_settings(recorded, json.loads(wanted_json))


def _experiment_json(config) -> str:
  settings = config.to_dict()
  for key in RUNTIME_ONLY_KEYS:
    settings.pop(key, None)
  return ml_collections.ConfigDict(settings).to_json_best_effort(indent=2, sort_keys=True)


# Settings added after runs already existed, with the value that computes what runs without them
# computed: a run recorded before a setting existed resumes if the config keeps that value.
# (`*` matches any stage name.)
ADDED_SETTINGS = (
    (('stages', '*', 'num_replicas'), 0),
    (('kd', 'noise_on'), 'teacher'),
    (('stages', '*', 'kd', 'noise_on'), 'teacher'),
    (('kd', 'teacher_replica'), 'first'),
    (('stages', '*', 'kd', 'teacher_replica'), 'first'),
)


def _without_added_settings(recorded: dict, wanted: dict) -> dict:
  """`wanted` less each `ADDED_SETTINGS` entry that `recorded` lacks and `wanted` holds neutral."""
  wanted = json.loads(json.dumps(wanted))  # a deep copy.

  def visit(old, new, path, neutral):
    if not isinstance(old, dict) or not isinstance(new, dict):
      return
    head, rest = path[0], path[1:]
    keys = list(new) if head == '*' else [head]
    for key in keys:
      if not rest:
        if key not in old and key in new and new[key] == neutral:
          del new[key]
      elif key in old and key in new:
        visit(old[key], new[key], rest, neutral)

  for path, neutral in ADDED_SETTINGS:
    visit(recorded, wanted, path, neutral)
  return wanted


def _claim_workdir(config, workdir: str, overwrite: bool) -> None:
  """Records the config in `workdir`; refuses a different experiment unless `overwrite`.

  A run recorded by an older kdjax, before some `ADDED_SETTINGS` existed, is the same experiment
  if this config holds those settings at their neutral values; its record is brought up to date.
  """
  path = os.path.join(workdir, 'config.json')
  wanted = _experiment_json(config)
  if os.path.exists(path):
    with open(path) as f:
      existing = f.read()
    if existing != wanted and _same_experiment(existing, wanted):
      print(f'{workdir}: recorded before some settings existed; they hold their neutral values '
            'here, so the run continues (config.json updated).')
    elif existing != wanted:
      if not overwrite:
        raise KdjaxError(
            f"'{workdir}' holds a run of a different config (see its config.json); kdjax will not "
            'mix two experiments in one folder. Use another --workdir, re-run with the original '
            'config to resume, or pass --overwrite to delete that run and start this one.')
      print(f'--overwrite: deleting the earlier run in {workdir}.')
      for entry in ('stages', *report.OUTPUT_FILES):
        target = os.path.join(workdir, entry)
        if os.path.isdir(target):
          shutil.rmtree(target)
        elif os.path.exists(target):
          os.remove(target)
  os.makedirs(workdir, exist_ok=True)
  with open(path, 'w') as f:
    f.write(wanted)


def run(config: ml_collections.ConfigDict, workdir: str,
        overwrite: bool = False) -> List[StageResult]:
  """Runs every stage of `config` in `workdir` and writes the results table and plot.

  Every check (config, data, workdir) happens before anything is written.
  """
  order = stage_order(config)
  dataset = load_dataset(config)
  mesh = parallel.make_mesh()
  _check_against_data(config, order, dataset, mesh)
  _claim_workdir(config, workdir, overwrite)
  mean, std = kd_data.channel_stats(dataset.x_train)
  normalization = train.Normalization(jnp.asarray(mean), jnp.asarray(std))
  device_data = _device_data(dataset, mesh)
  val = f' / {len(dataset.x_val)} validation' if dataset.x_val is not None else ''
  print(f'{dataset.name}: {len(dataset.x_train)} train{val} / {len(dataset.x_test)} test images '
        f'of {dataset.image_shape}, {dataset.num_classes} classes; stages: {" → ".join(order)}')
  results: Dict[str, StageResult] = {}
  for name in order:
    results[name] = run_stage(config, name, workdir, dataset, device_data, normalization, mesh)
  histories = {name: read_metrics(os.path.join(workdir, 'stages', name, 'metrics.jsonl'))
               for name in order}
  rows = [results[name] for name in order]
  report.write(workdir, dataset, [dataclasses.asdict(r) for r in rows], histories)
  return rows
