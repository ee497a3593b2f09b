"""Knowledge-distillation loss (Hinton et al. 2015) as used by TAKD (Mirzadeh et al. 2020)."""

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax.errors import KdjaxError
from kdjax.losses import _checks
from kdjax.losses import classification

KL_REDUCTIONS = ('batchmean', 'elementwise_mean')


def distillation_loss(student_logits: chex.Array,
                      teacher_logits: chex.Array,
                      labels: chex.Array,
                      *,
                      temperature: float,
                      kd_weight: float,
                      kl_reduction: str = 'batchmean') -> chex.Array:
  """Hinton distillation: `(1 − λ)·CE(s, y) + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))`.

  This is Eq. (2) of TAKD (Mirzadeh et al., AAAI 2020) with `λ = kd_weight` and `T = temperature`.
  The `T²` factor keeps the soft-target gradient on the same scale as the CE gradient as `T`
  grows (Hinton et al. 2015, Sec. 2). Teacher logits are wrapped in `stop_gradient`, so the loss
  can be differentiated without building a gradient for the teacher.

  Args:
    student_logits: `[B, C]` float.
    teacher_logits: `[B, C]` float, same shape.
    labels: `[B]` integer class indices.
    temperature: `T > 0`; a Python float (it is a hyper-parameter, not traced).
    kd_weight: `λ ∈ [0, 1]`; 0 is plain cross-entropy, 1 is pure distillation.
    kl_reduction: how the KL term is reduced.
      * `'batchmean'` (default, the paper): KL summed over classes, averaged over the batch — the
        true KL divergence per example.
      * `'elementwise_mean'`: the official TAKD code's `torch.nn.KLDivLoss()` default, which
        averages over batch × classes, i.e. `1/C` of the above. With C = 100 this weakens the
        distillation term a hundredfold; kept so the official runs can be reproduced.

  Returns:
    A scalar: the batch-mean loss.
  """
  _checks.check_logits(student_logits, 'student_logits')
  _checks.check_logits(teacher_logits, 'teacher_logits')
  chex.assert_equal_shape((student_logits, teacher_logits),
                          custom_message='student_logits and teacher_logits must both be [B, C]')
  # Hyper-parameters may be traced (a vmapped sweep over temperatures); check them when concrete.
  if _checks.is_concrete(temperature) and not temperature > 0:
    raise KdjaxError(f'temperature must be > 0, got {temperature}; the paper uses T in [1, 20].')
  if _checks.is_concrete(kd_weight) and not 0.0 <= kd_weight <= 1.0:
    raise KdjaxError(f'kd_weight must lie in [0, 1], got {kd_weight}.')
  if kl_reduction not in KL_REDUCTIONS:
    raise KdjaxError(f"unknown kl_reduction '{kl_reduction}'; choose one of: "
                     f"{', '.join(KL_REDUCTIONS)}.")

  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  ce = jnp.mean(classification.cross_entropy(student_logits, labels))
  kl = _kl_per_example(teacher_logits / temperature, student_logits / temperature)
  kl = jnp.mean(kl)
  if kl_reduction == 'elementwise_mean':
    kl = kl / student_logits.shape[-1]
  return (1.0 - kd_weight) * ce + kd_weight * temperature**2 * kl


def softened_kl(student_logits: chex.Array, teacher_logits: chex.Array, *,
                temperature: float) -> chex.Array:
  """`KL(softmax(t/T) ‖ softmax(s/T))` per example: the soft-target term of Hinton et al. 2015.

  Not scaled by `T²` and not reduced over the batch: `distillation_loss` is
  `(1 − λ)·mean(CE) + λ·T²·mean(softened_kl)`.

  Args:
    student_logits: `[B, C]` float.
    teacher_logits: `[B, C]` float, made `stop_gradient` here.
    temperature: `T > 0`.

  Returns:
    `[B]`: the KL divergence summed over classes, one value per example. A teacher probability
    that underflows to 0 contributes exactly 0 (never NaN).
  """
  _checks.check_logits(student_logits, 'student_logits')
  _checks.check_logits(teacher_logits, 'teacher_logits')
  chex.assert_equal_shape((student_logits, teacher_logits),
                          custom_message='student_logits and teacher_logits must both be [B, C]')
  if _checks.is_concrete(temperature) and not temperature > 0:
    raise KdjaxError(f'temperature must be > 0, got {temperature}.')
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  return _kl_per_example(teacher_logits / temperature, student_logits / temperature)


def _kl_per_example(target_logits: chex.Array, logits: chex.Array) -> chex.Array:
  """`KL(softmax(target) ‖ softmax(logits))` summed over the last axis → `[B]`.

  Written with log-softmax on both sides so that a teacher probability that underflows to 0
  contributes exactly 0 (`p·log p → 0`), never NaN.
  """
  # optax's log-target KL is `Σ exp(log p)·(log p − log q)`, the expression this function had:
  # under jit on CPU its values and gradients are bitwise those of the hand-written form (checked
  # on random and saturated teachers). optax's `kl_divergence`, which takes probabilities and
  # computes `log p` itself, differs by a few ulps and is not used.
  return optax.losses.kl_divergence_with_log_targets(jax.nn.log_softmax(logits, axis=-1),
                                                     jax.nn.log_softmax(target_logits, axis=-1))
