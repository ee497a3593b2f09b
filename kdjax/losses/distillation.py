"""Knowledge-distillation loss (Hinton et al. 2015) as used by TAKD (Mirzadeh et al. 2020)."""

import chex
import jax
import jax.numpy as jnp

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

  Computed in float32 (float16 / bfloat16 logits are cast at entry). A `-inf` teacher logit masks
  its class: teacher probability 0, which contributes 0 to the KL (not NaN). Label values and
  teacher logits are checked when concrete; under `jit` they cannot be (see
  `kdjax.losses._checks` for a `checkify` route): a label outside `[0, C)` then gives a wrong
  value (see `cross_entropy`) and a teacher row of all `-inf` gives NaN.

  Args:
    student_logits: `[B, C]` float, `B > 0`.
    teacher_logits: `[B, C]` float, same shape; finite or `-inf` (a masked class), at least one
      finite value per row.
    labels: `[B]` integer class indices in `[0, C)`.
    temperature: `T > 0`; a Python float (it is a hyper-parameter, not traced).
    kd_weight: `λ ∈ [0, 1]`; 0 is plain cross-entropy, 1 is pure distillation.
    kl_reduction: how the KL term is reduced.
      * `'batchmean'` (default, the paper): KL summed over classes, averaged over the batch — the
        true KL divergence per example.
      * `'elementwise_mean'`: the official TAKD code's `torch.nn.KLDivLoss()` default, which
        averages over batch × classes, i.e. `1/C` of the above. With C = 100 this weakens the
        distillation term a hundredfold; kept so the official runs can be reproduced.

  Returns:
    A float32 scalar: the batch-mean loss.

  Raises:
    KdjaxError: a bad hyper-parameter, an empty batch, or (when concrete) a label outside
      `[0, C)` or a teacher row that is all `-inf` or holds NaN / `+inf`.
  """
  student_logits, teacher_logits = _check_pair(student_logits, teacher_logits)
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

  Computed in float32; teacher logits are checked as in `distillation_loss`.

  Args:
    student_logits: `[B, C]` float, `B > 0`.
    teacher_logits: `[B, C]` float, made `stop_gradient` here; `-inf` masks a class.
    temperature: `T > 0`.

  Returns:
    `[B]` float32: the KL divergence summed over classes, one value per example. A teacher
    probability that underflows to 0, or a masked class, contributes exactly 0 (never NaN).
  """
  student_logits, teacher_logits = _check_pair(student_logits, teacher_logits)
  if _checks.is_concrete(temperature) and not temperature > 0:
    raise KdjaxError(f'temperature must be > 0, got {temperature}.')
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  return _kl_per_example(teacher_logits / temperature, student_logits / temperature)


def _check_pair(student_logits: chex.Array, teacher_logits: chex.Array):
  """Checks `[B, C]` student and teacher logits; returns them as float32."""
  _checks.check_logits(student_logits, 'student_logits')
  _checks.check_logits(teacher_logits, 'teacher_logits')
  chex.assert_equal_shape((student_logits, teacher_logits),
                          custom_message='student_logits and teacher_logits must both be [B, C]')
  _checks.check_teacher_logits(teacher_logits)
  return _checks.as_float32(student_logits), _checks.as_float32(teacher_logits)


def _kl_per_example(target_logits: chex.Array, logits: chex.Array) -> chex.Array:
  """`KL(softmax(target) ‖ softmax(logits))` summed over the last axis → `[B]`.

  Written with log-softmax on both sides so that a teacher probability that underflows to 0
  contributes exactly 0 (`p·log p → 0`), never NaN; see `_kl_from_log_probs` for `-inf` targets.
  """
  return _kl_from_log_probs(jax.nn.log_softmax(target_logits, axis=-1),
                           jax.nn.log_softmax(logits, axis=-1))


def _kl_from_log_probs(log_targets: chex.Array, log_predictions: chex.Array) -> chex.Array:
  """`Σ_c p_c·(log p_c − log q_c)` over the last axis, from `log p` (targets) and `log q`.

  A class with `log p = −inf` (a masked teacher class, probability 0) contributes exactly 0
  (`0·log 0 = 0`), also where `log q = −inf`, and passes `log q` a zero gradient, not NaN. A
  class with `p > 0` and `q = 0` still gives `+inf`: the student rules out what the teacher
  allows. The targets are the teacher's: no gradient flows into them.
  """
  return _masked_kl(jax.lax.stop_gradient(log_targets), log_predictions)


# `Σ exp(log p)·(log p − log q)` is optax's `kl_divergence_with_log_targets`, this function's
# expression before masked classes: under jit on CPU its values and gradients are bitwise those of
# the hand-written form (optax's `kl_divergence`, from probabilities, differs by a few ulps). With
# the mask they still are, for finite teacher logits, only as written here (checked under jit on
# CPU): masking the summed terms (optax's `where=`) changes XLA's code for the reduction, and
# autodiff through the mask changes the gradient's rounding, so the mask sits inside the product
# and the gradient is written out: the expression autodiff derives from the unmasked form.
@jax.custom_jvp
def _masked_kl(log_targets: chex.Array, log_predictions: chex.Array) -> chex.Array:
  masked = jnp.isneginf(log_targets)
  return jnp.sum(jnp.exp(log_targets) * jnp.where(masked, 0.0, log_targets - log_predictions),
                 axis=-1)


@_masked_kl.defjvp
def _masked_kl_jvp(primals, tangents):
  log_targets, log_predictions = primals
  _, predictions_dot = tangents  # The targets are `stop_gradient` (`_kl_from_log_probs`).
  return (_masked_kl(log_targets, log_predictions),
          jnp.sum(jnp.exp(log_targets) * -predictions_dot, axis=-1))
