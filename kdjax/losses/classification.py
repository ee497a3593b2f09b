"""Cross-entropy with integer labels."""

import chex
import jax
import jax.numpy as jnp


def cross_entropy(logits: chex.Array, labels: chex.Array) -> chex.Array:
  """Softmax cross-entropy against integer labels.

  Args:
    logits: `[B, C]` float logits.
    labels: `[B]` integer class indices in `[0, C)`.

  Returns:
    `[B]` per-example losses, `-log softmax(logits)[label]` (no reduction).
  """
  _check_logits(logits, 'logits')
  chex.assert_rank(labels, 1, custom_message='labels must be [B] class indices')
  chex.assert_type(labels, int, custom_message='labels must be integer class indices')
  chex.assert_equal_shape_prefix((logits, labels), 1,
                                 custom_message='logits and labels disagree on the batch size')
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=-1)[:, 0]


def _check_logits(logits: chex.Array, name: str) -> None:
  chex.assert_rank(logits, 2, custom_message=f'{name} must be [batch, num_classes]')
  chex.assert_type(logits, float, custom_message=f'{name} must be floating point')
