"""Cross-entropy with integer labels."""

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _checks


def cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """Softmax cross-entropy against integer labels.

  Args:
    logits: `[B, C]` float logits.
    labels: `[B]` integer class indices in `[0, C)`.

  Returns:
    `[B]` per-example losses, `-log softmax(logits)[label]` (no reduction).
  """
  _checks.check_logits(logits, 'logits')
  _checks.check_labels(labels, logits)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]

