"""Learning from the labels alone: cross-entropy, or the tolerant teacher's loss."""

import dataclasses
import numbers
from typing import ClassVar, Optional

import jax

from kdjax import losses
from kdjax.stage_losses import _checks


@dataclasses.dataclass(frozen=True)
class CrossEntropy:
  """`η·CE(z, y) + (1 − η)·TSD(z, y)` per example; plain cross-entropy when `η = 1`.

  The tolerant teacher of Yang, Xie, Qiao & Yuille, "Knowledge Distillation in Generations: More
  Tolerant Teachers Educate Better Students" (arXiv 1805.05551): the top-score difference (TSD,
  `kdjax.losses.top_score_difference`) between the true class and the `tsd_k − 1` best other
  classes keeps a few plausible secondary classes alive. With `eta == 1` only the cross-entropy
  is computed (no TSD, so `tsd_k` needs no more classes than the data has).

  The distillation losses use this as their label term (`Distillation.classification`).

  Attributes:
    eta: η ∈ [0, 1]; 1 is a strict teacher (plain cross-entropy), the paper's best is ≈ 0.6.
    tsd_k: K >= 2, the true class plus K − 1 secondary classes (the paper: 5); must be below the
      number of classes when `eta < 1`.
    tsd_scores: `'softmax'` (the paper) or `'logits'`: what TSD compares.
  """
  eta: float = 1.0
  tsd_k: int = 5
  tsd_scores: str = 'softmax'

  needs_teacher: ClassVar[bool] = False
  several_teachers: ClassVar[bool] = False
  multi_exit: ClassVar[bool] = False

  def check(self, num_classes: Optional[int] = None) -> None:
    _checks.number('eta', self.eta)
    _checks.require(0 <= self.eta <= 1,
                    f'eta must lie in [0, 1] (1: plain cross-entropy), got {self.eta}')
    _checks.require(isinstance(self.tsd_k, numbers.Integral) and not isinstance(self.tsd_k, bool)
                    and self.tsd_k >= 2, f'tsd_k must be an integer >= 2, got {self.tsd_k!r}')
    _checks.choice('tsd_scores', self.tsd_scores, losses.TSD_SCORES)
    if num_classes is not None and self.eta < 1:
      _checks.require(self.tsd_k < num_classes,
                      f'tsd_k = {self.tsd_k} needs more than {num_classes} classes; set tsd_k '
                      'below the number of classes')

  def __call__(self, outputs: jax.Array, teacher_logits: Optional[jax.Array], labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses of the `[B, C]` logits `outputs`; no teacher, no key."""
    del teacher_logits, key  # Learns from the labels only.
    logits = _checks.float32_logits(outputs, 'student logits')
    if self.eta == 1.0:
      return losses.cross_entropy(logits, labels)
    return losses.tolerant_cross_entropy(logits, labels, eta=self.eta, k=self.tsd_k,
                                         scores=self.tsd_scores)
