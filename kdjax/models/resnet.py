"""CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2): depth 6n+2 with 16/32/64 channels.

Three stages of `n` basic blocks (n = 1, 2, 3, 4, 5, 7, 9, 18 for ResNet-8 … ResNet-110), a 3×3
stem, global average pooling and one dense layer.

The shortcut where the shape changes is a choice:
  * `'zero_pad'` (default): He et al.'s option A for CIFAR — stride-2 subsampling and zero-padded
    channels, parameter-free. This gives the published counts (ResNet-20 0.27M, ResNet-110 1.7M).
  * `'projection'`: the official TAKD code (`resnet_cifar.py`), a 1×1 strided conv + BatchNorm
    (option B), which adds about 3k parameters.
Conv kernels use He-normal with fan-out, as both the paper and the official code do. The
network builds its `conv` and `norm` once and passes them to the stem (`conv_bn_relu`, shared
with `kdjax.models.multi_exit`) and to every block.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.conv import conv_class
from kdjax.models.layers import ModuleDef, batch_norm, conv_bn_relu

SHORTCUTS = ('zero_pad', 'projection')
BLOCKS_PER_STAGE = {8: 1, 14: 2, 20: 3, 26: 4, 32: 5, 44: 7, 56: 9, 110: 18}

_he_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def he_conv(conv: str, dtype) -> ModuleDef:
  """The ResNets' convolution: no bias (BatchNorm follows), He-normal fan-out kernels."""
  return functools.partial(conv_class(conv), use_bias=False, kernel_init=_he_fan_out, dtype=dtype)


class BasicBlock(nn.Module):
  """Two 3×3 conv + BN layers and a shortcut; `conv` and `norm` come from the network."""
  features: int
  strides: int
  shortcut: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    y = conv_bn_relu(x, self.features, self.conv, self.norm, self.strides)
    y = self.norm()(self.conv(self.features, (3, 3), padding=1)(y))
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'projection':
        strides = (self.strides, self.strides)
        residual = self.norm()(self.conv(self.features, (1, 1), strides=strides, padding=0)(x))
      else:
        residual = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(y + residual)


class CifarResNet(nn.Module):
  """Inputs `[B, H, W, C]` float; outputs `[B, num_classes]` logits."""
  blocks_per_stage: int
  num_classes: int
  shortcut: str = 'zero_pad'
  stage_widths: Sequence[int] = (16, 32, 64)
  dtype: jnp.dtype = jnp.float32
  conv: str = 'xla'  # 'xla' (nn.Conv) or 'matmul_dw'; see kdjax.models.conv.

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = he_conv(self.conv, self.dtype), batch_norm(train, self.dtype)
    x = conv_bn_relu(x.astype(self.dtype), self.stage_widths[0], conv, norm)  # the stem.
    for stage, width in enumerate(self.stage_widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, self.shortcut, conv=conv, norm=norm)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


def resnet(depth: int, num_classes: int, **kwargs) -> CifarResNet:
  return CifarResNet(blocks_per_stage=BLOCKS_PER_STAGE[depth], num_classes=num_classes, **kwargs)
