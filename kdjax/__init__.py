"""kdjax: knowledge distillation in JAX/Flax, with the teacher–student gap as a design variable.

`kdjax.losses`, `kdjax.stage_losses`, `kdjax.models`, `kdjax.teachers` and `kdjax.KdjaxError`
load on first use (PEP 562), so that `python -m kdjax.main` can restart itself (see
`kdjax.main.malloc_huge_pages_env`) before it has imported jax.
"""

import importlib

__version__ = '0.1.0'
__all__ = ['losses', 'stage_losses', 'models', 'teachers', 'KdjaxError']


def __getattr__(name):
  if name in ('losses', 'stage_losses', 'models', 'teachers'):
    return importlib.import_module(f'kdjax.{name}')
  if name == 'KdjaxError':
    from kdjax.errors import KdjaxError
    return KdjaxError
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted([*globals(), *__all__])
