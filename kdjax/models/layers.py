"""The pieces kdjax's conv nets are built from, injected in the manner of flax's imagenet example.

A network's top-level `__call__` builds `conv` and `norm` once, as partials of a module class, and
hands them to its blocks and heads, so that the conv option (`'xla'` or `'matmul_dw'`, see
`kdjax.models.conv`) and BatchNorm's settings are chosen in one place.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax

ModuleDef = Any  # a Flax module class, or a `functools.partial` of one with some fields fixed.


def batch_norm(train: bool, dtype) -> ModuleDef:
  """BatchNorm with PyTorch's defaults, as the official CIFAR code trains with them.

  PyTorch's `momentum=0.1` weights the new batch; Flax's `momentum=0.9` weights the running
  average: the same update. `train=True` normalises with the batch statistics and updates the
  `batch_stats` collection; `train=False` uses the running averages.
  """
  return functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                           epsilon=1e-5, dtype=dtype)


def conv_bn_relu(x: jax.Array, features: int, conv: ModuleDef, norm: ModuleDef,
                 strides: int = 1, conv_name: Optional[str] = None,
                 norm_name: Optional[str] = None) -> jax.Array:
  """3×3 conv (padding 1, `strides`) → `norm()` → ReLU on `x [B, H, W, C]`.

  A function, not a module: called inside a compact `__call__`, its two layers are the caller's
  own submodules, auto-named (`Conv_0`, `BatchNorm_0`, …) or given `conv_name` / `norm_name`.
  A module here would add a level to the variable tree and break existing checkpoints.
  """
  x = conv(features, (3, 3), strides=(strides, strides), padding=1, name=conv_name)(x)
  return nn.relu(norm(name=norm_name)(x))
