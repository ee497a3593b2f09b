# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Composing kdjax losses, then running a chain
#
# kdjax's losses are plain functions on arrays. This notebook builds a *tolerant* distillation
# loss by hand from two of them, checks its gradient, shows that it is the loss kdjax trains a
# `kd` stage with when `eta < 1`, and then runs a short teacher → student chain with
# `kdjax.experiment.run`, with its results table and test-accuracy curves.
# (`experiments/compose_losses.py` puts such a loss into a train step of your own.)
#
# One source, two files: this notebook and its `# %%` twin `compose_losses.py` beside it. Edit
# either, then `jupytext --sync experiments/notebooks/compose_losses.py`; commit the notebook
# without outputs. `tests/notebook_test.py` executes it.

# %%
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import ml_collections
import numpy as np

import kdjax
from kdjax import experiment, workdir as workdirs

# `experiments.*` lives in the repository, not in the installed package: make it importable
# from wherever the kernel started (the repository root, or this notebook's folder).
REPO = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents]
            if (p / 'experiments' / 'configs').is_dir())
sys.path.insert(0, str(REPO))
from experiments.configs import takd_default

# %% [markdown]
# ## A tolerant distillation loss, on arrays
#
# Hinton distillation (TAKD Eq. 2) with a tolerant label term (Yang et al. 2018):
# `(1 − λ)·[η·CE + (1 − η)·TSD] + λ·T²·KL(softmax(t/T) ‖ softmax(s/T))`, batch mean.
# `distillation_loss` with `kd_weight=1` is the `T²·KL` term alone.

# %%
def tolerant_kd_loss(student_logits, teacher_logits, labels, *, temperature=4.0, kd_weight=0.9,
                     eta=0.8, k=5):
  label_term = kdjax.losses.tolerant_teacher_loss(student_logits, labels, eta=eta, k=k)
  soft_term = kdjax.losses.distillation_loss(student_logits, teacher_logits, labels,
                                             temperature=temperature, kd_weight=1.0)
  return (1.0 - kd_weight) * label_term + kd_weight * soft_term


key_student, key_teacher, key_labels = jax.random.split(jax.random.key(0), 3)
student_logits = 2.0 * jax.random.normal(key_student, (16, 10))  # [B, C]
teacher_logits = 3.0 * jax.random.normal(key_teacher, (16, 10))
labels = jax.random.randint(key_labels, (16,), 0, 10)             # [B]

loss, grad = jax.value_and_grad(tolerant_kd_loss)(student_logits, teacher_logits, labels)
# The same loss, by name, as a `kd` stage trains with it (per-example values; we take the mean).
stage_loss = kdjax.stage_losses.get_loss('kd', {'temperature': 4.0, 'kd_weight': 0.9, 'eta': 0.8},
                                         num_classes=10)
by_name = jnp.mean(stage_loss(student_logits, teacher_logits, labels))
print(f'composed loss {float(loss):.6f}, stage loss kd(eta=0.8) {float(by_name):.6f}')
np.testing.assert_allclose(loss, by_name, rtol=1e-6)

# %% [markdown]
# ## Checking the gradient
#
# With `η = 1` the gradient with respect to the student's logits is known in closed form:
# `[(1 − λ)·(softmax(s) − onehot(y)) + λ·T·(softmax(s/T) − softmax(t/T))] / B` (the `T²` of the
# loss and the `1/T` of the softened softmax leave one `T`). With `η < 1` a central finite
# difference along a random direction checks it. The teacher gets no gradient (`stop_gradient`).

# %%
T, lam, batch = 4.0, 0.9, labels.shape[0]
strict_grad = jax.grad(tolerant_kd_loss)(student_logits, teacher_logits, labels, eta=1.0)
closed_form = ((1 - lam) * (jax.nn.softmax(student_logits) - jax.nn.one_hot(labels, 10))
               + lam * T * (jax.nn.softmax(student_logits / T)
                            - jax.nn.softmax(teacher_logits / T))) / batch
np.testing.assert_allclose(strict_grad, closed_form, atol=1e-6)

direction = jax.random.normal(jax.random.key(1), student_logits.shape)
eps = 1e-2
at = lambda s: tolerant_kd_loss(s, teacher_logits, labels)
finite_difference = (at(student_logits + eps * direction)
                     - at(student_logits - eps * direction)) / (2 * eps)
np.testing.assert_allclose(jnp.vdot(grad, direction), finite_difference, rtol=1e-2)

teacher_grad = jax.grad(tolerant_kd_loss, argnums=1)(student_logits, teacher_logits, labels)
assert not jnp.any(teacher_grad)
print('gradient: closed form and finite differences agree; the teacher gets none')

# %% [markdown]
# ## A chain, from Python
#
# The default TAKD config trimmed to two stages on the embedded 8×8 digits: a plain CNN-4
# teacher trained with cross-entropy, then a plain CNN-2 student distilled from it with the
# loss above (`kd`, `eta=0.8`), 3 epochs each. The run lives in a temporary folder that is
# deleted when the kernel stops; point `workdir` elsewhere to keep it (and to look at it with
# `tensorboard --logdir` that folder).

# %%
config = takd_default.get_config()
config.train.epochs = 3
config.stages = ml_collections.ConfigDict()
config.stages.teacher = takd_default.stage('plain_cnn_4')
config.stages.student = takd_default.stage('plain_cnn_2', 'kd', teacher='teacher', eta=0.8)
config.stage_order = ('teacher', 'student')
config.progress_bar = False
config.compilation_cache_dir = ''  # the persistent XLA cache is the command line's business.

scratch = tempfile.TemporaryDirectory(prefix='kdjax_notebook_')
workdir = os.path.join(scratch.name, 'run')
rows = experiment.run(config, workdir)

# %% [markdown]
# The run printed its results table as it ended; here is `results.md`, rendered (`results.json`
# holds the same rows, `rows` above the `StageResult`s):

# %%
from IPython.display import Markdown

Markdown(pathlib.Path(workdir, 'results.md').read_text())

# %% [markdown]
# Each stage's test accuracy per epoch, from its `metrics.jsonl`:

# %%
# %matplotlib inline
fig, ax = plt.subplots(figsize=(5, 3))
for name in config.stage_order:
  history = workdirs.read_metrics(workdirs.metrics_path(workdir, name))
  ax.plot([m['epoch'] for m in history], [100 * m['test_accuracy'] for m in history],
          marker='o', label=name)
ax.set_xlabel('epoch')
ax.set_ylabel('test accuracy (%)')
ax.set_xticks(range(1, config.train.epochs + 1))
ax.legend()
plt.show()
