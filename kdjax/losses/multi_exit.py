"""Self-distillation losses for multi-exit networks: every exit learns from a teacher made of exits.

All take `exit_logits` `[E, B, C]` (exits ordered shallow → deep) and return a scalar: the sum over
exits of each exit's batch-mean loss (BYOT sums its exits' losses the same way). Teachers are
`stop_gradient` wherever an exit learns from them. `distill_exits_per_example` gives the sum per
example, for callers that reduce over the batch themselves (`kdjax.stage_losses`).

* `exits_cross_entropy` — no distillation: every exit learns from the labels only.
* `byot_loss` — BYOT (Zhang et al., "Be Your Own Teacher", ICCV 2019): every exit learns from the
  deepest exit. BYOT's feature-hint (L2 on features) term is not included.
* `exit_ensemble_loss` — exit-ensemble distillation: every exit learns from the plain average of
  all exits' logits.
* `mate_loss` — MATE (Sun et al., FITEE 2024): E ensemble teachers, each a trainable weighted
  combination of the exits; exit i learns mostly from its own teacher i.

Each exit's loss is `(1 − β)·CE(z_i, y) + β·T²·Σ_k π_{ik}·KL(softmax(t_k/T) ‖ softmax(z_i/T))`.

All compute in float32 (float16 / bfloat16 logits are cast at entry) and check their inputs as
`kdjax.losses.distillation_loss` does: an empty batch is refused, and when concrete a label
outside `[0, C)` or a teacher row that is all `-inf` (or holds NaN / `+inf`); a `-inf` teacher
logit masks its class (it contributes 0 to the KL). Under `jit` the values cannot be checked
(see `kdjax.losses._checks`).
"""

import chex
import jax
import jax.numpy as jnp

from kdjax.errors import KdjaxError
from kdjax.losses import _checks
from kdjax.losses import classification
from kdjax.losses import distillation


def _check_exits(exit_logits, labels, name='exit_logits'):
  """Checks `[E, B, C]` logits and their `[B]` labels; returns the logits as float32."""
  chex.assert_rank(exit_logits, 3, custom_message=f'{name} must be [exits, batch, classes]')
  chex.assert_type(exit_logits, float, custom_message=f'{name} must be floating point')
  _checks.check_batch(exit_logits, name)
  _checks.check_labels(labels, exit_logits[0])
  return _checks.as_float32(exit_logits)


def _check_teachers(exit_logits, teacher_logits, labels):
  """`_check_exits` for both, and the teachers' rows; returns both as float32."""
  exit_logits = _check_exits(exit_logits, labels)
  teacher_logits = _check_exits(teacher_logits, labels, 'teacher_logits')
  _checks.check_teacher_logits(teacher_logits)
  return exit_logits, teacher_logits


def _check_hyperparameters(temperature, kd_weight):
  if _checks.is_concrete(temperature) and not temperature > 0:
    raise KdjaxError(f'temperature must be > 0, got {temperature}.')
  if _checks.is_concrete(kd_weight) and not 0.0 <= kd_weight <= 1.0:
    raise KdjaxError(f'kd_weight must lie in [0, 1], got {kd_weight}.')


def _per_exit_ce(exit_logits, labels):
  return jax.vmap(lambda z: jnp.mean(classification.cross_entropy(z, labels)))(exit_logits)


def distill_exits(exit_logits: chex.Array, teacher_logits: chex.Array, mixing: chex.Array,
                  labels: chex.Array, *, temperature: float, kd_weight: float) -> chex.Array:
  """The general form: exit i distils from teachers k with weights `mixing[i, k]`.

  Args:
    exit_logits: `[E, B, C]`, `B > 0`.
    teacher_logits: `[K, B, C]`, made `stop_gradient` here; `-inf` masks a class.
    mixing: `[E, K]`, each row summing to 1.
    labels: `[B]` class indices in `[0, C)`.
    temperature: T > 0.
    kd_weight: β ∈ [0, 1].

  Returns:
    Float32 scalar: `Σ_i [(1 − β)·CE_i + β·T²·Σ_k mixing[i, k]·KL(t_k ‖ z_i)]`.
  """
  exit_logits, teacher_logits = _check_teachers(exit_logits, teacher_logits, labels)
  _check_hyperparameters(temperature, kd_weight)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  # kl[i, k] = batch-mean KL(teacher k ‖ exit i) at temperature T.
  kl = jax.vmap(lambda z: jax.vmap(lambda t: jnp.mean(
      distillation._kl_per_example(t / temperature, z / temperature)))(teacher_logits))(
          exit_logits)
  per_exit = (1.0 - kd_weight) * _per_exit_ce(exit_logits, labels) + (
      kd_weight * temperature**2 * jnp.sum(mixing * kl, axis=-1))
  return jnp.sum(per_exit)


