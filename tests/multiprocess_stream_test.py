"""Streaming with several processes: each process reads only its own rows of every batch.

Two JAX processes (gloo over 127.0.0.1, one CPU device each) train the tiny chain's teacher
with `data.pipeline='stream'`; each process's training images are wrapped so that every row it
reads is recorded. Their rows are disjoint and together are the epoch's batches, half each.
"""

import json
import subprocess
import sys


from conftest import REPO
from multiprocess_test import free_port, environment

DRIVER = r'''
import json, sys
import jax
address, index, workdir, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=index,
                           initialization_timeout=60, heartbeat_timeout_seconds=10,
                           shutdown_timeout_seconds=10)
import numpy as np
import ml_collections
from experiments.configs import takd_default
from kdjax import experiment, train

reads = []


class Recording:
  """The training images, recording which rows this process reads."""

  def __init__(self, array):
    self.array, self.shape, self.dtype = array, array.shape, array.dtype

  def __getitem__(self, rows):
    reads.append(np.asarray(rows).tolist())
    return self.array[rows]


original = experiment.host_splits
experiment.host_splits = lambda dataset: original(dataset)._replace(
    train=train.HostData(Recording(dataset.x_train), dataset.y_train))
config = takd_default.get_config()
config.stages = ml_collections.ConfigDict({'teacher': takd_default.stage('plain_cnn_2')})
config.stage_order = ('teacher',)
config.train.epochs, config.train.batch_size, config.train.eval_batch_size = 1, 64, 100
config.data.pipeline, config.progress_bar, config.compilation_cache_dir = 'stream', False, ''
experiment.run(config, workdir)
with open(out, 'w') as f:
  json.dump(reads, f)
'''


def test_each_process_streams_only_its_own_rows(cli_env, tmp_path):
  address = f'127.0.0.1:{free_port()}'
  workdir = tmp_path / 'run'
  processes = [subprocess.Popen(
      [sys.executable, '-c', DRIVER, address, str(i), str(workdir), str(tmp_path / f'{i}.json')],
      cwd=REPO, env=environment(cli_env, 1), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, (_, err) in zip(processes, outputs):
    assert p.returncode == 0, err[-3000:]
  steps = 1438 // 64
  rows = []
  for i in range(2):
    reads = json.loads((tmp_path / f'{i}.json').read_text())
    batches = [r for r in reads if len(r) == 32]  # training: half of each 64-image batch.
    assert len(batches) == steps, [len(r) for r in reads]
    rows.append({row for batch in batches for row in batch})
  assert len(rows[0]) == len(rows[1]) == 32 * steps  # within an epoch no row repeats...
  assert not rows[0] & rows[1]  # ...and no process read a row of the other's.
  assert len(rows[0] | rows[1]) == 64 * steps
