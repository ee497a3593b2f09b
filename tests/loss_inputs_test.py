"""The losses on bad and edge inputs, against float64 numpy written here: half-precision logits at
high temperatures, masked (`-inf`) teacher classes, out-of-range labels, empty batches, teacher
rows with nothing to distil, and the `checkify` route for traced labels."""

import re

import jax
from jax.experimental import checkify
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import losses
from kdjax import stage_losses
from kdjax.losses import _checks

from conftest import numeric_gradient

E, K = 3, 2  # Exits of a multi-exit student; teachers of a multi-teacher loss.
WEIGHTS = (0.3, 0.7)
MIXING = np.array(losses.primary_mixing(E, 0.6), np.float64)


# --- numpy references, float64; a class of probability 0 contributes 0 to a KL ------------------

def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.exp(z - top).sum(-1, keepdims=True))


def np_kl_probs(p, z, T):
  """Per-example KL(p ‖ softmax(z/T)) over the classes with p > 0."""
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = p * (np.log(p) - np_log_softmax(z / T))
  return np.where(p > 0, terms, 0.0).sum(-1)


def np_kl(t, z, T):
  return np_kl_probs(np.exp(np_log_softmax(t / T)), z, T)


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_tsd(z, y, k=3):
  s = np.exp(np_log_softmax(z))
  out = []
  for row, label in zip(s, y):
    others = sorted((v for c, v in enumerate(row) if c != label), reverse=True)[:k - 1]
    out.append(row[label] - np.mean(others))
  return np.array(out)


def np_multi_teacher(s, t, T, combine):
  w = np.asarray(WEIGHTS, np.float64)
  if combine == 'probabilities':
    return np_kl_probs(sum(wk * np.exp(np_log_softmax(tk / T)) for wk, tk in zip(w, t)), s, T)
  if combine == 'logits':
    with np.errstate(invalid='ignore'):
      return np_kl(sum(wk * tk for wk, tk in zip(w, t)), s, T)
  return sum(wk * np_kl(tk, s, T) for wk, tk in zip(w, t))


def np_exits(exits, teachers, mixing, y, T, beta=0.7):
  """`[B]`: Σ_i (1 − β)·CE(z_i) + β·T²·Σ_k mixing[i, k]·KL(t_k ‖ z_i)."""
  return sum((1 - beta) * np_ce(z, y) + beta * T * T * sum(
      mixing[i][k] * np_kl(t, z, T) for k, t in enumerate(teachers)) for i, z in enumerate(exits))


# --- every public array loss that takes labels or teacher logits --------------------------------
# name → (kind, loss(student, teacher, labels, T), numpy reference of the same arguments).
# Kinds: 'labels' (student [B, C]), 'pair' ([B, C] teacher), 'teachers' ([K, B, C] teachers),
# 'exits' ([E, B, C] exits and [E, B, C] teachers), 'exits_labels' (exits only).

