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
                   un-augmented training set, gathered by index: the teacher runs once per stage;
                   or `[V, N, C]` on each epoch's per-example augmented views (`view`: the epoch).
* `DiskCachedTeacher` such a table in a file (`disk_cache`, `WORKDIR/teacher_logits/`), shared
                   by the stages that learn from one teacher; a streamed stage reads the batch's
                   rows from it on the host (`rows`), optionally top-k compressed.
* `TeacherEnsemble` several sources stacked on a `[K]` axis, for a loss that learns from several
                   teachers (`kdjax.stage_losses.multi_teacher`).

Where a live teacher's variables come from (an earlier stage of the run, or a PyTorch file named
in `config.external_teachers`; another workdir or an Orbax checkpoint later) is
`load_variables`'s business, not the step's: an imported teacher is a `LiveTeacher` (or
`CachedTeacher`) like any other.
"""

import contextlib
import dataclasses
import glob
import hashlib
import json
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

  Such a table holds logits of un-augmented images, so it refuses a step that augments
  (`needs_unaugmented_images`). A table of per-example views (`view` set: `[V, N, C]`, or
  `[R, V, N, C]`) holds logits on each epoch's augmented views (`ExampleViews`); `view`, an int32
  scalar, is the epoch of the step (`at_epoch`).
  """
  table: jax.Array
  view: Optional[jax.Array] = None
  per_replica: bool = struct.field(pytree_node=False, default=False)
  needs_unaugmented_images: bool = struct.field(pytree_node=False, default=True)

  def logits(self, images, indices) -> jax.Array:
    table = self.table
    if self.view is not None:
      table = table[:, self.view] if self.per_replica else table[self.view]
    return (table[:, indices] if self.per_replica else table[indices]).astype(jnp.float32)


