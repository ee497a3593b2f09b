"""Optimiser and schedules against hand-written references; the train step's teacher handling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs import takd_default
from kdjax import models
from kdjax import stage_losses
from kdjax import teachers
from kdjax import train


def train_config(**overrides):
  config = takd_default.get_config().train
  config.update(overrides)
  return config


@pytest.mark.parametrize('nesterov', [False, True])
def test_optimizer_is_pytorch_sgd(nesterov):
  # torch.optim.SGD: g += wd·w; b = μ·b + g; step = g + μ·b if nesterov else b; w -= lr·step.
  config = train_config(momentum=0.9, weight_decay=0.01, nesterov=nesterov)
  tx = train.make_optimizer(config, lambda step: 0.1)
  w = np.array([1.0, -2.0, 0.5])
  params = jnp.asarray(w, jnp.float32)
  opt_state = tx.init(params)
  buf = np.zeros(3)
  for i in range(4):
    g = np.array([0.3, -0.1, 0.2]) * (i + 1)
    updates, opt_state = tx.update(jnp.asarray(g, jnp.float32), opt_state, params)
    params = params + updates
    g = g + 0.01 * w
    buf = 0.9 * buf + g
    w = w - 0.1 * (g + 0.9 * buf if nesterov else buf)
  np.testing.assert_allclose(params, w, rtol=1e-5)


def test_step_schedule_divides_by_ten_at_half_and_three_quarters():
  schedule = train.learning_rate_schedule(train_config(epochs=8, learning_rate=0.1), 10,
                                          'resnet8')
  lrs = [float(schedule(s)) for s in (0, 39, 40, 59, 60, 79)]
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)


@pytest.mark.parametrize('epochs, expected', [
    (3, [0.1, 0.1, 0.001, 0.001]),  # 1.5 and 2.25 both round to epoch 2: both decays there.
    (5, [0.1, 0.1, 0.01, 0.001]),   # round(2.5) = 2, round(3.75) = 4.
])
def test_step_schedule_rounds_boundaries_to_epochs_and_keeps_every_decay(epochs, expected):
  schedule = train.learning_rate_schedule(train_config(epochs=epochs, learning_rate=0.1), 10,
                                          'resnet8')
  steps = (0, 19, 20, 10 * epochs - 1) if epochs == 3 else (0, 19, 20, 40)
  np.testing.assert_allclose([float(schedule(s)) for s in steps], expected, rtol=1e-6)


def test_takd_official_schedule_reproduces_the_code():
  config = train_config(epochs=8, learning_rate=0.1, lr_schedule='takd_official')
  resnet = train.learning_rate_schedule(config, 10, 'resnet8')
  plain = train.learning_rate_schedule(config, 10, 'plain_cnn_2')
  np.testing.assert_allclose([float(resnet(s)) for s in (0, 59, 60)], [0.01, 0.01, 0.001],
                             rtol=1e-6)
  np.testing.assert_allclose([float(plain(s)) for s in (0, 79)], [0.01, 0.01], rtol=1e-6)


def make_step(loss='kd'):
  student = models.get_model('plain_cnn_2', 3)
  stage_loss = stage_losses.get_loss(loss, {'temperature': 4.0, 'kd_weight': 0.9}
                                     if loss == 'kd' else {})
  augment = takd_default.get_config().data.augment
  norm = train.Normalization(jnp.full((1,), 0.5), jnp.full((1,), 0.25))
  step = train.make_train_step(student, stage_loss, augment, norm)
  variables = models.init_variables(student, (8, 8, 1), jax.random.key(1))
  state = train.create_train_state(student, variables,
                                   train.make_optimizer(train_config(), lambda s: 0.05))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
  labels = (images.mean((1, 2, 3)) > 127).astype(np.int32)
  return step, state, train.DeviceData(jnp.asarray(images), jnp.asarray(labels))


def test_train_step_learns_and_leaves_the_teacher_alone():
  teacher = models.get_model('plain_cnn_2', 3)
  teacher_variables = models.init_variables(teacher, (8, 8, 1), jax.random.key(2))
  before = jax.tree_util.tree_map(np.array, teacher_variables)
  step, state, batch = make_step()
  indices = jnp.arange(16)
  losses = []
  for _ in range(15):
    state, metrics = step(state, teachers.LiveTeacher(teacher_variables, teacher), batch, indices,
                          jax.random.key(0))
    losses.append(float(metrics['loss']))
  assert losses[-1] < losses[0]
  jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                         jax.tree_util.tree_map(np.array, teacher_variables))
  assert int(state.step) == 15


def test_teacher_forward_builds_no_gradient():
  # The jaxpr of the step has exactly one transpose (backward) of the student's convolutions,
  # none of the teacher's: count conv ops with the teacher's 8-pixel input and 16 channels.
  teacher = models.get_model('plain_cnn_4', 3)
  teacher_variables = models.init_variables(teacher, (8, 8, 1), jax.random.key(2))
  step, state, batch = make_step()
  jaxpr = str(jax.make_jaxpr(step.__wrapped__ if hasattr(step, '__wrapped__') else step)(
      state, teachers.LiveTeacher(teacher_variables, teacher), batch, jnp.arange(16),
      jax.random.key(0)))
  forward_only = str(jax.make_jaxpr(lambda v, x: teacher.apply(v, x, train=False))(
      teacher_variables, jnp.zeros((16, 8, 8, 1))))
  student_only, _, _ = make_step(loss='ce')
  student_jaxpr = str(jax.make_jaxpr(student_only)(state, teachers.NoTeacher(), batch,
                                                     jnp.arange(16), jax.random.key(0)))
  count = lambda text: text.count('conv_general_dilated[')
  assert count(forward_only) == 4 and count(student_jaxpr) > 4
  assert count(jaxpr) == count(student_jaxpr) + count(forward_only)


def stage_loss_mean(name, student_logits, teacher_logits, labels, key, **settings):
  """A stage loss reduced as the train step reduces it: the mean of its per-example values."""
  loss = stage_losses.get_loss(name, settings)
  return jnp.mean(loss(student_logits, teacher_logits, labels, key))


def test_stage_losses_compose_the_public_losses():
  from kdjax import losses
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 8, 10)).astype(np.float32)
  y = rng.integers(0, 10, 8).astype(np.int32)
  key = jax.random.key(0)
  ce = float(np.mean(losses.cross_entropy(s, y)))
  tolerant = float(losses.tolerant_teacher_loss(s, y, eta=0.6))
  kl_t1 = float(losses.distillation_loss(s, t, y, temperature=1.0, kd_weight=1.0))
  np.testing.assert_allclose(stage_loss_mean('ce', s, None, y, key), ce, rtol=1e-6)
  np.testing.assert_allclose(stage_loss_mean('ce', s, None, y, key, eta=0.6), tolerant,
                             rtol=1e-6)
  # A tolerant generation: (1 − λ)·(η·CE + (1 − η)·TSD) + λ·KL at T = 1.
  got = stage_loss_mean('kd', s, t, y, key, eta=0.6, kd_weight=0.6, temperature=1.0)
  np.testing.assert_allclose(got, 0.4 * tolerant + 0.6 * kl_t1, rtol=1e-5)
  # Noisy teacher with α = 0 is plain logit regression; with a CE weight it mixes in CE.
  l2 = float(np.mean(0.5 * ((s - t)**2).sum(-1)))
  np.testing.assert_allclose(stage_loss_mean('noisy_l2', s, t, y, key), l2, rtol=1e-6)
  np.testing.assert_allclose(stage_loss_mean('noisy_l2', s, t, y, key, noise_ce_weight=0.25),
                             0.75 * l2 + 0.25 * ce, rtol=1e-6)
  noisy = dict(noise_alpha=1.0, noise_sigma=0.5)
  assert abs(float(stage_loss_mean('noisy_l2', s, t, y, key, **noisy)) - l2) > 1e-3  # applied.
  # The same noise on the student: ½‖f·z_s − z_t‖² with the factors f the teacher would have got
  # from this key; its gradient is f·(f·z_s − z_t) / B.
  factors = np.asarray(losses.perturb_logits(key, t, alpha=1.0, sigma=0.5)) / t
  on_student = dict(noise_alpha=1.0, noise_sigma=0.5, noise_on='student')
  np.testing.assert_allclose(stage_loss_mean('noisy_l2', s, t, y, key, **on_student),
                             np.mean(0.5 * ((factors * s - t)**2).sum(-1)), rtol=1e-5)
  grad = jax.grad(lambda z: stage_loss_mean('noisy_l2', z, t, y, key, **on_student))(
      jnp.asarray(s))
  np.testing.assert_allclose(grad, factors * (factors * s - t) / len(s), rtol=1e-4, atol=1e-6)


def test_evaluate_matches_numpy_over_a_padded_last_batch():
  _, state, data = make_step(loss='ce')
  norm = train.Normalization(jnp.full((1,), 0.5), jnp.full((1,), 0.25))
  got = train.evaluate(train.make_eval_step(norm), state, data, batch_size=6)  # 16 = 6 + 6 + 4.
  images = (np.asarray(data.images, np.float32) / 255.0 - 0.5) / 0.25
  logits = np.asarray(state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                                     images, train=False), np.float64)
  labels = np.asarray(data.labels)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  probs = np.exp(log_probs)
  np.testing.assert_allclose(got['test_accuracy'], np.mean(logits.argmax(-1) == labels))
  np.testing.assert_allclose(got['test_loss'], -log_probs[np.arange(16), labels].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(got['test_nontrue_mass'], 1 - probs[np.arange(16), labels].mean(),
                             rtol=1e-5)
  np.testing.assert_allclose(got['test_entropy'], -(probs * log_probs).sum(-1).mean(), rtol=1e-5)


def test_top5_accuracy_above_ten_classes_matches_numpy():
  # 20 classes: the true class among the five highest logits (numpy's argsort as reference);
  # 10 classes (CIFAR-10, digits): no top-5 at all.
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (37, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 20, 37).astype(np.int32)
  norm = train.Normalization(jnp.full((1,), 0.5), jnp.full((1,), 0.25))
  data = train.DeviceData(jnp.asarray(images), jnp.asarray(labels))
  for classes in (20, 10):
    model = models.get_model('plain_cnn_2', classes)
    state = train.create_train_state(model, models.init_variables(model, (8, 8, 1),
                                                                  jax.random.key(4)),
                                     optax.sgd(0.1))
    got = train.evaluate(train.make_eval_step(norm), state, data, batch_size=8)  # 37 = 4·8 + 5.
    if classes == 10:
      assert 'test_top5_accuracy' not in got
      continue
    logits = np.asarray(state.apply_fn({'params': state.params, 'batch_stats': state.batch_stats},
                                       (images / 255.0 - 0.5) / 0.25, train=False))
    top5 = np.argsort(-logits, axis=-1)[:, :5]
    expected = np.mean([label in row for label, row in zip(labels, top5)])
    assert 0 < expected < 1  # the check can tell right from wrong.
    np.testing.assert_allclose(got['test_top5_accuracy'], expected)
    assert got['test_top5_accuracy'] >= got['test_accuracy']


def test_train_step_composes_inside_a_users_own_jit():
  # kdjax compiles its steps with CPU-only XLA options, which JAX allows only at the top level;
  # inside a user's jit (here: two steps in one lax.scan) the step must trace as a plain function.
  teacher = models.get_model('plain_cnn_2', 3)
  teacher_variables = models.init_variables(teacher, (8, 8, 1), jax.random.key(2))
  step, state, batch = make_step()
  source = teachers.LiveTeacher(teacher_variables, teacher)
  indices, key = jnp.arange(16), jax.random.key(0)
  copy = jax.tree_util.tree_map(jnp.array, state)  # the step donates its state.

  @jax.jit
  def two_steps(state):
    body = lambda s, _: (step(s, source, batch, indices, key)[0], None)
    return jax.lax.scan(body, state, None, length=2)[0]

  scanned = two_steps(copy)
  for _ in range(2):
    state, _ = step(state, source, batch, indices, key)
  for a, b in zip(jax.tree_util.tree_leaves(scanned.params),
                  jax.tree_util.tree_leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