ARRAY_LOSSES = {
    'cross_entropy': ('labels', lambda s, t, y, T: losses.cross_entropy(s, y),
                      lambda s, t, y, T: np_ce(s, y)),
    'top_score_difference': ('labels', lambda s, t, y, T: losses.top_score_difference(s, y, k=3),
                             lambda s, t, y, T: np_tsd(s, y)),
    'tolerant_cross_entropy': (
        'labels', lambda s, t, y, T: losses.tolerant_cross_entropy(s, y, eta=0.6, k=3),
        lambda s, t, y, T: 0.6 * np_ce(s, y) + 0.4 * np_tsd(s, y)),
    'tolerant_teacher_loss': (
        'labels', lambda s, t, y, T: losses.tolerant_teacher_loss(s, y, eta=0.6, k=3),
        lambda s, t, y, T: np.mean(0.6 * np_ce(s, y) + 0.4 * np_tsd(s, y))),
    'distillation_loss': (
        'pair', lambda s, t, y, T: losses.distillation_loss(s, t, y, temperature=T, kd_weight=0.7),
        lambda s, t, y, T: 0.3 * np.mean(np_ce(s, y)) + 0.7 * T * T * np.mean(np_kl(t, s, T))),
    'softened_kl': ('pair', lambda s, t, y, T: losses.softened_kl(s, t, temperature=T),
                    lambda s, t, y, T: np_kl(t, s, T)),
    'logit_l2_per_example': ('pair', lambda s, t, y, T: losses.logit_l2_per_example(s, t),
                             lambda s, t, y, T: 0.5 * ((s - t)**2).sum(-1)),
    'logit_l2_loss': ('pair', lambda s, t, y, T: losses.logit_l2_loss(s, t),
                      lambda s, t, y, T: np.mean(0.5 * ((s - t)**2).sum(-1))),
    **{f'multi_teacher_kl/{c}': (
        'teachers', lambda s, t, y, T, c=c: losses.multi_teacher_kl(
            s, t, jnp.asarray(WEIGHTS), temperature=T, combine=c),
        lambda s, t, y, T, c=c: np_multi_teacher(s, t, T, c)) for c in losses.TEACHER_COMBINES},
    'distill_exits': (
        'exits', lambda s, t, y, T: losses.distill_exits(s, t, MIXING.astype(np.float32), y,
                                                         temperature=T, kd_weight=0.7),
        lambda s, t, y, T: np.mean(np_exits(s, t, MIXING, y, T))),
    'distill_exits_per_example': (
        'exits', lambda s, t, y, T: losses.distill_exits_per_example(
            s, t, MIXING.astype(np.float32), y, temperature=T, kd_weight=0.7),
        lambda s, t, y, T: np_exits(s, t, MIXING, y, T)),
    'mate_loss': (
        'exits', lambda s, t, y, T: losses.mate_loss(s, t, y, temperature=T, kd_weight=0.7,
                                                     primary_weight=0.6),
        lambda s, t, y, T: np.mean(np_exits(s, t, MIXING, y, T) + sum(np_ce(z, y) for z in t))),
    'exits_cross_entropy': ('exits_labels', lambda s, t, y, T: losses.exits_cross_entropy(s, y),
                            lambda s, t, y, T: np.mean(sum(np_ce(z, y) for z in s))),
    'byot_loss': (
        'exits_labels', lambda s, t, y, T: losses.byot_loss(s, y, temperature=T, kd_weight=0.7),
        lambda s, t, y, T: np.mean(np_exits(s, s[-1:], np.ones((E, 1)), y, T))),
    'exit_ensemble_loss': (
        'exits_labels', lambda s, t, y, T: losses.exit_ensemble_loss(s, y, temperature=T,
                                                                     kd_weight=0.7),
        lambda s, t, y, T: np.mean(np_exits(s, s.mean(0, keepdims=True), np.ones((E, 1)), y, T))),
}
WITH_LABELS = [n for n, (kind, _, _) in ARRAY_LOSSES.items() if kind not in ('pair', 'teachers')
               or n == 'distillation_loss']
WITH_TEACHER = [n for n, (kind, _, _) in ARRAY_LOSSES.items() if kind in ('pair', 'teachers',
                                                                          'exits')]
KL_TEACHER = [n for n in WITH_TEACHER if 'l2' not in n]


def test_the_table_covers_every_exported_loss():
  not_losses = {'KL_REDUCTIONS', 'TEACHER_COMBINES', 'TSD_SCORES', 'noise_factors',
                'perturb_logits', 'primary_mixing', 'traced_checks'}
  covered = {name.split('/')[0] for name in ARRAY_LOSSES}
  assert covered == set(losses.__all__) - not_losses


