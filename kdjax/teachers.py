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

import contextlib
import os
import time
from typing import Any, List, Optional, Sequence, Tuple

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import checkpoints
from kdjax import files
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
class DiskCachedTeacher:
  """The batch's rows of a logits table kept in a file (`disk_cache`), read on the host with
  the batch's images: `rows` `[B, C]` (or `[R, B, C]`), replaced every step (`with_rows`). For a
  training set streamed from the host, whose `[N, C]` table need not fit on the device."""
  rows: jax.Array
  path: str = struct.field(pytree_node=False)
  per_replica: bool = struct.field(pytree_node=False, default=False)
  needs_unaugmented_images: bool = struct.field(pytree_node=False, default=True)

  def logits(self, images, indices) -> jax.Array:
    return self.rows.astype(jnp.float32)

  def table(self):
    """The file's `[N, C]` (or `[R, N, C]`) table, memory-mapped."""
    return np.load(self.path, mmap_mode='r')


def disk_tables(source) -> List[DiskCachedTeacher]:
  """The `DiskCachedTeacher`s of a source (itself, or an ensemble's members), in order."""
  members = source.members if isinstance(source, TeacherEnsemble) else (source,)
  return [m for m in members if isinstance(m, DiskCachedTeacher)]


def batch_row_shapes(source, batch_size: int, mesh) -> List[jax.ShapeDtypeStruct]:
  """The shapes each `DiskCachedTeacher`'s `rows` take in a step (to compile the step with)."""
  shapes = []
  for member in disk_tables(source):
    table = member.table()
    shape = (*table.shape[:-2], batch_size, table.shape[-1])
    shapes.append(jax.ShapeDtypeStruct(shape, table.dtype, sharding=parallel.batch_sharded(
        mesh, axis=len(shape) - 2)))
  return shapes


def with_rows(source, rows: Sequence[jax.Array]):
  """`source` with each `DiskCachedTeacher`'s `rows` replaced by the next of `rows`."""
  rows = iter(rows)
  replace = lambda m: m.replace(rows=next(rows)) if isinstance(m, DiskCachedTeacher) else m
  if isinstance(source, TeacherEnsemble):
    return source.replace(members=tuple(replace(m) for m in source.members))
  return replace(source)


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


def disk_cache(source: LiveTeacher, data: train.HostData, normalization: train.Normalization,
               batch_size: int, mesh, path: str, dtype: str, log=print) -> DiskCachedTeacher:
  """The live teacher's logits on every image of a streamed training set, in the file `path`
  (an `.npy` memory-mapped when read): `[N, C]`, or `[R, N, C]` per replica, in `dtype`.

  Written once, batch by batch (the table never on the device), to a temporary name, fsynced and
  renamed: a run killed while writing leaves no table, and the next one writes it again. A file
  already there (this teacher on this data: both fingerprints are in its name) is reused after
  its SHA-256, kept beside it, is checked; a damaged one is written again. With several
  processes each computes its rows, process 0 writes, and the others wait for it.
  """
  if not _intact(path):
    start = time.perf_counter()
    logits_fn = train.make_teacher_logits_fn(source.module, normalization, mesh, streamed=True)
    count, num = (jax.tree_util.tree_leaves(source.variables)[0].shape[0]
                  if source.per_replica else 0), data.labels.shape[0]
    probe = jax.eval_shape(logits_fn, train.replica(source.variables, 0) if count else
                           source.variables, *next(train._padded_batches(1, 1, mesh, data))[:2])
    shape = ((count,) if count else ()) + (num, probe.shape[-1])
    with _written_atomically(path) as temporary:
      table = (np.lib.format.open_memmap(temporary, mode='w+', dtype=dtype, shape=shape)
               if parallel.is_primary() else None)
      for r in range(max(count, 1)):
        variables = train.replica(source.variables, r) if count else source.variables
        for batch, indices, mask in train._padded_batches(num, batch_size, mesh, data):
          logits = parallel.to_host(logits_fn(variables, batch, indices))
          start_row = int(parallel.to_host(indices)[0])
          rows = slice(start_row, min(start_row + batch_size, num))
          if table is not None:
            (table[r] if count else table)[rows] = logits[:rows.stop - rows.start]
      if table is not None:
        table.flush()
        del table
    log(f"cached the teacher's logits on {num} streamed training images in "
        f'{path} ({dtype}) in {time.perf_counter() - start:.1f} s.')
  empty = np.zeros((0,), dtype)
  return DiskCachedTeacher(jnp.asarray(empty), path, per_replica=source.per_replica)


def _intact(path: str) -> bool:
  """Whether `path` holds a table whose SHA-256 is the one recorded beside it."""
  if not os.path.exists(path):
    return False
  try:
    with open(path + '.sha256') as f:
      recorded = f.read().strip()
  except OSError:
    recorded = ''
  if recorded == files.sha256_of(path):
    return True
  print(f'{path}: the teacher-logit table does not match its recorded checksum (damaged, or '
        'cut short); writing it again.')
  return False


@contextlib.contextmanager
def _written_atomically(path: str):
  """A temporary name to write the table to; on success it becomes `path` (with its checksum
  beside it), atomically. Process 0 writes; every process leaves once the file is in place."""
  temporary = f'{path}.tmp-{os.getpid()}'
  if parallel.is_primary():
    os.makedirs(os.path.dirname(path), exist_ok=True)
  try:
    yield temporary
    if parallel.is_primary():
      with open(temporary, 'rb+') as f:
        os.fsync(f.fileno())
      digest = files.sha256_of(temporary)
      os.replace(temporary, path)
      files.write_text_atomic(path + '.sha256', digest + '\n')
  finally:
    if parallel.is_primary() and os.path.exists(temporary):
      os.remove(temporary)
    parallel.sync_processes(f'kdjax: teacher logits written to {os.path.basename(path)}')


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
                normalization: train.Normalization, mesh, log=print,
                data_fingerprint: str = '', fingerprints: Optional[dict] = None):
  """The teacher source a stage plan asks for: none, live, cached (on device, or in a file for
  a streamed training set, named by the teacher's and the data's fingerprints), or an ensemble
  of them."""
  plan = stage_plan.teacher
  fingerprints = fingerprints or {}
  if not plan.teachers:
    return NoTeacher()
  members = []
  for teacher in plan.teachers:
    variables = parallel.put_replicated(
        load_variables(teacher, workdir, stage_plan.image_shape), mesh)
    source = LiveTeacher(variables, teacher.model, per_replica=teacher.per_replica,
                         batching=stage_plan.replica_batching)
    if plan.cache_logits and isinstance(train_data, train.HostData):
      path = os.path.join(workdir, 'teacher_logits', f'{teacher.stage.replace("/", "_")}-'
                          f'{fingerprints.get(teacher.stage, "")[:16]}-{data_fingerprint[:16]}-'
                          f'{plan.cache_dtype}.npy')
      source = disk_cache(source, train_data, normalization, stage_plan.train.eval_batch_size,
                          mesh, path, plan.cache_dtype,
                          log=lambda m: log(f'[{stage_plan.name}] {m}'))
    elif plan.cache_logits:
      start = time.perf_counter()
      source = cache(source, train_data, normalization, stage_plan.train.eval_batch_size, mesh)
      log(f"[{stage_plan.name}] cached the teacher's logits on {train_data.labels.shape[0]} "
          f"training images in {time.perf_counter() - start:.1f} s.")
    members.append(source)
  if not plan.ensemble:
    return members[0]
  return TeacherEnsemble(tuple(members), per_replica=plan.per_replica)
