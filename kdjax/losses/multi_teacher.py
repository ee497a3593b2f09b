"""The soft-target term for several teachers at once (e.g. a teacher and a teacher assistant).

Hinton et al. 2015 (Sec. 1) distil an ensemble into one student with "an arithmetic or geometric
mean of their individual predictive distributions" as the soft targets; the three `combine` modes
are those two means and the sum of the per-teacher terms.
"""

import chex
import jax
import jax.numpy as jnp

from kdjax.errors import KdjaxError
from kdjax.losses import _checks
from kdjax.losses import distillation

TEACHER_COMBINES = ('probabilities', 'logits', 'kl_sum')


def multi_teacher_kl(student_logits: chex.Array, teacher_logits: chex.Array,
                     weights: chex.Array, *, temperature: float,
                     combine: str = 'probabilities') -> chex.Array:
  """KL from K weighted teachers to the student at temperature T, per example.

  With `p_k = softmax(t_k/T)`, `q = softmax(s/T)` and weights `w_k` summing to 1:

  * `'probabilities'`: `KL(Σ_k w_k·p_k ‖ q)`, the arithmetic mean of the teachers' softened
    distributions (the distribution the teachers predict as an ensemble). The mixture's log is
    taken with logsumexp, so a probability that underflows in one teacher costs no NaN.
  * `'logits'`: `KL(softmax(Σ_k w_k·t_k / T) ‖ q)`, distilling from the averaged logits (KD_Lib's
    TAKD averages its teachers' logits this way). `softmax(Σ_k w_k·t_k/T)` is the normalised
    weighted geometric mean of the `p_k`, Hinton et al.'s other choice; it is sharper than the
    arithmetic mean where the teachers disagree.
  * `'kl_sum'`: `Σ_k w_k·KL(p_k ‖ q)`, one distillation term per teacher. By the convexity of KL
    in its first argument it is >= `'probabilities'`, and the two differ by a term that does not
    depend on the student (`H(Σ w_k p_k) − Σ w_k H(p_k)`): they give the student the same gradient,
    `(q − Σ_k w_k p_k)/T`, and differ only in the reported loss.

  With one teacher (or K identical ones) all three are `softened_kl`.

  Computed in float32 (float16 / bfloat16 logits are cast at entry). A `-inf` teacher logit masks
  that class for that teacher (probability 0; in `'logits'` it masks it in the average). Each
  teacher's rows are checked as in `softened_kl`, when concrete.

  Args:
    student_logits: `[B, C]` float, `B > 0`.
    teacher_logits: `[K, B, C]` float, made `stop_gradient` here; `-inf` masks a class.
    weights: `[K]` non-negative weights summing to 1 (not checked: they may be traced).
    temperature: `T > 0`.
    combine: one of `TEACHER_COMBINES`.

  Returns:
    `[B]` float32 per-example KL divergences (not scaled by `T²`).
  """
  _checks.check_logits(student_logits, 'student_logits')
  chex.assert_rank(teacher_logits, 3, custom_message='teacher_logits must be [teachers, B, C]')
  chex.assert_type(teacher_logits, float, custom_message='teacher_logits must be floating point')
  chex.assert_equal_shape((student_logits, teacher_logits[0]),
                          custom_message='each teacher_logits[k] must have the student\'s '
                                         '[B, C] shape')
  _checks.check_teacher_logits(teacher_logits)
  student_logits = _checks.as_float32(student_logits)
  teacher_logits = _checks.as_float32(teacher_logits)
  chex.assert_shape(weights, (teacher_logits.shape[0],),
                    custom_message='weights must be [K], one per teacher')
  if _checks.is_concrete(temperature) and not temperature > 0:
    raise KdjaxError(f'temperature must be > 0, got {temperature}.')
  if combine not in TEACHER_COMBINES:
    raise KdjaxError(f"unknown combine '{combine}'; choose one of: "
                     f"{', '.join(TEACHER_COMBINES)}.")
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  weights = jnp.asarray(weights, student_logits.dtype)
  if combine == 'logits':
    mean_logits = jnp.sum(weights[:, None, None] * teacher_logits, axis=0)
    return distillation.softened_kl(student_logits, mean_logits, temperature=temperature)
  if combine == 'kl_sum':
    kl = jax.vmap(lambda t: distillation.softened_kl(student_logits, t,
                                                     temperature=temperature))(teacher_logits)
    return jnp.sum(weights[:, None] * kl, axis=0)
  teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)  # [K, B, C]
  mixture_log_probs = jax.nn.logsumexp(teacher_log_probs, axis=0, b=weights[:, None, None])
  return distillation._kl_from_log_probs(
      mixture_log_probs, jax.nn.log_softmax(student_logits / temperature, axis=-1))
