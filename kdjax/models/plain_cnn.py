"""The plain CNNs of TAKD (Mirzadeh et al., AAAI 2020, Sec. 5.1): 2, 4, 6, 8 and 10 conv layers.

Each conv is Conv3×3 (with bias) + BatchNorm + ReLU; `'M'` is a 2×2 max-pool (`max_pool_2x2`);
the head is one or two dense layers (ReLU between them). Widths follow the official repository's
`plain_cnn_cifar.py` (`plane_cifar10_book` / `plane_cifar100_book`), including its CIFAR-100
6-layer net that has no third max-pool. The CIFAR-100 widths are used when `num_classes > 10`.
"""

import functools
from typing import Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from kdjax.errors import KdjaxError
from kdjax.models.conv import conv_class
from kdjax.models.layers import batch_norm, conv_bn_relu, max_pool_2x2

Layer = Union[int, str]  # an int is a conv width, 'M' a max-pool.

# (conv/pool layers, hidden dense widths); the final dense layer has num_classes outputs.
CIFAR10_SPECS = {
    2: ((16, 'M', 16, 'M'), ()),
    4: ((16, 16, 'M', 32, 32, 'M'), ()),
    6: ((16, 16, 'M', 32, 32, 'M', 64, 64, 'M'), ()),
    8: ((16, 16, 'M', 32, 32, 'M', 64, 64, 'M', 128, 128, 'M'), (64,)),
    10: ((32, 32, 'M', 64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M'), (128,)),
}
CIFAR100_SPECS = {
    2: ((32, 'M', 32, 'M'), ()),
    4: ((32, 32, 'M', 64, 64, 'M'), ()),
    6: ((32, 32, 'M', 64, 64, 'M', 128, 128), ()),
    8: ((32, 32, 'M', 64, 64, 'M', 128, 128, 'M', 256, 256, 'M'), (64,)),
    10: ((32, 32, 'M', 64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M'), (512,)),
}

# PyTorch's default for Conv2d/Linear weights (kaiming_uniform with a=√5), which the official code
# keeps: U(±1/√fan_in), i.e. variance 1/(3·fan_in).
_torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


class PlainCNN(nn.Module):
  """A plain (non-residual) CNN. Inputs `[B, H, W, C]` float; outputs `[B, num_classes]` logits."""
  layers: Sequence[Layer]
  hidden_widths: Sequence[int]
  num_classes: int
  dtype: jnp.dtype = jnp.float32
  conv: str = 'xla'  # 'xla' (nn.Conv) or 'matmul_dw'; see kdjax.models.conv.

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = functools.partial(conv_class(self.conv), kernel_init=_torch_default_init,
                             dtype=self.dtype)  # with a bias, as the official code has.
    norm = batch_norm(train, self.dtype)
    x = x.astype(self.dtype)
    for layer in self.layers:
      if layer == 'M':
        if min(x.shape[1:3]) < 2:
          raise KdjaxError(
              f'{self.name or "plain CNN"}: input too small for its {self.layers.count("M")} '
              'max-pools; use larger images or a shallower plain CNN.')
        x = max_pool_2x2(x)
      else:
        x = conv_bn_relu(x, layer, conv, norm)
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden_widths:
      x = nn.relu(nn.Dense(width, kernel_init=_torch_default_init, dtype=self.dtype)(x))
    x = nn.Dense(self.num_classes, kernel_init=_torch_default_init, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


def plain_cnn(depth: int, num_classes: int, **kwargs) -> PlainCNN:
  specs = CIFAR100_SPECS if num_classes > 10 else CIFAR10_SPECS
  layers, hidden = specs[depth]
  return PlainCNN(layers=layers, hidden_widths=hidden, num_classes=num_classes, **kwargs)
