"""Argument checks shared by the losses: a wrong shape fails with a message naming the argument.

Shapes are checked with chex (`AssertionError`); an empty batch and bad values with `KdjaxError`
(a `ValueError`). Values are checked only where they are concrete: under `jit`, `vmap` or `grad`
labels and teacher logits are tracers, whose values are unknown when the loss is traced, and a
bad one goes through (a label outside `[0, C)` counts from the last class or gives NaN; a teacher
row of all `-inf`, a NaN or a `+inf` gives NaN). Losses traced inside `traced_checks()` add a
`checkify.debug_check` for each value check instead, which `checkify.checkify` turns into an
error:

    with _checks.traced_checks():
      error, value = jax.jit(checkify.checkify(loss_fn))(logits, labels)
    error.throw()  # JaxRuntimeError naming the first bad label, if any.

The block is read when the function is traced, so trace it there (a function jitted and called
before keeps its unchecked trace). Outside the block nothing is added: a check is an effect, and
an effectful jitted function leaves JAX's fast C++ dispatch (5 µs → 46 µs a call for a small
function on CPU), so by default a traced loss is exactly the unchecked one.
"""

import contextlib
import contextvars

import chex
import jax
import jax.numpy as jnp
from jax.experimental import checkify
import numpy as np

from kdjax.errors import KdjaxError

_TRACED_CHECKS = contextvars.ContextVar('kdjax_traced_checks', default=False)


@contextlib.contextmanager
def traced_checks(enabled: bool = True):
  """Losses traced in this block check traced labels and teacher logits with `checkify`."""
  token = _TRACED_CHECKS.set(enabled)
  try:
    yield
  finally:
    _TRACED_CHECKS.reset(token)


def check_logits(logits: chex.Array, name: str) -> None:
  chex.assert_rank(logits, 2, custom_message=f'{name} must be [batch, num_classes]')
  chex.assert_type(logits, float, custom_message=f'{name} must be floating point')
  check_batch(logits, name)


def check_labels(labels: chex.Array, logits: chex.Array) -> None:
  """`labels` `[B]` integer class indices in `[0, C)` for `logits` `[B, C]`."""
  chex.assert_rank(labels, 1, custom_message='labels must be [B] class indices')
  chex.assert_type(labels, int, custom_message='labels must be integer class indices')
  chex.assert_equal_shape_prefix((logits, labels), 1,
                                 custom_message='logits and labels disagree on the batch size')
  check_label_values(labels, logits.shape[-1])


def check_batch(array: chex.Array, name: str, axis: int = -2) -> None:
  """Refuses an empty batch (a static shape, so this works under `jit` too)."""
  if np.shape(array)[axis] == 0:
    raise KdjaxError(f'{name} has an empty batch (shape {tuple(np.shape(array))}): a loss '
                     'averaged over zero examples is NaN. Skip empty batches before calling '
                     'the loss.')


def _label_message(num_classes: int, value, where: str) -> str:
  return (f'labels must be class indices in [0, {num_classes}), got {value} at {where}: a '
          'negative label would silently pick a class counted from the end and a label >= '
          f'{num_classes} no class at all. Check the dataset\'s labels (e.g. remap them to '
          f'0..{num_classes - 1}) or give the logits one column per class.')


def check_label_values(labels: chex.Array, num_classes: int) -> None:
  """Refuses a label outside `[0, num_classes)`: when concrete, else under `traced_checks()`."""
  if is_concrete(labels):
    values = np.asarray(labels)
    bad = np.flatnonzero((values < 0) | (values >= num_classes))
    if bad.size:
      raise KdjaxError(_label_message(num_classes, values[bad[0]], f'index {bad[0]}'))
  elif _TRACED_CHECKS.get():
    invalid = (labels < 0) | (labels >= num_classes)
    index = jnp.argmax(invalid)
    message = _label_message(num_classes, '{value}', 'index {index}')
    checkify.debug_check(jnp.logical_not(jnp.any(invalid)), message, value=labels[index],
                         index=index)


def check_teacher_logits(teacher_logits: chex.Array, name: str = 'teacher_logits') -> None:
  """Refuses NaN, `+inf` and rows (the last axis) of all `-inf`: when concrete, else under
  `traced_checks()`. A `-inf` alone masks a class: teacher probability 0, KL contribution 0.
  """
  if is_concrete(teacher_logits):
    values = _host_values(teacher_logits)
    bad = np.isnan(values) | (values == np.inf)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise KdjaxError(f'{name} must be finite, or -inf to mask a class, got {values[where]} at '
                       f'index {where}: the teacher\'s softmax is undefined there. Check the '
                       'teacher\'s outputs (or the stored logits).')
    dead = np.all(values == -np.inf, axis=-1)
    if dead.any():
      where = tuple(int(i) for i in np.argwhere(dead)[0])
      raise KdjaxError(_all_masked_message(name, f'row {where} is'))
  elif _TRACED_CHECKS.get():
    checkify.debug_check(jnp.logical_not(jnp.any(jnp.isnan(teacher_logits) |
                                                 (teacher_logits == jnp.inf))),
                         f'{name} must be finite, or -inf to mask a class, got NaN or +inf.')
    checkify.debug_check(jnp.logical_not(jnp.any(jnp.all(teacher_logits == -jnp.inf, axis=-1))),
                         _all_masked_message(name, 'a row is'))


def _all_masked_message(name: str, which: str) -> str:
  return (f'{name} {which} all -inf: every class is masked, so the teacher gives no '
          'distribution to distil from. Leave at least one class unmasked in every example, or '
          'drop the example.')


def check_finite(logits: chex.Array, name: str, why: str) -> None:
  """Refuses any non-finite value: when concrete, else under `traced_checks()`."""
  if is_concrete(logits):
    values = _host_values(logits)
    bad = ~np.isfinite(values)
    if bad.any():
      where = tuple(int(i) for i in np.argwhere(bad)[0])
      raise KdjaxError(f'{name} must be finite, got {values[where]} at index {where}: {why}.')
  elif _TRACED_CHECKS.get():
    checkify.debug_check(jnp.all(jnp.isfinite(logits)),
                         f'{name} must be finite, got a non-finite value: {why}.')


def _host_values(logits: chex.Array) -> np.ndarray:
  """A concrete array's values in numpy, half precision widened to float32."""
  values = np.asarray(logits)
  return values.astype(np.float32) if values.dtype.itemsize < 4 else values


def as_float32(logits: chex.Array) -> chex.Array:
  """float16 / bfloat16 logits as float32; float32 (and float64) ones returned as they are.

  The losses compute in float32: at a high temperature half precision gets the KL wrong (and
  `T²·KL` overflows float16 at T = 300). A float32 array is returned untouched, so float32
  inputs give exactly the values they gave before this cast existed.
  """
  dtype = jnp.result_type(logits)
  if jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32:
    return jnp.asarray(logits, jnp.float32)
  return logits


def is_concrete(value) -> bool:
  """False for a traced value (under `jit`, `vmap`, `grad`), which cannot be range-checked."""
  return not isinstance(value, jax.core.Tracer)
