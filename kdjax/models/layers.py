"""The pieces kdjax's conv nets are built from, injected in the manner of flax's imagenet example.

A network's top-level `__call__` builds `conv` and `norm` once, as partials of a module class, and
hands them to its blocks and heads, so that the conv option (`'xla'` or `'matmul_dw'`, see
`kdjax.models.conv`) and BatchNorm's settings are chosen in one place.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pool, stride 2, no padding: `[B, H, W, C]` → `[B, H // 2, W // 2, C]` (an odd last
  row or column dropped), the values of `nn.max_pool(x, (2, 2), strides=(2, 2))`.

  Written as a reshape and a max over the window axes because XLA's CPU backend lowers
  `reduce_window`'s gradient (select-and-scatter) to iota, scatter and concatenate passes: in
  plain CNN-2's forward + backward pass at batch 128 they took about 25 of its 50 ms, and the
  step ran in 28 ms with this pool (`experiments/bench/programs.md`). The gradient still goes
  to each window's maximum; where elements of a window tie for it, `max` splits it evenly
  between them, where `nn.max_pool` and PyTorch give all of it to one. Behind a ReLU the only
  ties that arise in practice are windows of zeros, and the ReLU's gradient at 0 stops those
  either way.
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))
