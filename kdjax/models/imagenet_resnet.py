"""ImageNet ResNets (He et al., CVPR 2016, Table 1) as torchvision builds them: ResNet-18/34/50.

A 7×7/2 stem conv (64 channels, padding 3) + BN + ReLU, a 3×3/2 max pool (padding 1), four stages
of 64/128/256/512 features, global average pooling and a dense head. ResNet-18 and ResNet-34
stack basic blocks (two 3×3 convs), [2, 2, 2, 2] and [3, 4, 6, 3] of them; ResNet-50 stacks
bottleneck blocks (1×1, 3×3, 1×1 convs, expansion 4), [3, 4, 6, 3]. This is torchvision's
"ResNet v1.5": a downsampling bottleneck strides its 3×3 conv, not its first 1×1 conv as the
paper's did. The first block of stages 2–4 halves the map.

The padding is PyTorch's, explicit and symmetric, so every map has torchvision's size
(`⌊(H + 2p − k) / s⌋ + 1`): 3 for the 7×7 stem, 1 for the 3×3 convs and the max pool (which pads
with −∞, as `MaxPool2d` does), 0 for the 1×1 convs. 224×224 images end at 7×7 before the pool;
small ones work too (the stem and pool divide by 4, the stages by 8 more, rounding up: 32×32 ends
at 1×1, and so does 16×16).

Shortcuts are projections where a block changes the shape (He et al.'s option B, torchvision's
`downsample`): a 1×1 conv with the block's stride + BN; identity elsewhere. There is no
parameter-free option here, so `get_model`'s `shortcut` option (`config.model.resnet_shortcut`,
chosen for the CIFAR ResNets and `'zero_pad'` by default) does not apply: `imagenet_resnet`
accepts and ignores it. With 1000 classes the parameter counts are torchvision's: 11,689,512
(ResNet-18), 21,797,672 (ResNet-34), 25,557,032 (ResNet-50).

Conv kernels are He-normal with fan-out (torchvision's `kaiming_normal_(mode='fan_out')`, as the
rest of kdjax); BatchNorm has PyTorch's defaults (`kdjax.models.layers.batch_norm`) and starts at
scale 1, offset 0. `zero_init_residual=True` (torchvision's option of that name, off by default
there too) starts the last BatchNorm scale of every block at 0 instead, so that each residual
branch starts as zero and each block as the identity (Goyal et al. 2017). The head is Flax's
default `nn.Dense`, as the CIFAR ResNets', not torchvision's uniform init.

The variables are named as torchvision's `state_dict` with `.` written `_`: `conv1`, `bn1`,
`layer1_0` … `layer4_2` (each with `conv1`, `bn1`, `conv2`, `bn2`, [`conv3`, `bn3`] and, in a
block with a projection, `downsample_0` (the conv) and `downsample_1` (its BN)), and `fc`.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from kdjax.models.layers import ModuleDef, batch_norm, conv_bn_relu
from kdjax.models.resnet import he_conv

# depth → (block kind, blocks per stage), He et al. 2016, Table 1.
SPECS = {18: ('basic', (2, 2, 2, 2)), 34: ('basic', (3, 4, 6, 3)),
         50: ('bottleneck', (3, 4, 6, 3))}
EXPANSION = {'basic': 1, 'bottleneck': 4}  # a block's output width / its stage's width.


def _projection(x, features: int, strides: int, conv: ModuleDef, norm: ModuleDef):
  """Option B: identity if the shape is kept, else a strided 1×1 conv + BN (`downsample`)."""
  if strides == 1 and x.shape[-1] == features:
    return x
  x = conv(features, (1, 1), strides=(strides, strides), padding=0, name='downsample_0')(x)
  return norm(name='downsample_1')(x)


def _last_norm(norm: ModuleDef, zero_init: bool) -> ModuleDef:
  return functools.partial(norm, scale_init=nn.initializers.zeros) if zero_init else norm


class BasicBlock(nn.Module):
  """3×3 conv (strided) + BN + ReLU, 3×3 conv + BN, plus the shortcut, ReLU (ResNet-18/34)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    y = conv_bn_relu(x, self.features, self.conv, self.norm, self.strides,
                     conv_name='conv1', norm_name='bn1')
    y = self.conv(self.features, (3, 3), padding=1, name='conv2')(y)
    y = _last_norm(self.norm, self.zero_init_residual)(name='bn2')(y)
    return nn.relu(y + _projection(x, self.features, self.strides, self.conv, self.norm))


class Bottleneck(nn.Module):
  """1×1 conv + BN + ReLU, 3×3 conv (strided, v1.5) + BN + ReLU, 1×1 conv to 4× + BN, shortcut."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x):
    y = self.conv(self.features, (1, 1), padding=0, name='conv1')(x)
    y = nn.relu(self.norm(name='bn1')(y))
    y = conv_bn_relu(y, self.features, self.conv, self.norm, self.strides,
                     conv_name='conv2', norm_name='bn2')
    out = self.features * EXPANSION['bottleneck']
    y = self.conv(out, (1, 1), padding=0, name='conv3')(y)
    y = _last_norm(self.norm, self.zero_init_residual)(name='bn3')(y)
    return nn.relu(y + _projection(x, out, self.strides, self.conv, self.norm))


BLOCKS = {'basic': BasicBlock, 'bottleneck': Bottleneck}


class ImageNetResNet(nn.Module):
  """Inputs `[B, H, W, C]` float; outputs `[B, num_classes]` float32 logits.

  `block` is `'basic'` or `'bottleneck'`; stage `s` has `blocks_per_stage[s]` blocks of width
  `stage_widths[s]` (a bottleneck's output is 4× that); the stem has `stage_widths[0]` channels.
  """
  block: str
  blocks_per_stage: Sequence[int]
  num_classes: int
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  zero_init_residual: bool = False  # torchvision's option: each block's last BN scale starts at 0.
  dtype: jnp.dtype = jnp.float32
  conv: str = 'xla'  # 'xla' (nn.Conv) or 'matmul_dw'; see kdjax.models.conv.

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv, norm = he_conv(self.conv, self.dtype), batch_norm(train, self.dtype)
    x = conv(self.stage_widths[0], (7, 7), strides=(2, 2), padding=3, name='conv1')(
        x.astype(self.dtype))
    x = nn.relu(norm(name='bn1')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    block = BLOCKS[self.block]
    for stage, (width, blocks) in enumerate(zip(self.stage_widths, self.blocks_per_stage)):
      for i in range(blocks):
        strides = 2 if stage > 0 and i == 0 else 1
        x = block(width, strides, conv=conv, norm=norm,
                  zero_init_residual=self.zero_init_residual, name=f'layer{stage + 1}_{i}')(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
    return x.astype(jnp.float32)


def imagenet_resnet(depth: int, num_classes: int, shortcut=None, **kwargs) -> ImageNetResNet:
  """ResNet-`depth` (18, 34 or 50). `shortcut` is ignored: these always project (option B)."""
  del shortcut  # get_model passes config.model.resnet_shortcut (default 'zero_pad') to 'resnet*'.
  block, blocks_per_stage = SPECS[depth]
  return ImageNetResNet(block=block, blocks_per_stage=blocks_per_stage, num_classes=num_classes,
                        **kwargs)
