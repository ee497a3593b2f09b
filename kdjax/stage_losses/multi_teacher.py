"""Distillation from several teachers at once, e.g. the teacher and a teacher assistant."""

import dataclasses
import math
import numbers
from typing import ClassVar, Optional, Sequence, Tuple

import chex
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.stage_losses import _checks
from kdjax.stage_losses.classification import CrossEntropy
from kdjax.stage_losses.distillation import combine_with_labels

WEIGHTS_HINT = ("set the weights in the stage's teachers, e.g. "
                "teachers = {'teacher': 0.5, 'ta8': 0.5}")


def normalised_weights(teacher_weights: Sequence[float]) -> Tuple[float, ...]:
  """The teachers' weights divided by their sum; raises `KdjaxError` unless all are > 0."""
  weights = tuple(teacher_weights)
  _checks.require(len(weights) >= 1, f'multi_teacher_kd needs at least one teacher; '
                                     f'{WEIGHTS_HINT}')
  _checks.require(
      all(isinstance(w, numbers.Real) and not isinstance(w, bool) and math.isfinite(w) and w > 0
          for w in weights),
      f'teacher weights must be numbers > 0, got {weights}; {WEIGHTS_HINT}')
  total = math.fsum(weights)
  return tuple(float(w) / total for w in weights)


@dataclasses.dataclass(frozen=True)
class MultiTeacherDistillation:
  """`(1 − λ)·classification + λ·T²·KL(teachers ‖ student)` per example, for K teachers.

  Distillation (TAKD Eq. 2, see `Distillation`) whose soft target combines K teachers with
  weights `w_k` (the stage's `teachers = {'teacher': 0.5, 'ta8': 0.5}`, normalised to sum 1).
  `combine` chooses how (`kdjax.losses.multi_teacher_kl`):

  * `'probabilities'` (default): KL from the mixture `Σ_k w_k·softmax(t_k/T)`, the arithmetic
    mean of the teachers' predictive distributions (Hinton et al. 2015, Sec. 1: an ensemble is
    distilled with "an arithmetic or geometric mean" of its members' distributions). It is the
    default because it is the distribution the teachers predict as an ensemble: a class any
    teacher finds plausible stays plausible in the target, and it is the KL-closest single
    distribution to the teachers, `argmin_q Σ_k w_k·KL(p_k ‖ q)`.
  * `'logits'`: KL from `softmax(Σ_k w_k·t_k / T)`, the averaged logits, as KD_Lib's TAKD averages
    its teachers' logits (the normalised geometric mean of the `p_k`).
  * `'kl_sum'`: `Σ_k w_k·KL(softmax(t_k/T) ‖ softmax(s/T))`, a distillation term per teacher.
    It is >= `'probabilities'` (KL is convex) by a constant that does not depend on the student:
    the two train identically and report different losses.

  With one teacher all three are `Distillation`. Teachers are `stop_gradient`.

  Attributes:
    temperature, kd_weight, kl_reduction, eta, tsd_k, tsd_scores: as `Distillation`'s.
    combine: one of `kdjax.losses.TEACHER_COMBINES`.
    weights: one weight per teacher, > 0 and summing to 1; not a user setting: `get_loss` fills it
      from the stage's `teachers` (`teacher_weights=`), normalised.
  """
  temperature: float = 4.0
  kd_weight: float = 0.9
  kl_reduction: str = 'batchmean'
  combine: str = 'probabilities'
  eta: float = 1.0
  tsd_k: int = 5
  tsd_scores: str = 'softmax'
  weights: Tuple[float, ...] = dataclasses.field(default=(), metadata={'set_by': WEIGHTS_HINT})

  needs_teacher: ClassVar[bool] = True
  several_teachers: ClassVar[bool] = True
  multi_exit: ClassVar[bool] = False

  @property
  def classification(self) -> CrossEntropy:
    """The label term."""
    return CrossEntropy(eta=self.eta, tsd_k=self.tsd_k, tsd_scores=self.tsd_scores)

  def check(self, num_classes: Optional[int] = None) -> None:
    _checks.temperature(self.temperature)
    _checks.kd_weight(self.kd_weight)
    _checks.kl_reduction(self.kl_reduction)
    _checks.choice('combine', self.combine, losses.TEACHER_COMBINES)
    self.classification.check(num_classes)
    normalised = normalised_weights(self.weights)
    _checks.require(all(math.isclose(w, n, rel_tol=1e-6) for w, n in zip(self.weights, normalised)),
                    f'teacher weights must sum to 1, got {self.weights}; get_loss normalises '
                    "the stage's teachers")

  def __call__(self, outputs: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses; `teacher_logits` is `[K, B, C]`, K = `len(weights)`."""
    del key  # Deterministic.
    student_logits = _checks.float32_logits(outputs, 'student logits')
    teacher_logits = _checks.float32_logits(teacher_logits, 'teacher_logits')
    chex.assert_rank(teacher_logits, 3, custom_message='teacher_logits must be [teachers, B, C]')
    chex.assert_axis_dimension(teacher_logits, 0, len(self.weights),
                               custom_message='one teacher per weight')
    kl = losses.multi_teacher_kl(student_logits, teacher_logits,
                                 jnp.asarray(self.weights, jnp.float32),
                                 temperature=self.temperature, combine=self.combine)
    return combine_with_labels(self, student_logits, labels, kl)
