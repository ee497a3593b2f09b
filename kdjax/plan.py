"""Plan, then run: a config and its dataset resolved once into one frozen `StagePlan` per stage.

`plan(config, data_info, num_devices)` makes every check a run needs (the config's values, its
stage graph, the data and the devices) and resolves every default, with no compile and no
writes, so a mistake is reported before anything is trained or written. The training loop
(`kdjax.experiment.run_stage`) only reads the plan.

A teacher is an earlier stage of the run or an external teacher (`config.external_teachers`: a
PyTorch or safetensors file, `kdjax.torch_import`), whose file is read and checked against its
layout here and whose SHA-256 the plan records (`TeacherPlan.fingerprint`): a stage trained
from a file that has changed since is then refused (`experiment.restore_checked`).
"""

import dataclasses
import hashlib
import json
import os
import re
from typing import Callable, Dict, List, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import optax

from kdjax import checkpoints
from kdjax import config_layout
from kdjax.data import augment as augment_lib
from kdjax import flax_import
from kdjax import models
from kdjax import stage_losses
from kdjax import torch_import
from kdjax import train
from kdjax.errors import KdjaxError

TEACHER_DTYPES = ('float32', 'bfloat16')
TEACHER_REPLICA = ('first', 'matching')
CACHE_DTYPES = ('float32', 'float16')


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What planning needs to know of a dataset (nothing is loaded on device)."""
  name: str
  num_train: int
  num_classes: int
  image_shape: Tuple[int, ...]
  has_validation: bool = False

  @classmethod
  def of(cls, dataset) -> 'DataInfo':
    return cls(dataset.name, int(len(dataset.x_train)), int(dataset.num_classes),
               tuple(dataset.image_shape), dataset.x_val is not None)


@dataclasses.dataclass(frozen=True)
class TrainPlan:
  epochs: int
  batch_size: int
  eval_batch_size: int
  steps_per_epoch: int  # the last partial batch is dropped, as usual.
  checkpoint_every_steps: int  # 0: at the end of each epoch only.
  checkpoints_to_keep: int
  skip_nonfinite: bool  # nan_policy 'skip': a non-finite step is dropped, not fatal.
  schedule: Callable = dataclasses.field(compare=False, repr=False)
  optimizer: optax.GradientTransformation = dataclasses.field(compare=False, repr=False)

  @property
  def total_steps(self) -> int:
    return self.epochs * self.steps_per_epoch


@dataclasses.dataclass(frozen=True)
class TeacherPlan:
  """One teacher, its module built with the teacher dtype: an earlier stage of this run, or
  (`source_path` set) an external teacher's file in a public `layout`."""
  stage: str          # the stage's name, or the external teacher's.
  weight: float
  model: nn.Module
  num_replicas: int   # how many models that stage trained (its checkpoint's stacking).
  per_replica: bool   # student replica r learns from that stage's replica r.
  source_path: str = ''  # an external teacher's file ('' for a stage of this run).
  layout: str = ''       # its layout, a key of `kdjax.torch_import.LAYOUTS`.
  fingerprint: str = ''  # its SHA-256 when planned, so that a changed file is noticed.


@dataclasses.dataclass(frozen=True)
class ExternalTeacher:
  """`config.external_teachers.<name>`, checked: the file holds `model_name` in `layout`; or
  (`layout='kdjax'`) a finished stage of another kdjax run, `'/path/to/workdir:stage'`."""
  name: str
  model_name: str
  path: str
  layout: str
  fingerprint: str
  num_replicas: int = 1   # another run's stage: how many models it trained.
  shortcut: str = ''      # another run's stage: the ResNet shortcut it was trained with.


