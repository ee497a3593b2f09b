"""Many students in one program (vmap), cached teacher logits, and the bfloat16 teacher."""

import json
import signal
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, cli_command, finished_run, run_cli
from experiments.configs import takd_default
from kdjax import models
from kdjax import stage_losses
from kdjax import teachers
from kdjax import train
from kdjax.errors import KdjaxError
from reliability_test import assert_same_final_state, checkpoint_steps, final_arrays, wait_for

TINY = 'tests/configs/tiny_chain.py'
# Runs compared to float tolerance: SGD amplifies rounding differences over many steps (at lr 0.05
# two runs that differ by 1e-7 after one step visibly part after about 100), so such comparisons
# train one 44-step epoch per stage at a small constant learning rate.
SHORT = ('--config.train.epochs=1', '--config.train.lr_schedule=constant',
         '--config.train.learning_rate=0.005')
NORM = train.Normalization(jnp.full((1,), 0.4), jnp.full((1,), 0.3))
STUDENT = models.get_model('plain_cnn_2', 10)
TEACHER = models.get_model('plain_cnn_4', 10)


def stage_loss(loss='kd', **settings):
  return stage_losses.get_loss(loss, settings)


def live(variables, per_replica=False, batching='vmap'):
  return teachers.LiveTeacher(variables, TEACHER, per_replica=per_replica, batching=batching)


def augment_config(enabled=False):
  config = takd_default.get_config().data.augment
  config.enabled = enabled
  return config


def data(num=48):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, num).astype(np.int32)
  return train.DeviceData(jnp.asarray(images), jnp.asarray(labels))


def states(keys, stacked):
  tx = train.make_optimizer(takd_default.get_config().train, lambda step: 0.05)
  make_state = lambda v: train.create_train_state(STUDENT, v, tx)
  if stacked:
    return jax.vmap(make_state)(models.init_variables(STUDENT, (8, 8, 1), keys))
  return make_state(models.init_variables(STUDENT, (8, 8, 1), keys))


def batches(steps=5, batch=16, num=48):
  return [jnp.asarray(np.random.default_rng(i).permutation(num)[:batch]) for i in range(steps)]


def run_steps(step, state, teacher, train_data, key):
  for indices in batches():
    state, metrics = step(state, teacher, train_data, indices, key)
  return state, metrics


def leaves(tree):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_init_with_n_keys_stacks_what_each_key_gives_alone():
  keys = jnp.stack([jax.random.key(s) for s in (3, 4, 5)])
  stacked = models.init_variables(STUDENT, (8, 8, 1), keys)
  for r, seed in enumerate((3, 4, 5)):
    alone = models.init_variables(STUDENT, (8, 8, 1), jax.random.key(seed))
    for a, b in zip(leaves(alone), leaves(stacked)):
      np.testing.assert_array_equal(a, b[r])


@pytest.mark.parametrize('batching', ['vmap', 'unroll'])
def test_replicated_students_each_train_as_they_would_alone(batching):
  # Noisy-teacher loss: each replica also draws its own logit noise from its own key.
  loss = stage_loss('noisy_l2', noise_alpha=0.5, noise_sigma=0.3)
  teacher = live(models.init_variables(TEACHER, (8, 8, 1), jax.random.key(9)))
  keys = jnp.stack([jax.random.key(s) for s in (3, 4, 5)])
  train_data = data()
  vmapped = train.make_train_step(STUDENT, loss, augment_config(), NORM,
                                  num_replicas=3, replica_batching=batching)
  together, metrics = run_steps(vmapped, states(keys, True), teacher, train_data, keys)
  assert np.asarray(metrics['loss']).shape == (3,)
  single = train.make_train_step(STUDENT, loss, augment_config(), NORM)
  finals = []
  for r, seed in enumerate((3, 4, 5)):
    alone, _ = run_steps(single, states(jax.random.key(seed), False), teacher,
                         train_data, jax.random.key(seed))
    finals.append(leaves(alone.params))
    for a, b in zip(finals[-1], leaves(together.params)):
      np.testing.assert_allclose(b[r], a, rtol=2e-5, atol=2e-6)
  assert not np.allclose(finals[0][0], finals[1][0])  # the replicas really differ.


def test_replicas_share_one_teacher_forward():
  # XLA's FLOP count: N students cost one teacher forward plus N student steps, not N of both.
  teacher_variables = models.init_variables(TEACHER, (8, 8, 1), jax.random.key(9))
  train_data, indices = data(), jnp.arange(16)

  def flops(replicas, teacher=True, loss='kd'):
    keys = jnp.stack([jax.random.key(s) for s in range(replicas)]) if replicas else \
        jax.random.key(0)
    step = train.make_train_step(STUDENT, stage_loss(loss), augment_config(), NORM,
                                 num_replicas=replicas or None, replica_batching='vmap')
    source = live(teacher_variables) if teacher else teachers.NoTeacher()
    compiled = step.lower(states(keys, bool(replicas)), source, train_data, indices,
                          keys).compile()
    return compiled.cost_analysis()['flops']

  one, four = flops(0), flops(4)
  student_only = flops(0, teacher=False, loss='ce')
  teacher_forward = one - student_only
  assert teacher_forward > 0.5 * student_only  # the teacher is a real share of the step.
  np.testing.assert_allclose(four, teacher_forward + 4 * student_only, rtol=0.05)


