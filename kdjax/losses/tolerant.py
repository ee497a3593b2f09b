"""Tolerant teachers (Yang, Xie, Qiao & Yuille, "Knowledge Distillation in Generations: More
Tolerant Teachers Educate Better Students", arXiv 1805.05551).

A strict teacher trained with cross-entropy drives every secondary class towards zero; a tolerant
one keeps a few plausible secondary classes alive by also minimising the top-score difference
(TSD) between the true class and the K − 1 highest-scoring other classes.
"""

import chex
import jax
import jax.numpy as jnp

from kdjax.errors import KdjaxError
from kdjax.losses import _checks
from kdjax.losses import classification

TSD_SCORES = ('softmax', 'logits')


def top_score_difference(logits: chex.Array, labels: chex.Array, *, k: int = 5,
                         scores: str = 'softmax') -> chex.Array:
  """`TSD = s_{a1} − (1/(K−1))·Σ_{k=2..K} s_{ak}` per example.

  `a1` is the true class and `a2..aK` the K − 1 highest-scoring *other* classes.

  Computed in float32 (float16 / bfloat16 logits are cast at entry); labels are checked as in
  `cross_entropy` (under `jit` a label outside `[0, C)` counts as no class: true score 0).

  Args:
    logits: `[B, C]` float, `B > 0`.
    labels: `[B]` integer class indices in `[0, C)`.
    k: K, the true class plus K − 1 secondary classes; `2 <= k < C`. The paper uses K = 5.
    scores: `'softmax'` (default, the paper: TSD on softmax probabilities, so it lies in
      [−1, 1]) or `'logits'` (the alternative reading: TSD on raw logits, unbounded).

  Returns:
    `[B]` float32 per-example TSD. Gradients flow into the true and the selected secondary
    scores.
  """
  _checks.check_logits(logits, 'logits')
  _checks.check_labels(labels, logits)
  logits = _checks.as_float32(logits)
  num_classes = logits.shape[-1]
  if not 2 <= k < num_classes:
    raise KdjaxError(f'k must satisfy 2 <= k < num_classes={num_classes}, got {k}; the paper '
                     'uses k = 5.')
  if scores not in TSD_SCORES:
    raise KdjaxError(f"unknown scores '{scores}'; choose one of: {', '.join(TSD_SCORES)}.")
  s = jax.nn.softmax(logits, axis=-1) if scores == 'softmax' else logits
  is_true = jax.nn.one_hot(labels, num_classes, dtype=bool)
  true_score = jnp.sum(jnp.where(is_true, s, 0.0), axis=-1)
  secondary, _ = jax.lax.top_k(jnp.where(is_true, -jnp.inf, s), k - 1)
  return true_score - jnp.mean(secondary, axis=-1)


def tolerant_cross_entropy(logits: chex.Array, labels: chex.Array, *, eta: float, k: int = 5,
                           scores: str = 'softmax') -> chex.Array:
  """The tolerant teacher's loss per example, `η·CE + (1 − η)·TSD` → `[B]`.

  Yang et al. 2018 train the patriarch with this loss; `η = 1` is the ordinary (strict)
  cross-entropy teacher and the paper's best is η ≈ 0.6. `k` and `scores` are those of
  `top_score_difference`. Float32, and checked, as `cross_entropy`.
  """
  if _checks.is_concrete(eta) and not 0.0 <= eta <= 1.0:
    raise KdjaxError(f'eta must lie in [0, 1], got {eta}; 1 is a strict (plain CE) teacher.')
  ce = classification.cross_entropy(logits, labels)
  tsd = top_score_difference(logits, labels, k=k, scores=scores)
  return eta * ce + (1.0 - eta) * tsd


def tolerant_teacher_loss(logits: chex.Array, labels: chex.Array, *, eta: float, k: int = 5,
                          scores: str = 'softmax') -> chex.Array:
  """The tolerant teacher's loss, `mean_B[η·CE + (1 − η)·TSD]` → scalar.

  `η = 1` is the ordinary (strict) cross-entropy teacher; the paper's best is η ≈ 0.6. Float32,
  and checked, as `cross_entropy`.
  """
  return jnp.mean(tolerant_cross_entropy(logits, labels, eta=eta, k=k, scores=scores))
