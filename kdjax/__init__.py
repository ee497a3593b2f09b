"""kdjax: knowledge distillation in JAX/Flax, with the teacher–student gap as a design variable."""

from kdjax import losses
from kdjax import models
from kdjax.errors import KdjaxError

__version__ = '0.1.0'
__all__ = ['losses', 'models', 'KdjaxError']
