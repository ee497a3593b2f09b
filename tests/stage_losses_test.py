"""Stage losses: per-example values against numpy written here, the registry, every check message,
multi-teacher identities, finite differences, and jit / vmap / static-argument use."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import kdjax
from kdjax import losses
from kdjax import stage_losses

from conftest import numeric_gradient

NAMES = ('ce', 'kd', 'noisy_l2', 'exits_ce', 'byot', 'exit_ensemble', 'mate', 'multi_teacher_kd')


# --- numpy references, float64 ---------------------------------------------------------------

def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  return np.exp(np_log_softmax(z))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y]


def np_kl_probs(p, z, T):
  """Per-example KL(p ‖ softmax(z/T)), with 0·log 0 = 0."""
  log_p = np.log(np.where(p > 0, p, 1.0))
  return (p * (log_p - np_log_softmax(z / T))).sum(-1)


def np_kl(t, z, T):
  return np_kl_probs(np_softmax(t / T), z, T)


def np_tsd(z, y, k, scores):
  s = np_softmax(z) if scores == 'softmax' else z
  out = []
  for row, label in zip(s, y):
    others = sorted((v for c, v in enumerate(row) if c != label), reverse=True)[:k - 1]
    out.append(row[label] - np.mean(others))
  return np.array(out)


def np_classification(z, y, eta=1.0, k=5, scores='softmax'):
  return eta * np_ce(z, y) + (1 - eta) * np_tsd(z, y, k, scores)


def np_kd(s, t, y, T, lam, reduction='batchmean', eta=1.0, kl=None):
  kl = np_kl(t, s, T) if kl is None else kl
  if reduction == 'elementwise_mean':
    kl = kl / s.shape[-1]
  return (1 - lam) * np_classification(s, y, eta) + lam * T * T * kl


def np_multi_teacher_kl(s, teachers, w, T, combine):
  w = np.asarray(w, np.float64) / np.sum(w)
  if combine == 'probabilities':
    mixture = sum(wk * np_softmax(t / T) for wk, t in zip(w, teachers))
    return np_kl_probs(mixture, s, T)
  if combine == 'logits':
    return np_kl(sum(wk * t for wk, t in zip(w, teachers)), s, T)
  return sum(wk * np_kl(t, s, T) for wk, t in zip(w, teachers))


def np_exits(exits, teachers, mixing, y, T, beta):
  total = 0.0
  for i, z in enumerate(exits):
    kd = sum(mixing[i][k] * np_kl(t, z, T) for k, t in enumerate(teachers))
    total = total + (1 - beta) * np_ce(z, y) + beta * T * T * kd
  return total


def batch(seed, b=6, c=10, teachers=0, scale=3.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(b, c)) * scale).astype(np.float32)
  shape = (teachers, b, c) if teachers else (b, c)
  t = (rng.normal(size=shape) * scale).astype(np.float32)
  y = rng.integers(0, c, b).astype(np.int32)
  return s, t, y


def f64(x):
  return np.asarray(x, np.float64)


def inputs_for(name, seed=0, b=6, c=10):
  """`(outputs, teacher_logits, labels)` of the right kind for loss `name`."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, c, b).astype(np.int32)
  if stage_losses.LOSSES[name].multi_exit:
    exits, ensemble = (rng.normal(size=(2, 3, b, c)) * 2).astype(np.float32)
    return (exits, ensemble), None, y
  s = (rng.normal(size=(b, c)) * 3).astype(np.float32)
  if name == 'multi_teacher_kd':
    return s, (rng.normal(size=(2, b, c)) * 3).astype(np.float32), y
  if stage_losses.LOSSES[name].needs_teacher:
    return s, (rng.normal(size=(b, c)) * 3).astype(np.float32), y
  return s, None, y


def loss_for(name, **settings):
  weights = (0.3, 0.7) if name == 'multi_teacher_kd' else ()
  if name == 'noisy_l2':
    settings = dict(dict(noise_alpha=0.5, noise_sigma=0.3, noise_ce_weight=0.2), **settings)
  return stage_losses.get_loss(name, settings, teacher_weights=weights)


