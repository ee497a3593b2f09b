"""Multi-exit CIFAR ResNets for self-distillation (BYOT, Zhang et al. 2019; MATE, Sun et al. 2024).

A CIFAR ResNet (He et al. 2016) with an exit after each of its three stages. Each exit is a
small head in BYOT's manner: stride-2 Conv3×3 + BN + ReLU layers that bring its feature map down
to the last stage's resolution and width, global average pooling, and a dense layer. The deepest
exit is the network's own head. Exits are ordered shallow → deep.

MATE adds E ensemble teachers: teacher e's logits are `Σ_j softmax(w_e)_j · z_j`, a weighted
combination of all E exits' logits with its own trainable weights `w_e` (a row of the `[E, E]`
parameter `ensemble_weights`). The weights start at `diag(1)`: with all rows equal the teachers
would get identical gradients and stay identical forever, so each starts leaning towards its own
exit. By default the teachers see the exits through `stop_gradient`, so their cross-entropy trains
only the weights; `teachers_train_backbone=True` lets it reach the exits too.

`__call__(x, train, last_exit=None)` returns `(exit_logits [E, B, C], teacher_logits [E, B, C])`;
`last_exit=i` computes only the layers exit i needs (the backbone up to stage i and exit i's
head) and returns `([1, B, C], None)`, which is how `exit_macs` counts each exit's cost.
"""

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.models import resnet as _resnet
from kdjax.models.layers import ModuleDef, batch_norm, conv_bn_relu


class ExitHead(nn.Module):
  """Stride-2 conv + BN + ReLU layers down to the last stage's map, pooling, a dense layer."""
  downsamples: int
  width: int
  num_classes: int
  conv: ModuleDef
  norm: ModuleDef
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    for i in range(self.downsamples):
      features = self.width // 2**(self.downsamples - 1 - i)
      x = conv_bn_relu(x, features, self.conv, self.norm, strides=2)
    return nn.Dense(self.num_classes, dtype=self.dtype)(jnp.mean(x, axis=(1, 2)))


class MultiExitResNet(nn.Module):
  blocks_per_stage: int
  num_classes: int
  shortcut: str = 'zero_pad'
  stage_widths: Sequence[int] = (16, 32, 64)
  teachers_train_backbone: bool = False
  dtype: jnp.dtype = jnp.float32
  conv: str = 'xla'  # 'xla' (nn.Conv) or 'matmul_dw'; see kdjax.models.conv.

  @property
  def num_exits(self) -> int:
    return len(self.stage_widths)

  @nn.compact
  def __call__(self, x, train: bool = False, last_exit: Optional[int] = None):
    num_exits = self.num_exits
    stop = num_exits - 1 if last_exit is None else last_exit
    conv, norm = _resnet.he_conv(self.conv, self.dtype), batch_norm(train, self.dtype)
    x = conv_bn_relu(x.astype(self.dtype), self.stage_widths[0], conv, norm, conv_name='stem',
                     norm_name='stem_bn')
    exits = []
    for stage, width in enumerate(self.stage_widths[:stop + 1]):
      for block in range(self.blocks_per_stage):
        strides = 2 if stage > 0 and block == 0 else 1
        x = _resnet.BasicBlock(width, strides, self.shortcut, conv=conv, norm=norm,
                               name=f'stage{stage}_block{block}')(x)
      if last_exit is None or stage == last_exit:
        head = ExitHead(num_exits - 1 - stage, self.stage_widths[-1], self.num_classes,
                        conv=conv, norm=norm, dtype=self.dtype, name=f'exit{stage}')
        exits.append(head(x).astype(jnp.float32))
    exit_logits = jnp.stack(exits)
    weights = self.param('ensemble_weights', lambda key: jnp.eye(num_exits, dtype=jnp.float32))
    if last_exit is not None:
      return exit_logits, None
    seen = exit_logits if self.teachers_train_backbone else jax.lax.stop_gradient(exit_logits)
    teacher_logits = jnp.einsum('ej,jbc->ebc', jax.nn.softmax(weights, axis=-1), seen)
    return exit_logits, teacher_logits


def multi_exit_resnet(depth: int, num_classes: int, **kwargs) -> MultiExitResNet:
  return MultiExitResNet(blocks_per_stage=_resnet.BLOCKS_PER_STAGE[depth],
                         num_classes=num_classes, **kwargs)


def exit_macs(model: MultiExitResNet, variables, image_shape) -> list:
  """Multiply-accumulates per image to reach each exit (backbone up to it + its head).

  Counted from the jaxpr of `model.apply(..., last_exit=i)`: every convolution and matrix
  product, `prod(output shape) × (contraction size)`, for a batch of one.
  """
  macs = []
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  for i in range(model.num_exits):
    jaxpr = jax.make_jaxpr(lambda v, im: model.apply(v, im, train=False, last_exit=i))(
        variables, x)
    macs.append(_count_macs(jaxpr.jaxpr))
  return macs


def _count_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():  # nested programs: jit, custom_jvp, ...
      inner = getattr(param, 'jaxpr', param)
      if hasattr(inner, 'eqns'):
        total += _count_macs(inner)
    out = eqn.outvars[0].aval.shape
    if eqn.primitive.name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      spec = eqn.params['dimension_numbers'].rhs_spec  # (out_feature, in_feature, spatial...)
      per_output = int(np.prod([rhs[d] for d in spec[1:]]))
      total += int(np.prod(out)) * per_output // eqn.params['feature_group_count']
    elif eqn.primitive.name == 'dot_general':
      (contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += int(np.prod(out)) * int(np.prod([lhs[d] for d in contract]))
  return total