def array_inputs(name, seed=0, b=5, c=8, scale=3.0):
  """`(student, teacher, labels)` for loss `name`, float32; labels avoid the last two classes."""
  kind = ARRAY_LOSSES[name][0]
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.normal(size=shape) * scale).astype(np.float32)
  y = rng.integers(0, c - 2, b).astype(np.int32)
  if kind == 'labels':
    return normal(b, c), None, y
  if kind == 'pair':
    return normal(b, c), normal(b, c), y
  if kind == 'teachers':
    return normal(b, c), normal(K, b, c), y
  if kind == 'exits':
    return normal(E, b, c), normal(E, b, c), y
  return normal(E, b, c), None, y


def f64(x):
  return None if x is None else np.asarray(x, np.float64)


def through(dtype, x):
  """`x` rounded to `dtype` (as a jax array of that dtype), and those values in float64."""
  if x is None:
    return None, None
  low = jnp.asarray(x, dtype)
  return low, f64(low.astype(jnp.float32))


# --- float16 / bfloat16: computed in float32 ---------------------------------------------------

# Tolerances against float64 on the same (rounded) inputs: what float32 arithmetic gives. At
# T = 300 the softened KL is ~1e-5 and its float32 terms cancel, so T²·KL keeps ~4 digits; before
# the cast float16 was 20% off at T = 16 and overflowed to inf at T = 300.
RTOL = {16.0: 2e-5, 300.0: 2e-3}


@pytest.mark.parametrize('temperature', [16.0, 300.0])
@pytest.mark.parametrize('dtype', [jnp.float16, jnp.bfloat16], ids=['float16', 'bfloat16'])
@pytest.mark.parametrize('name', list(ARRAY_LOSSES))
def test_half_precision_logits_match_float64(name, dtype, temperature):
  _, loss, reference = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name, seed=1, scale=8.0)
  (s_low, s64), (t_low, t64) = through(dtype, s), through(dtype, t)
  got = loss(s_low, t_low, y, temperature)
  assert got.dtype == jnp.float32
  want = reference(s64, t64, y, temperature)
  np.testing.assert_allclose(got, want, rtol=RTOL[temperature], atol=1e-6)


@pytest.mark.parametrize('name', list(ARRAY_LOSSES))
def test_float32_is_computed_as_given(name):
  # float32 arrays are not copied or cast (the default runs compute bitwise what they computed
  # before the half-precision cast existed), and still match float64.
  _, loss, reference = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name, seed=2)
  assert _checks.as_float32(s) is s
  got = loss(s, t, y, 4.0)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, reference(f64(s), f64(t), y, 4.0), rtol=2e-6, atol=1e-6)


def test_half_precision_softened_kl_at_high_temperature():
  # The probe that found the bug: float16 softened KL at T = 16 was 0.835 against 1.030.
  s, t, _ = array_inputs('softened_kl', seed=3, scale=8.0)
  for temperature in (16.0, 300.0):
    (s16, s64), (t16, t64) = through(jnp.float16, s), through(jnp.float16, t)
    got = temperature**2 * losses.softened_kl(s16, t16, temperature=temperature)
    want = temperature**2 * np_kl(t64, s64, temperature)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=RTOL[temperature])


# --- masked teacher classes --------------------------------------------------------------------

def masked(name, seed=4):
  """Inputs with teacher classes masked (`-inf`); small, for finite differences."""
  s, t, y = array_inputs(name, seed=seed, b=3, c=6, scale=1.5)
  kind = ARRAY_LOSSES[name][0]
  if kind == 'pair':
    t[0, 5] = t[1, 4:] = t[2, [0, 5]] = -np.inf
  elif kind == 'teachers':
    t[:, 0, 5] = -np.inf  # In both teachers: probability 0 in the mixture.
    t[0, 1, 4] = -np.inf  # In one teacher only.
    t[1, 2, [0, 5]] = -np.inf
  elif kind == 'exits':
    t[:, 0, 5] = t[0, 1, 4] = t[2, 2, 4:] = -np.inf  # Labels avoid classes 4 and 5 (MATE's CE).
  else:  # The exits are the teachers: mask a class in every exit, student and teacher alike.
    s[:, 0, 5] = s[:, 2, 4] = -np.inf
  return s, t, y


