"""Argument checks shared by the losses: a wrong shape fails with a message naming the argument."""

import chex
import jax


def check_logits(logits: chex.Array, name: str) -> None:
  chex.assert_rank(logits, 2, custom_message=f'{name} must be [batch, num_classes]')
  chex.assert_type(logits, float, custom_message=f'{name} must be floating point')


def check_labels(labels: chex.Array, logits: chex.Array) -> None:
  chex.assert_rank(labels, 1, custom_message='labels must be [B] class indices')
  chex.assert_type(labels, int, custom_message='labels must be integer class indices')
  chex.assert_equal_shape_prefix((logits, labels), 1,
                                 custom_message='logits and labels disagree on the batch size')


def is_concrete(value) -> bool:
  """False for a traced hyper-parameter (e.g. a vmapped sweep), which cannot be range-checked."""
  return not isinstance(value, jax.core.Tracer)
