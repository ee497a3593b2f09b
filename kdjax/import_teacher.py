r"""Convert a PyTorch teacher and verify it in one go: `python -m kdjax.import_teacher`.

  python -m kdjax.import_teacher --torch=resnet110.pth --model=resnet110 --layout=repdistiller \
      --out=teachers/resnet110 --data=cifar10

reads the state dict (`kdjax.torch_import`: every key and shape checked against the layout),
prints the teacher's test accuracy on the dataset (so a wrong import shows at once: a right one
scores what the teacher scored in PyTorch, a wrong one near chance), writes the variables as an
Orbax checkpoint folder, and prints the config lines that name it as a teacher
(`layout='orbax'`, read by `kdjax.flax_import`). A mistake prints one paragraph and exits 2.
"""

import os
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string('torch', None, 'The PyTorch weights: .pt, .pth, .pth.tar or .safetensors.')
flags.DEFINE_string('model', None, "kdjax's name of the architecture, e.g. resnet110.")
flags.DEFINE_string('layout', 'takd', "The file's layout: 'takd' or 'repdistiller'.")
flags.DEFINE_string('out', None, 'The Orbax checkpoint folder to write (must not exist).')
flags.DEFINE_string('data', 'cifar10', "The dataset to score it on: 'digits' or a TFDS name.")
flags.DEFINE_string('npz', '', 'Or a .npz with x_train, y_train, x_test, y_test.')
flags.DEFINE_integer('num_classes', 0, '0: from the labels.')
flags.mark_flags_as_required(['torch', 'model', 'out'])


def import_teacher(path: str, model_name: str, layout: str, out: str, dataset) -> float:
  """Converts `path`, writes it to `out` (Orbax) and returns its test accuracy on `dataset`."""
  import jax.numpy as jnp
  import optax
  import orbax.checkpoint as ocp
  from kdjax import data as kd_data
  from kdjax import torch_import
  from kdjax import train
  from kdjax.errors import KdjaxError
  if os.path.exists(out):
    raise KdjaxError(f"--out '{out}' exists already; give a new folder (nothing was written).")
  model = torch_import.build_model(model_name, dataset.num_classes)
  variables = torch_import.load_variables(path, model, dataset.image_shape, layout,
                                          source=f"'{path}'")
  mean, std = kd_data.channel_stats(dataset.x_train)
  state = train.create_train_state(model, variables, optax.identity())
  test = train.DeviceData(jnp.asarray(dataset.x_test), jnp.asarray(dataset.y_test))
  accuracy = train.evaluate(train.make_eval_step(train.Normalization(jnp.asarray(mean),
                                                                     jnp.asarray(std))),
                            state, test, batch_size=500)['test_accuracy']
  with ocp.StandardCheckpointer() as checkpointer:  # closing waits for the write.
    checkpointer.save(os.path.abspath(out), variables)
  return float(accuracy)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  from absl import logging
  logging.set_verbosity(logging.ERROR)
  from kdjax import data as kd_data
  from kdjax.errors import KdjaxError
  try:
    dataset = kd_data.load(FLAGS.data, FLAGS.npz, num_classes=FLAGS.num_classes or None)
    accuracy = import_teacher(FLAGS.torch, FLAGS.model, FLAGS.layout, FLAGS.out, dataset)
  except KdjaxError as e:
    print(f'kdjax.import_teacher: error: {e}', file=sys.stderr)
    sys.exit(2)
  print(f'{FLAGS.model} from {FLAGS.torch} ({FLAGS.layout} layout): test accuracy '
        f'{100 * accuracy:.2f} % on {dataset.name} ({len(dataset.x_test)} images, normalised '
        f"with its training set's mean and std). Written to {FLAGS.out}; name it in a config:\n\n"
        f"  config.external_teachers.{FLAGS.model} = dict(\n"
        f"      path='{os.path.abspath(FLAGS.out)}', model='{FLAGS.model}', layout='orbax')\n"
        f"  config.stages.student = stage(..., 'kd', teacher='{FLAGS.model}')")
  if FLAGS.model.startswith('resnet'):
    print("\nIts ResNet has 1x1-conv projection shortcuts, as the PyTorch codes build them: set "
          "config.model.resnet_shortcut = 'projection' in that config.")


if __name__ == '__main__':
  app.run(main)