@struct.dataclass
class DiskCachedTeacher:
  """The batch's rows of a logits table kept in a file (`disk_cache`), read on the host with
  the batch's images: `rows` `[B, C]` (or `[R, B, C]`), replaced every step (`with_rows`). For a
  training set streamed from the host, whose `[N, C]` table need not fit on the device."""
  rows: jax.Array
  path: str = struct.field(pytree_node=False)
  per_replica: bool = struct.field(pytree_node=False, default=False)
  needs_unaugmented_images: bool = struct.field(pytree_node=False, default=True)
  views: bool = struct.field(pytree_node=False, default=False)  # `[(R,) V, N, C]` in the file.
  num_classes: int = struct.field(pytree_node=False, default=0)

  def logits(self, images, indices) -> jax.Array:
    return self.rows.astype(jnp.float32)

  def table(self):
    """The file's `[N, C]` (or `[R, N, C]`; with views `[(R,) V, N, C]`) table, memory-mapped
    (top-k compressed: a structured array without the `C` axis, `compress_top_k`)."""
    return np.load(self.path, mmap_mode='r')

  def reader(self, steps_per_epoch: int):
    """`(step, rows) → ` the table's `[(R,) B, C]` logits of `rows` for that step (of its
    epoch's views), on the host."""
    table = self.table()
    expand = ((lambda x: expand_top_k(x, self.num_classes)) if table.dtype.names else
              (lambda x: x))
    if not self.views:
      return lambda step, rows: expand(table[:, rows] if self.per_replica else table[rows])
    return lambda step, rows: expand(table[:, step // steps_per_epoch, rows] if self.per_replica
                                     else table[step // steps_per_epoch, rows])


def compress_top_k(logits: np.ndarray, k: int, dtype='float32') -> np.ndarray:
  """`[..., C]` logits → a structured `[...]` array of each row's `k` largest logits
  (`values`, in `dtype`, largest first), their classes (`indices`, int32) and the log-sum-exp of
  the other `C − k` logits (`rest`, float32): FKD's top-k soft labels (Shen & Xing 2022)."""
  logits = np.asarray(logits, np.float32)
  order = np.argsort(-logits, axis=-1, kind='stable')[..., :k]
  others = logits.copy()
  np.put_along_axis(others, order, -np.inf, axis=-1)
  top = others.max(axis=-1, keepdims=True)
  rest = top[..., 0] + np.log(np.sum(np.exp(others - top), axis=-1))
  out = np.empty(logits.shape[:-1], _top_k_dtype(k, dtype))
  out['values'] = np.take_along_axis(logits, order, axis=-1)
  out['indices'] = order
  out['rest'] = rest
  return out


def expand_top_k(rows: np.ndarray, num_classes: int) -> np.ndarray:
  """`compress_top_k`'s rows → float32 `[..., C]` logits: the `k` kept exactly, every other
  class `rest − log(C − k)`. At T = 1 the softmax is then the teacher's on the k classes, and the
  probability it left to the others shared equally among them (FKD's marginal smoothing); at
  other temperatures the others' mass differs (its error: BUILD_NOTES)."""
  k = rows.dtype['values'].shape[0]
  out = np.empty(rows.shape + (num_classes,), np.float32)
  out[...] = (rows['rest'] - np.log(num_classes - k))[..., None]
  np.put_along_axis(out, rows['indices'].astype(np.int64),
                    rows['values'].astype(np.float32), axis=-1)
  return out


def _top_k_dtype(k: int, dtype) -> np.dtype:
  return np.dtype([('values', dtype, (k,)), ('indices', np.int32, (k,)), ('rest', np.float32)])


def disk_tables(source) -> List[DiskCachedTeacher]:
  """The `DiskCachedTeacher`s of a source (itself, or an ensemble's members), in order."""
  members = source.members if isinstance(source, TeacherEnsemble) else (source,)
  return [m for m in members if isinstance(m, DiskCachedTeacher)]


def batch_row_shapes(source, batch_size: int, mesh) -> List[jax.ShapeDtypeStruct]:
  """The shapes each `DiskCachedTeacher`'s `rows` take in a step (to compile the step with)."""
  shapes = []
  for member in disk_tables(source):
    table = member.table()
    dtype = np.float32 if table.dtype.names else table.dtype  # top-k rows come expanded.
    shape = (*table.shape[:1 if member.per_replica else 0], batch_size, member.num_classes)
    shapes.append(jax.ShapeDtypeStruct(shape, dtype, sharding=parallel.batch_sharded(
        mesh, axis=len(shape) - 2)))
  return shapes


def at_epoch(source, epoch: int, mesh):
  """`source` with each per-example-views `CachedTeacher` looking at `epoch`'s views."""
  view = lambda m: (m.replace(view=_on_devices(np.int32(epoch), mesh))
                    if isinstance(m, CachedTeacher) and m.view is not None else m)
  if isinstance(source, TeacherEnsemble):
    return source.replace(members=tuple(view(m) for m in source.members))
  return view(source)


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


def disk_cache(source: LiveTeacher, data, normalization: train.Normalization,
               batch_size: int, mesh, path: str, dtype: str, log=print, *, views=None,
               augment_config=None, num_views: int = 0, top_k: int = 0,
               meta: Optional[dict] = None):
  """The live teacher's logits on every image of a training set, in the file `path` (an `.npy`
  memory-mapped when read): `[N, C]`, or `[R, N, C]` per replica, in `dtype`; with `views`
  (`ExampleViews`, augmenting as `augment_config` says) on each example's view in each of
  `num_views` epochs, `[V, N, C]` (or `[R, V, N, C]`). `top_k` > 0 keeps each row's `top_k`
  largest logits only (`compress_top_k`; the `C` axis goes). Returns a `DiskCachedTeacher`.

  Written once, batch by batch (the table never on the device), to a temporary name, fsynced and
  renamed: a run killed while writing leaves no table, and the next one writes it again. A file
  already there (this teacher on this data: both fingerprints are in its name) is reused after
  its SHA-256, kept beside it, is checked; a damaged one is written again. `meta` (what the
  table was computed from: teacher, data, views) is kept beside it too, and a file whose `meta`
  differs is refused (it was put there by hand). With several processes each computes its rows,
  process 0 writes, and the others wait for it.
  """
  meta = dict(meta or {}, dtype=dtype, num_views=num_views, top_k=top_k)
  if top_k and 'num_classes' not in meta:
    raise ValueError("disk_cache: a top-k table needs meta['num_classes'].")
  if not _intact(path) or not os.path.exists(path + '.json'):  # no record: an older kdjax's.
    start = time.perf_counter()
    streamed = isinstance(data, train.HostData)
    logits_fn = train.make_teacher_logits_fn(source.module, normalization, mesh,
                                             streamed=streamed, augment_config=augment_config,
                                             views=views)
    count, num = (jax.tree_util.tree_leaves(source.variables)[0].shape[0]
                  if source.per_replica else 0), data.labels.shape[0]
    first = train.replica(source.variables, 0) if count else source.variables
    probe_args = next(train._padded_batches(num, batch_size, mesh, data))[:2] + (
        (_on_devices(np.int32(0), mesh),) if views else ())
    probe = jax.eval_shape(logits_fn, first, *probe_args)
    num_classes = probe.shape[-1]
    shape = ((count,) if count else ()) + ((num_views,) if views else ()) + (
        (num,) if top_k else (num, num_classes))
    stored = _top_k_dtype(top_k, dtype) if top_k else dtype
    fit = (lambda x: compress_top_k(x, top_k, dtype)) if top_k else (lambda x: x)
    with _written_atomically(path, meta) as temporary:
      table = (np.lib.format.open_memmap(temporary, mode='w+', dtype=stored, shape=shape)
               if parallel.is_primary() else None)
      for r in range(max(count, 1)):
        variables = train.replica(source.variables, r) if count else source.variables
        for v in range(num_views if views else 1):
          epoch = (_on_devices(np.int32(v), mesh),) if views else ()
          for batch, indices, mask in train._padded_batches(num, batch_size, mesh, data):
            logits = parallel.to_host(logits_fn(variables, batch, indices, *epoch))
            start_row = int(parallel.to_host(indices)[0])
            rows = slice(start_row, min(start_row + batch_size, num))
            if table is not None:
              at = ((r,) if count else ()) + ((v,) if views else ())
              table[at + (rows,)] = fit(logits[:rows.stop - rows.start])
      if table is not None:
        table.flush()
        del table
    what = f'{num_views} epochs of augmented views of ' if views else ''
    kept = f', the top {top_k}' if top_k else ''
    log(f"cached the teacher's logits on {what}{num} training images in {path} ({dtype}{kept}) "
        f'in {time.perf_counter() - start:.1f} s.')
  else:
    _check_meta(path, meta)
  num_classes = meta['num_classes'] if top_k else np.load(path, mmap_mode='r').shape[-1]
  empty = np.zeros((0,), np.float32 if top_k else dtype)
  return DiskCachedTeacher(jnp.asarray(empty), path, per_replica=source.per_replica,
                           needs_unaugmented_images=views is None, views=views is not None,
                           num_classes=num_classes)


def _check_meta(path: str, meta: dict) -> None:
  """Refuses a table whose recorded `meta` is not `meta` (JSON-equal)."""
  try:
    with open(path + '.json') as f:
      recorded = json.load(f)
  except (OSError, ValueError):
    recorded = None
  expected = json.loads(json.dumps(meta))
  if recorded != expected:
    differs = sorted(k for k in set(expected) | set(recorded or {})
                     if (recorded or {}).get(k) != expected.get(k))
    raise KdjaxError(
        f'{path}: this teacher-logit table was not computed from what this stage would compute '
        f"it from (differs in: {', '.join(differs) or 'its record, missing or unreadable'}). "
        'Tables are named by their teacher and data, so it was copied or renamed by hand. '
        'Delete it (and its .sha256 and .json beside it) to have it computed again.')


def load_to_device(disk: DiskCachedTeacher, mesh) -> CachedTeacher:
  """A table of `disk_cache` put whole on the device for a device-resident training set
  (top-k rows expanded to `C` logits): `[(R,) N, C]`, or of per-example views `[(R,) V, N, C]`,
  starting at epoch 0 (`at_epoch`)."""
  table = np.asarray(disk.table())
  if table.dtype.names:
    table = expand_top_k(table, disk.num_classes)
  return CachedTeacher(_on_devices(table, mesh),
                       view=_on_devices(np.int32(0), mesh) if disk.views else None,
                       per_replica=disk.per_replica, needs_unaugmented_images=not disk.views)


def _on_devices(x, mesh):
  """A host value whole on every device of `mesh` (None: the default device)."""
  return jnp.asarray(x) if mesh is None else parallel.put_replicated(x, mesh)


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
def _written_atomically(path: str, meta: dict):
  """A temporary name to write the table to; on success it becomes `path` (with its checksum
  and `meta` beside it), atomically. Process 0 writes; every process leaves once the file is in
  place."""
  temporary = f'{path}.tmp-{os.getpid()}'
  if parallel.is_primary():
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # A run killed while writing left its temporary behind; the workdir's lock says that no
    # other writer is alive, so it is removed (only names of this form, which kdjax made).
    for stale in glob.glob(glob.escape(path) + '.tmp-*'):
      os.remove(stale)
  try:
    yield temporary
    if parallel.is_primary():
      with open(temporary, 'rb+') as f:
        os.fsync(f.fileno())
      digest = files.sha256_of(temporary)
      files.write_text_atomic(path + '.json', json.dumps(meta, indent=1, sort_keys=True) + '\n')
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


def _cached_on_disk(stage_plan, teacher, source, workdir, train_data, normalization, mesh,
                    data_fingerprint: str, teacher_fingerprint: str, log):
  """`disk_cache` for one teacher of a stage: the un-augmented table of the training set, or
  (`cache_views`) the table of every epoch's per-example views; memory-mapped when streamed, put
  on the device otherwise. The name holds what the table depends on, so every stage that
  learns from this teacher on this data (with these views) finds and reuses it."""
  plan, views = stage_plan.teacher, stage_plan.views if stage_plan.teacher.cache_views else None
  meta = {'teacher': teacher.stage, 'teacher_fingerprint': teacher_fingerprint,
          'data_fingerprint': data_fingerprint, 'per_replica': teacher.per_replica,
          'num_classes': stage_plan.num_classes}
  name = (f'{teacher.stage.replace("/", "_")}-{teacher_fingerprint[:16]}-'
          f'{data_fingerprint[:16]}')
  num_views = 0
  if views is not None:
    num_views = stage_plan.train.epochs
    meta.update(views_seed=views.seed, augment=dataclasses.asdict(stage_plan.augment))
    settings = json.dumps([meta['views_seed'], meta['augment']], sort_keys=True)
    name += f'-views{num_views}-{hashlib.sha256(settings.encode()).hexdigest()[:8]}'
  top = f'-top{plan.cache_top_k}' if plan.cache_top_k else ''
  path = os.path.join(workdir, 'teacher_logits', f'{name}{top}-{plan.cache_dtype}.npy')
  disk = disk_cache(source, train_data, normalization, stage_plan.train.eval_batch_size, mesh,
                    path, plan.cache_dtype, log=lambda m: log(f'[{stage_plan.name}] {m}'),
                    views=views, augment_config=stage_plan.augment, num_views=num_views,
                    top_k=plan.cache_top_k, meta=meta)
  if not isinstance(train_data, train.HostData):
    return load_to_device(disk, mesh)
  return disk


def make_source(stage_plan, workdir: str, train_data: train.DeviceData,
                normalization: train.Normalization, mesh, log=print,
                data_fingerprint: str = '', fingerprints: Optional[dict] = None):
  """The teacher source a stage plan asks for: none, live, cached, or an ensemble of them.

  A cached teacher's table is computed once per teacher, data (and views) and kept in a file
  of the workdir named by their fingerprints (`_cached_on_disk`): every later stage of the
  table that learns from the same teacher reads it instead of running the teacher again (TAKD's
  CIFAR table: the CNN-10 teacher's logits serve its three assistants and the BLKD students),
  and a resumed stage does not recompute it. The file is put on the device for a
  device-resident training set and memory-mapped for a streamed one."""
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
    if plan.cache_logits:  # in a file, so every stage that learns from this teacher reuses it.
      source = _cached_on_disk(stage_plan, teacher, source, workdir, train_data, normalization,
                               mesh, data_fingerprint, fingerprints.get(teacher.stage, ''), log)
    members.append(source)
  if not plan.ensemble:
    return members[0]
  return TeacherEnsemble(tuple(members), per_replica=plan.per_replica)
