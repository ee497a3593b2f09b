"""Multi-exit self-distillation: losses against numpy, the model's exits, teachers and MACs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax

from conftest import numeric_gradient
from kdjax import losses
from kdjax.models import multi_exit


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), y].mean()


def np_kl(t, z, T):
  p = np.exp(np_log_softmax(t / T))
  return (p * (np_log_softmax(t / T) - np_log_softmax(z / T))).sum(-1).mean()


def np_exit_loss(exits, teachers, mixing, y, T, beta):
  total = 0.0
  for i, z in enumerate(exits):
    kd = sum(mixing[i][k] * np_kl(t, z, T) for k, t in enumerate(teachers))
    total += (1 - beta) * np_ce(z, y) + beta * T * T * kd
  return total


def data(seed=0, e=3, b=6, c=5):
  rng = np.random.default_rng(seed)
  exits = rng.normal(size=(e, b, c)) * 2
  teachers = rng.normal(size=(e, b, c)) * 2
  return exits.astype(np.float32), teachers.astype(np.float32), rng.integers(0, c, b).astype(
      np.int32)


def test_primary_mixing():
  m = np.asarray(losses.primary_mixing(4, 0.7))
  np.testing.assert_allclose(m.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.diag(m), 0.7, rtol=1e-6)
  np.testing.assert_allclose(m[0, 1:], 0.1, rtol=1e-6)
  with pytest.raises(kdjax.KdjaxError, match='primary_weight'):
    losses.primary_mixing(3, 0.0)


def test_mate_loss_matches_numpy():
  z, t, y = data(1)
  mixing = np.full((3, 3), 0.2) + np.eye(3) * 0.4  # primary 0.6, others 0.2 each.
  want = np_exit_loss(z.astype(np.float64), t.astype(np.float64), mixing, y, 3.0, 0.7)
  want += sum(np_ce(te.astype(np.float64), y) for te in t)
  got = losses.mate_loss(z, t, y, temperature=3.0, kd_weight=0.7, primary_weight=0.6)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_byot_and_exit_ensemble_match_numpy():
  z, _, y = data(2)
  z64 = z.astype(np.float64)
  want = np_exit_loss(z64, z64[-1:], np.ones((3, 1)), y, 2.0, 0.5)
  np.testing.assert_allclose(losses.byot_loss(z, y, temperature=2.0, kd_weight=0.5), want,
                             rtol=1e-5)
  want = np_exit_loss(z64, z64.mean(0, keepdims=True), np.ones((3, 1)), y, 2.0, 0.5)
  np.testing.assert_allclose(losses.exit_ensemble_loss(z, y, temperature=2.0, kd_weight=0.5),
                             want, rtol=1e-5)
  np.testing.assert_allclose(losses.exits_cross_entropy(z, y), sum(np_ce(e, y) for e in z64),
                             rtol=1e-5)


def test_teachers_get_only_their_cross_entropy_gradient():
  z, t, y = data(3)
  grad_t = jax.grad(lambda tt: losses.mate_loss(z, tt, y, temperature=3.0, kd_weight=0.9,
                                                primary_weight=0.5))(t)
  probs = np.exp(np_log_softmax(t.astype(np.float64)))
  onehot = np.eye(5)[y]
  np.testing.assert_allclose(grad_t, (probs - onehot[None]) / len(y), rtol=1e-4, atol=1e-7)
  # BYOT at β = 1: the deepest exit, distilling from itself, sits at the KL's minimum (zero
  # gradient up to rounding), while the shallower exits are pulled towards it.
  grad_z = jax.grad(lambda zz: losses.byot_loss(zz, y, temperature=3.0, kd_weight=1.0))(z)
  np.testing.assert_allclose(grad_z[-1], 0.0, atol=1e-7)
  assert np.abs(grad_z[0]).max() > 1e-3


def test_bad_exit_shapes_are_named():
  z, t, y = data(4)
  with pytest.raises(AssertionError, match='exit_logits'):
    losses.byot_loss(z[0], y, temperature=1.0, kd_weight=0.5)
  with pytest.raises(AssertionError, match='teacher_logits'):
    losses.mate_loss(z, t[:2], y, temperature=1.0, kd_weight=0.5, primary_weight=0.5)


@pytest.fixture(scope='module')
def resnet8():
  model = multi_exit.multi_exit_resnet(8, 10)
  variables = jax.jit(functools.partial(model.init, train=False))(
      jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  return model, variables


def test_model_exits_and_teachers(resnet8):
  model, variables = resnet8
  x = np.random.default_rng(5).normal(size=(4, 32, 32, 3)).astype(np.float32)
  exits, teachers = model.apply(variables, x, train=False)
  assert exits.shape == teachers.shape == (3, 4, 10)
  weights = jax.nn.softmax(variables['params']['ensemble_weights'], axis=-1)
  np.testing.assert_allclose(teachers, np.einsum('ej,jbc->ebc', weights, exits), rtol=1e-5,
                             atol=1e-5)
  assert np.argmax(weights, axis=1).tolist() == [0, 1, 2]  # each teacher leans to its exit.
  # The deepest exit with last_exit equals the full forward's deepest exit.
  only_last, _ = model.apply(variables, x, train=False, last_exit=2)
  np.testing.assert_allclose(only_last[0], exits[2], rtol=1e-5, atol=1e-5)


def test_exit_macs_by_hand(resnet8):
  model, variables = resnet8
  conv = lambda hw, cin, cout, k=3: hw * hw * k * k * cin * cout
  stem = conv(32, 3, 16)
  stage0 = 2 * conv(32, 16, 16)
  stage1 = conv(16, 16, 32) + conv(16, 32, 32)
  stage2 = conv(8, 32, 64) + conv(8, 64, 64)
  dense = 64 * 10
  head0 = conv(16, 16, 32) + conv(8, 32, 64) + dense  # two stride-2 convs down to 8×8×64.
  head1 = conv(8, 32, 64) + dense
  expected = [stem + stage0 + head0, stem + stage0 + stage1 + head1,
              stem + stage0 + stage1 + stage2 + dense]
  assert multi_exit.exit_macs(model, variables, (32, 32, 3)) == expected


def test_one_exit_mate_reduces_to_cross_entropy():
  # With E = 1 the teacher is the exit itself: the KL term vanishes, leaving (1 − β)·CE for the
  # exit plus the teacher's CE, and the exit's gradient is exactly (1 − β)·∇CE.
  z, _, y = data(6, e=1)
  ce = np_ce(z[0].astype(np.float64), y)
  f = lambda zz: losses.mate_loss(zz, zz, y, temperature=4.0, kd_weight=0.3, primary_weight=1.0)
  np.testing.assert_allclose(f(z), 0.7 * ce + ce, rtol=1e-5)
  exit_only = lambda zz: losses.mate_loss(zz, z, y, temperature=4.0, kd_weight=0.3,
                                          primary_weight=1.0)
  grad_ce = jax.grad(lambda zz: losses.exits_cross_entropy(zz, y))(z)
  np.testing.assert_allclose(jax.grad(exit_only)(z), 0.7 * grad_ce, rtol=1e-4, atol=1e-7)


def test_mate_gradient_matches_finite_differences():
  z, t, y = data(7, e=2, b=3, c=4)
  f = lambda zz: losses.mate_loss(zz, t, y, temperature=2.0, kd_weight=0.6, primary_weight=0.7)
  grad = np.asarray(jax.grad(f)(z), np.float64)
  mixing = np.array([[0.7, 0.3], [0.3, 0.7]])
  ref = lambda zz: np_exit_loss(zz, t.astype(np.float64), mixing, y, 2.0, 0.6)
  numeric = numeric_gradient(ref, z, eps=1e-5)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('kwargs,match', [
    (dict(temperature=0.0, kd_weight=0.5, primary_weight=0.5), 'temperature'),
    (dict(temperature=1.0, kd_weight=1.5, primary_weight=0.5), 'kd_weight'),
    (dict(temperature=1.0, kd_weight=0.5, primary_weight=1.5), 'primary_weight'),
    (dict(temperature=1.0, kd_weight=0.5, primary_weight=0.0), 'primary_weight'),
])
def test_mate_bad_values(kwargs, match):
  z, t, y = data(8)
  with pytest.raises(kdjax.KdjaxError, match=match):
    losses.mate_loss(z, t, y, **kwargs)
