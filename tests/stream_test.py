"""The streaming input path (`kdjax.data.stream`): the same students as the device-resident
path, data that never goes on the device whole, bitwise resume after SIGKILL."""

import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from conftest import REPO, cli_command, run_cli, write_npz
from kdjax import data as kd_data
from kdjax import experiment
from kdjax.data import stream
from reliability_test import (assert_same_final_state, checkpoint_steps, final_arrays,
                              results_without_timing)
from teachers_test import tiny_config

TINY = 'tests/configs/tiny_chain.py'


def pipeline_config(pipeline, augment=False):
  config = tiny_config()
  config.data.pipeline = pipeline
  config.train.epochs = 2
  if augment:  # the teacher then runs live on each augmented batch (no cache).
    config.data.augment.enabled, config.data.augment.crop_padding = True, 1
  return config


@pytest.mark.parametrize('augment', [False, True])
def test_streamed_and_device_resident_train_the_same_students(tmp_path, augment):
  # Same rows in the same order, the same augmentation keys: the same teacher and student (the
  # student learning from a cached teacher without augmentation, from a live one with it).
  rows = {}
  for pipeline in ('device', 'stream'):
    rows[pipeline] = experiment.run(pipeline_config(pipeline, augment),
                                    str(tmp_path / pipeline))
  for stage in ('teacher', 'student'):
    _, device = final_arrays(tmp_path / 'device', stage)
    _, streamed = final_arrays(tmp_path / 'stream', stage)
    for a, b in zip(device, streamed):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  for a, b in zip(rows['device'], rows['stream']):
    assert abs(a.test_accuracy - b.test_accuracy) < 1e-6 and a.data_fingerprint == b.data_fingerprint


