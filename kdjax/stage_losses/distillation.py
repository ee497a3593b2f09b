"""Knowledge distillation from one teacher (Hinton et al. 2015), as TAKD trains every stage."""

import dataclasses
from typing import ClassVar, Optional

import jax

from kdjax import losses
from kdjax.stage_losses import _checks
from kdjax.stage_losses.classification import CrossEntropy


@dataclasses.dataclass(frozen=True)
class Distillation:
  """`(1 − λ)·classification + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))` per example.

  Eq. (2) of TAKD (Mirzadeh et al., "Improved Knowledge Distillation via Teacher Assistant",
  AAAI 2020), with `λ = kd_weight` and `T = temperature`; `T²` keeps the soft-target gradient on
  the scale of the label gradient as T grows (Hinton et al. 2015, Sec. 2). The classification
  term is `CrossEntropy`: tolerant when `eta < 1`, which with `T = 1` is the generations loss of
  Yang et al. 2018. The teacher is `stop_gradient`.

  Attributes:
    temperature: T > 0.
    kd_weight: λ ∈ [0, 1]; 0 is the classification loss alone, 1 pure distillation.
    kl_reduction: `'batchmean'` (the paper: the KL summed over classes) or `'elementwise_mean'`
      (the official TAKD code's `KLDivLoss()` default, which also divides by the C classes).
    eta, tsd_k, tsd_scores: the classification term's, see `CrossEntropy`.
  """
  temperature: float = 4.0
  kd_weight: float = 0.9
  kl_reduction: str = 'batchmean'
  eta: float = 1.0
  tsd_k: int = 5
  tsd_scores: str = 'softmax'

  needs_teacher: ClassVar[bool] = True
  several_teachers: ClassVar[bool] = False
  multi_exit: ClassVar[bool] = False

  @property
  def classification(self) -> CrossEntropy:
    """The label term."""
    return CrossEntropy(eta=self.eta, tsd_k=self.tsd_k, tsd_scores=self.tsd_scores)

  def check(self, num_classes: Optional[int] = None) -> None:
    _checks.temperature(self.temperature)
    _checks.kd_weight(self.kd_weight)
    _checks.kl_reduction(self.kl_reduction)
    self.classification.check(num_classes)

  def __call__(self, outputs: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses of the student's `[B, C]` logits against the teacher's."""
    del key  # Deterministic.
    student_logits = _checks.float32_logits(outputs, 'student logits')
    teacher_logits = _checks.float32_logits(teacher_logits, 'teacher_logits')
    kl = losses.softened_kl(student_logits, teacher_logits, temperature=self.temperature)
    return combine_with_labels(self, student_logits, labels, kl)


def combine_with_labels(loss, student_logits: jax.Array, labels: jax.Array,
                        kl: jax.Array) -> jax.Array:
  """`(1 − λ)·classification + λ·(T²·KL)` from a `[B]` KL, for `Distillation`-like losses.

  The products are grouped as in the scalar loss kdjax trained with before losses returned
  per-example values, `(1 − λ)·mean(classification) + λ·(T²·mean(KL))`: with a power-of-two batch
  the gradient of the batch mean is bitwise that loss's (the 1/B scaling is exact), and the mean
  itself within an ulp, so existing runs compute what they computed.
  """
  if loss.kl_reduction == 'elementwise_mean':
    kl = kl / student_logits.shape[-1]
  classification = loss.classification(student_logits, None, labels)
  return (1.0 - loss.kd_weight) * classification + loss.kd_weight * (loss.temperature**2 * kl)
