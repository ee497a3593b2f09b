"""TensorBoard event files of a stage's epochs, written with tensorboardX (no TensorFlow).

  WORKDIR/stages/<name>/tensorboard/  one run per stage: `tensorboard --logdir WORKDIR` lists
                                      every stage of a run (and of several runs) side by side

Each epoch's line of `metrics.jsonl` becomes scalars at step = its epoch number (1, 2, ...):
the index `metrics.jsonl` uses, and one x-axis for stages of different lengths and batch sizes.
A tag is the metrics key (`train_loss`, `train_accuracy`, `test_loss`, `test_accuracy`,
`test_nontrue_mass`, `test_entropy`, `val_*`, `learning_rate`, `images_per_s`, `epoch_s`,
`skipped_steps`). A per-replica value (`num_replicas` > 1) is written as `<key>/replica_<r>`
for each replica and its mean as `<key>`, so replicated and single runs overlay; a multi-exit
model's `test_accuracy_exits` as `test_accuracy/exit_<e>` and `test_accuracy_ensemble` as
`test_accuracy/ensemble`.

The event files are a view of `metrics.jsonl`, never a record of their own: when a stage
starts or resumes, `open_writer` deletes its event files and writes again the epochs
`metrics.jsonl` kept (`workdir.resumed_metrics` has just dropped those after the restored
checkpoint), so an interrupted and resumed stage holds every epoch exactly once, and events
lost with a killed process (tensorboardX writes from a queue) come back. Rewritten events carry
the time of the rewrite. Process 0 alone writes, as for `metrics.jsonl`.
"""

import contextlib
import glob
import os
from typing import TYPE_CHECKING, Dict, Iterator, List, Optional

import numpy as np

from kdjax import parallel

if TYPE_CHECKING:  # imported where a writer is opened: it imports PyTorch when installed.
  import tensorboardX

EVENTS_FOLDER = 'tensorboard'
# tensorboardX's writer thread flushes at most this often (seconds): a live TensorBoard sees an
# epoch within a few seconds, and closing the writer always writes everything.
FLUSH_SECS = 5
_NOT_SCALARS = ('epoch', 'step')  # the x-axis, not a curve.


def scalars(summary: dict) -> Dict[str, float]:
  """An epoch's `metrics.jsonl` line as `{tag: value}` (the naming in the module docstring)."""
  tags = {}
  for key, value in summary.items():
    if key in _NOT_SCALARS or not _is_numeric(value):
      continue
    value = np.asarray(value, np.float64)
    if key.endswith('_exits'):  # [exits], or [replicas, exits].
      for exit_index in range(value.shape[-1]):
        tags.update(_with_replicas(f"{key[:-len('_exits')]}/exit_{exit_index}",
                                   value[..., exit_index]))
    elif key.endswith('_ensemble'):
      tags.update(_with_replicas(f"{key[:-len('_ensemble')]}/ensemble", value))
    else:
      tags.update(_with_replicas(key, value))
  return tags


def write_epoch(writer: Optional['tensorboardX.SummaryWriter'], summary: dict) -> None:
  """Adds an epoch's scalars at step `summary['epoch']`; nothing without a writer (process > 0)."""
  if writer is None:
    return
  for tag, value in scalars(summary).items():
    writer.add_scalar(tag, value, global_step=summary['epoch'])


@contextlib.contextmanager
def open_writer(stage_dir: str,
                history: List[dict]) -> Iterator[Optional['tensorboardX.SummaryWriter']]:
  """A writer for `stage_dir/tensorboard/` whose event files hold exactly the epochs in `history`
  (the stage's `metrics.jsonl` so far), closed (everything written) on every way out; `None` on
  processes other than 0."""
  if not parallel.is_primary():
    yield None
    return
  folder = os.path.join(stage_dir, EVENTS_FOLDER)
  for stale in glob.glob(os.path.join(folder, 'events.out.tfevents.*')):
    os.remove(stale)
  import tensorboardX  # here: it imports PyTorch when that is installed (about 1 s).
  with tensorboardX.SummaryWriter(folder, flush_secs=FLUSH_SECS) as writer:
    for summary in history:
      write_epoch(writer, summary)
    yield writer


def _is_numeric(value) -> bool:
  if isinstance(value, list):
    return bool(value) and all(_is_numeric(v) for v in value)
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _with_replicas(tag: str, value: np.ndarray) -> Dict[str, float]:
  """`{tag: value}` for a number; for `[replicas]` values their mean and one tag per replica."""
  if value.ndim == 0:
    return {tag: float(value)}
  return {tag: float(np.mean(value)),
          **{f'{tag}/replica_{r}': float(v) for r, v in enumerate(value)}}
