"""Training data streamed from the host, for datasets that do not fit on a device.

`data.pipeline` chooses how a run's images reach the device:
  'device'  every split is put on every device once (`experiment.device_splits`): no input
            pipeline at all, the fastest path while the data fits;
  'stream'  the splits stay on the host (in memory, or memory-mapped `.npy` files that need not
            fit in memory: `write_npy_folder`, `python -m kdjax.data.stream`), and each step's
            batch is read by grain's threads ahead of the step and sent to the device;
  'auto'    'device' when the splits fit `data.device_budget_mb`, else 'stream'.

Both paths train the same student: the batch of step s is the same rows in the same order
(`order(step)`, a pure function of the seed, the stage and the epoch), gathered on the host
instead of on the device, and augmented and normalised inside `jit` with the same keys. Nothing
about the stream needs saving: where it resumes is the step, which every checkpoint holds, so a
killed run resumes at the same example as the device-resident path does. With several processes
each one reads only the rows its own devices hold (`parallel.process_rows`).
"""

import json
import os
import sys
from typing import Callable, Iterator, Sequence, Tuple

import numpy as np

from kdjax import parallel
from kdjax import train
from kdjax.errors import KdjaxError

PIPELINES = ('device', 'stream', 'auto')
SPLITS = ('x_train', 'y_train', 'x_test', 'y_test')


def choose(pipeline: str, dataset, budget_mb: float) -> str:
  """'device' or 'stream' for `data.pipeline`; 'auto' compares the splits with the budget."""
  if pipeline not in PIPELINES:
    raise KdjaxError(f"unknown data.pipeline '{pipeline}'; choose one of: {', '.join(PIPELINES)}.")
  if pipeline != 'auto':
    return pipeline
  return 'device' if split_bytes(dataset) <= budget_mb * 2**20 else 'stream'


def split_bytes(dataset) -> int:
  """The bytes every device would hold with `data.pipeline='device'`."""
  arrays = (dataset.x_train, dataset.y_train, dataset.x_test, dataset.y_test, dataset.x_val,
            dataset.y_val)
  return int(sum(a.nbytes for a in arrays if a is not None))


def training_batches(data: train.HostData, order: Callable[[int], np.ndarray], start_step: int,
                     total_steps: int, mesh, tables: Sequence[Tuple[np.ndarray, bool]] = (),
                     threads: int = 4, prefetch: int = 4) -> Iterator[tuple]:
  """`(batch, indices, table_rows)` for the steps `start_step … total_steps − 1`.

  grain's threads read `prefetch` batches ahead of the step (this process's rows only) from the
  host arrays, and the same rows of each teacher-logit table in `tables` (`(table, per_replica)`:
  `[N, C]`, or `[R, N, C]`, memory-mapped files of `teachers.disk_cache`); each then becomes a
  global array split over the mesh's `data` axis, as the indices do (`parallel.global_batch`).
  """
  import grain  # imported here: only the streaming path needs it.

  def read(step: int):  # on a grain thread.
    indices = order(step)
    rows = parallel.process_rows(indices, mesh)
    logits = [np.asarray(t[:, rows] if per_replica else t[rows]) for t, per_replica in tables]
    return indices, np.asarray(data.images[rows]), np.asarray(data.labels[rows]), logits

  steps = grain.MapDataset.range(start_step, total_steps).map(read)
  loader = steps.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                   prefetch_buffer_size=prefetch))
  for indices, images, labels, logits in loader:
    size = len(indices)
    yield (train.StreamedBatch(parallel.global_rows(images, mesh, size),
                               parallel.global_rows(labels, mesh, size)),
           parallel.global_batch(indices, mesh),
           [parallel.global_rows(l, mesh, size, axis=1 if per_replica else 0)
            for l, (_, per_replica) in zip(logits, tables)])


def write_npy_folder(dataset, folder: str) -> None:
  """The dataset as `.npy` files (`x_train.npy`, …) that `open_npy_folder` memory-maps."""
  os.makedirs(folder, exist_ok=True)
  for split in SPLITS:
    np.save(os.path.join(folder, f'{split}.npy'), getattr(dataset, split))
  with open(os.path.join(folder, 'dataset.json'), 'w') as f:
    json.dump({'name': dataset.name, 'num_classes': dataset.num_classes}, f)


def open_npy_folder(folder: str) -> dict:
  """`{split: array}` memory-mapped from a folder `write_npy_folder` made: nothing is read until
  a batch needs its rows."""
  missing = [s for s in SPLITS if not os.path.isfile(os.path.join(folder, f'{s}.npy'))]
  if missing:
    raise KdjaxError(f"data.npy_dir '{folder}' lacks {', '.join(f'{m}.npy' for m in missing)}; "
                     'make the folder with `python -m kdjax.data.stream IN.npz OUT_FOLDER` (or '
                     '`kdjax.data.stream.write_npy_folder`).')
  return {s: np.load(os.path.join(folder, f'{s}.npy'), mmap_mode='r') for s in SPLITS}


def main(argv) -> None:
  """`python -m kdjax.data.stream IN.npz OUT_FOLDER`: an `.npz` in kdjax's layout as `.npy`
  files to stream from (`--config.data.npy_dir=OUT_FOLDER --config.data.pipeline=stream`)."""
  from kdjax.data import sources
  if len(argv) != 3:
    print(main.__doc__, file=sys.stderr)
    sys.exit(2)
  try:
    write_npy_folder(sources.load(npz=argv[1]), argv[2])
  except KdjaxError as e:
    print(f'kdjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {", ".join(f"{s}.npy" for s in SPLITS)} to {argv[2]}.')


if __name__ == '__main__':
  main(sys.argv)
