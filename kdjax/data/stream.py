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
                     total_steps: int, mesh, tables: Sequence[Tuple[Callable, bool]] = (),
                     threads: int = 4, prefetch: int = 4) -> Iterator[tuple]:
  """`(batch, indices, table_rows)` for the steps `start_step … total_steps − 1`.

  grain's threads read `prefetch` batches ahead of the step (this process's rows only) from the
  host arrays, and the same rows of each teacher-logit table in `tables` (`(read, per_replica)`,
  `read(step, rows)` giving `[B, C]`, or `[R, B, C]`: `teachers.DiskCachedTeacher.reader` of a
  memory-mapped file of `teachers.disk_cache`); each then becomes a global array split over the
  mesh's `data` axis, as the indices do (`parallel.global_batch`).
  """
  import grain  # imported here: only the streaming path needs it.

  def read(step: int):  # on a grain thread.
    indices = order(step)
    rows = parallel.process_rows(indices, mesh)
    logits = [np.asarray(read_rows(step, rows)) for read_rows, _ in tables]
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


IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
# A folder's test split, by the names torchvision and Kaggle-style layouts give it.
TEST_FOLDER_NAMES = ('test', 'val', 'validation')


def write_image_folder(folder: str, out: str, size: int, log=print) -> None:
  """An image folder in torchvision's `ImageFolder` layout (`folder/train/<class>/<image>` and
  `folder/test/<class>/<image>`, the test split also named `val` or `validation`) as the `.npy`
  files `open_npy_folder` memory-maps, each image decoded once (PIL, as RGB) and stored at
  `size × size`: training images with their shorter side resized to `size` and the central
  square kept, test images resized to `size / 0.875` first (ImageNet's resize-256-crop-224;
  `sources.fit_image`). Classes are the training split's sub-folders in sorted order (label 0
  the first). Written one image at a time into memory-mapped files under temporary names,
  renamed when whole, so a dataset larger than memory converts and a killed conversion leaves
  no partial split.
  """
  from PIL import Image
  from kdjax.data import sources
  splits = {'train': os.path.join(folder, 'train')}
  tests = [os.path.join(folder, n) for n in TEST_FOLDER_NAMES
           if os.path.isdir(os.path.join(folder, n))]
  if not os.path.isdir(splits['train']) or not tests:
    raise KdjaxError(f"'{folder}' is not an image folder in torchvision's layout: it needs "
                     f"train/<class>/<images> and one of {', '.join(TEST_FOLDER_NAMES)}"
                     '/<class>/<images> (found: '
                     f"{', '.join(sorted(os.listdir(folder))) or 'nothing'}).")
  splits['test'] = tests[0]
  classes = sorted(d for d in os.listdir(splits['train'])
                   if os.path.isdir(os.path.join(splits['train'], d)))
  if not classes:
    raise KdjaxError(f"'{splits['train']}' has no class folders (train/<class>/<images>).")
  os.makedirs(out, exist_ok=True)
  for split, root in splits.items():
    files = []
    for label, name in enumerate(classes):
      directory = os.path.join(root, name)
      found = sorted(f for f in os.listdir(directory) if f.lower().endswith(IMAGE_SUFFIXES)) \
          if os.path.isdir(directory) else []
      files += [(os.path.join(directory, f), label) for f in found]
    strays = sorted(set(os.listdir(root)) - set(classes))
    if strays and split == 'test':
      raise KdjaxError(f"'{root}' has class folders the training split lacks: "
                       f"{', '.join(strays[:5])}; every test class must be a training class.")
    if not files:
      raise KdjaxError(f"'{root}' holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    fraction = 1.0 if split == 'train' else sources.TEST_CROP_FRACTION
    images_path, labels_path = (os.path.join(out, f'{k}_{split}.npy') for k in ('x', 'y'))
    images = np.lib.format.open_memmap(images_path + '.tmp', mode='w+', dtype=np.uint8,
                                       shape=(len(files), size, size, 3))
    for i, (path, _) in enumerate(files):
      try:
        with Image.open(path) as image:
          pixels = np.asarray(image.convert('RGB'))
      except OSError as e:
        raise KdjaxError(f"cannot read the image '{path}': {e}. Remove or replace it.") from e
      images[i] = sources.fit_image(pixels, size, fraction)
    images.flush()
    del images
    np.save(labels_path + '.tmp.npy', np.asarray([l for _, l in files], np.int32))
    os.replace(images_path + '.tmp', images_path)
    os.replace(labels_path + '.tmp.npy', labels_path)
    log(f'{split}: {len(files)} images of {len(classes)} classes from {root}.')
  with open(os.path.join(out, 'dataset.json'), 'w') as f:
    json.dump({'name': os.path.basename(os.path.normpath(folder)), 'num_classes': len(classes),
               'classes': classes}, f)


def main(argv) -> None:
  """`python -m kdjax.data.stream IN OUT_FOLDER [--size=N]`: `.npy` files to stream from
  (`--config.data.npy_dir=OUT_FOLDER --config.data.pipeline=stream`), made from IN: an `.npz` in
  kdjax's layout, or an image folder in torchvision's layout (train/<class>/…, test/<class>/…),
  whose images are stored at N × N (`--size`, required for a folder)."""
  from kdjax.data import sources
  sizes = [a for a in argv[1:] if a.startswith('--size=')]
  paths = [a for a in argv[1:] if not a.startswith('--size=')]
  if len(paths) != 2 or len(sizes) > 1 or (sizes and not sizes[0][7:].isdigit()):
    print(main.__doc__, file=sys.stderr)
    sys.exit(2)
  source, out = paths
  try:
    if os.path.isdir(source):
      if not sizes or int(sizes[0][7:]) < 1:
        raise KdjaxError(f"'{source}' is an image folder: give the size its images are stored "
                         'at, e.g. --size=32 (CIFAR) or --size=224 (ImageNet).')
      write_image_folder(source, out, int(sizes[0][7:]))
    else:
      write_npy_folder(sources.load(npz=source), out)
  except KdjaxError as e:
    print(f'kdjax: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'wrote {", ".join(f"{s}.npy" for s in SPLITS)} to {out}.')


if __name__ == '__main__':
  main(sys.argv)