@dataclasses.dataclass(frozen=True)
class TeacherSourcePlan:
  teachers: Tuple[TeacherPlan, ...] = ()
  ensemble: bool = False      # the loss learns from several teachers: logits on a [K] axis.
  # Computed once: without augmentation per stage (on device, or in a file when streamed); with
  # per-example views (`cache_views`) once per epoch's views, in a file every stage shares.
  cache_logits: bool = False
  cache_views: bool = False
  per_replica: bool = False
  # A streamed training set's cached logits go to a file (`teachers.disk_cache`), in this dtype.
  cache_dtype: str = 'float32'
  # > 0: the file keeps each example's k largest logits and the rest's log-sum-exp
  # (`teachers.compress_top_k`); 0: all of them.
  cache_top_k: int = 0

  @property
  def names(self) -> str:
    return '+'.join(t.stage for t in self.teachers)


@dataclasses.dataclass(frozen=True)
class Augment:
  enabled: bool
  crop_padding: int
  flip: bool
  kind: str = 'pad_crop_flip'  # or 'random_resized_crop' (`kdjax.data.augment.KINDS`).
  size: int = 0                # random_resized_crop's output side; 0: the images' own size.
  draw: str = 'per_batch'      # or 'per_example' (`kdjax.data.augment.ExampleViews`).


@dataclasses.dataclass(frozen=True)
class StagePlan:
  name: str
  model_name: str
  model: nn.Module
  loss_name: str
  loss: object          # a `kdjax.stage_losses` object: per-example values, its own settings.
  teacher: TeacherSourcePlan
  num_replicas: int     # >= 1 students trained at once.
  replica_batching: str  # 'vmap' or 'unroll' (resolved from 'auto').
  seed: int
  train: TrainPlan
  augment: Augment
  evaluators: Tuple[str, ...]  # 'test', and 'validation' when the data holds one out.
  multi_exit: bool
  image_shape: Tuple[int, ...]
  num_classes: int
  settings_fingerprint: str = ''  # SHA-256 of the stage's effective settings (provenance).
  batching_note: str = ''         # what 'auto' chose and why, when the user should know.
  max_skipped_fraction: float = 0.01  # nan_policy 'skip': the stage fails above this fraction.

  @property
  def views(self) -> Optional[augment_lib.ExampleViews]:
    """Per-example augmented views (`data.augment.draw='per_example'`), or None."""
    if self.augment.draw != 'per_example' or not train.augments(self.augment):
      return None
    return augment_lib.ExampleViews(self.seed, self.train.steps_per_epoch)

  @property
  def replica_axis(self) -> Optional[int]:
    """The size of the students' stacked axis, or None for one student (no axis)."""
    return self.num_replicas if self.num_replicas > 1 else None

  @property
  def seeds(self) -> List[int]:
    return [self.seed + r for r in range(self.num_replicas)]


def plan(config: ml_collections.ConfigDict, data: DataInfo, num_devices: int = 1,
         backend: str = 'cpu') -> List[StagePlan]:
  """Every stage of `config`, checked and resolved, in the order to run them (teachers first)."""
  _check_globals(config)
  order = stage_order(config)
  external = {name: _external_teacher(config, name, data)
              for name in config_layout.external_teacher_names(config)}
  external.update({ref: _other_run_teacher(ref) for ref in _workdir_references(config)})
  settings = {name: config_layout.stage_settings(config, name) for name in order}
  for name in config.get('losses') or {}:  # a typo in an unused loss's block is still a typo.
    several = name in stage_losses.LOSSES and stage_losses.LOSSES[name].several_teachers
    _loss(name, dict(config.losses[name]), 'config.losses', data.num_classes,
          (1.0,) if several else ())  # a stand-in teacher: the weights are the stages'.
  fingerprints = _settings_fingerprints(config)
  plans: Dict[str, StagePlan] = {}
  for name in order:
    plans[name] = _stage_plan(config, settings, name, plans, external, data, num_devices,
                              backend, fingerprints[name])
  return [plans[name] for name in order]