def test_auto_streams_data_over_the_budget_and_the_device_never_holds_it(tmp_path, monkeypatch):
  # 6,000 images of 16×16×3 (4.4 MiB) against a 1 MiB budget: 'auto' streams them, and the
  # device's live arrays (sampled every 37th step: `jax.live_arrays()` itself keeps the arrays
  # it returns alive a while, so sampling every step would measure its own leak) hold no more
  # than the budget plus a few batches, and never a split's images.
  rng = np.random.default_rng(0)
  npz = write_npz(tmp_path / 'big.npz', image_shape=(16, 16, 3), num_train=6000, num_test=500,
                  num_classes=10, y_train=rng.integers(0, 10, 6000), y_test=rng.integers(0, 10, 500))
  config = pipeline_config('auto')
  config.data.name, config.data.npz, config.data.device_budget_mb = 'npz', npz, 1
  config.train.epochs = 1
  assert stream.split_bytes(kd_data.load('npz', npz)) > 4 * 2**20
  steps, peaks, largest = [], [], []
  original = stream.training_batches

  def measured(*args, **kwargs):
    for batch in original(*args, **kwargs):
      steps.append(1)
      if len(steps) % 37 == 0:
        live = jax.live_arrays()
        peaks.append(sum(x.nbytes for x in live))
        largest.append(max(x.shape[0] for x in live if x.ndim == 4 and x.dtype == np.uint8))
        del live
      yield batch
  monkeypatch.setattr(stream, 'training_batches', measured)
  experiment.run(config, str(tmp_path / 'run'))
  assert len(steps) == 2 * (6000 // config.train.batch_size)  # both stages streamed.
  batch_bytes = config.train.batch_size * 16 * 16 * 3
  assert len(peaks) >= 9 and max(peaks) <= 2**20 + 16 * batch_bytes, peaks
  # Images on the device: batches only, never a split (the student's cached teacher logits,
  # [6000, 10] float32, are: 4 bytes a class an example, see BUILD_NOTES).
  assert max(largest) == config.train.batch_size


def test_an_npz_converted_to_npy_files_streams_the_same_run(tmp_path):
  rng = np.random.default_rng(1)
  npz = write_npz(tmp_path / 'data.npz', image_shape=(8, 8, 1), num_train=300, num_test=60,
                  num_classes=10, y_train=rng.integers(0, 10, 300), y_test=rng.integers(0, 10, 60))
  folder = tmp_path / 'npy'
  done = subprocess.run([*cli_command(tmp_path, TINY)[:1], '-m', 'kdjax.data.stream', npz,
                         str(folder)], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  opened = stream.open_npy_folder(str(folder))
  assert all(isinstance(a, np.memmap) for a in opened.values())
  rows = {}
  for name, data in (('npz', {'npz': npz}), ('npy', {'npy_dir': str(folder)})):
    config = pipeline_config('stream' if name == 'npy' else 'device')
    for key, value in data.items():
      config.data[key] = value
    config.data.name = 'npz'
    rows[name] = experiment.run(config, str(tmp_path / name))
  assert [r.test_accuracy for r in rows['npz']] == [r.test_accuracy for r in rows['npy']]
  assert rows['npz'][0].data_fingerprint == rows['npy'][0].data_fingerprint


def test_sigkill_mid_epoch_while_streaming_resumes_bitwise(cli_env, tmp_path):
  streamed = ('--config.data.pipeline=stream', '--config.train.epochs=2')
  reference = tmp_path / 'reference'
  assert run_cli(cli_env, reference, TINY, *streamed).returncode == 0
  workdir = tmp_path / 'run'
  process = subprocess.Popen(cli_command(workdir, TINY, '--config.progress_bar=False',
                                         *streamed), cwd=REPO, env=cli_env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while not any(s >= 30 for s in checkpoint_steps(workdir, 'student')):  # mid-epoch (44).
    assert process.poll() is None and time.time() < deadline, process.communicate()
    time.sleep(0.02)
  process.send_signal(signal.SIGKILL)
  process.wait()
  resumed = run_cli(cli_env, workdir, TINY, *streamed)
  assert resumed.returncode == 0, resumed.stderr
  assert 'streamed from the host' in resumed.stdout
  assert_same_final_state(reference, workdir)
  assert results_without_timing(reference) == results_without_timing(workdir)


def logits_file(workdir):
  (path,) = [p for p in (workdir / 'teacher_logits').iterdir() if p.suffix == '.npy']
  return path


def test_a_streamed_student_reads_its_teachers_logits_from_a_file(tmp_path, capsys):
  # The table holds the teacher's inference-mode logits on every training image in order: the
  # same as the teacher model applied to those images here, and the student trained from it is
  # the device path's (cached on device). A damaged file is written again, not trusted.
  from kdjax import models
  run = tmp_path / 'stream'
  experiment.run(pipeline_config('stream'), str(run))
  table = np.load(logits_file(run))
  dataset = kd_data.load('digits')
  mean, std = kd_data.channel_stats(dataset.x_train)
  config = pipeline_config('stream')
  model = models.get_model(config.stages.teacher.model, 10)
  _, teacher_leaves = final_arrays(run, 'teacher')
  variables = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(models.init_variables(model, (8, 8, 1), jax.random.key(0))),
      teacher_leaves)
  images = (dataset.x_train.astype(np.float32) / 255 - mean) / std
  expected = np.asarray(model.apply(variables, images, train=False))
  np.testing.assert_allclose(table, expected, rtol=1e-5, atol=1e-5)
  # Damage: the next stage that needs it writes it again (and trains the same student).
  path = logits_file(run)
  data = bytearray(path.read_bytes())
  data[-40:] = bytes(40)
  path.write_bytes(bytes(data))
  import shutil
  shutil.rmtree(run / 'stages' / 'student')
  capsys.readouterr()
  again = experiment.run(pipeline_config('stream'), str(run))
  assert 'does not match its recorded checksum' in capsys.readouterr().out
  np.testing.assert_array_equal(np.load(path), table)
  assert not [p for p in path.parent.iterdir() if '.tmp-' in p.name]
  assert again[1].test_accuracy == experiment.run(pipeline_config('device'),
                                                  str(tmp_path / 'device'))[1].test_accuracy


def test_float16_logit_files_halve_the_bytes_within_half_precision(tmp_path):
  rows = {}
  for dtype in ('float32', 'float16'):
    config = pipeline_config('stream')
    config.teacher_source.cache_dtype = dtype
    rows[dtype] = experiment.run(config, str(tmp_path / dtype))
  full, half = (np.load(logits_file(tmp_path / d)) for d in ('float32', 'float16'))
  assert half.dtype == np.float16 and half.nbytes * 2 == full.nbytes
  # float16 keeps 11 significant bits: each logit within 2^-11 of its magnitude (plus the
  # subnormal floor).
  error = np.abs(half.astype(np.float32) - full)
  assert np.all(error <= np.abs(full) * 2.0**-11 + 2.0**-24), error.max()
  # The students differ by that rounding only: same accuracy to a test image or two.
  assert abs(rows['float16'][1].test_accuracy - rows['float32'][1].test_accuracy) <= 2 / 359


def test_per_replica_teachers_stream_from_one_file_each_replica_its_own(tmp_path):
  # replica 'matching': student replica r learns from teacher replica r; the file is [R, N, C].
  results = {}
  for pipeline in ('device', 'stream'):
    config = pipeline_config(pipeline)
    config.train.epochs, config.num_replicas = 1, 2
    config.teacher_source.replica = 'matching'
    results[pipeline] = experiment.run(config, str(tmp_path / pipeline))
  assert np.load(logits_file(tmp_path / 'stream')).shape[0] == 2
  _, device = final_arrays(tmp_path / 'device', 'student')
  _, streamed = final_arrays(tmp_path / 'stream', 'student')
  for a, b in zip(device, streamed):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_an_image_folder_converts_to_npy_files_at_the_given_size(tmp_path):
  # torchvision's ImageFolder layout: classes in sorted order, files in sorted order; an image
  # already 8×8 is stored as it is, others as torchvision's Resize(shorter side) + CenterCrop
  # (PIL bilinear; the test split resized to 8 / 0.875 first), written out here with PIL.
  from PIL import Image
  rng = np.random.default_rng(2)
  folder = tmp_path / 'pets'
  made = {}
  for split, sizes in (('train', [(8, 8), (10, 12), (8, 8)]), ('val', [(12, 10), (8, 8)])):
    for c, name in enumerate(['dog', 'cat']):  # 'cat' sorts first: label 0.
      (folder / split / name).mkdir(parents=True)
      for i, (h, w) in enumerate(sizes[c::2] if split == 'val' else sizes):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / split / name / f'{i}.png')
        made[split, name, i] = pixels
  (folder / 'train' / 'notes.txt').write_text('not an image class')
  out = tmp_path / 'npy'
  command = [*cli_command(tmp_path, TINY)[:1], '-m', 'kdjax.data.stream', str(folder), str(out)]
  refused = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
  assert refused.returncode == 2 and '--size=32' in refused.stderr
  done = subprocess.run([*command, '--size=8'], cwd=REPO, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  arrays = stream.open_npy_folder(str(out))

  def reference(pixels, short):
    h, w = pixels.shape[:2]
    new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
    resized = np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.BILINEAR))
    top, left = int(round((new_h - 8) / 2.0)), int(round((new_w - 8) / 2.0))
    return resized[top:top + 8, left:left + 8]

  assert arrays['x_train'].shape == (6, 8, 8, 3) and arrays['x_test'].shape == (2, 8, 8, 3)
  np.testing.assert_array_equal(arrays['y_train'], [0, 0, 0, 1, 1, 1])
  np.testing.assert_array_equal(arrays['y_test'], [0, 1])
  np.testing.assert_array_equal(arrays['x_train'][0], made['train', 'cat', 0])
  np.testing.assert_array_equal(arrays['x_train'][1], reference(made['train', 'cat', 1], 8))
  np.testing.assert_array_equal(arrays['x_test'][0], made['val', 'cat', 0])
  np.testing.assert_array_equal(arrays['x_test'][1], reference(made['val', 'dog', 0], 9))
  (folder / 'val' / 'bird').mkdir()
  stray = subprocess.run([*command, '--size=8'], cwd=REPO, capture_output=True, text=True)
  assert stray.returncode == 2 and 'bird' in stray.stderr