# --- registry ----------------------------------------------------------------------------------

def test_registry_names_and_classes():
  assert tuple(stage_losses.LOSSES) == NAMES
  assert stage_losses.LOSSES['kd'] is stage_losses.Distillation
  for name, cls in stage_losses.LOSSES.items():
    assert dataclasses.is_dataclass(cls)
    assert cls.__dataclass_params__.frozen, name
    assert cls.__doc__


def test_what_each_loss_needs():
  needs = {n: (c.needs_teacher, c.several_teachers, c.multi_exit)
           for n, c in stage_losses.LOSSES.items()}
  assert needs == {
      'ce': (False, False, False), 'kd': (True, False, False), 'noisy_l2': (True, False, False),
      'exits_ce': (False, False, True), 'byot': (False, False, True),
      'exit_ensemble': (False, False, True), 'mate': (False, False, True),
      'multi_teacher_kd': (True, True, False)}


def test_default_settings():
  classification = dict(eta=1.0, tsd_k=5, tsd_scores='softmax')
  assert stage_losses.default_settings('ce') == classification
  assert stage_losses.default_settings('kd') == dict(
      temperature=4.0, kd_weight=0.9, kl_reduction='batchmean', **classification)
  assert stage_losses.default_settings('noisy_l2') == dict(
      noise_alpha=0.0, noise_sigma=0.0, noise_on='teacher', noise_ce_weight=0.0,
      **classification)
  assert stage_losses.default_settings('exits_ce') == {}
  assert stage_losses.default_settings('byot') == dict(temperature=4.0, kd_weight=0.9)
  assert stage_losses.default_settings('exit_ensemble') == dict(temperature=4.0, kd_weight=0.9)
  assert stage_losses.default_settings('mate') == dict(temperature=4.0, kd_weight=0.9,
                                                       primary_weight=0.6)
  assert stage_losses.default_settings('multi_teacher_kd') == dict(
      temperature=4.0, kd_weight=0.9, kl_reduction='batchmean', combine='probabilities',
      **classification)


def test_get_loss_applies_settings_and_accepts_a_config_dict():
  loss = stage_losses.get_loss('kd', ml_collections.ConfigDict({'temperature': 2.0}))
  assert loss == stage_losses.Distillation(temperature=2.0)
  assert stage_losses.get_loss('kd') == stage_losses.Distillation()
  assert stage_losses.get_loss('exits_ce', {}) == stage_losses.ExitsCrossEntropy()


def test_unknown_name_lists_the_losses():
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      "unknown loss 'hinton'; choose one of: ce, kd, noisy_l2, exits_ce, byot, exit_ensemble, "
      'mate, multi_teacher_kd.')):
    stage_losses.get_loss('hinton')
  with pytest.raises(kdjax.KdjaxError, match="unknown loss 'hinton'"):
    stage_losses.default_settings('hinton')


def test_unknown_setting_lists_the_settings():
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      "loss 'kd' has no setting 'temprature'; its settings are: eta, kd_weight, kl_reduction, "
      'temperature, tsd_k, tsd_scores.')):
    stage_losses.get_loss('kd', {'temprature': 4.0})
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      "loss 'exits_ce' has no setting 'temperature'; it has no settings.")):
    stage_losses.get_loss('exits_ce', {'temperature': 4.0})


def test_teacher_weights_come_from_the_stage_not_the_settings():
  with pytest.raises(kdjax.KdjaxError, match="set the weights in the stage's teachers"):
    stage_losses.get_loss('multi_teacher_kd', {'weights': (0.5, 0.5)},
                          teacher_weights=(0.5, 0.5))
  with pytest.raises(kdjax.KdjaxError, match="set the weights in the stage's teachers"):
    stage_losses.get_loss('multi_teacher_kd')  # no teachers at all.
  with pytest.raises(kdjax.KdjaxError, match="loss 'kd' learns from one teacher"):
    stage_losses.get_loss('kd', teacher_weights=(0.5, 0.5))


