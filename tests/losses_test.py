"""Losses against numpy written independently here, finite differences, and known limits."""

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
import numpy as np
import pytest

import kdjax

from conftest import numeric_gradient


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_distillation(s, t, y, T, lam, reduction='batchmean'):
  s, t = s.astype(np.float64), t.astype(np.float64)
  ce = -np_log_softmax(s)[np.arange(len(y)), y].mean()
  p_t = np.exp(np_log_softmax(t / T))
  kl_elem = p_t * (np.log(p_t) - np_log_softmax(s / T))
  kl = kl_elem.sum(-1).mean() if reduction == 'batchmean' else kl_elem.mean()
  return (1 - lam) * ce + lam * T * T * kl


def random_batch(seed, batch=6, classes=5, scale=3.0):
  rng = np.random.default_rng(seed)
  s = (rng.normal(size=(batch, classes)) * scale).astype(np.float32)
  t = (rng.normal(size=(batch, classes)) * scale).astype(np.float32)
  y = rng.integers(0, classes, size=batch).astype(np.int32)
  return s, t, y


def test_cross_entropy_matches_numpy():
  s, _, y = random_batch(0)
  expected = -np_log_softmax(s.astype(np.float64))[np.arange(len(y)), y]
  np.testing.assert_allclose(kdjax.losses.cross_entropy(s, y), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('reduction', ['batchmean', 'elementwise_mean'])
@pytest.mark.parametrize('temperature,kd_weight', [(1.0, 0.5), (4.0, 0.9), (20.0, 1.0), (2.0, 0.0)])
def test_distillation_matches_numpy(reduction, temperature, kd_weight):
  s, t, y = random_batch(1)
  got = kdjax.losses.distillation_loss(s, t, y, temperature=temperature, kd_weight=kd_weight,
                                       kl_reduction=reduction)
  want = np_distillation(s, t, y, temperature, kd_weight, reduction)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_official_reduction_is_one_over_num_classes_of_the_paper():
  s, t, y = random_batch(2, classes=7)
  paper = kdjax.losses.distillation_loss(s, t, y, temperature=3.0, kd_weight=1.0)
  official = kdjax.losses.distillation_loss(s, t, y, temperature=3.0, kd_weight=1.0,
                                            kl_reduction='elementwise_mean')
  np.testing.assert_allclose(official, paper / 7, rtol=1e-6)


def test_gradient_matches_finite_differences():
  s, t, y = random_batch(3, batch=3, classes=4, scale=1.0)
  f = lambda z: kdjax.losses.distillation_loss(z, t, y, temperature=2.5, kd_weight=0.7)
  grad = np.asarray(jax.grad(f)(s), np.float64)
  numeric = numeric_gradient(lambda z: np_distillation(z, t, y, 2.5, 0.7), s)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6)


def test_teacher_gets_no_gradient():
  s, t, y = random_batch(4)
  g = jax.grad(lambda tt: kdjax.losses.distillation_loss(s, tt, y, temperature=4.0,
                                                         kd_weight=0.9))(t)
  np.testing.assert_array_equal(g, np.zeros_like(t))


def test_high_temperature_limit_is_logit_matching():
  # Hinton et al. 2015, Sec. 2.1: as T → ∞, T²·KL → (1/2C)·Σ_c (Δ_c − mean Δ)², Δ = s − t.
  # In float64: in float32 the KL itself (~1e-7 at T = 1000) is below the rounding of its terms.
  s, t, y = random_batch(5, classes=6, scale=1.0)
  s, t = s.astype(np.float64), t.astype(np.float64)
  with jax.enable_x64(True):
    got = float(kdjax.losses.distillation_loss(s, t, y, temperature=1e4, kd_weight=1.0))
  delta = s - t
  delta -= delta.mean(-1, keepdims=True)
  want = (delta**2).sum(-1).mean() / (2 * s.shape[-1])
  np.testing.assert_allclose(got, want, rtol=1e-3)
  assert abs(got - want) / want > 1e-9  # a real limit approached, not an identity.


def test_identical_logits_give_zero_kl():
  s, _, y = random_batch(6)
  got = kdjax.losses.distillation_loss(s, s, y, temperature=4.0, kd_weight=1.0)
  np.testing.assert_allclose(got, 0.0, atol=1e-6)


def test_jit_and_vmap_agree_with_eager():
  s, t, y = random_batch(7)
  f = lambda a, b, c: kdjax.losses.distillation_loss(a, b, c, temperature=3.0, kd_weight=0.5)
  eager = f(s, t, y)
  np.testing.assert_allclose(jax.jit(f)(s, t, y), eager, rtol=1e-6)
  stacked = jax.vmap(f)(np.stack([s, s]), np.stack([t, t]), np.stack([y, y]))
  np.testing.assert_allclose(stacked, [eager, eager], rtol=1e-6)


