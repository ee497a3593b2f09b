"""Noisy teachers (Sau & Balasubramanian, "Deep Model Compression: Distilling Knowledge from Noisy
Teachers", arXiv 1610.09650): the student regresses teacher logits that are, for a random subset
of examples, multiplied by `1 + ξ` — a regulariser akin to training with several teachers.
"""

import chex
import jax
import jax.numpy as jnp

from kdjax.errors import KdjaxError
from kdjax.losses import _checks


def noise_factors(key: jax.Array, logits: chex.Array, *, alpha: float,
                  sigma: float) -> chex.Array:
  """The multipliers of `perturb_logits`: `1 + ξ` for a perturbed example, else 1.

  Each example is perturbed with probability α, independently (one coin per example, as the
  paper's per-sample formulation reads, not one per batch); `ξ ~ N(0, σ² I)` elementwise.

  Args:
    key: PRNG key; draw a fresh one every step.
    logits: `[B, C]`; only its shape and dtype are used.
    alpha: probability α ∈ [0, 1] that an example is perturbed.
    sigma: standard deviation σ ≥ 0 of the multiplicative noise.

  Returns:
    `[B, C]` factors.
  """
  _checks.check_logits(logits, 'logits')
  if _checks.is_concrete(alpha) and not 0.0 <= alpha <= 1.0:
    raise KdjaxError(f'alpha must lie in [0, 1], got {alpha}.')
  if _checks.is_concrete(sigma) and not sigma >= 0.0:
    raise KdjaxError(f'sigma must be >= 0, got {sigma}.')
  which_key, noise_key = jax.random.split(key)
  perturbed = jax.random.bernoulli(which_key, alpha, (logits.shape[0], 1))
  xi = sigma * jax.random.normal(noise_key, logits.shape, logits.dtype)
  return jnp.where(perturbed, 1.0 + xi, jnp.ones_like(xi))


def perturb_logits(key: jax.Array, logits: chex.Array, *, alpha: float,
                   sigma: float) -> chex.Array:
  """`z′ = (1 + ξ)·z` with probability α, else `z′ = z`, independently per example (Sec. 3).

  Args:
    key: PRNG key; draw a fresh one every step.
    logits: `[B, C]` teacher logits.
    alpha, sigma: see `noise_factors`.

  Returns:
    `[B, C]` perturbed logits (a `stop_gradient` copy: the teacher is never trained).
  """
  logits = jax.lax.stop_gradient(logits)
  return noise_factors(key, logits, alpha=alpha, sigma=sigma) * logits


def logit_l2_per_example(student_logits: chex.Array, target_logits: chex.Array) -> chex.Array:
  """`½·Σ_c (z_s − z′)²` per example → `[B]` float32; the target is `stop_gradient`.

  Computed in float32 (float16 / bfloat16 logits are cast at entry). The batch must not be empty,
  and the target logits must be finite (checked when concrete; under `jit` a `±inf` or NaN
  target gives `inf` or NaN): a masked (`-inf`) class has no logit to regress.
  """
  _checks.check_logits(student_logits, 'student_logits')
  _checks.check_logits(target_logits, 'target_logits')
  chex.assert_equal_shape((student_logits, target_logits),
                          custom_message='student_logits and target_logits must both be [B, C]')
  _checks.check_finite(target_logits, 'target_logits',
                       'an L2 regression on logits needs a finite target for every class (a '
                       'masked, -inf, class cannot be regressed); use a KL loss such as '
                       "'kd' to distil from a teacher that masks classes")
  student_logits = _checks.as_float32(student_logits)
  target_logits = _checks.as_float32(target_logits)
  diff = student_logits - jax.lax.stop_gradient(target_logits)
  return 0.5 * jnp.sum(diff**2, axis=-1)


def logit_l2_loss(student_logits: chex.Array, target_logits: chex.Array) -> chex.Array:
  """`mean_B[0.5·Σ_c (z_s − z′)²]` → float32 scalar; checked as `logit_l2_per_example`."""
  return jnp.mean(logit_l2_per_example(student_logits, target_logits))
