"""A user's own Flax model, named in a config by its import path `'tests.user_models:TinyNet'`."""

import flax.linen as nn
import jax.numpy as jnp


class TinyNet(nn.Module):
  """Conv 3×3 + BatchNorm + ReLU, flatten, dense: `[B, H, W, C]` → `[B, classes]`."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(8, (3, 3), dtype=self.dtype)(x.astype(self.dtype))
    # momentum 0.9: Flax's default 0.99 leaves the running statistics near their initial values
    # after the few hundred steps of a test.
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x.reshape((x.shape[0], -1)))
    return x.astype(jnp.float32)


class NoDtypeNet(nn.Module):
  """A model without a `dtype` field: it can only run in float32."""
  num_classes: int

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def no_dtype_net(num_classes: int) -> nn.Module:
  """A factory function: takes `num_classes`, not `dtype`, `conv` or `shortcut`."""
  return NoDtypeNet(num_classes=num_classes)


NOT_A_MODEL = 3  # for the error naming an attribute that is neither a module class nor callable.