def test_cached_teacher_logits_train_the_same_student():
  teacher_variables = models.init_variables(TEACHER, (8, 8, 1), jax.random.key(9))
  train_data = data()
  cached = teachers.cache(live(teacher_variables), train_data, NORM, batch_size=20)
  images = (np.asarray(train_data.images, np.float32) / 255 - 0.4) / 0.3
  np.testing.assert_allclose(cached.table, TEACHER.apply(teacher_variables, images), rtol=1e-5,
                             atol=1e-5)  # 48 = 20 + 20 + 8 (padded).
  key = jax.random.key(3)
  step = train.make_train_step(STUDENT, stage_loss(), augment_config(), NORM)
  a, _ = run_steps(step, states(key, False), live(teacher_variables), train_data, key)
  b, _ = run_steps(step, states(key, False), cached, train_data, key)
  for x, y in zip(leaves(a.params), leaves(b.params)):
    np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-6)


def test_cached_logits_with_augmentation_are_refused():
  table = teachers.CachedTeacher(jnp.zeros((48, 10)))
  step = train.make_train_step(STUDENT, stage_loss(), augment_config(True), NORM)
  key = jax.random.key(3)
  with pytest.raises(KdjaxError, match='cannot be used with augmentation on'):
    step(states(key, False), table, data(), jnp.arange(16), key)


def test_bfloat16_teacher_computes_in_bfloat16_close_to_float32():
  variables = models.init_variables(TEACHER, (8, 8, 1), jax.random.key(9))
  bf16_teacher = models.get_model('plain_cnn_4', 10, dtype=jnp.bfloat16)
  images = jax.random.normal(jax.random.key(0), (32, 8, 8, 1))
  full = np.asarray(TEACHER.apply(variables, images))
  half = bf16_teacher.apply(variables, images)
  assert half.dtype == jnp.float32  # logits come back in float32 for the loss.
  # bfloat16 keeps 8 mantissa bits: relative error a few 1e-3 per op, not 1e-6.
  error = np.max(np.abs(np.asarray(half) - full)) / np.max(np.abs(full))
  assert 1e-5 < error < 5e-2, error
  jaxpr = str(jax.make_jaxpr(lambda v, x: bf16_teacher.apply(v, x))(variables, images))
  assert 'conv_general_dilated' in jaxpr and 'bf16[32,8,8,16]' in jaxpr


# ---------------------------------------------------------------------------------------------
# Whole runs.


@pytest.fixture(scope='module')
def replicated_run(cli_env, tmp_path_factory):
  return finished_run(cli_env, tmp_path_factory, 'replicas', TINY, '--config.num_replicas=2')


def test_replicated_run_reports_mean_and_std(replicated_run):
  rows = json.loads((replicated_run / 'results.json').read_text())['stages']
  for row in rows:
    accuracies = row['replicas']['test_accuracy']
    assert row['replicas']['seeds'] == [0, 1] and len(accuracies) == 2
    np.testing.assert_allclose(row['test_accuracy'], np.mean(accuracies), rtol=1e-12)
    np.testing.assert_allclose(row['test_accuracy_std'], np.std(accuracies, ddof=1), rtol=1e-12)
  table = (replicated_run / 'results.md').read_text()
  mean, std = 100 * rows[1]['test_accuracy'], 100 * rows[1]['test_accuracy_std']
  assert f'{mean:.2f} ± {std:.2f} (n=2)' in table
  step, teacher = final_arrays(replicated_run, 'teacher')
  assert all(x.shape[0] == 2 for x in teacher)  # both replicas checkpointed, stacked.
  assert not np.array_equal(teacher[0][0], teacher[0][1])


def test_replica_zero_trains_like_the_single_run(cli_env, tmp_path):
  # Replica 0 has the single run's seed, batches and teacher; only vmap's float rounding differs.
  runs = {}
  for replicas in (1, 2):
    runs[replicas] = tmp_path / f'replicas_{replicas}'
    done = run_cli(cli_env, runs[replicas], TINY, f'--config.num_replicas={replicas}', *SHORT)
    assert done.returncode == 0, done.stderr
  for stage in ('teacher', 'student'):
    _, alone = final_arrays(runs[1], stage)
    _, together = final_arrays(runs[2], stage)
    for a, b in zip(alone, together):
      np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)