# On CPU, 'auto' unrolls the students' updates (XLA's CPU grouped convolutions, which vmap makes,
# ran at half speed), but compile time grows with each unrolled copy: 17 s for 8 ResNet-8
# students against 5 s vmapped, and over 200 s (3.5 GB) for 64 against 63 s. Above this many,
# 'auto' vmaps there too.
UNROLL_AT_MOST = 16
# nan_policy 'skip' drops a step whose loss is not finite; a stage that drops more than this
# fraction of its steps (per student) fails rather than report a result trained on the rest.
DEFAULT_MAX_SKIPPED = 0.01


def replica_batching(requested: str, num_replicas: int, backend: str) -> Tuple[str, str]:
  """('vmap' | 'unroll', a note for the user or '') for `config.replica_batching`."""
  if requested == 'auto':
    if backend != 'cpu':
      return 'vmap', ''
    if num_replicas <= UNROLL_AT_MOST:
      return 'unroll', ''
    return 'vmap', (f"replica_batching 'auto': {num_replicas} students are vmapped on CPU "
                    f'(unrolling more than {UNROLL_AT_MOST} would compile for minutes); each step '
                    "runs slower than unrolled. Set --config.replica_batching=unroll to trade "
                    'compile time for step time.')
  if requested == 'unroll' and backend == 'cpu' and num_replicas > UNROLL_AT_MOST:
    return 'unroll', (f'replica_batching unroll: compiling {num_replicas} unrolled students '
                      'takes about 2 s each on CPU (ResNet-8, 2 cores), a few minutes in all, '
                      'and memory grows with them.')
  return requested, ''


def _settings_fingerprints(config) -> Dict[str, str]:
  """`{stage: SHA-256}` of what each stage computes: its effective settings with the run-wide
  ones (`config_layout.effective_settings`), so a stage's checkpoints can tell a resume or a skip
  run with another config (config.json deleted, say) from its own."""
  settings = config_layout.effective_settings(config)
  shared = {k: v for k, v in settings.items() if k != 'stages'}
  return {name: hashlib.sha256(json.dumps({**shared, 'stage': stage}, sort_keys=True)
                               .encode()).hexdigest()
          for name, stage in settings['stages'].items()}


def _check_globals(config) -> None:
  if not config.get('stages') or not config.stages.keys():
    raise KdjaxError('config.stages is empty; define at least one stage.')
  if config.get('replica_batching') not in train.REPLICA_BATCHING:
    raise KdjaxError(f"unknown replica_batching '{config.get('replica_batching')}'; choose one "
                     f"of: {', '.join(train.REPLICA_BATCHING)}.")
  skipped = config.get('max_skipped_fraction', DEFAULT_MAX_SKIPPED)
  if isinstance(skipped, bool) or not isinstance(skipped, (int, float)) or not 0 <= skipped <= 1:
    raise KdjaxError('config.max_skipped_fraction must be a number in [0, 1] (the fraction of '
                     f"steps nan_policy='skip' may drop before a stage fails), got {skipped!r}.")
  replicas = config.get('num_replicas')
  if not _is_int(replicas) or replicas < 1:
    raise KdjaxError(f'config.num_replicas must be an integer >= 1 (students trained at once), '
                     f'got {replicas!r}.')


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def stage_order(config) -> List[str]:
  """The stages' graph checked, and the order to run them in.

  `config.stage_order` if given (it must list every stage, teachers first); otherwise teachers
  before their students, ties broken by name.
  """
  names = config_layout.stage_names(config)
  _check_stage_names(names)
  external = _check_external_teachers(config, names)
  teachers = {}
  for name in names:
    stage = config.stages[name]
    unknown = set(stage.keys()) - set(config_layout.STAGE_KEYS)
    if unknown:
      raise KdjaxError(f"stage '{name}': unknown keys {sorted(unknown)}; a stage has: "
                       f"{', '.join(config_layout.STAGE_KEYS)}.")
    teachers[name] = list(config_layout.stage_settings(config, name).teachers)
    for teacher in teachers[name]:
      if teacher == name:
        raise KdjaxError(f"stage '{name}' is its own teacher; a teacher must be an earlier "
                         'stage.')
      if config_layout.workdir_reference(teacher):
        external = [*external, teacher]  # another run's stage: checked when planned.
      if teacher not in names and teacher not in external:
        also = f"; external teachers: {', '.join(external)}" if external else ''
        raise KdjaxError(f"stage '{name}': teacher '{teacher}' is not a stage of this config; "
                         f"stages are: {', '.join(names)}{also}.")
    teachers[name] = [t for t in teachers[name] if t not in external]  # ready from the start.
  requested = list(config.get('stage_order') or ())
  if requested:
    if sorted(requested) != sorted(names):
      raise KdjaxError(f'config.stage_order {requested} must list every stage exactly once; '
                       f'the stages are: {", ".join(names)}.')
    for position, name in enumerate(requested):
      for teacher in teachers[name]:
        if teacher not in requested[:position]:
          raise KdjaxError(f"stage '{name}' has teacher '{teacher}', which is not an earlier "
                           'stage in config.stage_order; move the teacher before its student.')
    return requested
  order, done = [], set()
  while len(order) < len(names):
    ready = sorted(n for n in names if n not in done and set(teachers[n]) <= done)
    if not ready:
      cycle = sorted(set(names) - done)
      raise KdjaxError(f'the stages {cycle} are teachers of each other in a cycle; every '
                       'teacher must be a stage that can finish before its student starts.')
    order.append(ready[0])
    done.add(ready[0])
  return order


