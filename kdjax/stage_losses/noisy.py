"""Regressing noisy teacher logits (Sau & Balasubramanian 2016)."""

import dataclasses
from typing import ClassVar, Optional

import jax

from kdjax import losses
from kdjax.stage_losses import _checks
from kdjax.stage_losses.classification import CrossEntropy

NOISE_ON = ('teacher', 'student')


@dataclasses.dataclass(frozen=True)
class NoisyLogitRegression:
  """`(1 − w)·½‖z_s − z′‖² + w·classification` per example, `z′` the perturbed teacher logits.

  Sau & Balasubramanian, "Deep Model Compression: Distilling Knowledge from Noisy Teachers"
  (arXiv 1610.09650), Sec. 3: with probability `noise_alpha` an example's teacher logits are
  multiplied by `1 + ξ`, `ξ ~ N(0, noise_sigma² I)` (`kdjax.losses.perturb_logits`), a
  regulariser akin to learning from several teachers. `w = noise_ce_weight`; with `w = 0` the loss
  is the L2 regression alone. `noise_on = 'student'` multiplies the student's logits by the same
  noise instead, against the clean teacher: `½‖(1 + ξ)·z_s − z_t‖²`, the baseline the paper's
  claim is measured against. The noise is drawn from `key`; the teacher is `stop_gradient`, and
  must be finite (`kdjax.losses.logit_l2_per_example`). The labels are used (and checked) only
  when `noise_ce_weight > 0`.

  Attributes:
    noise_alpha: α ∈ [0, 1], the probability that an example is perturbed.
    noise_sigma: σ >= 0, the standard deviation of ξ.
    noise_on: `'teacher'` (the paper) or `'student'`.
    noise_ce_weight: w ∈ [0, 1], the weight of the classification term.
    eta, tsd_k, tsd_scores: the classification term's, see `CrossEntropy`.
  """
  noise_alpha: float = 0.0
  noise_sigma: float = 0.0
  noise_on: str = 'teacher'
  noise_ce_weight: float = 0.0
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
    _checks.unit_interval('noise_alpha', self.noise_alpha)
    _checks.number('noise_sigma', self.noise_sigma)
    _checks.require(self.noise_sigma >= 0, f'noise_sigma must be >= 0, got {self.noise_sigma}')
    _checks.choice('noise_on', self.noise_on, NOISE_ON)
    _checks.unit_interval('noise_ce_weight', self.noise_ce_weight)
    self.classification.check(num_classes)

  def __call__(self, outputs: jax.Array, teacher_logits: jax.Array, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses; `key` draws the noise (a fresh one every step)."""
    if key is None:
      raise ValueError('NoisyLogitRegression draws its noise from key; pass a PRNG key.')
    student_logits = _checks.float32_logits(outputs, 'student logits')
    teacher_logits = _checks.float32_logits(teacher_logits, 'teacher_logits')
    noise = dict(alpha=self.noise_alpha, sigma=self.noise_sigma)
    if self.noise_on == 'student':
      noisy_student = losses.noise_factors(key, student_logits, **noise) * student_logits
      l2 = losses.logit_l2_per_example(noisy_student, teacher_logits)
    else:
      l2 = losses.logit_l2_per_example(
          student_logits, losses.perturb_logits(key, teacher_logits, **noise))
    weight = self.noise_ce_weight
    if weight == 0.0:
      return l2
    return (1.0 - weight) * l2 + weight * self.classification(student_logits, None, labels)
