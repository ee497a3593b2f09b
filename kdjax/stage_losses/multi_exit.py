"""Self-distillation of a multi-exit network: each exit learns from labels and from other exits.

The student is a `kdjax.models.MultiExitResNet`, whose training outputs are the tuple
`(exit_logits [E, B, C], ensemble_logits [E, B, C])` (exits shallow → deep; the ensemble
teachers are MATE's). No outside teacher: `teacher_logits` is ignored. Each loss's per-example
value is the sum over exits of that exit's per-example loss, so its batch mean is the scalar of
the matching `kdjax.losses` function (`exits_cross_entropy`, `byot_loss`, `exit_ensemble_loss`,
`mate_loss`), where the exit losses and their papers are described.
"""

import dataclasses
from typing import ClassVar, Optional

import chex
import jax
import jax.numpy as jnp

from kdjax import losses
from kdjax.stage_losses import _checks


def _exit_logits(outputs) -> jax.Array:
  exit_logits = _checks.float32_logits(outputs[0], 'exit_logits')
  chex.assert_rank(exit_logits, 3, custom_message='exit_logits must be [exits, batch, classes]')
  return exit_logits


def _exits_cross_entropy(exit_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`Σ_e CE(z_e, y)` per example → `[B]`."""
  return jnp.sum(jax.vmap(lambda z: losses.cross_entropy(z, labels))(exit_logits), axis=0)


@dataclasses.dataclass(frozen=True)
class ExitsCrossEntropy:
  """`Σ_e CE(z_e, y)`: every exit learns from the labels alone (the no-distillation baseline)."""

  needs_teacher: ClassVar[bool] = False
  several_teachers: ClassVar[bool] = False
  multi_exit: ClassVar[bool] = True

  def check(self, num_classes: Optional[int] = None) -> None:
    del num_classes  # Nothing to check.

  def __call__(self, outputs, teacher_logits, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses of the model's `(exit_logits, ensemble_logits)`."""
    del teacher_logits, key
    return _exits_cross_entropy(_exit_logits(outputs), labels)


@dataclasses.dataclass(frozen=True)
class BYOT:
  """Be Your Own Teacher (Zhang et al., ICCV 2019): every exit distils from the deepest exit.

  Exit i: `(1 − β)·CE(z_i, y) + β·T²·KL(softmax(z_E/T) ‖ softmax(z_i/T))`, summed over exits; the
  deepest exit's own KL is 0, so it learns from the labels. BYOT's feature-hint (L2 on features)
  term is not included.

  Attributes:
    temperature: T > 0.
    kd_weight: β ∈ [0, 1].
  """
  temperature: float = 4.0
  kd_weight: float = 0.9

  needs_teacher: ClassVar[bool] = False
  several_teachers: ClassVar[bool] = False
  multi_exit: ClassVar[bool] = True

  def check(self, num_classes: Optional[int] = None) -> None:
    del num_classes
    _checks.temperature(self.temperature)
    _checks.kd_weight(self.kd_weight)

  def __call__(self, outputs, teacher_logits, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses of the model's `(exit_logits, ensemble_logits)`."""
    del teacher_logits, key
    exit_logits = _exit_logits(outputs)
    mixing = jnp.ones((exit_logits.shape[0], 1))
    return losses.distill_exits_per_example(exit_logits, exit_logits[-1:], mixing, labels,
                                            temperature=self.temperature,
                                            kd_weight=self.kd_weight)


@dataclasses.dataclass(frozen=True)
class ExitEnsemble:
  """Exit-ensemble distillation: every exit distils from the plain average of all exits' logits.

  Exit i: `(1 − β)·CE(z_i, y) + β·T²·KL(softmax(z̄/T) ‖ softmax(z_i/T))`, `z̄ = mean_e z_e`,
  summed over exits.

  Attributes:
    temperature: T > 0.
    kd_weight: β ∈ [0, 1].
  """
  temperature: float = 4.0
  kd_weight: float = 0.9

  needs_teacher: ClassVar[bool] = False
  several_teachers: ClassVar[bool] = False
  multi_exit: ClassVar[bool] = True

  def check(self, num_classes: Optional[int] = None) -> None:
    del num_classes
    _checks.temperature(self.temperature)
    _checks.kd_weight(self.kd_weight)

  def __call__(self, outputs, teacher_logits, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses of the model's `(exit_logits, ensemble_logits)`."""
    del teacher_logits, key
    exit_logits = _exit_logits(outputs)
    ensemble = jnp.mean(exit_logits, axis=0, keepdims=True)
    mixing = jnp.ones((exit_logits.shape[0], 1))
    return losses.distill_exits_per_example(exit_logits, ensemble, mixing, labels,
                                            temperature=self.temperature,
                                            kd_weight=self.kd_weight)


@dataclasses.dataclass(frozen=True)
class MATE:
  """MATE (Sun et al., FITEE 2024): E ensemble teachers, each a trainable mix of the exits.

  Exit i: `(1 − β)·CE(z_i, y) + β·T²·Σ_k π_ik·KL(softmax(t_k/T) ‖ softmax(z_i/T))` with
  `π_ii = primary_weight` and the other E − 1 teachers sharing the rest equally
  (`kdjax.losses.primary_mixing`), summed over exits, plus `Σ_k CE(t_k, y)`, the cross-entropy
  that trains each teacher's combination weights (the teachers enter the distillation term only
  through `stop_gradient`).

  Attributes:
    temperature: T > 0.
    kd_weight: β ∈ [0, 1].
    primary_weight: π_ii ∈ (0, 1]; 1: each exit learns from its own teacher only.
  """
  temperature: float = 4.0
  kd_weight: float = 0.9
  primary_weight: float = 0.6

  needs_teacher: ClassVar[bool] = False
  several_teachers: ClassVar[bool] = False
  multi_exit: ClassVar[bool] = True

  def check(self, num_classes: Optional[int] = None) -> None:
    del num_classes
    _checks.temperature(self.temperature)
    _checks.kd_weight(self.kd_weight)
    _checks.number('primary_weight', self.primary_weight)
    _checks.require(0 < self.primary_weight <= 1,
                    f'primary_weight must lie in (0, 1], got {self.primary_weight}')

  def __call__(self, outputs, teacher_logits, labels: jax.Array,
               key: Optional[jax.Array] = None) -> jax.Array:
    """`[B]` float32 per-example losses of the model's `(exit_logits, ensemble_logits)`."""
    del teacher_logits, key
    exit_logits = _exit_logits(outputs)
    ensemble_logits = _checks.float32_logits(outputs[1], 'ensemble_logits')
    chex.assert_equal_shape((exit_logits, ensemble_logits),
                            custom_message='exit_logits and ensemble_logits must both be '
                                           '[E, B, C]')
    mixing = losses.primary_mixing(exit_logits.shape[0], self.primary_weight)
    exits = losses.distill_exits_per_example(exit_logits, ensemble_logits, mixing, labels,
                                             temperature=self.temperature,
                                             kd_weight=self.kd_weight)
    return exits + _exits_cross_entropy(ensemble_logits, labels)