# A stage's name is a folder name under WORKDIR/stages/: letters, digits, '_', '-', '.', starting
# with a letter or digit, so it can be neither absolute, nor '..', nor hold a path separator.
STAGE_NAME = re.compile(r'[A-Za-z0-9][A-Za-z0-9_.-]{0,99}')


def _check_stage_names(names) -> None:
  """Every stage writes only inside its own folder, which no other stage's name shares."""
  for name in names:
    if not isinstance(name, str) or not STAGE_NAME.fullmatch(name):
      raise KdjaxError(
          f'stage name {name!r} cannot be a folder name inside the workdir: a stage is named '
          "with letters, digits, '_', '-' and '.', starting with a letter or digit, at most 100 "
          "characters (no '/', '\\', absolute paths or '..'). Rename the stage in config.stages "
          '(and wherever it is named as a teacher).')
  by_folding = {}
  for name in names:
    by_folding.setdefault(name.casefold(), []).append(name)
  clashes = [group for group in by_folding.values() if len(group) > 1]
  if clashes:
    raise KdjaxError(
        f'stage names {clashes[0]} differ only in upper and lower case: on a case-insensitive '
        'filesystem (macOS, Windows, some network mounts) they would share one folder and '
        'overwrite each other\'s checkpoints. Give each stage a name of its own.')


def _check_external_teachers(config, stage_names) -> List[str]:
  """The names of `config.external_teachers`, each block's keys and values checked."""
  names = config_layout.external_teacher_names(config)
  for name in names:
    where = f"config.external_teachers.{name}"
    block = config.external_teachers[name]
    if not hasattr(block, 'keys'):
      raise KdjaxError(f'{where} must be a block such as dict(path=..., model=..., layout=...), '
                       f'got {block!r}.')
    if name in stage_names:
      raise KdjaxError(f"{where}: '{name}' is also a stage's name; give the external teacher "
                       'another name.')
    keys = set(block.keys())
    if keys != set(config_layout.EXTERNAL_TEACHER_KEYS):
      wrong = sorted(keys - set(config_layout.EXTERNAL_TEACHER_KEYS))
      absent = sorted(set(config_layout.EXTERNAL_TEACHER_KEYS) - keys)
      raise KdjaxError(f'{where}: ' + (f'unknown keys {wrong}' if wrong else f'missing {absent}')
                       + f"; an external teacher has: "
                       f"{', '.join(config_layout.EXTERNAL_TEACHER_KEYS)}.")
    for key in config_layout.EXTERNAL_TEACHER_KEYS:
      if not isinstance(block[key], str) or not block[key]:
        raise KdjaxError(f'{where}.{key} must be a non-empty string, got {block[key]!r}.')
    try:
      if block.layout in flax_import.LAYOUTS:  # any model of the registry.
        models.check_model_name(block.model)
      else:
        torch_import.check_model(block.model, block.layout)
    except KdjaxError as e:
      raise KdjaxError(f'{where}: {e}') from None
    if not os.path.exists(block.path):
      raise KdjaxError(f"{where}: the file '{block.path}' does not exist; check the path.")
  return names


