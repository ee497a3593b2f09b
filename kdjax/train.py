"""Train state, optimiser, learning-rate schedules, and the jitted train and eval steps.

`make_train_step` returns a pure function `(state, teacher, data, batch_indices, key)
→ (state, metrics)`: the batch is gathered from the device-resident training set, augmented and
normalised inside `jit`, the teacher source (`kdjax.teachers`) gives its logits for the batch,
and the student takes one SGD step on the stage loss's mean. The state argument is donated.
The same step shards the batch over a device mesh (`kdjax.parallel`) and trains N stacked
students at once (`num_replicas`).
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
from flax.training import train_state
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as kd_data
from kdjax import losses
from kdjax import parallel
from kdjax.models.conv import CPU_COMPILER_OPTIONS
from kdjax.errors import KdjaxError

LR_SCHEDULES = ('step', 'cosine', 'constant', 'takd_official')
REPLICA_BATCHING = ('auto', 'vmap', 'unroll')


class TrainState(train_state.TrainState):
  batch_stats: Any


class DeviceData(NamedTuple):
  """A split kept on device: uint8 `[N, H, W, C]` images, int32 `[N]` labels."""
  images: jax.Array
  labels: jax.Array


class HostData(NamedTuple):
  """A split kept on the host (numpy arrays, possibly memory-mapped): uint8 `[N, H, W, C]`
  images, int32 `[N]` labels, streamed to the device batch by batch (`kdjax.data.stream`)."""
  images: np.ndarray
  labels: np.ndarray


class StreamedBatch(NamedTuple):
  """One batch read from a `HostData` split: row i of uint8 `[B, H, W, C]` images and int32 `[B]`
  labels is the example `indices[i]` of the step's `(data, indices)` arguments."""
  images: jax.Array
  labels: jax.Array


def batch_rows(data, indices):
  """The batch's `(images, labels)`: gathered from a device-resident split, or a streamed batch
  as it is (its rows already are `indices`)."""
  if isinstance(data, StreamedBatch):
    return data.images, data.labels
  return data.images[indices], data.labels[indices]


class Normalization(NamedTuple):
  mean: jax.Array  # [C], in [0, 1] pixel units.
  std: jax.Array   # [C]


def learning_rate_schedule(train_config: ml_collections.ConfigDict, steps_per_epoch: int,
                           model_name: str) -> optax.Schedule:
  """The per-step learning rate.

  * `'step'` (default; the TAKD paper's ResNet setting, He et al. 2016): `learning_rate`, times
    `lr_decay` at each fraction of training in `lr_boundaries` (0.5 and 0.75: 0.1 → 0.01 → 0.001).
    Each fraction is rounded to a whole epoch (Python's `round`, as per-epoch schedulers such as
    PyTorch's MultiStepLR count), and fractions that land on the same epoch each decay there:
    3 epochs with (0.5, 0.75) give 0.1 for two epochs, then 0.001.
  * `'takd_official'`: what the official TAKD code actually runs. Its `adjust_learning_rate`
    compares `epoch < int(epoch / 2)`, which is never true, so ResNets train at 0.01 until 3/4 of
    the epochs and 0.001 after; plain CNNs train at a constant 0.01. `learning_rate` is ignored.
  * `'cosine'`: cosine decay from `learning_rate` to 0. `'constant'`: `learning_rate` throughout.
  """
  total_steps = train_config.epochs * steps_per_epoch
  name = train_config.lr_schedule
  if name == 'step':
    boundaries = {}
    for b in train_config.lr_boundaries:  # a dict comprehension would drop a repeated epoch.
      step = int(round(b * train_config.epochs)) * steps_per_epoch
      boundaries[step] = boundaries.get(step, 1.0) * train_config.lr_decay
    return optax.piecewise_constant_schedule(train_config.learning_rate, boundaries)
  if name == 'takd_official':
    if model_name.startswith('resnet'):
      return optax.piecewise_constant_schedule(
          0.01, {int(train_config.epochs * 3 / 4) * steps_per_epoch: 0.1})
    return optax.constant_schedule(0.01)
  if name == 'cosine':
    return optax.cosine_decay_schedule(train_config.learning_rate, total_steps)
  if name == 'constant':
    return optax.constant_schedule(train_config.learning_rate)
  raise KdjaxError(f"unknown lr_schedule '{name}'; choose one of: {', '.join(LR_SCHEDULES)}.")


