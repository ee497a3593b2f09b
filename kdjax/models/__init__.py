"""Models chosen by name: `get_model('resnet20', num_classes=10)`."""

import functools
from typing import Callable, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import KdjaxError
from kdjax.models import plain_cnn as _plain_cnn
from kdjax.models import resnet as _resnet
from kdjax.models import multi_exit as _multi_exit
from kdjax.models import small as _small
from kdjax.models.conv import CONVS
from kdjax.models.plain_cnn import PlainCNN
from kdjax.models.multi_exit import MultiExitResNet, exit_macs
from kdjax.models.resnet import CifarResNet, SHORTCUTS

MODELS: Dict[str, Callable[..., nn.Module]] = {
    **{f'plain_cnn_{d}': functools.partial(_plain_cnn.plain_cnn, d)
       for d in sorted(_plain_cnn.CIFAR10_SPECS)},
    **{f'resnet{d}': functools.partial(_resnet.resnet, d)
       for d in sorted(_resnet.BLOCKS_PER_STAGE)},
    **{f'multi_exit_resnet{d}': functools.partial(_multi_exit.multi_exit_resnet, d)
       for d in sorted(_resnet.BLOCKS_PER_STAGE)},
    'lenet5': _small.LeNet5,
    **{name: functools.partial(_small.MLP, widths) for name, widths in _small.MLP_SHAPES.items()},
    **{f'{name}_dropout{round(100 * rate)}': functools.partial(_small.MLP, widths,
                                                               dropout_rate=rate)
       for name, widths in _small.MLP_SHAPES.items() for rate in _small.DROPOUT_RATES},
}


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the model called `name` (a key of `MODELS`) with `num_classes` outputs.

  `conv` (plain CNNs and ResNets) picks how convolutions are differentiated: `'xla'` (default,
  `nn.Conv`) or `'matmul_dw'` (`kdjax.models.conv.Conv`: kernel gradients as matrix multiplies,
  faster on CPU under XLA's default options). The variables and the forward pass are the same.
  """
  if name not in MODELS:
    raise KdjaxError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}.")
  if not isinstance(num_classes, int) or num_classes < 2:
    raise KdjaxError(f'num_classes must be an integer >= 2, got {num_classes!r}.')
  if 'shortcut' in kwargs and kwargs['shortcut'] not in SHORTCUTS:
    raise KdjaxError(f"unknown ResNet shortcut '{kwargs['shortcut']}'; choose one of: "
                     f"{', '.join(SHORTCUTS)}.")
  if 'conv' in kwargs and kwargs['conv'] not in CONVS:
    raise KdjaxError(f"unknown conv '{kwargs['conv']}'; choose one of: {', '.join(CONVS)}.")
  if 'resnet' not in name:
    kwargs.pop('shortcut', None)
  if 'resnet' not in name and 'plain_cnn' not in name:
    kwargs.pop('conv', None)  # LeNet-5 and the MLPs keep nn.Conv / have no convolutions.
  return MODELS[name](num_classes=num_classes, **kwargs)


def init_variables(model: nn.Module, image_shape, key: jax.Array):
  """Initialises `model` for images of `image_shape = (H, W, C)` as one compiled program.

  Calling `model.init` eagerly compiles every random initialiser separately (about 30 s for
  ResNet-110 on 2 CPU cores). One jitted init compiles once; it runs once, so it is compiled
  without LLVM's optimisations, which cuts a small CNN's start-up from about 4 s to about 1 s.
  The result is the same as `model.init(key, ...)`. A `[N]` array of keys gives N models' variables
  stacked on a leading axis (one vmapped program; model i is the same as with `key[i]` alone).
  """
  dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  init = functools.partial(model.init, train=False)
  if key.ndim:
    init = jax.vmap(init, in_axes=(0, None))
  init = jax.jit(init)
  compiled = init.lower(key, dummy).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return compiled(key, jnp.zeros(dummy.shape, dummy.dtype))


def variable_shapes(model: nn.Module, image_shape):
  """The `ShapeDtypeStruct` tree `init_variables` would return, computed without any compile."""
  dummy = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), dummy)


def is_multi_exit(name: str) -> bool:
  return name.startswith('multi_exit_')


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


__all__ = ['MODELS', 'get_model', 'init_variables', 'variable_shapes', 'count_params',
           'is_multi_exit', 'exit_macs', 'PlainCNN', 'CifarResNet', 'MultiExitResNet']