def test_teacher_weights_are_normalised():
  loss = stage_losses.get_loss('multi_teacher_kd', teacher_weights=(1, 3))
  assert loss.weights == (0.25, 0.75)
  loss = stage_losses.get_loss('multi_teacher_kd', teacher_weights=(0.2, 0.2, 0.2))
  np.testing.assert_allclose(loss.weights, [1 / 3] * 3)
  assert abs(sum(loss.weights) - 1) < 1e-12


@pytest.mark.parametrize('weights', [(0.5, 0.0), (1.0, -1.0), ('0.5', 0.5), (float('nan'),)])
def test_non_positive_teacher_weights_are_refused(weights):
  with pytest.raises(kdjax.KdjaxError, match=r"teacher weights must be numbers > 0, got .*"
                                             r"set the weights in the stage's teachers"):
    stage_losses.get_loss('multi_teacher_kd', teacher_weights=weights)


def test_check_refuses_weights_that_do_not_sum_to_one():
  with pytest.raises(kdjax.KdjaxError, match='teacher weights must sum to 1'):
    stage_losses.MultiTeacherDistillation(weights=(1.0, 1.0)).check()


# --- check messages ------------------------------------------------------------------------------

@pytest.mark.parametrize('name,settings,message', [
    ('kd', dict(temperature=0), 'temperature must be > 0, got 0'),
    ('kd', dict(kd_weight=1.5), 'kd_weight must lie in [0, 1], got 1.5'),
    ('kd', dict(kl_reduction='x'),
     "unknown kl_reduction 'x'; choose one of: batchmean, elementwise_mean"),
    ('ce', dict(eta=-0.2), 'eta must lie in [0, 1] (1: plain cross-entropy), got -0.2'),
    ('kd', dict(eta=1.2), 'eta must lie in [0, 1] (1: plain cross-entropy), got 1.2'),
    ('ce', dict(tsd_k=1), 'tsd_k must be an integer >= 2, got 1'),
    ('ce', dict(tsd_k=2.5), 'tsd_k must be an integer >= 2, got 2.5'),
    ('ce', dict(tsd_k=True), 'tsd_k must be an integer >= 2, got True'),
    ('ce', dict(tsd_scores='probs'), "unknown tsd_scores 'probs'; choose one of: softmax, logits"),
    ('noisy_l2', dict(noise_alpha=2.0), 'noise_alpha must lie in [0, 1], got 2.0'),
    ('noisy_l2', dict(noise_sigma=-1.0), 'noise_sigma must be >= 0, got -1.0'),
    ('noisy_l2', dict(noise_on='both'), "unknown noise_on 'both'; choose one of: teacher, student"),
    ('noisy_l2', dict(noise_ce_weight=1.1), 'noise_ce_weight must lie in [0, 1], got 1.1'),
    ('noisy_l2', dict(eta=-0.2), 'eta must lie in [0, 1] (1: plain cross-entropy), got -0.2'),
    ('byot', dict(temperature=-1.0), 'temperature must be > 0, got -1.0'),
    ('exit_ensemble', dict(kd_weight=-0.1), 'kd_weight must lie in [0, 1], got -0.1'),
    ('mate', dict(primary_weight=0.0), 'primary_weight must lie in (0, 1], got 0.0'),
    ('mate', dict(temperature=0), 'temperature must be > 0, got 0'),
    ('multi_teacher_kd', dict(combine='mean'),
     "unknown combine 'mean'; choose one of: probabilities, logits, kl_sum"),
    ('multi_teacher_kd', dict(kl_reduction='sum'),
     "unknown kl_reduction 'sum'; choose one of: batchmean, elementwise_mean"),
    ('multi_teacher_kd', dict(tsd_scores='x'), "unknown tsd_scores 'x'"),
    # Types: a string where a number belongs says so.
    ('kd', dict(temperature='4.0'), "temperature must be a number, got '4.0'"),
    ('kd', dict(kd_weight='0.9'), "kd_weight must be a number, got '0.9'"),
    ('ce', dict(eta=None), 'eta must be a number, got None'),
    ('noisy_l2', dict(noise_sigma='1'), "noise_sigma must be a number, got '1'"),
    ('mate', dict(primary_weight=True), 'primary_weight must be a number, got True'),
    ('kd', dict(kl_reduction=None), "unknown kl_reduction 'None'"),
])
def test_bad_values_are_refused_with_todays_message(name, settings, message):
  weights = (0.5, 0.5) if name == 'multi_teacher_kd' else ()
  with pytest.raises(kdjax.KdjaxError) as raised:
    stage_losses.get_loss(name, settings, teacher_weights=weights)
  text = str(raised.value)
  assert message in text
  assert text.endswith('.')
  assert not text.startswith('stage')


