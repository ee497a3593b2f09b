"""Tolerant-teacher (TSD) and noisy-teacher losses against independent numpy references."""

import jax
import numpy as np
import pytest

import kdjax

from conftest import numeric_gradient
from kdjax import losses


def np_softmax(z):
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_tsd(logits, labels, k, scores):
  s = np_softmax(logits.astype(np.float64)) if scores == 'softmax' else logits.astype(np.float64)
  out = []
  for row, label in zip(s, labels):
    others = sorted((v for c, v in enumerate(row) if c != label), reverse=True)[:k - 1]
    out.append(row[label] - np.mean(others))
  return np.array(out)


def batch(seed, b=7, c=10):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(b, c)) * 2).astype(np.float32), rng.integers(0, c, b).astype(np.int32)


@pytest.mark.parametrize('k', [2, 5, 9])
@pytest.mark.parametrize('scores', ['softmax', 'logits'])
def test_tsd_matches_numpy(k, scores):
  z, y = batch(0)
  np.testing.assert_allclose(losses.top_score_difference(z, y, k=k, scores=scores),
                             np_tsd(z, y, k, scores), rtol=1e-5, atol=1e-6)


def test_tsd_of_a_one_hot_softmax_is_one():
  z = np.full((3, 5), -1e4, np.float32)
  y = np.array([0, 3, 4], np.int32)
  z[np.arange(3), y] = 1e4
  np.testing.assert_allclose(losses.top_score_difference(z, y, k=4), 1.0, atol=1e-6)


def test_tolerant_loss_interpolates_ce_and_tsd():
  z, y = batch(1)
  ce = -np.log(np_softmax(z.astype(np.float64))[np.arange(len(y)), y])
  tsd = np_tsd(z, y, 5, 'softmax')
  for eta in (1.0, 0.6, 0.0):
    np.testing.assert_allclose(losses.tolerant_teacher_loss(z, y, eta=eta),
                               np.mean(eta * ce + (1 - eta) * tsd), rtol=1e-5)


def test_tsd_gradient_matches_finite_differences():
  z, y = batch(2, b=2, c=6)
  f = lambda x: losses.tolerant_teacher_loss(x, y, eta=0.6, k=3)
  grad = np.asarray(jax.grad(f)(z), np.float64)
  ref = lambda x: np.mean(0.6 * -np.log(np_softmax(x)[np.arange(2), y]) +
                          0.4 * np_tsd(x, y, 3, 'softmax'))
  numeric = numeric_gradient(ref, z, eps=1e-5)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-6)


def test_minimising_tsd_spreads_mass_to_secondary_classes():
  z, y = batch(3)
  nontrue = lambda x: 1 - np_softmax(np.asarray(x, np.float64))[np.arange(len(y)), y].mean()
  step = jax.jit(jax.grad(lambda x: losses.tolerant_teacher_loss(x, y, eta=0.0)))
  x = z
  for _ in range(50):
    x = x - 1.0 * step(x)
  assert nontrue(x) > nontrue(z)


@pytest.mark.parametrize('kwargs,match', [
    (dict(k=1), 'k must satisfy'), (dict(k=10), 'k must satisfy'), (dict(scores='probs'), 'scores')])
def test_tsd_bad_arguments(kwargs, match):
  z, y = batch(4)
  with pytest.raises(kdjax.KdjaxError, match=match):
    losses.top_score_difference(z, y, **kwargs)


def test_tolerant_loss_refuses_eta_outside_unit_interval():
  z, y = batch(5)
  with pytest.raises(kdjax.KdjaxError, match='eta'):
    losses.tolerant_teacher_loss(z, y, eta=1.2)


def test_perturb_logits_statistics():
  rng = np.random.default_rng(6)
  z = (rng.normal(size=(20000, 4)) + 3).astype(np.float32)  # away from zero: ratios are stable.
  out = np.asarray(losses.perturb_logits(jax.random.key(0), z, alpha=0.3, sigma=0.5))
  changed = ~np.all(out == z, axis=-1)
  assert abs(changed.mean() - 0.3) < 0.015                 # per-example coin, probability α…
  assert np.all(np.all(out != z, axis=-1) == changed)      # …and the whole row or none of it.
  xi = out[changed] / z[changed] - 1
  assert abs(xi.mean()) < 0.01 and abs(xi.std() - 0.5) < 0.01  # ξ ~ N(0, σ²) elementwise.
  assert abs(np.corrcoef(xi[:, 0], xi[:, 1])[0, 1]) < 0.03     # independent per logit.


def test_perturb_logits_limits_and_determinism():
  z, _ = batch(7)
  np.testing.assert_array_equal(losses.perturb_logits(jax.random.key(1), z, alpha=0.0, sigma=1.0), z)
  np.testing.assert_array_equal(losses.perturb_logits(jax.random.key(1), z, alpha=1.0, sigma=0.0), z)
  a = losses.perturb_logits(jax.random.key(2), z, alpha=1.0, sigma=1.0)
  b = losses.perturb_logits(jax.random.key(2), z, alpha=1.0, sigma=1.0)
  c = losses.perturb_logits(jax.random.key(3), z, alpha=1.0, sigma=1.0)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, z)


def test_perturb_logits_bad_arguments():
  z, _ = batch(8)
  with pytest.raises(kdjax.KdjaxError, match='alpha'):
    losses.perturb_logits(jax.random.key(0), z, alpha=1.5, sigma=0.1)
  with pytest.raises(kdjax.KdjaxError, match='sigma'):
    losses.perturb_logits(jax.random.key(0), z, alpha=0.5, sigma=-0.1)


def test_logit_l2_matches_numpy_and_its_gradient():
  s, _ = batch(9)
  t, _ = batch(10)
  np.testing.assert_allclose(losses.logit_l2_loss(s, t),
                             np.mean(0.5 * ((s - t).astype(np.float64)**2).sum(-1)), rtol=1e-6)
  grad_s, grad_t = jax.grad(losses.logit_l2_loss, argnums=(0, 1))(s, t)
  np.testing.assert_allclose(grad_s, (s - t) / len(s), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(grad_t, np.zeros_like(t))  # the target is never trained.


def test_logit_l2_shape_mismatch_names_arguments():
  s, _ = batch(11)
  with pytest.raises(AssertionError, match='target_logits'):
    losses.logit_l2_loss(s, s[:, :4])


def test_logit_l2_gradient_matches_finite_differences():
  s, _ = batch(12, b=3, c=4)
  t, _ = batch(13, b=3, c=4)
  grad = np.asarray(jax.grad(losses.logit_l2_loss)(s, t), np.float64)
  ref = lambda x: np.mean(0.5 * ((x - t.astype(np.float64))**2).sum(-1))
  numeric = numeric_gradient(ref, s, eps=1e-5)
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-7)


def test_tolerant_loss_with_eta_one_is_cross_entropy():
  z, y = batch(14)
  np.testing.assert_allclose(losses.tolerant_teacher_loss(z, y, eta=1.0),
                             np.mean(losses.cross_entropy(z, y)), rtol=1e-6)
