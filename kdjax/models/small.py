"""Small MNIST-scale models for the noisy-teacher experiments (Sau & Balasubramanian 2016).

`LeNet5`: LeCun et al. 1998's layout with ReLU and max-pooling (conv 6@5×5 'SAME' → pool → conv
16@5×5 → pool → 120 → 84 → classes). `MLP`: flatten, ReLU hidden layers, linear output; names
`mlp_<layers>x<width>`, e.g. `mlp_2x800` (Hinton et al. 2015's small MNIST student), and
`mlp_<layers>x<width>_dropout<percent>`, the same with dropout after every hidden layer at
p = 0.1, 0.2 or 0.5 (0.5: Srivastava et al. 2014's hidden-unit rate), the regulariser the
noisy-teacher paper compares against. The
noisy-teacher paper's exact architectures are not reachable here; these are the conventional ones.
"""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class LeNet5(nn.Module):
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no BatchNorm or dropout.
    x = x.astype(self.dtype)
    x = nn.max_pool(nn.relu(nn.Conv(6, (5, 5), padding='SAME', dtype=self.dtype)(x)), (2, 2),
                    strides=(2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(16, (5, 5), padding='VALID', dtype=self.dtype)(x)), (2, 2),
                    strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in (120, 84):
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class MLP(nn.Module):
  """Dropout (rate > 0) is active with `train=True` and needs a `'dropout'` PRNG stream."""
  hidden_widths: Sequence[int]
  num_classes: int
  dropout_rate: float = 0.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype).reshape((x.shape[0], -1))
    for width in self.hidden_widths:
      x = nn.relu(nn.Dense(width, dtype=self.dtype)(x))
      if self.dropout_rate:
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


MLP_SHAPES = {'mlp_1x100': (100,), 'mlp_2x800': (800, 800), 'mlp_2x1200': (1200, 1200)}
DROPOUT_RATES = (0.1, 0.2, 0.5)
