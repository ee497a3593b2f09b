"""Teachers from PyTorch and students back: kdjax.torch_import, and an external teacher in a run.

The PyTorch networks are written here from the public layouts (the state dicts' names and
shapes, NCHW, the flatten before the first Linear layer), not imported from the public codes.
"""

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch', reason="PyTorch is an extra: pip install 'kdjax[torch]' "
                                            '(CI installs the CPU wheel from /opt/wheels).')
import jax
import jax.numpy as jnp
import ml_collections
from torch import nn as tnn
import torch.nn.functional as F

from kdjax import config_layout
from kdjax import data as kd_data
from kdjax import experiment
from kdjax import models
from kdjax import parallel
from kdjax import plan as planning
from kdjax import teachers
from kdjax import torch_import
from kdjax.errors import KdjaxError
from experiments.configs import takd_default
from conftest import REPO

_spec = importlib.util.spec_from_file_location(
    'tiny_chain', os.path.join(REPO, 'tests/configs/tiny_chain.py'))
tiny_chain = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny_chain)

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# The PyTorch networks of the layouts.


class TorchBlock(tnn.Module):
  """A CIFAR ResNet basic block with a 1×1 conv + BN `downsample` where the shape changes."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = tnn.BatchNorm2d(cout)
    self.downsample = None
    if stride != 1 or cin != cout:
      self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False),
                                       tnn.BatchNorm2d(cout))

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class TorchCifarResNet(tnn.Module):
  """TAKD's and RepDistiller's CIFAR ResNet: conv1, bn1, layer1-3, AvgPool2d(8), fc."""

  def __init__(self, depth, num_classes=10, in_channels=3):
    super().__init__()
    n = (depth - 2) // 6
    self.conv1 = tnn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
    self.bn1 = tnn.BatchNorm2d(16)
    cin = 16
    for stage, width in enumerate((16, 32, 64)):
      blocks = [TorchBlock(cin if b == 0 else width, width, 2 if stage and b == 0 else 1)
                for b in range(n)]
      setattr(self, f'layer{stage + 1}', tnn.Sequential(*blocks))
      cin = width
    self.fc = tnn.Linear(64, num_classes)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = self.layer3(self.layer2(self.layer1(x)))
    return self.fc(F.avg_pool2d(x, 8).view(x.size(0), -1))


PLAIN_SPECS = {  # TAKD's CIFAR-10 plain CNNs: conv widths, 'M' max-pools, then Linear widths.
    2: ([16, 'M', 16, 'M'], []),
    4: ([16, 16, 'M', 32, 32, 'M'], []),
    10: ([32, 32, 'M', 64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M'], [128]),
}


class TorchPlainCNN(tnn.Module):
  """TAKD's plain CNN: `conv_layers` (Conv2d+bias, BatchNorm2d, ReLU, MaxPool2d) and
  `fc_layers` (Linear, ReLU, Linear) on the NCHW features flattened by `view`."""

  def __init__(self, depth, num_classes=10, image_shape=(32, 32, 3)):
    super().__init__()
    layers, hidden = PLAIN_SPECS[depth]
    h, w, c = image_shape
    conv = []
    for layer in layers:
      if layer == 'M':
        conv.append(tnn.MaxPool2d(2, 2))
        h, w = h // 2, w // 2
      else:
        conv += [tnn.Conv2d(c, layer, 3, padding=1), tnn.BatchNorm2d(layer), tnn.ReLU()]
        c = layer
    fc, size = [], h * w * c
    for width in hidden:
      fc += [tnn.Linear(size, width), tnn.ReLU()]
      size = width
    fc.append(tnn.Linear(size, num_classes))
    self.conv_layers, self.fc_layers = tnn.Sequential(*conv), tnn.Sequential(*fc)

  def forward(self, x):
    return self.fc_layers(self.conv_layers(x).view(x.size(0), -1))


def randomized(module, seed):
  """`module` with random weights and BatchNorm statistics (not PyTorch's defaults), in eval."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for layer in module.modules():
      if isinstance(layer, tnn.BatchNorm2d):
        n = layer.num_features
        layer.weight.copy_(0.5 + torch.rand(n, generator=generator))
        layer.bias.copy_(0.2 * torch.randn(n, generator=generator))
        layer.running_mean.copy_(0.2 * torch.randn(n, generator=generator))
        layer.running_var.copy_(0.5 + torch.rand(n, generator=generator))
        layer.num_batches_tracked.fill_(17)
      elif isinstance(layer, (tnn.Conv2d, tnn.Linear)):
        fan_in = layer.weight[0].numel()
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=generator)
                           * (2.0 / fan_in) ** 0.5)
        if layer.bias is not None:
          layer.bias.copy_(0.1 * torch.randn(layer.bias.shape, generator=generator))
  return module.eval()


