"""Models chosen by name: `get_model('resnet20', num_classes=10)`, or a user's own Flax module.

A model is named by a key of `MODELS` (the built-in models, and those added with
`register_model(name, factory)`), or by an import path `'my_pkg.nets:TinyNet'`: module path, colon,
attribute. The module must be importable (on `PYTHONPATH`, or below the folder that
`python -m kdjax.main` runs in); the attribute is a Flax `nn.Module` class or a function that
returns a module.

A user's model is built as `TinyNet(num_classes=..., **options)`, where the options are those of
`dtype`, `conv` and `shortcut` that it takes (a Module class's dataclass fields, a function's
parameters); it is not given the others. A teacher run in bfloat16 needs a `dtype` field. The
contract, the same as kdjax's own models keep:
  * `__call__(x, train: bool = False)` takes float images `x [B, H, W, C]` and returns logits
    `[B, num_classes]` (float32 is best: the losses compute in the logits' dtype);
  * BatchNorm, if any, keeps its running statistics in the `batch_stats` collection and
    normalises with the batch's statistics when `train=True` (kdjax then applies the model with
    `mutable=['batch_stats']`);
  * dropout, if any, is active when `train=True` and draws from the `'dropout'` PRNG stream.
`is_multi_exit(model)` is true for a `MultiExitResNet` and for a module with a true `multi_exit`
attribute, whose `__call__` returns `(exit_logits, teacher_logits)`, each `[E, B, num_classes]`,
as `MultiExitResNet`'s does.
"""

import dataclasses
import functools
import importlib
import inspect
from typing import Callable, Dict, Optional, Set, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import KdjaxError
from kdjax.models import plain_cnn as _plain_cnn
from kdjax.models import resnet as _resnet
from kdjax.models import imagenet_resnet as _imagenet_resnet
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
    **{f'resnet{d}': functools.partial(_imagenet_resnet.imagenet_resnet, d)  # ImageNet: 18/34/50.
       for d in sorted(_imagenet_resnet.SPECS)},
    **{f'multi_exit_resnet{d}': functools.partial(_multi_exit.multi_exit_resnet, d)
       for d in sorted(_resnet.BLOCKS_PER_STAGE)},
    'lenet5': _small.LeNet5,
    **{name: functools.partial(_small.MLP, widths) for name, widths in _small.MLP_SHAPES.items()},
    **{f'{name}_dropout{round(100 * rate)}': functools.partial(_small.MLP, widths,
                                                               dropout_rate=rate)
       for name, widths in _small.MLP_SHAPES.items() for rate in _small.DROPOUT_RATES},
}
BUILT_IN_MODELS = frozenset(MODELS)
CIFAR_RESNET_DEPTHS = frozenset(_resnet.BLOCKS_PER_STAGE)  # resnet18/34/50 are ImageNet's.


def register_model(name: str, factory: Callable[..., nn.Module]) -> None:
  """Adds `factory` (a Flax Module class or a function returning a module) to `MODELS` as `name`.

  A config can then name it like a built-in model. Registering a name again replaces its
  factory; a built-in name cannot be replaced.
  """
  if not isinstance(name, str) or not name or ':' in name:
    raise KdjaxError(f"cannot register model {name!r}: a registered name is a non-empty string "
                     "without ':' (an import path 'package.module:ClassName' needs no "
                     'registering).')
  if name in BUILT_IN_MODELS:
    raise KdjaxError(f"cannot register model '{name}': it is a built-in model's name; choose "
                     'another name.')
  _check_factory(f"model '{name}'", factory)
  MODELS[name] = factory


def check_model_name(name: str) -> None:
  """Raises `KdjaxError` unless `name` names a model; builds nothing (imports an import path)."""
  _factory(name)


def get_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """Builds the model `name` (a key of `MODELS` or an import path) with `num_classes` outputs.

  `conv` (plain CNNs and ResNets) picks how convolutions are differentiated: `'xla'` (default,
  `nn.Conv`) or `'matmul_dw'` (`kdjax.models.conv.Conv`: kernel gradients as matrix multiplies,
  faster on CPU under XLA's default options). The variables and the forward pass are the same.
  `shortcut` (ResNets) is one of `SHORTCUTS`; `dtype` is the computation dtype. A user's model is
  given those of these options it takes (see the module docstring).
  """
  factory = _factory(name)
  if not isinstance(num_classes, int) or num_classes < 2:
    raise KdjaxError(f'num_classes must be an integer >= 2, got {num_classes!r}.')
  if 'shortcut' in kwargs and kwargs['shortcut'] not in SHORTCUTS:
    raise KdjaxError(f"unknown ResNet shortcut '{kwargs['shortcut']}'; choose one of: "
                     f"{', '.join(SHORTCUTS)}.")
  if 'conv' in kwargs and kwargs['conv'] not in CONVS:
    raise KdjaxError(f"unknown conv '{kwargs['conv']}'; choose one of: {', '.join(CONVS)}.")
  if name not in BUILT_IN_MODELS:
    return _build_user_model(name, factory, num_classes, kwargs)
  if 'resnet' not in name:
    kwargs.pop('shortcut', None)
  if 'resnet' not in name and 'plain_cnn' not in name:
    kwargs.pop('conv', None)  # LeNet-5 and the MLPs keep nn.Conv / have no convolutions.
  return factory(num_classes=num_classes, **kwargs)