def test_a_stage_can_train_fewer_replicas_than_its_students(cli_env, tmp_path):
  # One teacher under two students: the teacher is the single run's, bit for bit (same code path),
  # and the students' replica 0 learns from it like the single run's student.
  runs = {name: tmp_path / name for name in ('single', 'mixed')}
  for name, extra in (('single', ()), ('mixed', ('--config.num_replicas=2',
                                                 '--config.stages.teacher.num_replicas=1'))):
    done = run_cli(cli_env, runs[name], TINY, *extra, *SHORT)
    assert done.returncode == 0, done.stderr
  _, single_teacher = final_arrays(runs['single'], 'teacher')
  _, mixed_teacher = final_arrays(runs['mixed'], 'teacher')
  for a, b in zip(single_teacher, mixed_teacher):
    np.testing.assert_array_equal(a, b)
  _, single_student = final_arrays(runs['single'], 'student')
  _, mixed_student = final_arrays(runs['mixed'], 'student')
  for a, b in zip(single_student, mixed_student):
    assert b.shape == (2, *a.shape)
    np.testing.assert_allclose(b[0], a, rtol=1e-4, atol=1e-5)
  rows = {r['name']: r for r in json.loads((runs['mixed'] / 'results.json').read_text())['stages']}
  assert rows['teacher']['replicas'] is None and rows['student']['replicas']['seeds'] == [0, 1]


def test_uncached_teacher_run_gives_the_same_student(cli_env, tmp_path):
  runs = {}
  for cache in (True, False):
    workdir = tmp_path / f'cache_{cache}'
    done = run_cli(cli_env, workdir, TINY, f'--config.teacher_source.cache_logits={cache}', *SHORT)
    assert done.returncode == 0, done.stderr
    assert ("cached the teacher's logits" in done.stdout) == cache
    runs[cache] = final_arrays(workdir, 'student')[1]
  for a, b in zip(runs[True], runs[False]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_replicated_stage_killed_mid_run_resumes_bitwise(cli_env, replicated_run, tmp_path):
  workdir = tmp_path / 'run'
  overrides = (f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}",
               '--config.num_replicas=2')
  process = subprocess.Popen(cli_command(workdir, TINY, *overrides), cwd=REPO, env=cli_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for(lambda: any(s >= 30 for s in checkpoint_steps(workdir, 'student')), process)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_cli(cli_env, workdir, TINY, '--config.num_replicas=2')
  assert resumed.returncode == 0, resumed.stderr
  assert '[student] resuming from step' in resumed.stdout
  assert_same_final_state(replicated_run, workdir)


@pytest.mark.parametrize('batching,cached', [('vmap', False), ('unroll', False),
                                             ('unroll', True)])
def test_matching_teachers_train_each_replica_from_its_own(batching, cached):
  # Replica r with teacher r equals a single student trained from teacher r alone.
  loss = stage_loss('kd')
  teacher_keys = jnp.stack([jax.random.key(s) for s in (9, 10)])
  stacked = models.init_variables(TEACHER, (8, 8, 1), teacher_keys)
  keys = jnp.stack([jax.random.key(s) for s in (3, 4)])
  train_data = data()
  source = live(stacked, per_replica=True, batching=batching)
  if cached:
    source = teachers.cache(source, train_data, NORM, batch_size=20)
  step = train.make_train_step(STUDENT, loss, augment_config(), NORM, num_replicas=2,
                               replica_batching=batching)
  together, _ = run_steps(step, states(keys, True), source, train_data, keys)
  single = train.make_train_step(STUDENT, loss, augment_config(), NORM)
  for r, seed in enumerate((3, 4)):
    alone, _ = run_steps(single, states(jax.random.key(seed), False),
                         live(train.replica(stacked, r)), train_data, jax.random.key(seed))
    for a, b in zip(leaves(alone.params), leaves(together.params)):
      np.testing.assert_allclose(b[r], a, rtol=2e-5, atol=2e-6)
  # And replica 1 did not learn from teacher 0: the shared-teacher step gives another student.
  first, _ = run_steps(step, states(keys, True), live(train.replica(stacked, 0)), train_data,
                       keys)
  assert not np.allclose(leaves(first.params)[0][1], leaves(together.params)[0][1])


def test_matching_teachers_in_a_run(cli_env, tmp_path):
  # Two lineages against one shared teacher: replica 0 has teacher 0 either way, replica 1 not.
  students = {}
  for mode in ('matching', 'first'):
    workdir = tmp_path / mode
    done = run_cli(cli_env, workdir, TINY, '--config.num_replicas=2', *SHORT,
                   f'--config.teacher_source.replica={mode}')
    assert done.returncode == 0, done.stderr
    students[mode] = final_arrays(workdir, 'student')[1]
  for a, b in zip(students['matching'], students['first']):
    np.testing.assert_allclose(a[0], b[0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(students['matching'][0][1], students['first'][0][1], atol=1e-4)
  mismatched = run_cli(cli_env, tmp_path / 'bad', TINY, '--config.num_replicas=2', *SHORT,
                       '--config.teacher_source.replica=matching',
                       '--config.stages.teacher.num_replicas=1')
  assert mismatched.returncode == 2 and 'same number of replicas' in mismatched.stderr
  assert not (tmp_path / 'bad').exists()
