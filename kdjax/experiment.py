"""Stages and chains: train teacher → assistant(s) → student, each stage checkpointed and resumable.

A config's `stages` maps a stage name to `{model, loss, teacher, train, kd}`. Stages run teachers
first (a topological order, ties broken by name). Each stage lives in `WORKDIR/stages/<name>/`:

  checkpoints/   Orbax `CheckpointManager`: every epoch (and every `checkpoint_every_steps`), the
                 last few kept; the final one carries `"final": true` in its metadata.
  metrics.jsonl  one line per epoch: loss, accuracy, learning rate, images/s.

Running the same command again resumes an interrupted stage from its last checkpoint and skips
finished ones. The run ends with `results.json`, `results.md` and `test_accuracy.png`.
"""

import dataclasses
import json
import os
import time
import zlib
from typing import Dict, List, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from kdjax import data as kd_data
from kdjax import models
from kdjax import report
from kdjax import train
from kdjax.errors import KdjaxError

STAGE_KEYS = ('model', 'loss', 'teacher', 'train', 'kd')


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
  # Multi-exit models only: per-exit test accuracy, the exits' ensemble, and MACs per exit.
  exits: Optional[dict] = None


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
    _check_values(stage_config(config, name))

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
      (0 <= kd.noise_ce_weight <= 1, f'noise_ce_weight must lie in [0, 1], got {kd.noise_ce_weight}'),
      (0 < kd.primary_weight <= 1, f'primary_weight must lie in (0, 1], got {kd.primary_weight}'),
  ]
  for ok, message in checks:
    if not ok:
      raise KdjaxError(f'{where}: {message}.')


# ---------------------------------------------------------------------------------------------
# Checkpoints.


def _checkpoint_manager(directory: str, keep: Optional[int],
                        read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=not read_only,
                                         read_only=read_only)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=('model', 'optimizer', 'meta'))


def _save(manager, state: train.TrainState, meta: dict) -> None:
  # A host copy: the next train step donates the device buffers while Orbax writes in background.
  model, optimizer = jax.device_get((
      {'params': state.params, 'batch_stats': state.batch_stats},
      {'opt_state': state.opt_state, 'step': state.step}))
  manager.save(int(optimizer['step']), args=ocp.args.Composite(
      model=ocp.args.StandardSave(model), optimizer=ocp.args.StandardSave(optimizer),
      meta=ocp.args.JsonSave(meta)))


def _restore_meta(manager, step: int) -> dict:
  return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta


def _restore_state(manager, step: int, state: train.TrainState) -> train.TrainState:
  abstract = lambda tree: jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
  restored = manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(abstract({'params': state.params,
                                               'batch_stats': state.batch_stats})),
      optimizer=ocp.args.StandardRestore(abstract({'opt_state': state.opt_state,
                                                   'step': state.step}))))
  return state.replace(params=restored.model['params'],
                       batch_stats=restored.model['batch_stats'],
                       opt_state=restored.optimizer['opt_state'],
                       step=restored.optimizer['step'])


def load_final_variables(stage_dir: str, model, image_shape) -> dict:
  """The `{params, batch_stats}` of a finished stage, for use as a teacher."""
  manager = _checkpoint_manager(os.path.join(stage_dir, 'checkpoints'), keep=None,
                                read_only=True)
  step = manager.latest_step()
  if step is None or not _restore_meta(manager, step).get('final'):
    raise KdjaxError(f"no final checkpoint in '{stage_dir}'; the teacher stage must finish "
                     'first (re-run the same command to resume it).')
  target = models.variable_shapes(model, image_shape)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(target)))
  except Exception as e:  # orbax reports a tree or shape mismatch in its own words.
    raise KdjaxError(f"the checkpoint in '{stage_dir}' does not match the model the config "
                     f'names for that stage ({type(e).__name__}: {e}). Use the model it was '
                     'trained with, or delete the stage folder to retrain it.') from e
  manager.close()
  return restored.model


# ---------------------------------------------------------------------------------------------
# One stage.


def _device_data(dataset: kd_data.Dataset):
  put = lambda x: jax.device_put(x)
  return (train.DeviceData(put(dataset.x_train), put(dataset.y_train)),
          train.DeviceData(put(dataset.x_test), put(dataset.y_test)))


def _epoch_permutation(seed: int, stage_name: str, epoch: int, num_train: int) -> jax.Array:
  key = jax.random.fold_in(_stage_key(seed, stage_name, 'shuffle'), epoch)
  return jax.random.permutation(key, num_train)