@pytest.mark.parametrize('name', ['ce', 'kd', 'noisy_l2', 'multi_teacher_kd'])
def test_tsd_k_is_checked_against_the_classes_only_when_tolerant(name):
  weights = (1.0,) if name == 'multi_teacher_kd' else ()
  with pytest.raises(kdjax.KdjaxError, match=re.escape(
      'tsd_k = 10 needs more than 10 classes; set tsd_k below the number of classes.')):
    stage_losses.get_loss(name, dict(eta=0.6, tsd_k=10), num_classes=10, teacher_weights=weights)
  stage_losses.get_loss(name, dict(eta=1.0, tsd_k=10), num_classes=10, teacher_weights=weights)
  stage_losses.get_loss(name, dict(eta=0.6, tsd_k=9), num_classes=10, teacher_weights=weights)


def test_every_default_passes_its_check():
  for name in NAMES:
    loss_for(name).check(num_classes=10)


# --- values against numpy --------------------------------------------------------------------

@pytest.mark.parametrize('eta,k,scores', [(1.0, 5, 'softmax'), (0.6, 5, 'softmax'),
                                          (0.3, 3, 'logits'), (0.0, 2, 'softmax')])
def test_cross_entropy_per_example(eta, k, scores):
  s, _, y = batch(0)
  loss = stage_losses.get_loss('ce', dict(eta=eta, tsd_k=k, tsd_scores=scores))
  got = loss(s, None, y, None)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_classification(f64(s), y, eta, k, scores),
                             rtol=1e-5, atol=1e-6)


def test_plain_cross_entropy_ignores_tsd():
  # With eta == 1 no TSD is computed, so tsd_k may exceed the classes (TSD would refuse it).
  s, _, y = batch(1, c=4)
  got = stage_losses.CrossEntropy(tsd_k=9)(s, None, y)
  np.testing.assert_allclose(got, np_ce(f64(s), y), rtol=1e-6)


@pytest.mark.parametrize('temperature,kd_weight,reduction,eta', [
    (4.0, 0.9, 'batchmean', 1.0), (1.0, 0.5, 'batchmean', 0.6), (20.0, 1.0, 'batchmean', 1.0),
    (2.0, 0.0, 'batchmean', 1.0), (4.0, 0.9, 'elementwise_mean', 1.0),
    (3.0, 0.7, 'elementwise_mean', 0.6)])
def test_distillation_per_example(temperature, kd_weight, reduction, eta):
  s, t, y = batch(2)
  loss = stage_losses.get_loss('kd', dict(temperature=temperature, kd_weight=kd_weight,
                                          kl_reduction=reduction, eta=eta))
  got = loss(s, t, y, None)
  assert got.shape == (6,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_kd(f64(s), f64(t), y, temperature, kd_weight, reduction,
                                        eta), rtol=1e-5, atol=1e-5)


def test_distillation_batch_mean_is_the_array_loss():
  s, t, y = batch(3, b=8)
  loss = stage_losses.Distillation(temperature=3.0, kd_weight=0.7)
  np.testing.assert_allclose(
      jnp.mean(loss(s, t, y)),
      losses.distillation_loss(s, t, y, temperature=3.0, kd_weight=0.7), rtol=1e-6)