def torch_network(model_name, num_classes=10, image_shape=(32, 32, 3), seed=0):
  if model_name.startswith('resnet'):
    module = TorchCifarResNet(int(model_name[6:]), num_classes, image_shape[-1])
  else:
    module = TorchPlainCNN(int(model_name.rsplit('_', 1)[1]), num_classes, image_shape)
  return randomized(module, seed)


def save(module, path, form):
  state = module.state_dict()
  if form == 'safetensors':
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, path)
  elif form == 'takd':  # TAKD's train.py saves beside the epoch and the optimizer's state.
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.save({'epoch': 3, 'model_state_dict': state,
                'optimizer_state_dict': optimizer.state_dict()}, path)
  elif form == 'repdistiller':  # RepDistiller and mdistiller: {'model': ..., 'epoch', ...}.
    torch.save({'epoch': 240, 'model': state, 'accuracy': 71.3}, path)
  else:
    torch.save(state, path)
  return path


def torch_logits(module, images_nhwc):
  with torch.no_grad():
    return module(torch.from_numpy(np.transpose(images_nhwc, (0, 3, 1, 2)).copy())).numpy()


def kdjax_logits(model_name, variables, images_nhwc, num_classes=10):
  model = torch_import.build_model(model_name, num_classes)
  return np.asarray(model.apply(variables, jnp.asarray(images_nhwc), train=False))


