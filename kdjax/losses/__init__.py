"""Pure loss functions on arrays: `jit`, `vmap` and `grad` safe, shapes checked with chex."""

from kdjax.losses.classification import cross_entropy
from kdjax.losses.distillation import distillation_loss, KL_REDUCTIONS

__all__ = ['cross_entropy', 'distillation_loss', 'KL_REDUCTIONS']