def _stage_key(seed: int, stage_name: str, purpose: str) -> jax.Array:
  """An independent key per (seed, stage, purpose), stable across runs and resumes."""
  return jax.random.fold_in(jax.random.key(seed), zlib.crc32(f'{stage_name}/{purpose}'.encode()))


def run_stage(config, name: str, workdir: str, dataset: kd_data.Dataset, device_data,
              normalization: train.Normalization) -> StageResult:
  """Trains (or resumes, or skips if finished) one stage and returns its result."""
  stage = stage_config(config, name)
  t = stage.train
  stage_dir = os.path.join(workdir, 'stages', name)
  os.makedirs(stage_dir, exist_ok=True)
  model_kwargs = {'shortcut': config.model.resnet_shortcut}
  student = models.get_model(stage.model, dataset.num_classes, **model_kwargs)
  manager = _checkpoint_manager(os.path.join(stage_dir, 'checkpoints'), t.checkpoints_to_keep)
  latest = manager.latest_step()
  meta = _restore_meta(manager, latest) if latest is not None else {}
  if meta.get('final'):
    manager.close()
    print(f"[{name}] finished earlier (step {latest}); not retrained.")
    return StageResult(**meta['result'])

  num_train = dataset.x_train.shape[0]
  if t.batch_size > num_train:
    raise KdjaxError(f"stage '{name}': batch_size {t.batch_size} exceeds the {num_train} "
                     'training images; lower --config.train.batch_size.')
  steps_per_epoch = num_train // t.batch_size  # the last partial batch is dropped, as usual.
  total_steps = t.epochs * steps_per_epoch
  schedule = train.learning_rate_schedule(t, steps_per_epoch, stage.model)
  tx = train.make_optimizer(t, schedule)

  start = time.perf_counter()
  make_state = lambda variables: train.create_train_state(student, variables, tx)
  wall_s_before = 0.0
  if latest is None:
    state = make_state(models.init_variables(student, dataset.image_shape,
                                             _stage_key(config.seed, name, 'init')))
  else:  # restore into shapes only: a resume never pays for compiling the initialisers.
    shapes = models.variable_shapes(student, dataset.image_shape)
    state = _restore_state(manager, latest, jax.eval_shape(make_state, shapes))
    wall_s_before = meta.get('wall_s', 0.0)
    print(f'[{name}] resuming from step {latest} (epoch {latest / steps_per_epoch:.2f}).')
  _truncate_metrics(os.path.join(stage_dir, 'metrics.jsonl'), int(state.step) // steps_per_epoch)

  teacher, teacher_variables = None, {}
  if stage.teacher:
    teacher_stage = config.stages[stage.teacher]
    teacher = models.get_model(teacher_stage.model, dataset.num_classes, **model_kwargs)
    teacher_variables = load_final_variables(os.path.join(workdir, 'stages', stage.teacher),
                                             teacher, dataset.image_shape)

  train_data, test_data = device_data
  train_step = train.make_train_step(student, teacher, _loss_config(stage),
                                     config.data.augment, normalization)
  multi_exit = models.is_multi_exit(stage.model)
  eval_step = train.make_eval_step(normalization, multi_exit)
  augment_key = _stage_key(config.seed, name, 'augment')
  indices = jnp.zeros((t.batch_size,), jnp.int32)
  compile_start = time.perf_counter()
  train_step = train_step.lower(state, teacher_variables, train_data, indices,
                                augment_key).compile()
  compile_s = time.perf_counter() - compile_start

  progress = _progress_bar(config, name, total_steps, int(state.step))
  metrics_path = os.path.join(stage_dir, 'metrics.jsonl')
  step = int(state.step)
  permutation = None
  epoch_metrics, epoch_start, epoch_images = [], time.perf_counter(), 0
  while step < total_steps:
    epoch, position = divmod(step, steps_per_epoch)
    if permutation is None or position == 0:
      permutation = _epoch_permutation(config.seed, name, epoch, num_train)
    batch_indices = jax.lax.dynamic_slice_in_dim(permutation, position * t.batch_size,
                                                 t.batch_size)
    state, step_metrics = train_step(state, teacher_variables, train_data, batch_indices,
                                     augment_key)
    step += 1
    epoch_metrics.append(step_metrics)
    epoch_images += t.batch_size
    progress.update(1)
    end_of_epoch = step % steps_per_epoch == 0
    if end_of_epoch:
      summary = _epoch_summary(epoch_metrics, name, epoch, step)
      seconds = time.perf_counter() - epoch_start
      summary.update(train.evaluate(eval_step, state, test_data, t.eval_batch_size))
      summary.update(epoch=epoch + 1, step=step, learning_rate=float(schedule(step - 1)),
                     images_per_s=epoch_images / seconds, epoch_s=seconds)
      with open(metrics_path, 'a') as f:
        f.write(json.dumps(summary) + '\n')
      progress.set_postfix(loss=f"{summary['train_loss']:.3f}",
                           test_acc=f"{summary['test_accuracy']:.3f}")
      epoch_metrics, epoch_start, epoch_images = [], time.perf_counter(), 0
    if end_of_epoch or (t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0):
      elapsed = wall_s_before + time.perf_counter() - start
      if step < total_steps:
        _save(manager, state, {'final': False, 'wall_s': elapsed})
  progress.close()

  history = _read_metrics(metrics_path)
  last = history[-1]
  result = StageResult(
      name=name, model=stage.model, teacher=stage.teacher, loss=stage.loss,
      test_accuracy=last['test_accuracy'], test_loss=last['test_loss'],
      test_nontrue_mass=last['test_nontrue_mass'], test_entropy=last['test_entropy'],
      params=models.count_params(state.params), epochs=t.epochs,
      wall_s=wall_s_before + time.perf_counter() - start, compile_s=compile_s,
      images_per_s=float(np.median([m['images_per_s'] for m in history])))
  if multi_exit:
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    result.exits = {'test_accuracy': last['test_accuracy_exits'],
                    'ensemble_test_accuracy': last['test_accuracy_ensemble'],
                    'macs': models.exit_macs(student, variables, dataset.image_shape)}
  _save(manager, state, {'final': True, 'wall_s': result.wall_s,
                         'result': dataclasses.asdict(result)})
  manager.wait_until_finished()
  manager.close()
  return result


def _loss_config(stage):
  return ml_collections.ConfigDict({'loss': stage.loss, **stage.kd.to_dict()})


def _epoch_summary(epoch_metrics, name, epoch, step) -> dict:
  stacked = jax.device_get(jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *epoch_metrics))
  if not np.all(np.isfinite(stacked['loss'])):
    bad = int(np.argmin(np.isfinite(stacked['loss'])))
    raise KdjaxError(f"stage '{name}': the training loss became {stacked['loss'][bad]} at step "
                     f'{step - len(epoch_metrics) + bad + 1} (epoch {epoch + 1}). The last good '
                     'checkpoint is kept; lower the learning rate or check the data, then '
                     're-run to resume from it.')
  return {'train_loss': float(np.mean(stacked['loss'])),
          'train_accuracy': float(np.mean(stacked['accuracy']))}