def images(shape=(32, 32, 3), count=4, seed=1):
  return np.random.default_rng(seed).normal(size=(count, *shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Import: the same logits.

CASES = [  # (layout, model, how the file is saved, suffix)
    ('takd', 'resnet8', 'takd', '.pth.tar'),
    ('takd', 'resnet20', 'plain', '.pth'),
    ('repdistiller', 'resnet8', 'safetensors', '.safetensors'),
    ('repdistiller', 'resnet20', 'repdistiller', '.pth'),
    ('takd', 'plain_cnn_2', 'plain', '.pt'),
    ('takd', 'plain_cnn_4', 'safetensors', '.safetensors'),
    ('takd', 'plain_cnn_10', 'takd', '.pth.tar'),
]


@pytest.mark.parametrize('layout,model_name,form,suffix', CASES)
def test_imported_teacher_gives_pytorch_logits(tmp_path, layout, model_name, form, suffix):
  module = torch_network(model_name)
  path = save(module, str(tmp_path / f'teacher{suffix}'), form)
  variables = torch_import.import_state_dict(path, model_name, layout, num_classes=10)
  x = images()
  np.testing.assert_allclose(kdjax_logits(model_name, variables, x), torch_logits(module, x),
                             **TOLERANCE)


def test_a_flatten_that_is_not_square_and_one_channel_is_permuted_right(tmp_path):
  shape = (16, 8, 1)  # H ≠ W: the first Linear layer's rows depend on both.
  module = torch_network('plain_cnn_4', image_shape=shape)
  path = save(module, str(tmp_path / 'teacher.pth'), 'plain')
  variables = torch_import.import_state_dict(path, 'plain_cnn_4', 'takd', 10, shape)
  x = images(shape)
  np.testing.assert_allclose(kdjax_logits('plain_cnn_4', variables, x), torch_logits(module, x),
                             **TOLERANCE)
  exported = torch_import.export_state_dict(variables, 'plain_cnn_4', 'takd', shape)
  assert all(np.array_equal(exported[k], v.numpy()) for k, v in module.state_dict().items()
             if not k.endswith('num_batches_tracked'))


# ---------------------------------------------------------------------------------------------
# Export: students back to PyTorch.


@pytest.mark.parametrize('model_name', ['resnet8', 'plain_cnn_2'])
def test_export_then_import_is_bitwise_and_pytorch_runs_it(tmp_path, model_name):
  model = torch_import.build_model(model_name, 10)
  variables = models.init_variables(model, (32, 32, 3), jax.random.key(3))
  # Non-default statistics, as a trained student has.
  variables = jax.tree_util.tree_map(lambda v: v + 0.25, variables)
  exported = torch_import.export_state_dict(variables, model_name, 'takd')
  module = torch_network(model_name)
  module.load_state_dict({k: torch.from_numpy(v) for k, v in exported.items()}, strict=True)
  x = images()
  np.testing.assert_allclose(torch_logits(module, x), kdjax_logits(model_name, variables, x),
                             **TOLERANCE)
  for save_fn, name in ((torch_import.save_torch, 'student.pth'),
                        (torch_import.save_safetensors, 'student.safetensors')):
    save_fn(exported, str(tmp_path / name))
    again = torch_import.import_state_dict(str(tmp_path / name), model_name, 'takd', 10)
    same = jax.tree_util.tree_map(
        lambda a, b: a.dtype == b.dtype and a.tobytes() == np.asarray(b).tobytes(),
        again, jax.device_get(variables))
    assert all(jax.tree_util.tree_leaves(same)), name


def test_export_of_a_zero_pad_resnet_says_to_train_with_projection():
  model = models.get_model('resnet8', 10, shortcut='zero_pad')
  variables = models.init_variables(model, (32, 32, 3), jax.random.key(0))
  with pytest.raises(KdjaxError, match='resnet_shortcut=projection'):
    torch_import.export_state_dict(variables, 'resnet8', 'repdistiller')


# ---------------------------------------------------------------------------------------------
# Files that do not fit, and files that are not plain weights.


@pytest.fixture(scope='module')
def resnet8_state():
  return {k: v.numpy().copy() for k, v in torch_network('resnet8').state_dict().items()}


def check(state, model_name='resnet8', num_classes=10):
  torch_import.to_variables(state, torch_import.build_model(model_name, num_classes),
                            (32, 32, 3), 'repdistiller', "'teacher.pth'")


def test_missing_key_is_named_with_its_shape(resnet8_state):
  state = dict(resnet8_state)
  del state['layer3.0.downsample.0.weight']
  with pytest.raises(KdjaxError, match=r"missing key 'layer3.0.downsample.0.weight' \(expected "
                                       r'shape \[64, 32, 1, 1\]\)'):
    check(state)


def test_extra_key_is_named(resnet8_state):
  state = {**resnet8_state, 'fc2.weight': np.zeros((10, 64), np.float32)}
  with pytest.raises(KdjaxError, match=r"unexpected key 'fc2.weight' \(shape \[10, 64\]\)"):
    check(state)


def test_misshaped_key_is_named_with_the_expected_shape(resnet8_state):
  state = {**resnet8_state, 'fc.weight': np.zeros((100, 64), np.float32)}
  with pytest.raises(KdjaxError, match=r"'fc.weight' has shape \[100, 64\], expected \[10, 64\].*"
                                       'number of classes'):
    check(state)


def test_wrong_architecture_says_what_the_keys_look_like(tmp_path):
  path = save(torch_network('resnet20'), str(tmp_path / 'resnet20.pth'), 'plain')
  with pytest.raises(KdjaxError, match=r'does not hold a ResNet-8.*unexpected keys '
                                       r"'layer1.1.conv1.weight'.*look like a CIFAR ResNet-20 "
                                       r'\(resnet20\)'):
    torch_import.import_state_dict(path, 'resnet8', 'takd', 10)
  path = save(torch_network('plain_cnn_4'), str(tmp_path / 'plain4.pth'), 'plain')
  with pytest.raises(KdjaxError, match=r'plain_cnn_4'):
    torch_import.import_state_dict(path, 'plain_cnn_2', 'takd', 10)
  with pytest.raises(KdjaxError, match="layout 'repdistiller' has no model 'plain_cnn_2'"):
    torch_import.import_state_dict(path, 'plain_cnn_2', 'repdistiller', 10)


class Marker:
  """Unpickling it would write `path`: proof that the file's code ran."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (_write_marker, (self.path,))


def _write_marker(path):
  with open(path, 'w') as f:
    f.write('code from the file ran')
  return path


def test_a_pickle_with_objects_is_refused_and_never_runs(tmp_path):
  marker = str(tmp_path / 'ran.txt')
  path = str(tmp_path / 'evil.pth')
  torch.save({'model': {'fc.weight': torch.zeros(10, 64)}, 'hook': Marker(marker)}, path)
  assert not os.path.exists(marker)
  with pytest.raises(KdjaxError, match='refused to read.*weights_only=True.*never unpickles'):
    torch_import.read_state_dict(path)
  assert not os.path.exists(marker)


def test_a_dict_that_is_not_a_state_dict_is_refused(tmp_path):
  path = str(tmp_path / 'odd.pth')
  torch.save({'fc.weight': torch.zeros(2), 'note': 'hello'}, path)
  with pytest.raises(KdjaxError, match="'note' holds a str, not a tensor"):
    torch_import.read_state_dict(path)


# ---------------------------------------------------------------------------------------------
# In a config: a stage names the external teacher like an earlier stage.


def external_config(path, model='plain_cnn_4', layout='takd'):
  config = tiny_chain.get_config()
  config.train.epochs = 1
  config.compilation_cache_dir = ''
  config.external_teachers = ml_collections.ConfigDict()
  config.external_teachers.torch4 = dict(path=str(path), model=model, layout=layout)
  config.stages = ml_collections.ConfigDict()
  config.stages.student = takd_default.stage('plain_cnn_2', 'kd', teacher='torch4')
  config.stage_order = ('student',)
  return config


def test_config_mistakes_in_the_block_are_reported_before_any_data(tmp_path):
  path = save(torch_network('plain_cnn_4', image_shape=(8, 8, 1)), str(tmp_path / 't.pth'),
              'plain')
  assert planning.stage_order(external_config(path)) == ['student']
  with pytest.raises(KdjaxError, match="does not exist"):
    planning.stage_order(external_config(tmp_path / 'nope.pth'))
  with pytest.raises(KdjaxError, match="unknown teacher layout 'torchvision'"):
    planning.stage_order(external_config(path, layout='torchvision'))
  config = external_config(path)
  config.external_teachers.torch4.dtype = 'float32'
  with pytest.raises(KdjaxError, match=r"unknown keys \['dtype'\]"):
    planning.stage_order(config)
  config = external_config(path)
  config.stages.student.teacher = 'torch5'
  with pytest.raises(KdjaxError, match='external teachers: torch4'):
    planning.stage_order(config)


def test_the_block_is_part_of_the_recorded_experiment_when_a_stage_uses_it(tmp_path):
  config = external_config(tmp_path / 't.pth')
  settings = config_layout.effective_settings(config)
  assert settings['external_teachers'] == {'torch4': dict(path=str(tmp_path / 't.pth'),
                                                          model='plain_cnn_4', layout='takd')}
  config.stages.student = takd_default.stage('plain_cnn_2')  # no stage uses it: not counted.
  assert 'external_teachers' not in config_layout.effective_settings(config)


def test_plan_checks_the_file_and_records_its_fingerprint(tmp_path):
  path = save(torch_network('plain_cnn_4', image_shape=(8, 8, 1)), str(tmp_path / 't.pth'),
              'plain')
  data = planning.DataInfo('digits', 1000, 10, (8, 8, 1))
  (student,) = planning.plan(external_config(path), data)
  (teacher,) = student.teacher.teachers
  assert teacher.source_path == path and teacher.layout == 'takd'
  assert teacher.fingerprint == torch_import.sha256(path) and len(teacher.fingerprint) == 64
  with pytest.raises(KdjaxError, match=r"config.external_teachers.torch4 \('.*t.pth'\) does not "
                                       'hold a 2-layer plain CNN'):
    planning.plan(external_config(path, model='plain_cnn_2'), data)


def test_a_student_distils_from_an_imported_pytorch_teacher(tmp_path):
  dataset = experiment.load_dataset(external_config('unused'))
  module = torch_network('plain_cnn_4', image_shape=dataset.image_shape, seed=5)
  path = save(module, str(tmp_path / 'plain4.pth.tar'), 'takd')
  config = external_config(path)
  workdir = str(tmp_path / 'run')
  (result,) = experiment.run(config, workdir)
  assert result.name == 'student' and result.teacher == 'torch4'
  assert np.isfinite(result.test_loss)

  # The logits the student learnt from (the cached table) are PyTorch's.
  mesh = parallel.make_mesh()
  (plan,) = planning.plan(config, planning.DataInfo.of(dataset), mesh.devices.size)
  mean, std = kd_data.channel_stats(dataset.x_train)
  normalization = experiment.train.Normalization(jnp.asarray(mean), jnp.asarray(std))
  splits = experiment.device_splits(dataset, mesh)
  source = teachers.make_source(plan, workdir, splits.train, normalization, mesh,
                                log=lambda *_: None)
  assert isinstance(source, teachers.CachedTeacher)
  normalized = np.asarray(kd_data.normalize(dataset.x_train, mean, std), np.float32)
  np.testing.assert_allclose(np.asarray(source.table), torch_logits(module, normalized),
                             **TOLERANCE)

  # A file changed after planning is refused, not silently used.
  save(torch_network('plain_cnn_4', image_shape=dataset.image_shape, seed=6), path, 'takd')
  with pytest.raises(KdjaxError, match='has changed since this run was planned'):
    teachers.load_variables(plan.teacher.teachers[0], workdir, plan.image_shape)


def test_the_import_command_scores_the_teacher_and_writes_a_checkpoint_a_config_names(tmp_path):
  from kdjax import import_teacher
  dataset = experiment.load_dataset(external_config('unused'))
  module = torch_network('plain_cnn_4', image_shape=dataset.image_shape, seed=7)
  path = save(module, str(tmp_path / 'plain4.pth'), 'plain')
  out = str(tmp_path / 'teacher_orbax')
  accuracy = import_teacher.import_teacher(path, 'plain_cnn_4', 'takd', out, dataset)
  # PyTorch's own accuracy on the same normalised test images.
  mean, std = kd_data.channel_stats(dataset.x_train)
  logits = torch_logits(module, np.asarray(kd_data.normalize(dataset.x_test, mean, std),
                                           np.float32))
  assert accuracy == pytest.approx(float(np.mean(logits.argmax(-1) == dataset.y_test)), abs=1e-6)
  with pytest.raises(KdjaxError, match='exists already'):
    import_teacher.import_teacher(path, 'plain_cnn_4', 'takd', out, dataset)
  config = external_config(out, layout='orbax')
  (result,) = experiment.run(config, str(tmp_path / 'run'))
  assert result.teacher == 'torch4' and np.isfinite(result.test_loss)
