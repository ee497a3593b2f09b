"""Checks shared by the stage losses: each raises `KdjaxError` with a message ending in a period.

Messages name the setting and the value but not the stage: the caller adds "stage 'x': ".
"""

import numbers

import chex
import jax.numpy as jnp

from kdjax import losses
from kdjax.errors import KdjaxError


def require(ok: bool, message: str) -> None:
  if not ok:
    raise KdjaxError(f'{message}.')


def number(name: str, value) -> None:
  """A real number (int or float, not bool): a string from a hand-written config fails here."""
  require(isinstance(value, numbers.Real) and not isinstance(value, bool),
          f'{name} must be a number, got {value!r}')


def unit_interval(name: str, value) -> None:
  number(name, value)
  require(0 <= value <= 1, f'{name} must lie in [0, 1], got {value}')


def choice(name: str, value, choices) -> None:
  require(isinstance(value, str) and value in choices,
          f"unknown {name} '{value}'; choose one of: {', '.join(choices)}")


def temperature(value) -> None:
  number('temperature', value)
  require(value > 0, f'temperature must be > 0, got {value}')


def kd_weight(value) -> None:
  unit_interval('kd_weight', value)


def kl_reduction(value) -> None:
  choice('kl_reduction', value, losses.KL_REDUCTIONS)


def float32_logits(logits, name: str) -> jnp.ndarray:
  """`logits` as float32: the losses compute in float32 whatever the model's dtype."""
  if logits is None:
    raise ValueError(f'{name} is None; this loss needs them.')
  chex.assert_type(logits, float, custom_message=f'{name} must be floating point')
  return jnp.asarray(logits).astype(jnp.float32)
