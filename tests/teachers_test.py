"""Teacher sources (none, live, cached, an ensemble) and several teachers for one student."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from kdjax import experiment
from kdjax import models
from kdjax import teachers
from kdjax import train
from kdjax.errors import KdjaxError
from reliability_test import final_arrays

NORM = train.Normalization(jnp.full((1,), 0.4), jnp.full((1,), 0.3))
TEACHER = models.get_model('plain_cnn_4', 10)
OTHER = models.get_model('plain_cnn_2', 10)


def data(num=40):
  rng = np.random.default_rng(0)
  return train.DeviceData(jnp.asarray(rng.integers(0, 256, (num, 8, 8, 1), dtype=np.uint8)),
                          jnp.asarray(rng.integers(0, 10, num).astype(np.int32)))


def normalised(images):
  return (np.asarray(images, np.float32) / 255 - 0.4) / 0.3


def test_sources_give_the_teachers_logits():
  split, indices = data(), jnp.array([3, 0, 17, 39])
  images = normalised(split.images[indices])
  v1 = models.init_variables(TEACHER, (8, 8, 1), jax.random.key(1))
  v2 = models.init_variables(OTHER, (8, 8, 1), jax.random.key(2))
  expected1 = np.asarray(TEACHER.apply(v1, images, train=False))
  expected2 = np.asarray(OTHER.apply(v2, images, train=False))
  assert teachers.NoTeacher().logits(images, indices) is None
  live = teachers.LiveTeacher(v1, TEACHER)
  np.testing.assert_allclose(live.logits(images, indices), expected1, rtol=1e-6)
  cached = teachers.cache(live, split, NORM, batch_size=16)  # 40 = 16 + 16 + 8 (padded).
  assert cached.table.shape == (40, 10) and cached.needs_unaugmented_images
  np.testing.assert_allclose(cached.logits(images, indices), expected1, rtol=1e-5, atol=1e-5)
  ensemble = teachers.TeacherEnsemble((cached, teachers.LiveTeacher(v2, OTHER)))
  stacked = ensemble.logits(images, indices)
  assert stacked.shape == (2, 4, 10) and ensemble.needs_unaugmented_images
  np.testing.assert_allclose(stacked[0], expected1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(stacked[1], expected2, rtol=1e-6)


def test_per_replica_sources_give_one_teacher_per_replica():
  split, indices = data(), jnp.arange(8)
  images = normalised(split.images[indices])
  stacked = models.init_variables(TEACHER, (8, 8, 1), jnp.stack([jax.random.key(s)
                                                                 for s in (4, 5)]))
  expected = [TEACHER.apply(train.replica(stacked, r), images, train=False) for r in range(2)]
  for batching in ('vmap', 'unroll'):
    live = teachers.LiveTeacher(stacked, TEACHER, per_replica=True, batching=batching)
    np.testing.assert_allclose(live.logits(images, indices), np.stack(expected), rtol=1e-5,
                               atol=1e-6)
  cached = teachers.cache(live, split, NORM, batch_size=16)
  assert cached.table.shape == (2, 40, 10)
  np.testing.assert_allclose(cached.logits(images, indices), np.stack(expected), rtol=1e-5,
                             atol=1e-5)
  ensemble = teachers.TeacherEnsemble((cached, live), per_replica=True)
  assert ensemble.logits(images, indices).shape == (2, 2, 8, 10)  # [R, K, B, C].


def tiny_config(**student):
  spec = importlib.util.spec_from_file_location('tiny_chain',
                                                os.path.join(REPO, 'tests/configs/tiny_chain.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.train.epochs, config.train.lr_schedule, config.train.learning_rate = 1, 'constant', 0.005
  config.compilation_cache_dir = ''
  for key, value in student.items():
    config.stages.student[key] = value
  return config


def test_one_teacher_of_weight_one_teaches_as_kd_does(tmp_path):
  # The multi-teacher loss with a single teacher is Hinton's KD, whatever it combines: the same
  # student (float tolerance), with nothing in the training loop knowing about several teachers.
  experiment.run(tiny_config(), str(tmp_path / 'kd'))
  experiment.run(tiny_config(loss='multi_teacher_kd', teacher='', teachers={'teacher': 1.0}),
                 str(tmp_path / 'multi'))
  _, kd = final_arrays(tmp_path / 'kd', 'student')
  _, multi = final_arrays(tmp_path / 'multi', 'student')
  for a, b in zip(kd, multi):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def two_teacher_config(combine):
  from experiments.configs.takd_default import stage
  config = tiny_config(loss='multi_teacher_kd', teacher='',
                       teachers={'teacher': 0.5, 'assistant': 0.5}, loss_kw={'combine': combine})
  config.stages.assistant = stage('plain_cnn_2', 'kd', teacher='teacher')
  config.stage_order = ('teacher', 'assistant', 'student')
  return config


def test_a_student_learns_from_two_weighted_teachers(tmp_path):
  rows = {}
  for combine in ('probabilities', 'kl_sum', 'logits'):
    rows[combine] = experiment.run(two_teacher_config(combine), str(tmp_path / combine))
  student = rows['probabilities'][-1]
  assert [r.name for r in rows['probabilities']] == ['teacher', 'assistant', 'student']
  assert student.teacher == 'assistant+teacher' and student.loss == 'multi_teacher_kd'
  assert student.test_accuracy > 0.5  # it learnt (10 classes: chance is 0.1).
  recorded = json.loads((tmp_path / 'probabilities' / 'config.json').read_text())
  assert recorded['stages']['student']['teachers'] == {'teacher': 0.5, 'assistant': 0.5}
  # Σ_k w_k·KL(t_k ‖ s) = KL(Σ_k w_k·t_k ‖ s) + (a Jensen gap that does not depend on s): the
  # same gradient, hence the same student, with a loss larger by the gap.
  params = {c: final_arrays(tmp_path / c, 'student')[1] for c in rows}
  for a, b in zip(params['probabilities'], params['kl_sum']):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  train_loss = {c: experiment.read_metrics(str(tmp_path / c / 'stages/student/metrics.jsonl'))
                [-1]['train_loss'] for c in rows}
  assert train_loss['kl_sum'] > train_loss['probabilities']
  # Averaging the logits is another target distribution, and another student.
  assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-5)
                 for a, b in zip(params['probabilities'], params['logits']))


def test_a_finished_stage_of_another_run_teaches_as_it_did_there(tmp_path):
  # The student of run A, trained again in run B from A's teacher named '/path/to/A:teacher':
  # the same teacher variables, seeds and batches, hence the same student, bit for bit.
  first = tmp_path / 'first'
  experiment.run(tiny_config(), str(first))
  from experiments.configs.takd_default import stage
  config = tiny_config()
  config.stages = {'student': stage('plain_cnn_2', 'kd', teacher=f'{first}:teacher')}
  config.stage_order = ('student',)
  rows = experiment.run(config, str(tmp_path / 'second'))
  assert [r.name for r in rows] == ['student'] and rows[0].teacher == f'{first}:teacher'
  _, there = final_arrays(first, 'student')
  _, here = final_arrays(tmp_path / 'second', 'student')
  for a, b in zip(there, here):
    np.testing.assert_array_equal(a, b)
  for teacher, message in ((f'{tmp_path}/nowhere:teacher', 'holds no kdjax run'),
                           (f'{first}:ghost', "has no stage 'ghost'; its stages are: student, "
                                              'teacher')):
    config.stages.student.teacher = teacher
    with pytest.raises(KdjaxError, match=message):
      experiment.run(config, str(tmp_path / 'third'))
  assert not (tmp_path / 'third').exists()


def test_a_flax_or_orbax_checkpoint_of_a_registry_model_teaches(tmp_path):
  # The tiny run's teacher saved as a user's Flax file and Orbax folder: a student taught from
  # either is the run's own student, bit for bit (same variables, seeds and batches).
  import flax
  import orbax.checkpoint as ocp
  from experiments.configs.takd_default import stage
  from kdjax import checkpoints
  first = tmp_path / 'first'
  experiment.run(tiny_config(), str(first))
  variables = checkpoints.load_final_variables(
      str(first / 'stages' / 'teacher'), models.variable_shapes(TEACHER, (8, 8, 1)))
  (tmp_path / 'teacher.msgpack').write_bytes(flax.serialization.to_bytes(variables))
  with ocp.StandardCheckpointer() as checkpointer:  # closing waits for the write.
    checkpointer.save(str(tmp_path / 'teacher_orbax'), variables)
  _, expected = final_arrays(first, 'student')
  for layout, path in (('flax', tmp_path / 'teacher.msgpack'),
                       ('orbax', tmp_path / 'teacher_orbax')):
    config = tiny_config()
    config.external_teachers = {'mine': dict(path=str(path), model='plain_cnn_4', layout=layout)}
    config.stages = {'student': stage('plain_cnn_2', 'kd', teacher='mine')}
    config.stage_order = ('student',)
    experiment.run(config, str(tmp_path / layout))
    _, got = final_arrays(tmp_path / layout, 'student')
    for a, b in zip(expected, got):
      np.testing.assert_array_equal(a, b)
  config.external_teachers.mine.model = 'plain_cnn_6'  # not the model the file holds.
  with pytest.raises(KdjaxError, match=r"entry 'params/Conv_2/kernel'|shape"):
    experiment.run(config, str(tmp_path / 'wrong'))
  assert not (tmp_path / 'wrong').exists()