def _progress_bar(config, name, total, initial):
  import tqdm  # imported here: only the CLI path shows progress.
  return tqdm.tqdm(total=total, initial=initial, desc=f'[{name}]', unit='step',
                   disable=not config.progress_bar, dynamic_ncols=True, leave=True)


def _read_metrics(path: str) -> List[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _truncate_metrics(path: str, completed_epochs: int) -> None:
  """Drops lines for epochs after the restored checkpoint, so a resumed run does not repeat them."""
  kept = [m for m in _read_metrics(path) if m['epoch'] <= completed_epochs]
  with open(path, 'w') as f:
    f.writelines(json.dumps(m) + '\n' for m in kept)


# ---------------------------------------------------------------------------------------------
# A whole run.


def load_dataset(config) -> kd_data.Dataset:
  return kd_data.load(config.data.name, config.data.npz,
                      num_classes=config.data.num_classes or None,
                      tfds_data_dir=config.data.tfds_data_dir or None)


def run(config: ml_collections.ConfigDict, workdir: str) -> List[StageResult]:
  """Runs every stage of `config` in `workdir` and writes the results table and plot."""
  order = stage_order(config)
  dataset = load_dataset(config)
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  mean, std = kd_data.channel_stats(dataset.x_train)
  normalization = train.Normalization(jnp.asarray(mean), jnp.asarray(std))
  device_data = _device_data(dataset)
  print(f'{dataset.name}: {len(dataset.x_train)} train / {len(dataset.x_test)} test images of '
        f'{dataset.image_shape}, {dataset.num_classes} classes; stages: {" → ".join(order)}')
  results: Dict[str, StageResult] = {}
  for name in order:
    results[name] = run_stage(config, name, workdir, dataset, device_data, normalization)
  histories = {name: _read_metrics(os.path.join(workdir, 'stages', name, 'metrics.jsonl'))
               for name in order}
  rows = [results[name] for name in order]
  report.write(workdir, dataset, [dataclasses.asdict(r) for r in rows], histories)
  return rows