def _external_teacher(config, name, data: DataInfo) -> ExternalTeacher:
  """The external teacher `name`, its file read and checked against its layout."""
  block = config.external_teachers[name]
  source = f"config.external_teachers.{name} ('{block.path}')"
  if block.layout in flax_import.LAYOUTS:  # a Flax or Orbax checkpoint of a registry model.
    model = _model(config, block.model, data, source)
    flax_import.read_variables(block.path, block.layout,
                               models.variable_shapes(model, data.image_shape), source)
    return ExternalTeacher(name, block.model, block.path, block.layout,
                           flax_import.fingerprint(block.path))
  model = torch_import.build_model(block.model, data.num_classes, conv=config.model.conv)
  fingerprint = torch_import.sha256(block.path)
  try:
    state_dict = torch_import.read_state_dict(block.path)
  except KdjaxError as e:
    raise KdjaxError(f'config.external_teachers.{name}: {e}') from None
  torch_import.check_state_dict(state_dict, model, data.image_shape, block.layout, source)
  return ExternalTeacher(name, block.model, block.path, block.layout, fingerprint)


def _workdir_references(config) -> List[str]:
  """Every `'/path/to/workdir:stage'` some stage names as a teacher."""
  return sorted({teacher for name in config_layout.stage_names(config)
                 for teacher in config_layout.stage_settings(config, name).teachers
                 if config_layout.workdir_reference(teacher)})


def _other_run_teacher(reference: str) -> ExternalTeacher:
  """A finished stage of another kdjax run: its model and replicas from that run's config.json,
  the fingerprint of its final checkpoint (which must exist)."""
  workdir, stage = config_layout.workdir_reference(reference)
  where = f"teacher '{reference}'"
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise KdjaxError(f"{where}: '{workdir}' holds no kdjax run (no config.json); give the "
                     "folder of a finished run as '/path/to/workdir:stage'.")
  with open(path) as f:
    recorded = ml_collections.ConfigDict(config_layout.upgrade_layout(json.load(f)))
  if stage not in config_layout.stage_names(recorded):
    raise KdjaxError(f"{where}: the run in '{workdir}' has no stage '{stage}'; its stages are: "
                     f"{', '.join(config_layout.stage_names(recorded))}.")
  settings = config_layout.stage_settings(recorded, stage)
  fingerprint = checkpoints.final_fingerprint(os.path.join(workdir, 'stages', stage))
  return ExternalTeacher(reference, settings.model, workdir, 'kdjax', fingerprint,
                         num_replicas=settings.num_replicas,
                         shortcut=recorded.model.resnet_shortcut)


def _loss(name, settings, where, num_classes, teacher_weights=()):
  try:
    return stage_losses.get_loss(name, settings, num_classes=num_classes,
                                 teacher_weights=teacher_weights)
  except KdjaxError as e:
    raise KdjaxError(f'{where}: {e}') from None


