# %% [markdown]
# # Composing kdjax losses in your own train step
#
# kdjax's losses are plain functions on arrays, so a train step of your own can mix them freely.
# This example, in notebook cells (`# %%`), distils a plain CNN-2 student from a plain CNN-4
# teacher on the embedded digits with a loss built by hand from three kdjax pieces:
# Hinton KD from a *noisy* teacher, plus a tolerant (TSD) term. Run it with
#
#   python experiments/compose_losses.py
#
# `tests/example_test.py` executes it. The notebook experiments/notebooks/compose_losses.ipynb
# composes such a loss on bare arrays, checks its gradient, and runs a chain with kdjax's runner.

# %%
import functools

import jax
import jax.numpy as jnp
import optax

import kdjax
from kdjax import data, models

# %% Data and models: everything comes from kdjax by name; the training set stays on device.
digits = data.load('digits')
mean, std = data.channel_stats(digits.x_train)
x_train = data.normalize(jnp.asarray(digits.x_train), mean, std)
x_test = data.normalize(jnp.asarray(digits.x_test), mean, std)
y_train, y_test = jnp.asarray(digits.y_train), jnp.asarray(digits.y_test)

teacher = models.get_model('plain_cnn_4', digits.num_classes)
student = models.get_model('plain_cnn_2', digits.num_classes)
teacher_vars = models.init_variables(teacher, digits.image_shape, jax.random.key(0))
student_vars = models.init_variables(student, digits.image_shape, jax.random.key(1))


# %% A plain cross-entropy step, to give the teacher something to teach.
def ce_step(variables, opt_state, tx, model, x, y):
  def loss_fn(params):
    logits, updates = model.apply({**variables, 'params': params}, x, train=True,
                                  mutable=['batch_stats'])
    return jnp.mean(kdjax.losses.cross_entropy(logits, y)), updates
  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables['params'])
  step, opt_state = tx.update(grads, opt_state, variables['params'])
  return {'params': optax.apply_updates(variables['params'], step), **updates}, opt_state, loss


# %% The composed distillation step: noisy teacher logits → KD, plus a small tolerance term.
def kd_step(student_vars, opt_state, tx, teacher_vars, x, y, key):
  teacher_logits = teacher.apply(teacher_vars, x, train=False)      # no gradient is taken here
  noisy_logits = kdjax.losses.perturb_logits(key, teacher_logits, alpha=0.5, sigma=0.2)

  def loss_fn(params):
    logits, updates = student.apply({**student_vars, 'params': params}, x, train=True,
                                    mutable=['batch_stats'])
    kd = kdjax.losses.distillation_loss(logits, noisy_logits, y, temperature=4.0, kd_weight=0.9)
    tsd = jnp.mean(kdjax.losses.top_score_difference(logits, y, k=3))
    return kd + 0.1 * tsd, updates

  (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(student_vars['params'])
  step, opt_state = tx.update(grads, opt_state, student_vars['params'])
  return {'params': optax.apply_updates(student_vars['params'], step), **updates}, opt_state, loss


def accuracy(model, variables, x, y):
  return float(jnp.mean(jnp.argmax(model.apply(variables, x, train=False), -1) == y))


# %% Train: the teacher first, then the student; batches of 64 in a fixed shuffled order.
def main(steps: int = 300, batch: int = 64):
  tx = optax.sgd(0.05, momentum=0.9)
  global teacher_vars, student_vars
  train_teacher = jax.jit(functools.partial(ce_step, tx=tx, model=teacher))
  train_student = jax.jit(functools.partial(kd_step, tx=tx))
  order = jax.random.permutation(jax.random.key(2), len(y_train))
  batches = lambda i: order[(i * batch) % (len(order) - batch):][:batch]

  opt_state = tx.init(teacher_vars['params'])
  for i in range(steps):
    idx = batches(i)
    teacher_vars, opt_state, _ = train_teacher(teacher_vars, opt_state, x=x_train[idx],
                                               y=y_train[idx])
  opt_state = tx.init(student_vars['params'])
  losses = []
  for i in range(steps):
    idx = batches(i)
    student_vars, opt_state, loss = train_student(student_vars, opt_state,
                                                  teacher_vars=teacher_vars, x=x_train[idx],
                                                  y=y_train[idx], key=jax.random.key(i))
    losses.append(float(loss))
  result = {'teacher_accuracy': accuracy(teacher, teacher_vars, x_test, y_test),
            'student_accuracy': accuracy(student, student_vars, x_test, y_test),
            'first_loss': losses[0], 'last_loss': losses[-1]}
  print(result)
  return result


if __name__ == '__main__':
  main()
