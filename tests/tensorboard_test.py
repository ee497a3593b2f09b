"""TensorBoard event files: every stage's epochs as scalars, equal to metrics.jsonl, once each.

The files are read back without TensorFlow or the `tensorboard` package: the TFRecord framing
(uint64 length, its masked CRC-32C, the data, the data's masked CRC-32C) is parsed and checked
here, and each record decoded as a `tensorboardX.proto.event_pb2.Event`.
"""

import collections
import json
import signal
import struct
import subprocess
import time

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from conftest import REPO, cli_command, finished_run, run_cli
from kdjax import parallel
from kdjax import tensorboard

TINY = 'tests/configs/tiny_chain.py'


def _crc32c_table():
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected.
    table.append(crc)
  return table


CRC32C_TABLE = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  crc ^= 0xFFFFFFFF
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF  # TFRecord's mask.


def read_records(path, complete_only=False):
  """The records of one TFRecord file, checking both CRCs of each; `complete_only`: stop at a
  record still being written (a live file) instead of failing."""
  data, position, records = path.read_bytes(), 0, []
  while position < len(data):
    if complete_only and position + 12 > len(data):
      break
    header = data[position:position + 8]
    (length,) = struct.unpack('<Q', header)
    (header_crc,) = struct.unpack('<I', data[position + 8:position + 12])
    end = position + 12 + length + 4
    if complete_only and end > len(data):
      break
    assert header_crc == masked_crc32c(header), f'{path}: bad length CRC at byte {position}'
    payload = data[position + 12:position + 12 + length]
    (payload_crc,) = struct.unpack('<I', data[end - 4:end])
    assert payload_crc == masked_crc32c(payload), f'{path}: bad data CRC at byte {position}'
    records.append(payload)
    position = end
  return records


def read_scalars(stage_dir, complete_only=False):
  """`{tag: [(step, value), ...]}` over every event file of a stage's `tensorboard/` folder."""
  scalars = collections.defaultdict(list)
  for path in sorted((stage_dir / 'tensorboard').glob('events.out.tfevents.*')):
    for record in read_records(path, complete_only):
      event = event_pb2.Event.FromString(record)
      for value in event.summary.value:
        scalars[value.tag].append((event.step, value.simple_value))
  return dict(scalars)


def expected_scalars(metrics_line):
  """The tags and values a metrics.jsonl line should give, written out independently."""
  expected = {}
  for key, value in metrics_line.items():
    if key in ('epoch', 'step'):
      continue
    if isinstance(value, list):  # one value per replica.
      expected[key] = float(np.mean(value))
      expected.update({f'{key}/replica_{r}': v for r, v in enumerate(value)})
    else:
      expected[key] = value
  return expected


def assert_events_equal_metrics(stage_dir):
  """Exactly one event per (epoch, tag), equal (as float32) to the stage's metrics.jsonl."""
  metrics = [json.loads(line) for line in (stage_dir / 'metrics.jsonl').read_text().splitlines()]
  assert metrics, stage_dir
  scalars = read_scalars(stage_dir)
  wanted = {}
  for line in metrics:
    for tag, value in expected_scalars(line).items():
      wanted.setdefault(tag, []).append((line['epoch'], value))
  assert sorted(scalars) == sorted(wanted)
  for tag, points in wanted.items():
    steps = [step for step, _ in scalars[tag]]
    assert steps == [step for step, _ in points], tag  # each epoch once, in order.
    np.testing.assert_allclose([v for _, v in scalars[tag]],
                               np.float32([v for _, v in points]), rtol=1e-6, err_msg=tag)
  return metrics, scalars


# --- The module on its own: naming, the rewrite on resume, closing on an error. ---


def test_scalars_name_replicas_exits_and_the_ensemble():
  summary = {'epoch': 3, 'step': 30, 'train_loss': 0.5, 'skipped_steps': 0,
             'test_accuracy': [0.25, 0.75],
             'test_accuracy_exits': [[0.1, 0.2, 0.3], [0.3, 0.4, 0.5]],  # [replicas, exits]
             'test_accuracy_ensemble': [0.6, 0.8]}
  tags = tensorboard.scalars(summary)
  assert tags == pytest.approx({
      'train_loss': 0.5, 'skipped_steps': 0.0,
      'test_accuracy': 0.5, 'test_accuracy/replica_0': 0.25, 'test_accuracy/replica_1': 0.75,
      'test_accuracy/exit_0': 0.2, 'test_accuracy/exit_0/replica_0': 0.1,
      'test_accuracy/exit_0/replica_1': 0.3,
      'test_accuracy/exit_1': 0.3, 'test_accuracy/exit_1/replica_0': 0.2,
      'test_accuracy/exit_1/replica_1': 0.4,
      'test_accuracy/exit_2': 0.4, 'test_accuracy/exit_2/replica_0': 0.3,
      'test_accuracy/exit_2/replica_1': 0.5,
      'test_accuracy/ensemble': 0.7, 'test_accuracy/ensemble/replica_0': 0.6,
      'test_accuracy/ensemble/replica_1': 0.8})
  one_model = tensorboard.scalars({'epoch': 1, 'test_accuracy_exits': [0.1, 0.2],
                                   'test_accuracy_ensemble': 0.3})
  assert one_model == pytest.approx({'test_accuracy/exit_0': 0.1, 'test_accuracy/exit_1': 0.2,
                                     'test_accuracy/ensemble': 0.3})


