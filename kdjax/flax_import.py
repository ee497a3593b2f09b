"""Teachers saved by Flax or Orbax outside kdjax: the variables of a model in kdjax's registry.

Two layouts for `config.external_teachers.<name>.layout`:

* `'flax'`: one file of `flax.serialization.to_bytes({'params': ..., 'batch_stats': ...})`
  (msgpack), as flax's examples save;
* `'orbax'`: a folder written by `orbax.checkpoint.StandardCheckpointer().save(path,
  {'params': ..., 'batch_stats': ...})`.

The tree is checked against the model the config names (`kdjax.models.variable_shapes`) before
use: a missing, extra or mis-shaped entry is named with the shape the model expects. A model
without BatchNorm may omit `batch_stats`.
"""

import hashlib
import os
from typing import Dict

import flax
import jax
import numpy as np

from kdjax.errors import KdjaxError

LAYOUTS = {
    'flax': "a file of flax.serialization.to_bytes({'params', 'batch_stats'})",
    'orbax': "a folder of orbax.checkpoint.StandardCheckpointer's {'params', 'batch_stats'}",
}


def fingerprint(path: str) -> str:
  """SHA-256 over the file, or over every file's relative path and bytes below the folder."""
  digest = hashlib.sha256()
  files = [path] if os.path.isfile(path) else sorted(
      os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
  for name in files:
    digest.update(os.path.relpath(name, path).encode())
    with open(name, 'rb') as f:
      for block in iter(lambda: f.read(1 << 20), b''):
        digest.update(block)
  return digest.hexdigest()


def _flat(tree) -> Dict[str, tuple]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(leaf))
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def read_variables(path: str, layout: str, shapes, source: str) -> dict:
  """`{params, batch_stats}` from `path`, checked against `shapes` (`variable_shapes(model)`)."""
  if layout not in LAYOUTS:
    raise KdjaxError(f"{source}: unknown layout '{layout}'; choose one of: {', '.join(LAYOUTS)}.")
  wanted = {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})}
  try:
    if layout == 'flax':
      with open(path, 'rb') as f:
        tree = flax.serialization.msgpack_restore(f.read())
    else:
      import orbax.checkpoint as ocp
      tree = ocp.StandardCheckpointer().restore(os.path.abspath(path))
  except Exception as e:  # not msgpack / not an Orbax checkpoint, in the library's words.
    raise KdjaxError(f"{source}: cannot read a {layout} checkpoint ({type(e).__name__}: "
                     f"{str(e).splitlines()[0][:200] if str(e) else ''}); it must be "
                     f'{LAYOUTS[layout]}.') from None
  tree = {'params': (tree or {}).get('params', {}), 'batch_stats': (tree or {}).get(
      'batch_stats', {})}
  have, expected = _flat(tree), _flat(wanted)
  for key, shape in expected.items():
    if key not in have:
      raise KdjaxError(f"{source}: no entry '{key}' (expected shape {shape}); the checkpoint "
                       'is not of the model the config names.')
    if have[key] != shape:
      raise KdjaxError(f"{source}: entry '{key}' has shape {have[key]}, the model expects "
                       f'{shape}; the checkpoint is not of the model the config names.')
  extra = sorted(set(have) - set(expected))
  if extra:
    raise KdjaxError(f"{source}: unexpected entries {extra[:3]} (the model has no such "
                     'variables); the checkpoint is not of the model the config names.')
  dtypes = jax.tree_util.tree_map(lambda s: s.dtype, wanted)
  return jax.tree_util.tree_map(lambda x, dtype: np.asarray(x, dtype), tree, dtypes)