def _stage_plan(config, settings, name, earlier, external, data: DataInfo, num_devices,
                backend, settings_fingerprint):
  stage = settings[name]
  where = f"stage '{name}'"
  model = _model(config, stage.model, data, where)
  multi_exit = models.is_multi_exit(model)
  if stage.loss not in stage_losses.LOSSES:
    raise KdjaxError(f"{where}: unknown loss '{stage.loss}'; choose one of: "
                     f"{', '.join(stage_losses.LOSSES)}.")
  loss_class = stage_losses.LOSSES[stage.loss]
  loss = _loss(stage.loss, stage.loss_kw.to_dict(), where, data.num_classes,
               tuple(stage.teachers.values()) if loss_class.several_teachers else ())
  _check_loss_fits(where, stage, loss_class, multi_exit, earlier)  # external: never multi-exit.
  own_replicas = config.stages[name].get('num_replicas', 0)
  if not _is_int(own_replicas) or own_replicas < 0:
    raise KdjaxError(f"{where}: num_replicas must be an integer >= 1, or 0 for "
                     f'config.num_replicas; got {own_replicas!r}.')
  train_plan = _train_plan(stage.train, stage.model, data, num_devices, where)
  augment = _augment(config.data.augment, data)
  teacher = _teacher_source_plan(config, stage, earlier, external, data, augment, where)
  evaluators = ('test', 'validation') if data.has_validation else ('test',)
  batching, batching_note = replica_batching(config.replica_batching, stage.num_replicas,
                                             backend)
  return StagePlan(
      name=name, model_name=stage.model, model=model, loss_name=stage.loss, loss=loss,
      teacher=teacher, num_replicas=stage.num_replicas, replica_batching=batching,
      seed=config.seed, train=train_plan, augment=augment, evaluators=evaluators,
      multi_exit=multi_exit, image_shape=data.image_shape, num_classes=data.num_classes,
      settings_fingerprint=settings_fingerprint, batching_note=batching_note,
      max_skipped_fraction=float(config.get('max_skipped_fraction', DEFAULT_MAX_SKIPPED)))


def _augment(block, data: DataInfo) -> Augment:
  """`config.data.augment`, checked: its kind, and a random resized crop's size against the
  images (the test split is evaluated as stored, so a model must train at the stored size)."""
  kind, size = block.get('kind', 'pad_crop_flip'), block.get('size', 0)
  draw = block.get('draw', 'per_batch')
  if kind not in augment_lib.KINDS:
    raise KdjaxError(f"unknown data.augment.kind '{kind}'; choose one of: "
                     f"{', '.join(augment_lib.KINDS)}.")
  if draw not in augment_lib.DRAWS:
    raise KdjaxError(f"unknown data.augment.draw '{draw}'; choose one of: "
                     f"{', '.join(augment_lib.DRAWS)} ('per_example' draws each example's view "
                     'from (seed, epoch, index), so a teacher\'s logits on it can be cached).')
  if not _is_int(size) or size < 0:
    raise KdjaxError(f'data.augment.size must be an integer >= 0 (0: the images\' size), got '
                     f'{size!r}.')
  height, width = data.image_shape[:2]
  if block.enabled and kind == 'random_resized_crop' and size and (size, size) != (height, width):
    raise KdjaxError(
        f'data.augment.size {size} differs from the {height}×{width} images of {data.name}: '
        'kdjax evaluates the test images as they are stored, so a model trained on '
        f'{size}×{size} crops would be tested at {height}×{width}. Store the images at the '
        'training size instead (a TFDS dataset: --config.data.image_size, which stores the test '
        'split as resize-then-center-crop, the ImageNet protocol) and leave data.augment.size 0.')
  return Augment(bool(block.enabled), int(block.crop_padding), bool(block.flip), kind, int(size),
                 draw)


def _model(config, name, data: DataInfo, where, dtype=jnp.float32,
           shortcut: Optional[str] = None) -> nn.Module:
  try:
    models.check_model_name(name)
  except KdjaxError as e:
    raise KdjaxError(f'{where}: {e}') from None
  model = models.get_model(name, data.num_classes, dtype=dtype,
                           shortcut=shortcut or config.model.resnet_shortcut,
                           conv=config.model.conv)
  models.variable_shapes(model, data.image_shape)  # raises if the images are too small.
  return model


