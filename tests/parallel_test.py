"""Data parallelism on 8 simulated CPU devices: the same training as one device, B/8 rows each.

The device count is fixed when JAX starts, so these run in a subprocess started with
`XLA_FLAGS=--xla_force_host_platform_device_count=8`.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, run_cli

EIGHT_DEVICES = '--xla_force_host_platform_device_count=8'

# Trains the same student from the same state for 6 steps on a 1-device mesh and on an 8-device
# mesh (with and without 3 vmapped replicas), and prints what the test compares.
SCRIPT = r'''
import json
import jax, jax.numpy as jnp, numpy as np
from experiments.configs import takd_default
from kdjax import models, parallel, stage_losses, teachers, train

assert jax.device_count() == 8, jax.devices()
BATCH, STEPS = 32, 6
config = takd_default.get_config()
loss = stage_losses.get_loss('kd', dict(config.losses.kd))
augment = config.data.augment
augment.enabled, augment.crop_padding = True, 1  # crops and flips inside the sharded step.
norm = train.Normalization(jnp.full((1,), 0.4), jnp.full((1,), 0.3))
student, teacher = models.get_model('plain_cnn_2', 10), models.get_model('plain_cnn_4', 10)
teacher_source = teachers.LiveTeacher(
    models.init_variables(teacher, (8, 8, 1), jax.random.key(7)), teacher)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (96, 8, 8, 1), dtype=np.uint8)
labels = rng.integers(0, 10, 96).astype(np.int32)
tx = train.make_optimizer(config.train, lambda step: 0.05)

def run(devices, replicas):
  mesh = parallel.make_mesh(jax.devices()[:devices])
  keys = jax.random.key(1) if not replicas else jnp.stack(
      [jax.random.key(1 + r) for r in range(replicas)])
  make_state = lambda v: train.create_train_state(student, v, tx)
  state = (jax.vmap(make_state) if replicas else make_state)(
      models.init_variables(student, (8, 8, 1), keys))
  state = parallel.put_replicated(state, mesh)
  data = parallel.put_replicated(train.DeviceData(jnp.asarray(images), jnp.asarray(labels)), mesh)
  step = train.make_train_step(student, loss, augment, norm, num_replicas=replicas or None,
                               mesh=mesh)
  indices = jax.device_put(np.arange(BATCH), parallel.batch_sharded(mesh))
  compiled = step.lower(state, teacher_source, data, indices, keys).compile()
  losses = []
  for i in range(STEPS):
    indices = jax.device_put(rng_steps[i], parallel.batch_sharded(mesh))
    state, metrics = compiled(state, teacher_source, data, indices, keys)
    losses.append(np.asarray(metrics['loss']).tolist())
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(
      (state.params, state.batch_stats, state.opt_state))]
  return dict(leaves=leaves, losses=losses, hlo=compiled.as_text(),
              rows_per_device=sorted({s.data.shape[0] for s in indices.addressable_shards}),
              index_devices=len(indices.addressable_shards))

rng_steps = [np.random.default_rng(10 + i).permutation(96)[:BATCH] for i in range(STEPS)]
report = {}
for replicas in (0, 3):
  one, eight = run(1, replicas), run(8, replicas)
  report[replicas] = dict(
      max_abs_diff=max(float(np.max(np.abs(a - b))) for a, b in zip(one['leaves'], eight['leaves'])),
      max_abs_value=max(float(np.max(np.abs(a))) for a in one['leaves']),
      losses_one=one['losses'], losses_eight=eight['losses'],
      rows_per_device=eight['rows_per_device'], index_devices=eight['index_devices'],
      # The per-device program normalises [B/8, 8, 8, 1] images; the 1-device one [B, 8, 8, 1].
      eight_has_shard_shape='f32[4,8,8,1]' in eight['hlo'],
      eight_has_global_shape='f32[32,8,8,1]' in eight['hlo'],
      one_has_global_shape='f32[32,8,8,1]' in one['hlo'])
print('REPORT' + json.dumps(report))
'''


@pytest.fixture(scope='module')
def eight_device_report():
  env = dict(os.environ, XLA_FLAGS=EIGHT_DEVICES, PYTHONPATH=REPO)
  done = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  line = [l for l in done.stdout.splitlines() if l.startswith('REPORT')][0]
  return {int(k): v for k, v in json.loads(line[len('REPORT'):]).items()}


@pytest.mark.parametrize('replicas', [0, 3])
def test_eight_devices_train_like_one(eight_device_report, replicas):
  report = eight_device_report[replicas]
  # Same parameters, BN statistics and momentum after 6 steps, to float32 rounding of the
  # all-reduced sums (values are O(1); a missing BN or gradient all-reduce gives O(1e-2)).
  assert report['max_abs_diff'] < 1e-5 * max(1.0, report['max_abs_value']), report
  assert len(report['losses_one']) == 6
  import numpy as np
  np.testing.assert_allclose(report['losses_eight'], report['losses_one'], rtol=1e-5)


@pytest.mark.parametrize('replicas', [0, 3])
def test_eight_devices_each_hold_an_eighth_of_the_batch(eight_device_report, replicas):
  report = eight_device_report[replicas]
  assert report['index_devices'] == 8 and report['rows_per_device'] == [4]  # 32 / 8.
  assert report['eight_has_shard_shape'] and not report['eight_has_global_shape']
  assert report['one_has_global_shape']


def test_a_batch_that_does_not_split_over_the_devices_is_refused(cli_env, tmp_path):
  env = dict(cli_env, XLA_FLAGS=EIGHT_DEVICES)
  done = run_cli(env, tmp_path / 'run', 'tests/configs/tiny_chain.py',
                 '--config.train.batch_size=30')
  assert done.returncode == 2, done.stderr
  assert 'batch_size 30 does not split evenly over the 8 devices' in done.stderr
  assert 'multiple of 8' in done.stderr
  assert not os.path.exists(tmp_path / 'run')  # refused before anything was written.