def is_multi_exit(model_or_name: Union[nn.Module, str]) -> bool:
  """Whether a model gives multi-exit outputs (`(exit_logits, teacher_logits)`, each `[E, B, C]`).

  A name is multi-exit if it starts with `multi_exit_`; a module if it is a `MultiExitResNet` or
  has a true `multi_exit` attribute.
  """
  if isinstance(model_or_name, str):
    return model_or_name.startswith('multi_exit_')
  return isinstance(model_or_name, MultiExitResNet) or bool(
      getattr(model_or_name, 'multi_exit', False))


def _factory(name: str) -> Callable[..., nn.Module]:
  """The class or function that builds the model `name`, or a `KdjaxError` saying what is wrong."""
  if not isinstance(name, str):
    raise KdjaxError(f'a model name is a string, got {name!r}.')
  if ':' in name:
    return _import_factory(name)
  if name not in MODELS:
    raise KdjaxError(f"unknown model '{name}'; choose one of: {', '.join(MODELS)}, or give an "
                     "import path 'package.module:ClassName'.")
  return MODELS[name]


def _import_factory(path: str) -> Callable[..., nn.Module]:
  """The attribute that the import path `'package.module:Attribute'` names."""
  module_name, _, attribute = path.partition(':')
  if not module_name or not attribute or ':' in attribute:
    raise KdjaxError(f"model '{path}': an import path is 'package.module:ClassName', one colon "
                     'between a module and a name in it.')
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    first_line = (str(e).splitlines() or [type(e).__name__])[0]
    raise KdjaxError(f"model '{path}': cannot import module '{module_name}' ({first_line}); "
                     'check its spelling and that its folder is on PYTHONPATH.') from e
  factory = module
  for part in attribute.split('.'):  # 'Outer.Inner' reaches a nested attribute.
    if not hasattr(factory, part):
      raise KdjaxError(f"model '{path}': module '{module_name}' has no attribute '{attribute}'; "
                       f'check the name after the colon (its Flax modules: '
                       f"{', '.join(_module_classes(module)) or 'none'}).")
    factory = getattr(factory, part)
  _check_factory(f"model '{path}'", factory)
  return factory


def _module_classes(module) -> list:
  return sorted(name for name, value in vars(module).items()
                if isinstance(value, type) and issubclass(value, nn.Module)
                and value.__module__ == module.__name__)


def _check_factory(what: str, factory) -> None:
  if isinstance(factory, nn.Module):
    raise KdjaxError(f'{what} is a built {type(factory).__name__} module; give its class (kdjax '
                     'builds it with num_classes=...) or a function that returns a module.')
  if isinstance(factory, type) and not issubclass(factory, nn.Module):
    raise KdjaxError(f'{what}: {factory.__name__} is a class but not a Flax module; give a '
                     'flax.linen.Module subclass or a function that returns a module.')
  if not callable(factory):
    raise KdjaxError(f'{what} is a value of type {type(factory).__name__}, not a Flax Module '
                     'class or a function that returns a module.')


def _accepted_options(factory) -> Optional[Set[str]]:
  """The keyword arguments `factory` takes, or None if it takes any (`**kwargs`)."""
  if isinstance(factory, type) and issubclass(factory, nn.Module):
    return {field.name for field in dataclasses.fields(factory)}
  parameters = inspect.signature(factory).parameters.values()
  if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
    return None
  return {p.name for p in parameters
          if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}


def _build_user_model(name: str, factory, num_classes: int, options: dict) -> nn.Module:
  """`factory(num_classes=..., **the options it takes)`, refusing a dtype it cannot honour."""
  accepted = _accepted_options(factory)
  takes = lambda option: accepted is None or option in accepted
  if not takes('num_classes'):
    raise KdjaxError(f"model '{name}' takes no num_classes; kdjax builds a model as "
                     f'{getattr(factory, "__name__", "factory")}(num_classes=...): add a '
                     '`num_classes` field or parameter.')
  dtype = options.get('dtype')
  if dtype is not None and jnp.dtype(dtype) != jnp.float32 and not takes('dtype'):
    raise KdjaxError(f"model '{name}' has no `dtype` field, so it cannot run in "
                     f'{jnp.dtype(dtype).name}: the teacher dtype needs a `dtype` field on the '
                     "model (cast its input and layers to it); add one, or set the teacher's "
                     "dtype (teacher_source.dtype) to 'float32'.")
  model = factory(num_classes=num_classes,
                  **{option: value for option, value in options.items() if takes(option)})
  if not isinstance(model, nn.Module):
    raise KdjaxError(f"model '{name}': building it returned a {type(model).__name__}, not a "
                     'Flax nn.Module.')
  return model


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


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


__all__ = ['MODELS', 'BUILT_IN_MODELS', 'get_model', 'register_model', 'check_model_name',
           'init_variables', 'variable_shapes', 'count_params', 'is_multi_exit', 'exit_macs',
           'PlainCNN', 'CifarResNet', 'MultiExitResNet']
