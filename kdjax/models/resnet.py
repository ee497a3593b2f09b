"""CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2): depth 6n+2 with 16/32/64 channels.

Three stages of `n` basic blocks (n = 1, 2, 3, 4, 5, 7, 9, 18 for ResNet-8 … ResNet-110), a 3×3
stem, global average pooling and one dense layer.

The shortcut where the shape changes is a choice:
  * `'zero_pad'` (default): He et al.'s option A for CIFAR — stride-2 subsampling and zero-padded
    channels, parameter-free. This gives the published counts (ResNet-20 0.27M, ResNet-110 1.7M).
  * `'projection'`: the official TAKD code (`resnet_cifar.py`), a 1×1 strided conv + BatchNorm
    (option B), which adds about 3k parameters.
Conv kernels use He-normal with fan-out, as both the paper and the official code do.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.conv import conv_class

SHORTCUTS = ('zero_pad', 'projection')
BLOCKS_PER_STAGE = {8: 1, 14: 2, 20: 3, 26: 4, 32: 5, 44: 7, 56: 9, 110: 18}

_he_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class BasicBlock(nn.Module):
  features: int
  strides: int
  shortcut: str
  dtype: jnp.dtype
  conv: str = 'xla'

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, s: conv_class(self.conv)(f, (k, k), strides=(s, s), padding=k // 2,
                                                 use_bias=False, kernel_init=_he_fan_out,
                                                 dtype=self.dtype)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                                dtype=self.dtype)
    y = nn.relu(norm()(conv(self.features, 3, self.strides)(x)))
    y = norm()(conv(self.features, 3, 1)(y))
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      if self.shortcut == 'projection':
        residual = norm()(conv(self.features, 1, self.strides)(x))
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
    x = x.astype(self.dtype)
    x = conv_class(self.conv)(self.stage_widths[0], (3, 3), padding=1, use_bias=False,
                              kernel_init=_he_fan_out, dtype=self.dtype)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                             dtype=self.dtype)(x))
    for stage, width in enumerate(self.stage_widths):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, strides, self.shortcut, self.dtype, self.conv)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)


def resnet(depth: int, num_classes: int, **kwargs) -> CifarResNet:
  return CifarResNet(blocks_per_stage=BLOCKS_PER_STAGE[depth], num_classes=num_classes, **kwargs)