def test_open_writer_rewrites_history_and_closes_on_an_error(tmp_path):
  history = [{'epoch': e, 'step': 10 * e, 'train_loss': 1.0 / e} for e in (1, 2, 3)]
  with pytest.raises(RuntimeError):
    with tensorboard.open_writer(str(tmp_path), []) as writer:
      for line in history:
        tensorboard.write_epoch(writer, line)
      raise RuntimeError('a stage that fails: its epochs so far must still reach the file')
  assert [step for step, _ in read_scalars(tmp_path)['train_loss']] == [1, 2, 3]
  # A resume from the checkpoint after epoch 1 (metrics.jsonl truncated to it), then epoch 2.
  with tensorboard.open_writer(str(tmp_path), history[:1]) as writer:
    tensorboard.write_epoch(writer, {**history[1], 'train_loss': 0.75})
  assert read_scalars(tmp_path)['train_loss'] == [(1, 1.0), (2, 0.75)]
  assert len(list((tmp_path / 'tensorboard').glob('events.out.tfevents.*'))) == 1


def test_only_process_0_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(parallel, 'is_primary', lambda: False)
  with tensorboard.open_writer(str(tmp_path), [{'epoch': 1, 'train_loss': 1.0}]) as writer:
    tensorboard.write_epoch(writer, {'epoch': 2, 'train_loss': 0.5})
  assert writer is None and not (tmp_path / 'tensorboard').exists()


# --- Whole runs through the command line. ---


def test_a_finished_run_has_every_epoch_and_tag_of_metrics_jsonl(cli_env, tmp_path_factory):
  workdir = finished_run(cli_env, tmp_path_factory, 'tb_finished', TINY, '--config.train.epochs=2')
  for stage in ('teacher', 'student'):
    metrics, scalars = assert_events_equal_metrics(workdir / 'stages' / stage)
    assert [m['epoch'] for m in metrics] == [1, 2]
    assert {'train_loss', 'train_accuracy', 'test_loss', 'test_accuracy', 'test_nontrue_mass',
            'test_entropy', 'learning_rate', 'images_per_s', 'epoch_s',
            'skipped_steps'} <= set(scalars)


def test_a_resumed_stage_has_one_event_per_epoch_and_tag(cli_env, tmp_path):
  workdir = tmp_path / 'killed'
  teacher = workdir / 'stages' / 'teacher'
  overrides = (f"--config.compilation_cache_dir={cli_env['KDJAX_TEST_CACHE']}",
               '--config.progress_bar=False', '--config.train.epochs=4')
  process = subprocess.Popen(cli_command(workdir, TINY, *overrides), cwd=REPO, env=cli_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 120
  try:
    # Killed once the event file holds epoch 1 on disk: events a resume must not repeat.
    while 'train_loss' not in read_scalars(teacher, complete_only=True):
      assert process.poll() is None and time.time() < deadline, 'no epoch-1 event in 120 s'
      time.sleep(0.05)
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  assert not (workdir / 'results.json').exists()  # really killed mid-run.

  resumed = run_cli(cli_env, workdir, TINY, '--config.train.epochs=4')
  assert resumed.returncode == 0, resumed.stderr
  assert 'resuming from step' in resumed.stdout
  for stage in ('teacher', 'student'):
    metrics, _ = assert_events_equal_metrics(workdir / 'stages' / stage)
    assert [m['epoch'] for m in metrics] == [1, 2, 3, 4]


def test_a_replicated_run_has_a_tag_per_replica_and_their_mean(cli_env, tmp_path_factory):
  workdir = finished_run(cli_env, tmp_path_factory, 'tb_replicas', TINY,
                         '--config.train.epochs=2', '--config.num_replicas=2')
  metrics, scalars = assert_events_equal_metrics(workdir / 'stages' / 'student')
  assert len(metrics[-1]['test_accuracy']) == 2
  assert {'test_accuracy', 'test_accuracy/replica_0', 'test_accuracy/replica_1',
          'test_loss/replica_1', 'test_entropy/replica_0'} <= set(scalars)
  assert 'test_accuracy/replica_2' not in scalars