def _check_loss_fits(where, stage, loss_class, multi_exit, earlier) -> None:
  teachers = list(stage.teachers)
  if multi_exit != loss_class.multi_exit:
    exit_losses = [n for n, c in stage_losses.LOSSES.items() if c.multi_exit]
    raise KdjaxError(
        f"{where}: model '{stage.model}' and loss '{stage.loss}' do not fit: the multi-exit "
        f"losses ({', '.join(exit_losses)}) need a multi-exit model (multi_exit_*) and a "
        'multi-exit model needs one of them.')
  if multi_exit and teachers:
    raise KdjaxError(f'{where}: a multi-exit stage teaches itself; clear its teacher.')
  for teacher in teachers:
    if teacher in earlier and earlier[teacher].multi_exit:
      raise KdjaxError(f"{where}: teacher '{teacher}' is a multi-exit model; use a "
                       'single-exit stage as a teacher.')
  if loss_class.needs_teacher and not teachers:
    raise KdjaxError(f"{where} uses loss '{stage.loss}' but names no teacher; set "
                     f"--config.stages.{stage.name}.teacher to an earlier stage, or use loss "
                     "'ce'.")
  if not loss_class.needs_teacher and teachers:
    raise KdjaxError(f"{where} names teacher '{'+'.join(teachers)}' but its loss "
                     f"'{stage.loss}' ignores it; use a distillation loss or clear the teacher.")
  if len(teachers) > 1 and not loss_class.several_teachers:
    several = [n for n, c in stage_losses.LOSSES.items() if c.several_teachers]
    raise KdjaxError(f"{where} names {len(teachers)} teachers but loss '{stage.loss}' learns "
                     f"from one; use {', '.join(several)} to learn from several.")