def test_saturated_teacher_is_finite():
  s, t, y = random_batch(8)
  t = t * 1e4  # probabilities underflow to exactly zero.
  got = kdjax.losses.distillation_loss(s, t, y, temperature=1.0, kd_weight=0.9)
  assert np.isfinite(got)


@pytest.mark.parametrize('make_args,match', [
    (lambda s, t, y: (s[0], t, y), 'student_logits'),
    (lambda s, t, y: (s, t[:, :3], y), 'teacher_logits'),
    (lambda s, t, y: (s, t, y[:2]), 'batch size'),
    (lambda s, t, y: (s.astype(np.int32), t, y), 'floating'),
    (lambda s, t, y: (s, t, y.astype(np.float32)), 'integer'),
])
def test_bad_shapes_name_the_argument(make_args, match):
  s, t, y = random_batch(9)
  with pytest.raises(AssertionError, match=match):
    kdjax.losses.distillation_loss(*make_args(s, t, y), temperature=2.0, kd_weight=0.5)


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature=0.0, kd_weight=0.5), 'temperature'),
    (dict(temperature=-1.0, kd_weight=0.5), 'temperature'),
    (dict(temperature=2.0, kd_weight=1.5), 'kd_weight'),
    (dict(temperature=2.0, kd_weight=-0.1), 'kd_weight'),
    (dict(temperature=2.0, kd_weight=0.5, kl_reduction='sum'), 'kl_reduction'),
])
def test_bad_hyperparameters_are_refused(kwargs, match):
  s, t, y = random_batch(10)
  with pytest.raises(kdjax.KdjaxError, match=match):
    kdjax.losses.distillation_loss(s, t, y, **kwargs)


logits_strategy = hnp.arrays(np.float32, (4, 5),
                             elements=st.floats(-30, 30, width=32, allow_nan=False))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(s=logits_strategy, t=logits_strategy,
                  temperature=st.floats(0.5, 50), y=hnp.arrays(np.int32, 4,
                                                               elements=st.integers(0, 4)))
def test_properties_over_the_input_space(s, t, y, temperature):
  # KL ≥ 0; kd_weight = 0 is exactly cross-entropy; the value matches numpy.
  kl_only = kdjax.losses.distillation_loss(s, t, y, temperature=temperature, kd_weight=1.0)
  assert kl_only >= -1e-5
  ce_only = kdjax.losses.distillation_loss(s, t, y, temperature=temperature, kd_weight=0.0)
  np.testing.assert_allclose(ce_only, np.mean(kdjax.losses.cross_entropy(s, y)), rtol=1e-6)
  np.testing.assert_allclose(kl_only, np_distillation(s, t, y, temperature, 1.0),
                             rtol=1e-4, atol=1e-4)


def test_softened_kl_matches_numpy_per_example():
  s, t, y = random_batch(11)
  T = 3.0
  p_t = np.exp(np_log_softmax(t.astype(np.float64) / T))
  want = (p_t * (np.log(p_t) - np_log_softmax(s.astype(np.float64) / T))).sum(-1)
  got = kdjax.losses.softened_kl(s, t, temperature=T)
  assert got.shape == (len(y),)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  with pytest.raises(kdjax.KdjaxError, match='temperature'):
    kdjax.losses.softened_kl(s, t, temperature=0.0)


def test_per_example_helpers_average_to_the_scalar_losses():
  # The per-example forms the stage losses use; their batch means are the scalar functions.
  s, t, y = random_batch(12, classes=8)
  L = kdjax.losses
  np.testing.assert_allclose(np.mean(L.tolerant_cross_entropy(s, y, eta=0.6, k=3)),
                             L.tolerant_teacher_loss(s, y, eta=0.6, k=3), rtol=1e-6)
  np.testing.assert_allclose(np.mean(L.logit_l2_per_example(s, t)), L.logit_l2_loss(s, t),
                             rtol=1e-6)
  exits = np.stack([s, t, s - t])
  mixing = L.primary_mixing(3, 0.5)
  np.testing.assert_allclose(
      np.mean(L.distill_exits_per_example(exits, exits[::-1], mixing, y, temperature=2.0,
                                          kd_weight=0.4)),
      L.distill_exits(exits, exits[::-1], mixing, y, temperature=2.0, kd_weight=0.4), rtol=1e-6)