@pytest.mark.parametrize('noise_on', ['teacher', 'student'])
@pytest.mark.parametrize('ce_weight,eta', [(0.0, 1.0), (0.3, 1.0), (0.3, 0.6)])
def test_noisy_logit_regression_per_example(noise_on, ce_weight, eta):
  s, t, y = batch(4)
  key = jax.random.key(7)
  loss = stage_losses.get_loss('noisy_l2', dict(noise_alpha=0.5, noise_sigma=0.4,
                                                noise_on=noise_on, noise_ce_weight=ce_weight,
                                                eta=eta))
  # The documented noise: `kdjax.losses.noise_factors` from this key, on the student's or the
  # teacher's logits (same shape, so the same factors).
  factors = f64(losses.noise_factors(key, jnp.asarray(t), alpha=0.5, sigma=0.4))
  assert np.any(factors != 1.0) and np.any(factors == 1.0)  # some rows perturbed, some not.
  s64, t64 = f64(s), f64(t)
  if noise_on == 'teacher':
    l2 = 0.5 * ((s64 - factors * t64)**2).sum(-1)
  else:
    l2 = 0.5 * ((factors * s64 - t64)**2).sum(-1)
  want = l2 if ce_weight == 0 else (1 - ce_weight) * l2 + ce_weight * np_classification(
      s64, y, eta)
  np.testing.assert_allclose(loss(s, t, y, key), want, rtol=1e-5, atol=1e-5)


def test_noisy_without_noise_is_plain_logit_regression():
  s, t, y = batch(5)
  got = stage_losses.NoisyLogitRegression()(s, t, y, jax.random.key(0))
  np.testing.assert_allclose(got, 0.5 * ((f64(s) - f64(t))**2).sum(-1), rtol=1e-5)
  with pytest.raises(ValueError, match='key'):
    stage_losses.NoisyLogitRegression()(s, t, y, None)


def multi_exit_data(seed=0, e=3, b=6, c=5):
  rng = np.random.default_rng(seed)
  exits, teachers = (rng.normal(size=(2, e, b, c)) * 2).astype(np.float32)
  return exits, teachers, rng.integers(0, c, b).astype(np.int32)


def test_exits_cross_entropy_per_example():
  z, t, y = multi_exit_data(0)
  got = stage_losses.ExitsCrossEntropy()((z, t), None, y)
  np.testing.assert_allclose(got, sum(np_ce(f64(e), y) for e in z), rtol=1e-6)
  np.testing.assert_allclose(jnp.mean(got), losses.exits_cross_entropy(z, y), rtol=1e-6)


def test_byot_and_exit_ensemble_per_example():
  z, t, y = multi_exit_data(1)
  z64 = f64(z)
  byot = stage_losses.BYOT(temperature=3.0, kd_weight=0.6)((z, t), None, y)
  np.testing.assert_allclose(byot, np_exits(z64, z64[-1:], np.ones((3, 1)), y, 3.0, 0.6),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.mean(byot), losses.byot_loss(z, y, temperature=3.0,
                                                              kd_weight=0.6), rtol=1e-6)
  ensemble = stage_losses.ExitEnsemble(temperature=2.0, kd_weight=0.5)((z, t), None, y)
  np.testing.assert_allclose(
      ensemble, np_exits(z64, z64.mean(0, keepdims=True), np.ones((3, 1)), y, 2.0, 0.5),
      rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.mean(ensemble), losses.exit_ensemble_loss(
      z, y, temperature=2.0, kd_weight=0.5), rtol=1e-6)


def test_mate_per_example():
  z, t, y = multi_exit_data(2)
  got = stage_losses.MATE(temperature=3.0, kd_weight=0.7, primary_weight=0.6)((z, t), None, y)
  mixing = np.full((3, 3), 0.2) + np.eye(3) * 0.4  # primary 0.6, the others 0.2 each.
  want = np_exits(f64(z), f64(t), mixing, y, 3.0, 0.7) + sum(np_ce(f64(e), y) for e in t)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.mean(got), losses.mate_loss(
      z, t, y, temperature=3.0, kd_weight=0.7, primary_weight=0.6), rtol=1e-6)


def test_mate_needs_the_ensemble_teachers():
  z, t, y = multi_exit_data(3)
  with pytest.raises(ValueError, match='ensemble_logits'):
    stage_losses.MATE()((z, None), None, y)
  with pytest.raises(AssertionError, match='ensemble_logits'):
    stage_losses.MATE()((z, t[:2]), None, y)


