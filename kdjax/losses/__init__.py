"""Pure loss functions on arrays: `jit`, `vmap` and `grad` safe, shapes checked with chex.

Inputs are checked where they are concrete (labels in range, no empty batch, no all-masked
teacher row); `traced_checks()` adds the same checks to losses traced inside it, for
`jax.experimental.checkify` to raise under `jit`.
"""

from kdjax.losses._checks import traced_checks
from kdjax.losses.classification import cross_entropy
from kdjax.losses.distillation import distillation_loss, KL_REDUCTIONS, softened_kl
from kdjax.losses.multi_exit import (byot_loss, distill_exits, distill_exits_per_example,
                                     exit_ensemble_loss, exits_cross_entropy, mate_loss,
                                     primary_mixing)
from kdjax.losses.multi_teacher import multi_teacher_kl, TEACHER_COMBINES
from kdjax.losses.noisy import logit_l2_loss, logit_l2_per_example, noise_factors, perturb_logits
from kdjax.losses.tolerant import (top_score_difference, tolerant_cross_entropy,
                                   tolerant_teacher_loss, TSD_SCORES)

__all__ = ['cross_entropy', 'distillation_loss', 'KL_REDUCTIONS', 'softened_kl',
           'top_score_difference', 'tolerant_cross_entropy', 'tolerant_teacher_loss', 'TSD_SCORES',
           'perturb_logits', 'noise_factors', 'logit_l2_loss', 'logit_l2_per_example',
           'distill_exits', 'distill_exits_per_example', 'exits_cross_entropy', 'byot_loss',
           'exit_ensemble_loss', 'mate_loss', 'primary_mixing', 'multi_teacher_kl',
           'TEACHER_COMBINES', 'traced_checks']