def make_optimizer(train_config: ml_collections.ConfigDict,
                   schedule: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum and coupled weight decay, exactly PyTorch's `optim.SGD`.

  PyTorch adds `weight_decay · w` to the gradient before the momentum buffer, for every parameter
  (BatchNorm scales and biases included, as in the official TAKD code).
  """
  return optax.chain(
      optax.add_decayed_weights(train_config.weight_decay),
      optax.sgd(schedule, momentum=train_config.momentum or None,
                nesterov=train_config.nesterov))


def create_train_state(model: nn.Module, variables, tx: optax.GradientTransformation) -> TrainState:
  return TrainState.create(apply_fn=model.apply, params=variables['params'],
                           batch_stats=variables.get('batch_stats', {}), tx=tx)


def jit(fn: Callable, compiler_options: Optional[dict] = None, **kwargs) -> Callable:
  """`jax.jit`, compiled with `CPU_COMPILER_OPTIONS` on the CPU backend unless `compiler_options`
  is given (`{}`: XLA's defaults).

  jaxlib 0.10 hands CPU convolutions to YNNPACK, which ran the CIFAR networks' small-channel
  layers on one core; the options give convolutions back to Eigen (ResNet-110 → ResNet-8 KD
  step: 120 → 169 images/s on 2 cores, `experiments/bench/`). GPU and TPU compile as usual.
  """
  if compiler_options is None and jax.default_backend() == 'cpu':
    compiler_options = CPU_COMPILER_OPTIONS
  if not compiler_options:
    return jax.jit(fn, **kwargs)
  return _TopLevelOptionsJit(fn, compiler_options, kwargs)


class _TopLevelOptionsJit:
  """A jitted function whose top-level calls compile with `compiler_options`.

  JAX accepts compiler options only on a top-level jit, so a step called inside a user's own
  `jit`, `vmap`, `scan` or `make_jaxpr` (its arguments are tracers) is traced as a plain jitted
  function instead, and the outer program's options apply.
  """

  def __init__(self, fn: Callable, compiler_options: dict, jit_kwargs: dict):
    self._tuned = jax.jit(fn, compiler_options=compiler_options, **jit_kwargs)
    self._plain = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args):
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(args)):
      return self._plain(*args)
    return self._tuned(*args)

  def lower(self, *args):
    return self._tuned.lower(*args)


def replica(tree, r: int):
  """Replica `r` of a tree of arrays stacked on a leading replica axis."""
  return jax.tree_util.tree_map(lambda x: x[r], tree)


def augments(augment_config: ml_collections.ConfigDict) -> bool:
  """Whether the train step changes images at all (crops or flips; a random resized crop
  always does)."""
  resized = getattr(augment_config, 'kind', 'pad_crop_flip') == 'random_resized_crop'
  return bool(augment_config.enabled and (resized or augment_config.crop_padding > 0
                                          or augment_config.flip))


def make_train_step(student: nn.Module, loss: Callable,
                    augment_config, normalization: Normalization, *,
                    skip_nonfinite: bool = False, num_replicas: Optional[int] = None,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    compiler_options: Optional[dict] = None,
                    replica_batching: str = 'auto', streamed: bool = False,
                    views: Optional[kd_data.augment.ExampleViews] = None) -> Callable:
  """Builds the jitted train step `(state, teacher, train_data, batch_indices, key)`.

  `train_data` is the device-resident training split (`DeviceData`), from which the step
  gathers `batch_indices`, or with `streamed` the batch itself (a `StreamedBatch` read on the
  host: `kdjax.data.stream`); the indices still name its rows (for a cached teacher's table).

  Args:
    student: the student module.
    loss: a stage loss (`kdjax.stage_losses`): `loss(outputs, teacher_logits, labels, key)` gives
      per-example values, reduced here by their mean (the one place losses are reduced).
    augment_config: `enabled`, `crop_padding`, `flip`, `kind`, `size` (a config block or
      `plan.Augment`; see `kdjax.data.augment.augmenter`).
    skip_nonfinite: a step whose loss or updated parameters are not finite leaves the parameters,
      statistics and optimiser state as they were (the step counter still advances) and reports
      `skipped = 1`; otherwise the caller stops on the first non-finite loss.
    num_replicas: None for one student. N >= 1: `state` holds N students stacked on a leading
      axis and `key` is `[N]` keys. The students share each batch, its augmentation and the
      teacher's forward pass (only the student update is batched, see `replica_batching`); they
      differ in their parameters and in the loss's own randomness (noise keys).
    mesh: a `kdjax.parallel` mesh: the batch is split over its `data` axis and everything else
      replicated. None: no sharding annotations (one device).
    compiler_options: XLA options; None for kdjax's (see `jit`), `{}` for XLA's defaults.
    replica_batching: how the N student updates run inside the step. `'vmap'`: one batched
      program; a convolution with N stacked kernels becomes a grouped convolution, which GPUs and
      TPUs run well. `'unroll'`: N copies of the single-student update in the one program (N×
      the compile time), each at single-student speed: XLA's CPU grouped convolutions are slow
      (8 ResNet-8 students: 263 images/s vmapped, 555 unrolled; `experiments/bench`). `'auto'`:
      `'unroll'` on CPU, `'vmap'` elsewhere. Both give the same students.
    views: with augmentation, each example's view drawn from (views' seed, epoch, its index)
      (`data.augment.draw='per_example'`) instead of the batch's from (key, step).

  The step's `teacher` argument is a teacher source (`kdjax.teachers`): `teacher.logits(images,
  batch_indices)` gives the logits the loss learns from (None, one teacher's, several stacked,
  or one per replica when `teacher.per_replica`). Randomness is a function of (key, step): a
  resumed stage replays it exactly. The state argument is donated.
  """
  augment = augments(augment_config)
  augment_images = kd_data.augment.augmenter(augment_config)  # by kind: crop+flip, or RRC+flip.
  augment_examples = kd_data.augment.per_example(augment_images)
  if replica_batching not in REPLICA_BATCHING:
    raise KdjaxError(f"unknown replica_batching '{replica_batching}'; choose one of: "
                     f"{', '.join(REPLICA_BATCHING)}.")
  batching = replica_batching
  if batching == 'auto':
    batching = 'unroll' if jax.default_backend() == 'cpu' else 'vmap'
  stacked = num_replicas is not None
  shard_batch = lambda x, axis=0: x if mesh is None else jax.lax.with_sharding_constraint(
      x, parallel.batch_sharded(mesh, axis=axis))

  student_update = functools.partial(_student_update, loss, skip_nonfinite)

  def train_step(state: TrainState, teacher, train_data: DeviceData,
                 batch_indices: jax.Array, key: jax.Array):
    if augment and teacher.needs_unaugmented_images:
      raise KdjaxError('cached teacher logits are computed on un-augmented images; they cannot '
                       'be used with augmentation on (the teacher must see each augmented '
                       'batch).')
    # The replicas share one step counter; each has its own key (one key without replicas).
    step = state.step[0] if stacked else state.step
    keys = key if stacked else key[None]
    step_keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, step)))(keys)
    augment_key, noise_keys = step_keys[0, 0], step_keys[:, 1]
    images, labels = (shard_batch(x) for x in batch_rows(train_data, batch_indices))
    if augment and views is not None:
      images = augment_examples(views.keys(views.epoch(step), batch_indices), images)
    elif augment:
      images = augment_images(augment_key, images)
    images = kd_data.normalize(images, normalization.mean, normalization.std)
    teacher_logits = teacher.logits(images, batch_indices)
    if teacher_logits is not None:  # [..., B, C]: the batch axis is split over the devices.
      teacher_logits = shard_batch(teacher_logits, teacher_logits.ndim - 2)
    if not stacked:
      return student_update(state, images, labels, teacher_logits, noise_keys[0])
    per_replica = teacher.per_replica
    if batching == 'vmap':
      return jax.vmap(student_update, in_axes=(0, None, None, 0 if per_replica else None, 0))(
          state, images, labels, teacher_logits, noise_keys)
    updates = [student_update(replica(state, r), images, labels,
                              teacher_logits[r] if per_replica else teacher_logits,
                              noise_keys[r]) for r in range(num_replicas)]
    return jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *updates)

  if mesh is None:
    return jit(train_step, compiler_options, donate_argnums=0)
  whole, rows = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  # Streamed: the batch's rows come sharded, and so may a teacher's (`DiskCachedTeacher`):
  # the teacher's shardings are then its arguments' own (None: taken from the arrays).
  return jit(train_step, compiler_options, donate_argnums=0,
             in_shardings=(whole, None if streamed else whole, rows if streamed else whole,
                           rows, whole),
             out_shardings=whole)


def _student_update(loss, skip_nonfinite: bool, state: TrainState, images, labels, teacher_logits,
                    noise_key):
  """One SGD step of one student on the mean of `loss`'s per-example values, and its metrics."""
  def loss_fn(params):
    # Dropout (where a model has it) draws from the replica's key, apart from the loss noise.
    outputs, updates = state.apply_fn({'params': params, 'batch_stats': state.batch_stats},
                                      images, train=True, mutable=['batch_stats'],
                                      rngs={'dropout': jax.random.fold_in(noise_key, 1)})
    per_example = loss(outputs, teacher_logits, labels, noise_key)
    return jnp.mean(per_example), (final_logits(outputs), updates)

  (value, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads,
                                    batch_stats=updates.get('batch_stats', state.batch_stats))
  finite = jnp.isfinite(value) & _all_finite(new_state.params)
  if skip_nonfinite:
    keep_old = lambda new, old: jnp.where(finite, new, old)
    new_state = new_state.replace(
        params=jax.tree_util.tree_map(keep_old, new_state.params, state.params),
        batch_stats=jax.tree_util.tree_map(keep_old, new_state.batch_stats, state.batch_stats),
        opt_state=jax.tree_util.tree_map(keep_old, new_state.opt_state, state.opt_state))
  metrics = {'loss': value, 'accuracy': jnp.mean(jnp.argmax(logits, -1) == labels),
             'skipped': jnp.logical_not(finite).astype(jnp.int32) if skip_nonfinite
                        else jnp.zeros((), jnp.int32),
             'student_finite': _all_finite(logits),
             'teacher_finite': (_all_finite(teacher_logits) if teacher_logits is not None
                                else jnp.array(True))}
  return new_state, metrics


def exit_logits(outputs) -> Optional[jax.Array]:
  """A multi-exit model's `[E, B, C]` exit logits (its outputs are `(exits, ensemble teachers)`);
  None for a single-exit model, whose outputs are its `[B, C]` logits."""
  return outputs[0] if isinstance(outputs, (tuple, list)) else None


def final_logits(outputs) -> jax.Array:
  """The `[B, C]` logits a model is judged by: its deepest exit's, for a multi-exit model."""
  exits = exit_logits(outputs)
  return outputs if exits is None else exits[-1]


def make_teacher_logits_fn(teacher: nn.Module, normalization: Normalization,
                           mesh: Optional[jax.sharding.Mesh] = None,
                           streamed: bool = False, augment_config=None,
                           views: Optional[kd_data.augment.ExampleViews] = None) -> Callable:
  """Jitted `(teacher_variables, data, indices) → [B, C]` float32 inference-mode logits;
  `streamed`: `data` is the batch itself (a `StreamedBatch`), not a device-resident split.

  With `views` (and the `augment_config` they augment with): `(teacher_variables, data, indices,
  epoch)`, the logits on each example's view in `epoch`, as the train step draws it."""
  augment_examples = (kd_data.augment.per_example(kd_data.augment.augmenter(augment_config))
                      if views is not None else None)

  def teacher_logits(teacher_variables, data: DeviceData, indices, epoch=None):
    images = batch_rows(data, indices)[0]
    if views is not None:
      images = augment_examples(views.keys(epoch, indices), images)
    images = kd_data.normalize(images, normalization.mean, normalization.std)
    return teacher.apply(teacher_variables, images, train=False).astype(jnp.float32)

  if mesh is None:
    return jit(teacher_logits)
  whole, rows = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  shardings = (whole, rows if streamed else whole, rows) + ((whole,) if views else ())
  return jit(teacher_logits, in_shardings=shardings, out_shardings=rows)


def teacher_logits_table(teacher: nn.Module, teacher_variables, data: DeviceData,
                         normalization: Normalization, batch_size: int,
                         mesh: Optional[jax.sharding.Mesh] = None,
                         logits_fn: Optional[Callable] = None) -> jax.Array:
  """The teacher's inference-mode logits on every image of `data`: `[N, C]` float32, on device.

  Computed once per stage, in batches of `batch_size` (the last one padded), so a stage without
  augmentation pays for the teacher once instead of once per epoch. At 4 bytes per logit the
  table is small beside the images it indexes (CIFAR-10: 2 MB against 150 MB). `logits_fn`: a
  `make_teacher_logits_fn` result to reuse (built here if None).
  """
  logits_fn = logits_fn or make_teacher_logits_fn(teacher, normalization, mesh,
                                                  streamed=isinstance(data, HostData))
  num = data.labels.shape[0]
  parts = [logits_fn(teacher_variables, batch, indices)
           for batch, indices, _ in _padded_batches(num, batch_size, mesh, data)]
  table = jnp.concatenate(parts)[:num]
  return table if mesh is None else parallel.put_replicated(table, mesh)


def _padded_batches(num: int, batch_size: int, mesh: Optional[jax.sharding.Mesh], data):
  """`(data, indices [batch_size], mask [batch_size])` covering rows `0 … num − 1` in order; the
  last batch repeats row `num − 1` where `mask` is 0, so every batch has one shape (one
  compile). With a `mesh`, indices and mask are global arrays split over its `data` axis
  (`parallel.global_batch`). A device-resident split is passed on as it is; from a `HostData`
  split each batch's rows are read and sent (a `StreamedBatch`, this process's rows)."""
  put = (lambda x: jnp.asarray(x)) if mesh is None else (
      lambda x: parallel.global_batch(x, mesh))
  for start in range(0, num, batch_size):
    indices = np.arange(start, start + batch_size)
    rows = np.minimum(indices, num - 1).astype(np.int32)
    batch = data
    if isinstance(data, HostData):
      mine = rows if mesh is None else parallel.process_rows(rows, mesh)
      images, labels = np.asarray(data.images[mine]), np.asarray(data.labels[mine])
      batch = StreamedBatch(*((jnp.asarray(x) for x in (images, labels)) if mesh is None else
                              (parallel.global_rows(x, mesh, batch_size)
                               for x in (images, labels))))
    yield batch, put(rows), put((indices < num).astype(np.float32))


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


TOP5_MIN_CLASSES = 10  # top-5 accuracy is reported above this many classes (not for 10).


def make_eval_step(normalization: Normalization, *, num_replicas: Optional[int] = None,
                   mesh: Optional[jax.sharding.Mesh] = None, streamed: bool = False) -> Callable:
  """Jitted `(state, data, indices, mask) → sums over a batch` of the loss, correct predictions,
  the probability mass on non-true classes, and the prediction entropy (nats).

  The last two are Yang et al.'s view of the "secondary information" a teacher passes on.
  With more than `TOP5_MIN_CLASSES` classes (CIFAR-100, ImageNet) `top5_correct` is added: the
  true class is among the five highest logits, counted as fewer than five classes scoring
  strictly higher (a tie at the fifth place counts as correct; `torch.topk` would break it by
  position).
  For a multi-exit model these describe the deepest exit, and `exit_correct` `[E]` and
  `ensemble_correct` (the average of the exits' probabilities) are added.
  `mask` marks the real rows of a padded last batch, so every batch has one shape. With
  `num_replicas` N >= 1 (None: one model) the state is N stacked models and every sum gains a leading `[N]` axis;
  `mesh` shards the batch as in `make_train_step`.
  """

  def eval_step(state: TrainState, eval_data: DeviceData, indices, mask):
    images, labels = batch_rows(eval_data, indices)
    images = kd_data.normalize(images, normalization.mean, normalization.std)
    outputs = state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats}, images,
                             train=False)
    total = lambda x: jnp.sum(x * mask, axis=-1)
    extra = {}
    exits, logits = exit_logits(outputs), final_logits(outputs)
    if exits is not None:
      extra['exit_correct'] = total(jnp.argmax(exits, -1) == labels)
      ensemble = jnp.mean(jax.nn.softmax(exits), axis=0)
      extra['ensemble_correct'] = total(jnp.argmax(ensemble, -1) == labels)
    per_example = losses.cross_entropy(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels)
    if logits.shape[-1] > TOP5_MIN_CLASSES:
      true_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
      extra['top5_correct'] = total(jnp.sum(logits > true_logit, axis=-1) < 5)
    nontrue = 1.0 - jnp.exp(-per_example)  # CE = −log p_true.
    log_probs = jax.nn.log_softmax(logits)
    entropy = -jnp.sum(jnp.exp(log_probs) * log_probs, axis=-1)
    return {'loss': total(per_example), 'correct': total(correct), 'count': jnp.sum(mask),
            'nontrue_mass': total(nontrue), 'entropy': total(entropy), **extra}

  if num_replicas is not None:
    eval_step = jax.vmap(eval_step, in_axes=(0, None, None, None))
  if mesh is None:
    return jit(eval_step)
  whole, rows = parallel.replicated(mesh), parallel.batch_sharded(mesh)
  return jit(eval_step, in_shardings=(whole, rows if streamed else whole, rows, rows),
             out_shardings=whole)


def evaluate(eval_step: Callable, state: TrainState, test_data: DeviceData,
             batch_size: int, mesh: Optional[jax.sharding.Mesh] = None) -> dict:
  """Test loss and accuracy over a whole device-resident split (lists, one per replica, for a
  replicated state). `mesh`: the eval step's mesh (its batches are then global arrays)."""
  totals = None
  for batch, indices, mask in _padded_batches(test_data.labels.shape[0], batch_size, mesh,
                                              test_data):
    sums = eval_step(state, batch, indices, mask)
    totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = np.ravel(totals['count'])[0]  # the same for every replica.
  mean = lambda name: (totals[name] / count).tolist()
  results = {'test_loss': mean('loss'), 'test_accuracy': mean('correct'),
             'test_nontrue_mass': mean('nontrue_mass'), 'test_entropy': mean('entropy')}
  if 'top5_correct' in totals:
    results['test_top5_accuracy'] = mean('top5_correct')
  if 'exit_correct' in totals:
    results['test_accuracy_exits'] = mean('exit_correct')
    results['test_accuracy_ensemble'] = mean('ensemble_correct')
  return results