def distill_exits_per_example(exit_logits: chex.Array, teacher_logits: chex.Array,
                              mixing: chex.Array, labels: chex.Array, *, temperature: float,
                              kd_weight: float) -> chex.Array:
  """`distill_exits` per example: its batch mean is `distill_exits` (up to rounding).

  Args: as `distill_exits`.

  Returns:
    `[B]` float32: `Σ_i [(1 − β)·CE_i + β·T²·Σ_k mixing[i, k]·KL(t_k ‖ z_i)]` for each example.
  """
  exit_logits, teacher_logits = _check_teachers(exit_logits, teacher_logits, labels)
  _check_hyperparameters(temperature, kd_weight)
  teacher_logits = jax.lax.stop_gradient(teacher_logits)
  ce = jax.vmap(lambda z: classification.cross_entropy(z, labels))(exit_logits)  # [E, B]
  # kl[i, k, b] = KL(teacher k ‖ exit i) on example b, at temperature T.
  kl = jax.vmap(lambda z: jax.vmap(lambda t: distillation._kl_per_example(
      t / temperature, z / temperature))(teacher_logits))(exit_logits)
  # A broadcast sum, not an einsum: a GPU's default matmul precision (TF32) would round `mixing`.
  distill = jnp.sum(mixing[:, :, None] * kl, axis=1)  # [E, B]
  per_exit = (1.0 - kd_weight) * ce + kd_weight * temperature**2 * distill
  return jnp.sum(per_exit, axis=0)


def exits_cross_entropy(exit_logits: chex.Array, labels: chex.Array) -> chex.Array:
  """`Σ_i CE(z_i, y)`: every exit trained on the labels alone (the no-distillation baseline)."""
  exit_logits = _check_exits(exit_logits, labels)
  return jnp.sum(_per_exit_ce(exit_logits, labels))


def byot_loss(exit_logits, labels, *, temperature: float, kd_weight: float) -> chex.Array:
  """BYOT: every exit distils from the deepest exit (which then learns from labels only)."""
  num_exits = exit_logits.shape[0]
  mixing = jnp.ones((num_exits, 1))
  return distill_exits(exit_logits, exit_logits[-1:], mixing, labels, temperature=temperature,
                       kd_weight=kd_weight)


def exit_ensemble_loss(exit_logits, labels, *, temperature: float,
                       kd_weight: float) -> chex.Array:
  """Every exit distils from the average of all exits' logits."""
  exit_logits = _check_exits(exit_logits, labels)  # The mean is taken in float32.
  num_exits = exit_logits.shape[0]
  ensemble = jnp.mean(exit_logits, axis=0, keepdims=True)
  return distill_exits(exit_logits, ensemble, jnp.ones((num_exits, 1)), labels,
                       temperature=temperature, kd_weight=kd_weight)


def primary_mixing(num_exits: int, primary_weight: float) -> chex.Array:
  """`[E, E]`: `primary_weight` on the diagonal, the rest shared equally by the other teachers."""
  if _checks.is_concrete(primary_weight) and not 0.0 < primary_weight <= 1.0:
    raise KdjaxError(f'primary_weight must lie in (0, 1], got {primary_weight}.')
  if num_exits == 1:
    return jnp.ones((1, 1))
  off = (1.0 - primary_weight) / (num_exits - 1)
  eye = jnp.eye(num_exits)
  return eye * primary_weight + (1.0 - eye) * off


def mate_loss(exit_logits: chex.Array, teacher_logits: chex.Array, labels: chex.Array, *,
              temperature: float, kd_weight: float, primary_weight: float) -> chex.Array:
  """MATE: exit i distils from all E ensemble teachers, weighting its own teacher i most.

  Plus `Σ_e CE(t_e, y)`, the cross-entropy that trains each teacher's combination weights (the
  teachers enter the distillation term only through `stop_gradient`).

  Args:
    exit_logits: `[E, B, C]`.
    teacher_logits: `[E, B, C]`, teacher e = `Σ_j softmax(w_e)_j·z_j` (see
      `kdjax.models.MultiExitResNet`).
    labels: `[B]`.
    temperature: T > 0.
    kd_weight: β ∈ [0, 1].
    primary_weight: weight of exit i's own teacher, in (0, 1]; the other E − 1 teachers share
      the rest equally. 1 means each exit learns only from its own teacher.
  """
  chex.assert_equal_shape((exit_logits, teacher_logits),
                          custom_message='exit_logits and teacher_logits must both be [E, B, C]')
  exit_logits, teacher_logits = _check_teachers(exit_logits, teacher_logits, labels)
  mixing = primary_mixing(exit_logits.shape[0], primary_weight)
  exits = distill_exits(exit_logits, teacher_logits, mixing, labels, temperature=temperature,
                        kd_weight=kd_weight)
  return exits + jnp.sum(_per_exit_ce(teacher_logits, labels))