MASKED = [n for n in KL_TEACHER] + ['byot_loss', 'exit_ensemble_loss']


@pytest.mark.parametrize('name', MASKED)
def test_masked_teacher_classes_contribute_nothing(name):
  _, loss, reference = ARRAY_LOSSES[name]
  s, t, y = masked(name)
  got = loss(s, t, y, 2.0)
  want = reference(f64(s), f64(t), y, 2.0)
  assert np.all(np.isfinite(want)) and np.all(np.isfinite(got))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jax.jit(lambda s, t: loss(s, t, y, 2.0))(s, t), want, rtol=1e-5,
                             atol=1e-6)


def frozen_teacher(name, s, t, y, T):
  """The scalar reference as a function of the student alone, the teacher held fixed (BYOT's and
  the exit ensemble's teachers are made of the exits, and `stop_gradient`)."""
  _, _, reference = ARRAY_LOSSES[name]
  if name == 'byot_loss':
    return lambda z: np.mean(np_exits(z, f64(s)[-1:], np.ones((E, 1)), y, T))
  if name == 'exit_ensemble_loss':
    return lambda z: np.mean(np_exits(z, f64(s).mean(0, keepdims=True), np.ones((E, 1)), y, T))
  return lambda z: np.mean(reference(z, f64(t), y, T))


@pytest.mark.parametrize('name', MASKED)
def test_masked_teacher_gradient_is_finite_and_matches_finite_differences(name):
  _, loss, reference = ARRAY_LOSSES[name]
  s, t, y = masked(name)
  grad = f64(jax.grad(lambda z: jnp.mean(loss(z, t, y, 2.0)))(s))
  assert np.all(np.isfinite(grad))
  numeric = numeric_gradient(frozen_teacher(name, s, t, y, 2.0), s)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)
  jitted = f64(jax.jit(jax.grad(lambda z, tt: jnp.mean(loss(z, tt, y, 2.0))))(s, t))
  np.testing.assert_allclose(jitted, grad, rtol=1e-6, atol=1e-7)


def test_student_ruling_out_a_teacher_class_is_infinite():
  s, t, _ = array_inputs('softened_kl')
  s[1, 2] = -np.inf
  kl = losses.softened_kl(s, t, temperature=2.0)
  assert kl[1] == np.inf and np.all(np.isfinite(np.delete(np.asarray(kl), 1)))


# --- refused inputs ----------------------------------------------------------------------------

@pytest.mark.parametrize('bad', [-1, 8, 20])
@pytest.mark.parametrize('name', WITH_LABELS)
def test_out_of_range_labels_are_refused(name, bad):
  _, loss, _ = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name)
  y[3] = bad
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      f'labels must be class indices in [0, 8), got {bad} at index 3')) as raised:
    loss(s, t, y, 4.0)
  assert 'remap them to 0..7' in str(raised.value)
  assert isinstance(raised.value, ValueError)


@pytest.mark.parametrize('name', list(ARRAY_LOSSES))
def test_an_empty_batch_is_refused_eagerly_and_under_jit(name):
  _, loss, _ = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name)
  empty = lambda x: None if x is None else x[..., :0, :]
  for fn in (loss, jax.jit(loss, static_argnums=3)):
    with pytest.raises(kdjax.KdjaxError, match='empty batch'):
      fn(empty(s), empty(t), y[:0], 4.0)


@pytest.mark.parametrize('name', KL_TEACHER)
def test_a_teacher_row_of_all_minus_inf_is_refused(name):
  _, loss, _ = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name)
  t[..., 2, :] = -np.inf
  with pytest.raises(kdjax.KdjaxError, match=r'row \([\d, ]+\) is all -inf: every class is masked'):
    loss(s, t, y, 4.0)