def _train_plan(t, model_name, data: DataInfo, num_devices, where) -> TrainPlan:
  checks = [
      (_is_int(t.epochs) and t.epochs >= 1, f'epochs must be an integer >= 1, got {t.epochs!r}'),
      (_is_int(t.batch_size) and t.batch_size >= 1,
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
  ]
  for ok, message in checks:
    if not ok:
      raise KdjaxError(f'{where}: {message}.')
  for setting in ('batch_size', 'eval_batch_size'):
    if t[setting] % num_devices:
      raise KdjaxError(
          f'{where}: {setting} {t[setting]} does not split evenly over the {num_devices} devices '
          f'of the data-parallel mesh; use a multiple of {num_devices} (the global batch is '
          f'divided into {num_devices} equal shards).')
  if t.batch_size > data.num_train:
    raise KdjaxError(f'{where}: batch_size {t.batch_size} exceeds the {data.num_train} training '
                     'images; lower --config.train.batch_size.')
  steps_per_epoch = data.num_train // t.batch_size
  schedule = train.learning_rate_schedule(t, steps_per_epoch, model_name)
  return TrainPlan(
      epochs=t.epochs, batch_size=t.batch_size, eval_batch_size=t.eval_batch_size,
      steps_per_epoch=steps_per_epoch, checkpoint_every_steps=t.checkpoint_every_steps,
      checkpoints_to_keep=t.checkpoints_to_keep, skip_nonfinite=t.nan_policy == 'skip',
      schedule=schedule, optimizer=train.make_optimizer(t, schedule))


def _teacher_source_plan(config, stage, earlier, external, data, augment: Augment, where):
  source = stage.teacher_source
  checks = [
      (source.dtype in TEACHER_DTYPES,
       f"unknown teacher_source.dtype '{source.dtype}'; choose one of: "
       f"{', '.join(TEACHER_DTYPES)}"),
      (source.replica in TEACHER_REPLICA,
       f"unknown teacher_source.replica '{source.replica}'; choose one of: "
       f"{', '.join(TEACHER_REPLICA)}"),
      (isinstance(source.cache_logits, bool),
       f'teacher_source.cache_logits must be True or False, got {source.cache_logits!r}'),
      (source.cache_dtype in CACHE_DTYPES,
       f"unknown teacher_source.cache_dtype '{source.cache_dtype}'; choose one of: "
       f"{', '.join(CACHE_DTYPES)}"),
      (_is_int(source.cache_top_k) and 0 <= source.cache_top_k < data.num_classes,
       f'teacher_source.cache_top_k must be an integer in [0, {data.num_classes}) (0: keep every '
       f'logit; k: the k largest of the {data.num_classes} classes), got '
       f'{source.cache_top_k!r}'),
  ]
  for ok, message in checks:
    if not ok:
      raise KdjaxError(f'{where}: {message}.')
  if not stage.teachers:
    return TeacherSourcePlan()
  for weight in stage.teachers.values():
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
      raise KdjaxError(f'{where}: teacher weights must be numbers > 0, got '
                       f'{dict(stage.teachers)}.')
  per_replica = source.replica == 'matching'
  views = train.augments(augment)  # the teacher sees augmented views.
  teachers = []
  for name, weight in stage.teachers.items():
    if name in external:
      teachers.append(_external_teacher_plan(config, external[name], float(weight), per_replica,
                                             data, jnp.dtype(source.dtype), where,
                                             stage.num_replicas))
      continue
    theirs = earlier[name].num_replicas
    if per_replica and (stage.num_replicas < 2 or stage.num_replicas != theirs):
      raise KdjaxError(
          f"{where}: teacher_source.replica 'matching' pairs student replica r with teacher "
          f"replica r, so both need the same number of replicas (>= 2); this stage has "
          f"{stage.num_replicas} and its teacher '{name}' {theirs}. Set their num_replicas "
          "equal, or use replica 'first'.")
    model = _model(config, earlier[name].model_name, data, where, jnp.dtype(source.dtype))
    teachers.append(TeacherPlan(name, float(weight), model, theirs, per_replica))
  return TeacherSourcePlan(
      teachers=tuple(teachers), ensemble=stage_losses.LOSSES[stage.loss].several_teachers,
      cache_logits=source.cache_logits and (not views or augment.draw == 'per_example'),
      cache_views=source.cache_logits and views and augment.draw == 'per_example',
      per_replica=per_replica, cache_dtype=source.cache_dtype,
      cache_top_k=int(source.cache_top_k))


def _external_teacher_plan(config, teacher: ExternalTeacher, weight, per_replica, data, dtype,
                           where, own_replicas: int = 1) -> TeacherPlan:
  if teacher.layout == 'kdjax':  # another run's stage: the model and replicas it trained.
    if per_replica and (own_replicas < 2 or own_replicas != teacher.num_replicas):
      raise KdjaxError(f"{where}: teacher_source.replica 'matching' needs the same number of "
                       f"replicas (>= 2) as teacher '{teacher.name}', which has "
                       f'{teacher.num_replicas}; this stage has {own_replicas}.')
    model = _model(config, teacher.model_name, data, where, dtype, shortcut=teacher.shortcut)
    if models.is_multi_exit(model):
      raise KdjaxError(f"{where}: teacher '{teacher.name}' is a multi-exit model; use a "
                       'single-exit stage as a teacher.')
    return TeacherPlan(teacher.name, weight, model, num_replicas=teacher.num_replicas,
                       per_replica=per_replica, source_path=teacher.path, layout='kdjax',
                       fingerprint=teacher.fingerprint)
  if per_replica:
    raise KdjaxError(f"{where}: external teacher '{teacher.name}' is one model (one file), so "
                     "teacher_source.replica 'matching' has no replica r to pair; use 'first'.")
  torch_layout = teacher.layout not in flax_import.LAYOUTS  # their ResNets: projections.
  model = _model(config, teacher.model_name, data, where, dtype,
                 shortcut='projection' if torch_layout and teacher.model_name.startswith('resnet')
                 else None)
  return TeacherPlan(teacher.name, weight, model, num_replicas=1, per_replica=False,
                     source_path=teacher.path, layout=teacher.layout,
                     fingerprint=teacher.fingerprint)
