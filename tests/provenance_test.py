"""Provenance: a stage remembers the data, settings and teacher it trained from, and a resume or
a skip that finds any of them changed is refused (or, with overwrite, retrains the stage)."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from conftest import folder_digest, write_npz
from kdjax import data as kd_data
from kdjax import experiment
from kdjax.errors import KdjaxError
from teachers_test import tiny_config


def npz_config(path):
  config = tiny_config()
  config.data.name, config.data.npz = 'npz', str(path)
  return config


def write_data(path, seed):
  rng = np.random.default_rng(seed)
  return write_npz(path, image_shape=(8, 8, 1), num_train=64, num_test=16, num_classes=10,
                   x_train=rng.integers(0, 256, (64, 8, 8, 1), dtype=np.uint8),
                   y_train=rng.integers(0, 10, 64), y_test=rng.integers(0, 10, 16))


def test_the_data_fingerprint_is_of_the_arrays_not_the_file(tmp_path):
  one = kd_data.load('npz', write_data(tmp_path / 'a.npz', 0))
  same = kd_data.load('npz', write_data(tmp_path / 'b.npz', 0))
  other = kd_data.load('npz', write_data(tmp_path / 'c.npz', 1))
  assert kd_data.fingerprint(one) == kd_data.fingerprint(same) != kd_data.fingerprint(other)
  x_train = one.x_train.copy()
  x_train[5, 3, 2, 0] ^= 1  # one bit of one pixel.
  changed = kd_data.Dataset(one.name, x_train, one.y_train, one.x_test, one.y_test, 10)
  assert kd_data.fingerprint(changed) != kd_data.fingerprint(one)
  # An independent SHA-256 of the same bytes in the same order.
  digest = hashlib.sha256()
  for split in ('x_train', 'y_train', 'x_val', 'y_val', 'x_test', 'y_test'):
    digest.update(split.encode())
    array = getattr(one, split)
    if array is not None:
      digest.update(f'{array.dtype}{array.shape}'.encode() + array.tobytes())
  assert kd_data.fingerprint(one) == digest.hexdigest()


def test_other_data_of_the_same_shape_is_refused_and_overwrite_retrains(tmp_path):
  data, run = tmp_path / 'data.npz', str(tmp_path / 'run')
  write_data(data, 0)
  first = experiment.run(npz_config(data), run)
  write_data(data, 1)  # the file replaced by another of the same name and shape.
  before = folder_digest(run)
  with pytest.raises(KdjaxError, match="stage 'teacher' .* the data: its arrays differ") as e:
    experiment.run(npz_config(data), run)
  assert '--overwrite' in str(e.value) and '\n' not in str(e.value)
  assert folder_digest(run) == before  # refused: nothing touched.
  rows = experiment.run(npz_config(data), run, overwrite=True)
  now = kd_data.fingerprint(kd_data.load('npz', str(data)))
  assert [r.data_fingerprint for r in rows] == [now, now] != [r.data_fingerprint for r in first]
  # The student retrained too: its teacher had changed.
  assert rows[1].teacher_fingerprints != first[1].teacher_fingerprints


def test_another_config_after_config_json_was_deleted_is_refused(tmp_path):
  run = tmp_path / 'run'
  experiment.run(tiny_config(), str(run))
  os.remove(run / 'config.json')
  other = tiny_config()
  other.train.learning_rate = 0.01
  before = folder_digest(run)
  with pytest.raises(KdjaxError, match="stage 'teacher' .* the config: the stage's effective"):
    experiment.run(other, str(run))
  assert folder_digest(run) == before  # refused before config.json was written.
  experiment.run(tiny_config(), str(run))  # the config it trained with: finished, not refused.


def test_a_student_whose_teacher_was_retrained_is_refused(tmp_path, capsys):
  # The student of run B learns from run A's teacher ('/path/to/A:teacher'); A is then run
  # again with another seed (--overwrite), so B's finished student was taught by a teacher that
  # is no longer there. (Inside one run a retrained teacher has other settings or data, and is
  # itself refused first.)
  from experiments.configs.takd_default import stage
  first, second = tmp_path / 'first', tmp_path / 'second'
  experiment.run(tiny_config(), str(first))
  config = tiny_config()
  config.stages = {'student': stage('plain_cnn_2', 'kd', teacher=f'{first}:teacher')}
  config.stage_order = ('student',)
  taught = experiment.run(config, str(second))
  assert experiment.run(config, str(second))[0].teacher_fingerprints == \
      taught[0].teacher_fingerprints  # nothing changed: skipped, not refused.
  retrained = tiny_config()
  retrained.seed = 1
  experiment.run(retrained, str(first), overwrite=True)
  before = folder_digest(second)
  with pytest.raises(KdjaxError, match=f"stage 'student' .* its teacher '{first}:teacher': "
                                       'retrained or replaced since'):
    experiment.run(config, str(second))
  assert folder_digest(second) == before
  capsys.readouterr()
  rows = experiment.run(config, str(second), overwrite=True)
  assert '[student] --overwrite: its teacher' in capsys.readouterr().out
  assert rows[0].teacher_fingerprints != taught[0].teacher_fingerprints


def test_a_torn_or_lost_metrics_file_is_rebuilt_from_the_checkpoint(tmp_path):
  run = tmp_path / 'run'
  config = tiny_config()
  config.train.epochs = 2
  experiment.run(config, str(run))
  teacher_metrics = run / 'stages' / 'teacher' / 'metrics.jsonl'
  student_metrics = run / 'stages' / 'student' / 'metrics.jsonl'
  intact = teacher_metrics.read_text(), student_metrics.read_text()
  assert len(intact[0].splitlines()) == 2
  teacher_metrics.write_text(intact[0][:len(intact[0]) // 2])  # torn mid-line.
  os.remove(student_metrics)
  experiment.run(config, str(run))  # finished stages: their files come back.
  assert (teacher_metrics.read_text(), student_metrics.read_text()) == intact
  # A resume: the final checkpoint gone, the stage resumes from epoch 1's, and its file
  # (torn again) is rebuilt from that checkpoint, then completed.
  checkpoints = run / 'stages' / 'student' / 'checkpoints'
  shutil.rmtree(checkpoints / str(max(int(p) for p in os.listdir(checkpoints) if p.isdigit())))
  student_metrics.write_text('{"epoch": 1, "trai')
  experiment.run(config, str(run))
  lines = [json.loads(l) for l in student_metrics.read_text().splitlines()]
  expected = [json.loads(l) for l in intact[1].splitlines()]
  timing = ('images_per_s', 'epoch_s')
  strip = lambda ms: [{k: v for k, v in m.items() if k not in timing} for m in ms]
  assert strip(lines) == strip(expected)
