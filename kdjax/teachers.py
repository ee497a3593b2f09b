"""Teacher sources: where a stage's teacher logits come from.

One protocol. A source is a pytree (a `flax.struct` dataclass) passed to the jitted train step as
an argument; its arrays (variables, a logits table) are traced, its modules and flags are static:

  source.logits(images, indices) -> None | [B, C] | [K, B, C]  (or [R, B, C] / [R, K, B, C])

`images` are the batch as the student sees it (normalised, augmented), `indices` the batch's
example indices in the training set; float32 logits come back under `stop_gradient`. A source
with `per_replica` set gives replica r of a stacked student its own teacher (a leading `[R]`
axis); otherwise every replica shares the one teacher and its one forward pass.

* `NoTeacher`      a stage that learns from labels (or from itself: multi-exit models).
* `LiveTeacher`    a model's variables, run in inference mode (running BatchNorm statistics) on
                   every batch; one shared teacher, or `[R]` stacked ones (`per_replica`).
* `CachedTeacher`  an `[N, C]` (or `[R, N, C]`) table of the teacher's logits on the
                   un-augmented training set, gathered by index: the teacher runs once per stage.
* `TeacherEnsemble` several sources stacked on a `[K]` axis, for a loss that learns from several
                   teachers (`kdjax.stage_losses.multi_teacher`).

Where a live teacher's variables come from (an earlier stage of the run, or a PyTorch file named
in `config.external_teachers`; another workdir or an Orbax checkpoint later) is
`load_variables`'s business, not the step's: an imported teacher is a `LiveTeacher` (or
`CachedTeacher`) like any other.
"""

import os
import time
from typing import Any, Optional, Tuple

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from kdjax import checkpoints
from kdjax import flax_import
from kdjax import models
from kdjax import parallel
from kdjax import torch_import
from kdjax import train
from kdjax.errors import KdjaxError


@struct.dataclass
class NoTeacher:
  per_replica: bool = struct.field(pytree_node=False, default=False)
  needs_unaugmented_images: bool = struct.field(pytree_node=False, default=False)

  def logits(self, images, indices) -> None:
    return None


@struct.dataclass
class LiveTeacher:
  """`module` applied to `variables` (stacked `[R, ...]` when `per_replica`) on each batch.

  `batching` ('vmap' or 'unroll') is how R per-replica teachers run, as for the students
  (`train.make_train_step`'s `replica_batching`).
  """
  variables: Any
  module: nn.Module = struct.field(pytree_node=False)
  per_replica: bool = struct.field(pytree_node=False, default=False)
  batching: str = struct.field(pytree_node=False, default='vmap')
  needs_unaugmented_images: bool = struct.field(pytree_node=False, default=False)

  def forward(self, variables, images) -> jax.Array:
    # Inference mode, and no gradient is ever built for the teacher.
    return jax.lax.stop_gradient(
        self.module.apply(variables, images, train=False)).astype(jnp.float32)

  def logits(self, images, indices) -> jax.Array:
    if not self.per_replica:
      return self.forward(self.variables, images)
    if self.batching == 'vmap':
      return jax.vmap(lambda v: self.forward(v, images))(self.variables)
    count = jax.tree_util.tree_leaves(self.variables)[0].shape[0]
    return jnp.stack([self.forward(train.replica(self.variables, r), images)
                      for r in range(count)])


@struct.dataclass
class CachedTeacher:
  """Rows `indices` of `table` (`[N, C]`, or `[R, N, C]` when `per_replica`).

  The table holds logits of un-augmented images, so it refuses a step that augments
  (`needs_unaugmented_images`).
  """
  table: jax.Array
  per_replica: bool = struct.field(pytree_node=False, default=False)
  needs_unaugmented_images: bool = struct.field(pytree_node=False, default=True)

  def logits(self, images, indices) -> jax.Array:
    return self.table[:, indices] if self.per_replica else self.table[indices]


@struct.dataclass
class TeacherEnsemble:
  """Its members' logits stacked on a teacher axis: `[K, B, C]` (`[R, K, B, C]` per replica)."""
  members: Tuple[Any, ...]
  per_replica: bool = struct.field(pytree_node=False, default=False)

  @property
  def needs_unaugmented_images(self) -> bool:
    return any(m.needs_unaugmented_images for m in self.members)

  def logits(self, images, indices) -> jax.Array:
    return jnp.stack([m.logits(images, indices) for m in self.members],
                     axis=1 if self.per_replica else 0)


