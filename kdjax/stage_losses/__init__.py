"""A stage's training loss: a small frozen dataclass of its own hyper-parameters, chosen by name.

    loss = stage_losses.get_loss('kd', {'temperature': 4.0}, num_classes=100)
    per_example = loss(outputs, teacher_logits, labels, key)  # [B] float32
    objective = jnp.mean(per_example)

Every loss is called as `loss(outputs, teacher_logits, labels, key)` and returns `[B]` float32
per-example values (optax's convention); the caller reduces them. `outputs` is what the student
returns in training (`[B, C]` logits, or `(exit_logits, ensemble_logits)` for a multi-exit model),
`teacher_logits` is None, `[B, C]`, or `[K, B, C]` for several teachers, and `key` feeds the
loss's own randomness. Class attributes say what a loss needs: `needs_teacher`,
`several_teachers`, `multi_exit`. A loss object is hashable, so it can be a static `jit` argument.

Logits of any float dtype are computed in float32. The `kdjax.losses` functions a loss calls
check its inputs: an empty batch is refused, and so are (when concrete, i.e. not under `jit`;
see `kdjax.losses._checks` for a `checkify` route) labels outside `[0, C)` and teacher rows that
are all `-inf` or hold NaN / `+inf`. A `-inf` teacher logit masks its class in the KL losses
(it contributes 0); `noisy_l2` regresses logits and refuses any non-finite teacher logit.

A new loss is one class (its fields are its settings, `check` refuses bad values) and one line
in `LOSSES`.
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence

from kdjax.errors import KdjaxError
from kdjax.stage_losses.classification import CrossEntropy
from kdjax.stage_losses.distillation import Distillation
from kdjax.stage_losses.multi_exit import BYOT, ExitEnsemble, ExitsCrossEntropy, MATE
from kdjax.stage_losses.multi_teacher import MultiTeacherDistillation, normalised_weights
from kdjax.stage_losses.noisy import NoisyLogitRegression

LOSSES: Dict[str, type] = {
    'ce': CrossEntropy,
    'kd': Distillation,
    'noisy_l2': NoisyLogitRegression,
    'exits_ce': ExitsCrossEntropy,
    'byot': BYOT,
    'exit_ensemble': ExitEnsemble,
    'mate': MATE,
    'multi_teacher_kd': MultiTeacherDistillation,
}


def _loss_class(name: str) -> type:
  if name not in LOSSES:
    raise KdjaxError(f"unknown loss '{name}'; choose one of: {', '.join(LOSSES)}.")
  return LOSSES[name]


def _settable_fields(loss_class: type):
  """The fields a config sets; a field with `set_by` metadata is filled from elsewhere."""
  return [f for f in dataclasses.fields(loss_class) if 'set_by' not in f.metadata]


def default_settings(name: str) -> Dict[str, Any]:
  """The settings of loss `name` (its user-settable fields) and their defaults."""
  return {f.name: f.default for f in _settable_fields(_loss_class(name))}


def get_loss(name: str, settings: Optional[Mapping[str, Any]] = None, *,
             num_classes: Optional[int] = None, teacher_weights: Sequence[float] = ()):
  """Loss `name` with `settings` replacing its defaults, checked.

  Args:
    name: a key of `LOSSES`.
    settings: setting name → value (a dict or ConfigDict); only the loss's own settings
      (`default_settings(name)`).
    num_classes: the data's number of classes, for the checks that need it; None skips them.
    teacher_weights: for a loss with `several_teachers`, one weight per teacher (the stage's
      `teachers` values, in the order of its `[K, B, C]` teacher logits), normalised to sum 1.
      Empty for any other loss.

  Returns:
    The loss object.

  Raises:
    KdjaxError: an unknown name or setting, or a bad value.
  """
  loss_class = _loss_class(name)
  settings = dict(settings or {})
  fields = {f.name: f for f in dataclasses.fields(loss_class)}
  settable = sorted(f.name for f in _settable_fields(loss_class))
  for key in sorted(settings):
    if key not in fields:
      listed = f"its settings are: {', '.join(settable)}" if settable else 'it has no settings'
      raise KdjaxError(f"loss '{name}' has no setting '{key}'; {listed}.")
    if key not in settable:
      raise KdjaxError(f"loss '{name}' takes no '{key}' in its settings; "
                       f"{fields[key].metadata['set_by']}.")
  if loss_class.several_teachers:
    settings['weights'] = normalised_weights(teacher_weights)
  elif tuple(teacher_weights):
    teachers = 'one teacher' if loss_class.needs_teacher else 'no outside teacher'
    raise KdjaxError(f"loss '{name}' learns from {teachers}; weights for several teachers need "
                     "loss 'multi_teacher_kd'.")
  loss = loss_class(**settings)
  loss.check(num_classes)
  return loss


__all__ = ['LOSSES', 'get_loss', 'default_settings', 'CrossEntropy', 'Distillation',
           'NoisyLogitRegression', 'ExitsCrossEntropy', 'BYOT', 'ExitEnsemble', 'MATE',
           'MultiTeacherDistillation']