@pytest.mark.parametrize('value', [np.nan, np.inf])
@pytest.mark.parametrize('name', KL_TEACHER)
def test_a_nan_or_plus_inf_teacher_logit_is_refused(name, value):
  _, loss, _ = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name)
  t[..., 1, 3] = value
  with pytest.raises(kdjax.KdjaxError, match=f'must be finite, or -inf to mask a class, got '
                                             f'{value}'):
    loss(s, t, y, 4.0)


@pytest.mark.parametrize('name', ['logit_l2_per_example', 'logit_l2_loss'])
def test_logit_regression_refuses_a_masked_target(name):
  _, loss, _ = ARRAY_LOSSES[name]
  s, t, y = array_inputs(name)
  t[1, 3] = -np.inf
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      'target_logits must be finite, got -inf at index (1, 3)')):
    loss(s, t, y, 4.0)


# --- stage losses ------------------------------------------------------------------------------

def stage_inputs(name, seed=0, b=5, c=8, scale=3.0):
  """`(outputs, teacher_logits, labels)` for stage loss `name`; labels avoid the last 2 classes."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: (rng.normal(size=shape) * scale).astype(np.float32)
  y = rng.integers(0, c - 2, b).astype(np.int32)
  if stage_losses.LOSSES[name].multi_exit:
    return (normal(E, b, c), normal(E, b, c)), None, y
  if name == 'multi_teacher_kd':
    return normal(b, c), normal(K, b, c), y
  if stage_losses.LOSSES[name].needs_teacher:
    return normal(b, c), normal(b, c), y
  return normal(b, c), None, y


def stage_loss(name, **settings):
  if name == 'noisy_l2':  # Noise, and a label term, so that the labels are used.
    settings = dict(dict(noise_alpha=0.5, noise_sigma=0.3, noise_ce_weight=0.2), **settings)
  elif 'temperature' in stage_losses.default_settings(name):
    settings.setdefault('temperature', 2.0)
  return stage_losses.get_loss(name, settings,
                               teacher_weights=WEIGHTS if name == 'multi_teacher_kd' else ())


def np_stage(name, outputs, t, y, T=2.0):
  """The per-example reference of `stage_loss(name)` (not `noisy_l2`: its noise is random)."""
  if name == 'ce':
    return np_ce(outputs, y)
  if name == 'kd':
    return 0.1 * np_ce(outputs, y) + 0.9 * T * T * np_kl(t, outputs, T)
  if name == 'multi_teacher_kd':
    return 0.1 * np_ce(outputs, y) + 0.9 * T * T * np_multi_teacher(outputs, t, T,
                                                                    'probabilities')
  exits, ensemble = outputs
  if name == 'exits_ce':
    return sum(np_ce(z, y) for z in exits)
  if name == 'byot':
    return np_exits(exits, exits[-1:], np.ones((E, 1)), y, T, beta=0.9)
  if name == 'exit_ensemble':
    return np_exits(exits, exits.mean(0, keepdims=True), np.ones((E, 1)), y, T, beta=0.9)
  return np_exits(exits, ensemble, MIXING, y, T, beta=0.9) + sum(np_ce(z, y) for z in ensemble)


STAGE = list(stage_losses.LOSSES)
STAGE_KL = ['kd', 'multi_teacher_kd', 'mate']  # The stage losses with teacher logits in a KL.


@pytest.mark.parametrize('bad', [-1, 8])
@pytest.mark.parametrize('name', STAGE)
def test_stage_losses_refuse_out_of_range_labels(name, bad):
  outputs, t, y = stage_inputs(name)
  y[2] = bad
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      f'labels must be class indices in [0, 8), got {bad} at index 2')):
    stage_loss(name)(outputs, t, y, jax.random.key(0))


@pytest.mark.parametrize('name', STAGE)
def test_stage_losses_refuse_an_empty_batch(name):
  outputs, t, y = stage_inputs(name)
  empty = lambda x: None if x is None else x[..., :0, :]
  loss = stage_loss(name)
  for fn in (loss, jax.jit(loss)):
    with pytest.raises(kdjax.KdjaxError, match='empty batch'):
      fn(jax.tree_util.tree_map(empty, outputs), empty(t), y[:0], jax.random.key(0))


@pytest.mark.parametrize('name', STAGE_KL + ['noisy_l2'])
def test_stage_losses_refuse_a_teacher_row_of_all_minus_inf(name):
  outputs, t, y = stage_inputs(name)
  if name == 'mate':  # MATE's teachers are the model's ensemble logits.
    outputs[1][1, 3] = -np.inf
  else:
    t[..., 3, :] = -np.inf
  match = 'must be finite' if name == 'noisy_l2' else 'is all -inf: every class is masked'
  with pytest.raises(kdjax.KdjaxError, match=match):
    stage_loss(name)(outputs, t, y, jax.random.key(0))


def test_noisy_l2_refuses_a_masked_teacher_class():
  outputs, t, y = stage_inputs('noisy_l2')
  t[0, 1] = -np.inf
  with pytest.raises(kdjax.KdjaxError, match='target_logits must be finite, got -inf'):
    stage_loss('noisy_l2')(outputs, t, y, jax.random.key(0))


def stage_masked(name):
  outputs, t, y = stage_inputs(name, seed=5, b=3, c=6, scale=1.5)
  if name in ('kd', 'multi_teacher_kd'):
    t[..., 0, 5] = t[..., 2, [0, 4]] = -np.inf
  elif name == 'mate':
    outputs[1][:, 0, 5] = outputs[1][1, 2, 4] = -np.inf
  else:  # byot, exit_ensemble: the exits are the teachers.
    outputs[0][:, 1, 4] = -np.inf
  return outputs, t, y


@pytest.mark.parametrize('name', STAGE_KL + ['byot', 'exit_ensemble'])
def test_stage_losses_with_masked_teacher_classes(name):
  outputs, t, y = stage_masked(name)
  loss = stage_loss(name)
  got = loss(outputs, t, y)
  want = np_stage(name, jax.tree_util.tree_map(f64, outputs), f64(t), y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  student = outputs[0] if isinstance(outputs, tuple) else outputs
  rebuild = (lambda z: (z, outputs[1])) if isinstance(outputs, tuple) else (lambda z: z)
  grad = f64(jax.grad(lambda z: jnp.mean(loss(rebuild(z), t, y)))(student))
  assert np.all(np.isfinite(grad))
  exits = f64(student)
  frozen = {'byot': lambda z: np_exits(z, exits[-1:], np.ones((E, 1)), y, 2.0, beta=0.9),
            'exit_ensemble': lambda z: np_exits(z, exits.mean(0, keepdims=True), np.ones((E, 1)),
                                                y, 2.0, beta=0.9)}
  per_example = frozen.get(name, lambda z: np_stage(name, jax.tree_util.tree_map(
      f64, rebuild(z)), f64(t), y))
  numeric = numeric_gradient(lambda z: np.mean(per_example(z)), student)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('temperature', [16.0, 300.0])
@pytest.mark.parametrize('name', STAGE_KL + ['byot'])
def test_stage_losses_with_half_precision_logits(name, temperature):
  outputs, t, y = stage_inputs(name, seed=6, scale=8.0)
  low = lambda x: None if x is None else jnp.asarray(x, jnp.float16)
  rounded = lambda x: None if x is None else f64(low(x).astype(jnp.float32))
  got = stage_loss(name, temperature=temperature)(jax.tree_util.tree_map(low, outputs), low(t), y)
  assert got.dtype == jnp.float32
  want = np_stage(name, jax.tree_util.tree_map(rounded, outputs), rounded(t), y, temperature)
  np.testing.assert_allclose(got, want, rtol=RTOL[temperature], atol=1e-6)


# --- traced labels: not checked by default, checked through checkify ---------------------------

def bad_labels():
  s, t, y = array_inputs('distillation_loss')
  y[2] = -1
  return s, t, y


CHECKIFY = {
    'cross_entropy': lambda s, t, y: losses.cross_entropy(s, y),
    'distillation_loss': lambda s, t, y: losses.distillation_loss(s, t, y, temperature=4.0,
                                                                  kd_weight=0.9),
    'exits_cross_entropy': lambda s, t, y: losses.exits_cross_entropy(jnp.stack([s, t]), y),
    'stage kd': lambda s, t, y: stage_loss('kd')(s, t, y),
    'stage mate': lambda s, t, y: stage_loss('mate')((jnp.stack([s, t]), jnp.stack([t, s])),
                                                     None, y),
    'grad of stage kd': lambda s, t, y: jax.grad(lambda z: jnp.mean(stage_loss('kd')(z, t, y)))(s),
}


@pytest.mark.parametrize('name', list(CHECKIFY))
def test_traced_labels_are_checked_under_checkify_and_jit(name):
  s, t, y = bad_labels()
  message = re.escape('labels must be class indices in [0, 8), got -1 at index 2')
  with _checks.traced_checks():
    checked = jax.jit(checkify.checkify(CHECKIFY[name]))
    outer = checkify.checkify(jax.jit(CHECKIFY[name]))
    error, _ = checked(s, t, y)
    outer_error, _ = outer(s, t, y)
  for err in (error, outer_error):
    with pytest.raises(checkify.JaxRuntimeError, match=message):
      err.throw()
  # The compiled check runs on every call; good labels pass it.
  y[2] = 1
  assert checked(s, t, y)[0].get() is None and outer(s, t, y)[0].get() is None


def test_traced_teacher_rows_are_checked_under_checkify():
  s, t, y = array_inputs('softened_kl')
  f = lambda s, t: losses.softened_kl(s, t, temperature=4.0)
  with _checks.traced_checks():
    checked = jax.jit(checkify.checkify(f))
    dead = t.copy()
    dead[1] = -np.inf
    with pytest.raises(checkify.JaxRuntimeError, match='a row is all -inf'):
      checked(s, dead)[0].throw()
    t[1, 3] = np.nan
    with pytest.raises(checkify.JaxRuntimeError, match='got NaN or \\+inf'):
      checked(s, t)[0].throw()
    l2 = jax.jit(checkify.checkify(losses.logit_l2_per_example))
    with pytest.raises(checkify.JaxRuntimeError, match='target_logits must be finite'):
      l2(s, dead)[0].throw()


def test_without_traced_checks_a_jitted_loss_is_unchecked():
  # The documented behaviour: under jit a negative label counts from the last class, and the
  # loss has no effects (no checks), so it keeps JAX's fast dispatch.
  s, t, y = bad_labels()
  f = lambda s, y: losses.distillation_loss(s, t, y, temperature=4.0, kd_weight=0.9)
  assert not jax.make_jaxpr(f)(s, y).effects
  with _checks.traced_checks():  # A new function: JAX would reuse `f`'s trace.
    assert jax.make_jaxpr(lambda s, y: f(s, y))(s, y).effects
  wrapped = y.copy()
  wrapped[2] = 7
  np.testing.assert_array_equal(jax.jit(f)(s, y), jax.jit(f)(s, wrapped))
  with pytest.raises(kdjax.KdjaxError, match='got -1 at index 2'):
    f(s, y)  # Concrete: refused.


def test_traced_checks_is_a_block():
  assert not _checks._TRACED_CHECKS.get()
  with _checks.traced_checks():
    assert _checks._TRACED_CHECKS.get()
    with _checks.traced_checks(False):
      assert not _checks._TRACED_CHECKS.get()
    assert _checks._TRACED_CHECKS.get()
  assert not _checks._TRACED_CHECKS.get()