# --- several teachers ------------------------------------------------------------------------

COMBINES = ('probabilities', 'logits', 'kl_sum')


@pytest.mark.parametrize('combine', COMBINES)
@pytest.mark.parametrize('reduction', ['batchmean', 'elementwise_mean'])
def test_multi_teacher_per_example(combine, reduction):
  s, t, y = batch(6, teachers=3)
  weights = (0.2, 0.3, 0.5)
  loss = stage_losses.get_loss('multi_teacher_kd', dict(combine=combine, temperature=3.0,
                                                        kd_weight=0.8, kl_reduction=reduction),
                               teacher_weights=weights)
  kl = np_multi_teacher_kl(f64(s), f64(t), weights, 3.0, combine)
  np.testing.assert_allclose(loss(s, t, y, None), np_kd(f64(s), None, y, 3.0, 0.8, reduction,
                                                        kl=kl), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('combine', COMBINES)
def test_one_teacher_is_distillation(combine):
  s, t, y = batch(7, teachers=1)
  settings = dict(temperature=2.0, kd_weight=0.7, eta=0.6)
  one = stage_losses.get_loss('multi_teacher_kd', dict(combine=combine, **settings),
                              teacher_weights=(3.0,))
  kd = stage_losses.get_loss('kd', settings)
  np.testing.assert_allclose(one(s, t, y), kd(s, t[0], y), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('combine', COMBINES)
def test_two_equal_teachers_are_distillation(combine):
  s, t, y = batch(8, teachers=1)
  two = stage_losses.get_loss('multi_teacher_kd', dict(combine=combine),
                              teacher_weights=(0.5, 0.5))
  np.testing.assert_allclose(two(s, np.concatenate([t, t]), y), stage_losses.Distillation()(
      s, t[0], y), rtol=1e-5, atol=1e-6)


def test_kl_sum_bounds_the_mixture_and_trains_the_same():
  # KL is convex in its first argument: Σ w_k KL(p_k ‖ q) >= KL(Σ w_k p_k ‖ q), and the gap does
  # not depend on the student, so both give the student the same gradient.
  for seed in range(5):
    s, t, y = batch(10 + seed, b=16, teachers=3, scale=4.0)
    weights = tuple(np.random.default_rng(seed).uniform(0.1, 1.0, 3))
    make = lambda combine: stage_losses.get_loss(
        'multi_teacher_kd', dict(combine=combine, kd_weight=1.0), teacher_weights=weights)
    summed, mixture = make('kl_sum'), make('probabilities')
    assert np.all(summed(s, t, y) >= mixture(s, t, y) - 1e-5)
    assert np.any(summed(s, t, y) > mixture(s, t, y) + 1e-3)  # a real gap, not an identity.
    grad = lambda loss: jax.grad(lambda z: jnp.mean(loss(z, t, y)))(s)
    np.testing.assert_allclose(grad(summed), grad(mixture), rtol=1e-4, atol=1e-6)


def test_multi_teacher_needs_one_teacher_per_weight():
  s, t, y = batch(9, teachers=3)
  loss = stage_losses.get_loss('multi_teacher_kd', teacher_weights=(0.5, 0.5))
  with pytest.raises(AssertionError, match='one teacher per weight'):
    loss(s, t, y)
  with pytest.raises(AssertionError, match=re.escape('[teachers, B, C]')):
    loss(s, t[0], y)


@pytest.mark.parametrize('name,combine', [('kd', None)] + [('multi_teacher_kd', c)
                                                          for c in COMBINES])
def test_saturated_teacher_is_finite(name, combine):
  # Teacher probabilities underflow to exactly 0 at T = 1: 0·log 0 must count as 0, not NaN.
  s, t, y = batch(11, teachers=2 if combine else 0)
  t = t * 1e4
  settings = dict(temperature=1.0) if combine is None else dict(temperature=1.0, combine=combine)
  loss = stage_losses.get_loss(name, settings, teacher_weights=(0.5, 0.5) if combine else ())
  value, grad = jax.value_and_grad(lambda z: jnp.mean(loss(z, t, y)))(s)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


# --- gradients -------------------------------------------------------------------------------

def test_distillation_gradient_matches_finite_differences():
  s, t, y = batch(12, b=3, c=4, scale=1.0)
  loss = stage_losses.Distillation(temperature=2.5, kd_weight=0.7)
  grad = f64(jax.grad(lambda z: jnp.mean(loss(z, t, y)))(s))
  numeric = numeric_gradient(lambda z: np.mean(np_kd(z, f64(t), y, 2.5, 0.7)), s)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('combine', COMBINES)
def test_multi_teacher_gradient_matches_finite_differences(combine):
  s, t, y = batch(13, b=3, c=4, teachers=2, scale=1.0)
  loss = stage_losses.get_loss('multi_teacher_kd', dict(combine=combine, temperature=2.0,
                                                        kd_weight=0.6), teacher_weights=(1, 2))
  grad = f64(jax.grad(lambda z: jnp.mean(loss(z, t, y)))(s))
  numeric = numeric_gradient(lambda z: np.mean(np_kd(
      z, None, y, 2.0, 0.6, kl=np_multi_teacher_kl(z, f64(t), (1, 2), 2.0, combine))), s)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', ['kd', 'noisy_l2', 'multi_teacher_kd'])
def test_teacher_gets_no_gradient(name):
  s, t, y = inputs_for(name)
  loss = loss_for(name)
  grad = jax.grad(lambda tt: jnp.sum(loss(s, tt, y, jax.random.key(0))))(t)
  np.testing.assert_array_equal(grad, np.zeros_like(t))


# --- jit, vmap, static arguments, dtypes ------------------------------------------------------

@pytest.mark.parametrize('name', NAMES)
def test_jit_vmap_and_static_argument_agree_with_eager(name):
  outputs, t, y = inputs_for(name)
  loss = loss_for(name)
  key = jax.random.key(3)
  eager = loss(outputs, t, y, key)
  assert eager.shape == (6,) and eager.dtype == jnp.float32
  np.testing.assert_allclose(jax.jit(loss)(outputs, t, y, key), eager, rtol=1e-6, atol=1e-6)
  # The loss as a static argument: it is hashable, and an equal loss reuses the compilation.
  static = jax.jit(lambda l, o, tt, yy, k: l(o, tt, yy, k), static_argnums=0)
  np.testing.assert_allclose(static(loss, outputs, t, y, key), eager, rtol=1e-6, atol=1e-6)
  assert hash(loss) == hash(loss_for(name)) and loss == loss_for(name)
  # A batch of two students learning from one teacher (the second student perturbed).
  other = jax.tree_util.tree_map(lambda x: x + 0.5, outputs)
  students = jax.tree_util.tree_map(lambda a, b: np.stack([a, b]), outputs, other)
  stacked = jax.vmap(loss, in_axes=(0, None, None, None))(students, t, y, key)
  np.testing.assert_allclose(stacked[0], eager, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stacked[1], loss(other, t, y, key), rtol=1e-6, atol=1e-6)


def test_losses_are_frozen():
  loss = stage_losses.Distillation()
  with pytest.raises(dataclasses.FrozenInstanceError):
    loss.temperature = 1.0
  assert len({stage_losses.Distillation(), stage_losses.Distillation(),
              stage_losses.Distillation(temperature=2.0)}) == 2


@pytest.mark.parametrize('name', ['ce', 'kd', 'multi_teacher_kd', 'mate'])
def test_losses_compute_in_float32(name):
  outputs, t, y = inputs_for(name)
  to_bf16 = lambda x: None if x is None else jnp.asarray(x, jnp.bfloat16)
  got = loss_for(name)(jax.tree_util.tree_map(to_bf16, outputs), to_bf16(t), y, None)
  assert got.dtype == jnp.float32
  rounded = lambda x: None if x is None else f64(to_bf16(x).astype(jnp.float32))
  want = loss_for(name)(jax.tree_util.tree_map(rounded, outputs), rounded(t), y, None)
  np.testing.assert_allclose(got, want, rtol=1e-6)