def cache(source: LiveTeacher, data: train.DeviceData, normalization: train.Normalization,
          batch_size: int, mesh: Optional[jax.sharding.Mesh] = None) -> CachedTeacher:
  """The live teacher's logits on every image of `data`, computed once: a `CachedTeacher`.

  At 4 bytes per logit the table is small beside the images it indexes (CIFAR-10: 2 MB against
  150 MB).
  """
  logits_fn = train.make_teacher_logits_fn(source.module, normalization, mesh,
                                           streamed=isinstance(data, train.HostData))
  table = lambda variables: train.teacher_logits_table(
      source.module, variables, data, normalization, batch_size, mesh, logits_fn)
  if source.per_replica:
    count = jax.tree_util.tree_leaves(source.variables)[0].shape[0]
    logits = jnp.stack([table(train.replica(source.variables, r)) for r in range(count)])
  else:
    logits = table(source.variables)
  return CachedTeacher(jax.block_until_ready(logits), per_replica=source.per_replica)


def load_variables(teacher_plan, workdir: str, image_shape) -> dict:
  """The final `{params, batch_stats}` of the teacher `teacher_plan` names (a `plan.TeacherPlan`).

  A finished stage of this run, or of another run (`'/path/to/workdir:stage'`, refused if its
  final checkpoint changed since planning): with `per_replica` False the source keeps replica 0
  of a replicated teacher stage, else all of its replicas stacked. An external teacher
  (`teacher_plan.source_path`): its file in its public layout (`kdjax.torch_import`), refused if
  it has changed since the run was planned.
  """
  stage = teacher_plan.stage
  if teacher_plan.layout == 'kdjax':  # a finished stage of another kdjax run.
    workdir, stage = teacher_plan.source_path, stage.rpartition(':')[2]
  elif teacher_plan.layout in flax_import.LAYOUTS:
    source = f"external teacher '{teacher_plan.stage}' ('{teacher_plan.source_path}')"
    if flax_import.fingerprint(teacher_plan.source_path) != teacher_plan.fingerprint:
      raise KdjaxError(f'{source} changed after this run was planned; re-run the command.')
    return flax_import.read_variables(teacher_plan.source_path, teacher_plan.layout,
                                      models.variable_shapes(teacher_plan.model, image_shape),
                                      source)
  elif teacher_plan.source_path:
    return torch_import.load_variables(
        teacher_plan.source_path, teacher_plan.model, image_shape, teacher_plan.layout,
        fingerprint=teacher_plan.fingerprint,
        source=f"external teacher '{teacher_plan.stage}' ('{teacher_plan.source_path}')")
  shapes = models.variable_shapes(teacher_plan.model, image_shape)
  stacked = teacher_plan.num_replicas > 1
  if stacked:
    shapes = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((teacher_plan.num_replicas, *s.shape), s.dtype), shapes)
  variables = checkpoints.load_final_variables(
      os.path.join(workdir, 'stages', stage), shapes, fingerprint=teacher_plan.fingerprint)
  if stacked and not teacher_plan.per_replica:
    variables = train.replica(variables, 0)
  return variables


def fingerprints(stage_plan, workdir: str) -> dict:
  """`{teacher: SHA-256}` of what each of the stage's teachers is now: the final checkpoint of a
  stage (of this run or another), or an external file. A student records it when it finishes."""
  found = {}
  for teacher in stage_plan.teacher.teachers:
    found[teacher.stage] = teacher.fingerprint or checkpoints.final_fingerprint(
        os.path.join(workdir, 'stages', teacher.stage))
  return found


def make_source(stage_plan, workdir: str, train_data: train.DeviceData,
                normalization: train.Normalization, mesh, log=print):
  """The teacher source a stage plan asks for: none, live, cached, or an ensemble of them."""
  plan = stage_plan.teacher
  if not plan.teachers:
    return NoTeacher()
  members = []
  for teacher in plan.teachers:
    variables = parallel.put_replicated(
        load_variables(teacher, workdir, stage_plan.image_shape), mesh)
    source = LiveTeacher(variables, teacher.model, per_replica=teacher.per_replica,
                         batching=stage_plan.replica_batching)
    if plan.cache_logits:
      start = time.perf_counter()
      source = cache(source, train_data, normalization, stage_plan.train.eval_batch_size, mesh)
      log(f"[{stage_plan.name}] cached the teacher's logits on {train_data.labels.shape[0]} "
          f"training images in {time.perf_counter() - start:.1f} s.")
    members.append(source)
  if not plan.ensemble:
    return members[0]
  return TeacherEnsemble(tuple(members), per_replica=plan.per_replica)
