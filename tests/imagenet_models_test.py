"""The ImageNet ResNets (resnet18/34/50): torchvision's counts, Table 1's layers, a PyTorch forward.

The full-size networks are only traced (`variable_shapes`, `jax.eval_shape`): nothing of their
size is compiled except one ResNet-18 forward on 32×32 images. The numerical checks run on small
`ImageNetResNet`s (narrow stages, one or two blocks each), which keep every layer kind.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import models
from kdjax.models.imagenet_resnet import SPECS, ImageNetResNet
from kdjax.models.resnet import BLOCKS_PER_STAGE, CifarResNet

NAMES = ('resnet18', 'resnet34', 'resnet50')
# A basic-block and a bottleneck network small enough to initialise and run in a test; stage 1
# of the first keeps its width (identity shortcuts only), every other first block projects.
SMALL = {'basic': dict(block='basic', blocks_per_stage=(2, 2, 1, 1), stage_widths=(8, 8, 16, 16)),
         'bottleneck': dict(block='bottleneck', blocks_per_stage=(2, 1, 1, 1),
                            stage_widths=(4, 8, 8, 16))}


def shapes(name, image_shape=(224, 224, 3), num_classes=10, **kwargs):
  return models.variable_shapes(models.get_model(name, num_classes, **kwargs), image_shape)


def randomized(variables, seed=0):
  """The variables with random BatchNorm statistics and affine parameters, so BN is not a no-op."""
  rng = np.random.default_rng(seed)

  def one(path, leaf):
    kind = path[-1].key
    if kind == 'var':
      return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape), leaf.dtype)
    if kind in ('mean', 'bias', 'scale'):
      offset = 1.0 if kind == 'scale' else 0.0
      return jnp.asarray(offset + 0.2 * rng.normal(size=leaf.shape), leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(one, variables)


def run_once(f, *args):
  """`f(*args)` compiled without LLVM's optimisations: these tests are about values."""
  compiled = jax.jit(f).lower(*args).compile(
      compiler_options={'xla_backend_optimization_level': 0})
  return compiled(*args)


def torchvision_state(variables):
  """Our variables as a torchvision `state_dict` would hold them: names, NCHW/OI layouts."""
  names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}
  state = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    _, *scope, leaf_name = (p.key for p in path)
    value = np.array(leaf, np.float32)  # a writable copy, as torch.from_numpy wants.
    if value.ndim == 4:
      value = value.transpose(3, 2, 0, 1)  # HWIO → OIHW.
    elif value.ndim == 2:
      value = value.T  # Dense [in, out] → Linear [out, in].
    state['.'.join([s.replace('_', '.') for s in scope] + [names[leaf_name]])] = value
  return state


# ---------------------------------------------------------------------------------------------
# Sizes: torchvision's parameter counts, Table 1's layers and map sizes.


@pytest.mark.parametrize('name,published', [
    ('resnet18', 11_689_512), ('resnet34', 21_797_672), ('resnet50', 25_557_032)])
def test_parameter_counts_equal_torchvision(name, published):
  variables = shapes(name, num_classes=1000)
  assert models.count_params(variables['params']) == published  # BN statistics are not counted.
  # Each BatchNorm has a scale and an offset in params and a mean and a variance in batch_stats.
  bn_params = sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(
      variables['params'])[0] if path[-2].key.startswith(('bn', 'downsample_1')))
  assert models.count_params(variables['batch_stats']) == bn_params


@pytest.mark.parametrize('name,blocks', [
    ('resnet18', (2, 2, 2, 2)), ('resnet34', (3, 4, 6, 3)), ('resnet50', (3, 4, 6, 3))])
def test_layers_follow_table_1(name, blocks):
  params = shapes(name, (16, 16, 3))['params']
  stages = [sorted(k for k in params if k.startswith(f'layer{s}_')) for s in (1, 2, 3, 4)]
  assert [len(stage) for stage in stages] == list(blocks)
  assert set(params) == {'conv1', 'bn1', 'fc', *sum(stages, [])}
  kernel = lambda *scope: params[scope[0]]['kernel'].shape if len(scope) == 1 else (
      params[scope[0]][scope[1]]['kernel'].shape)
  assert kernel('conv1') == (7, 7, 3, 64)  # conv1: 7×7, 64, stride 2.
  last = f'layer4_{blocks[3] - 1}'
  if name == 'resnet50':  # [1×1, 64; 3×3, 64; 1×1, 256] … [1×1, 512; 3×3, 512; 1×1, 2048].
    assert [kernel('layer1_0', c) for c in ('conv1', 'conv2', 'conv3', 'downsample_0')] == [
        (1, 1, 64, 64), (3, 3, 64, 64), (1, 1, 64, 256), (1, 1, 64, 256)]
    assert kernel('layer2_0', 'conv1') == (1, 1, 256, 128)
    assert kernel('layer2_0', 'conv2') == (3, 3, 128, 128)
    assert kernel('layer3_5', 'conv3') == (1, 1, 256, 1024)
    assert kernel(last, 'conv1') == (1, 1, 2048, 512)
    assert kernel(last, 'conv3') == (1, 1, 512, 2048)
    assert kernel('layer4_0', 'downsample_0') == (1, 1, 1024, 2048)
    assert kernel('fc') == (2048, 10)
  else:  # [3×3, 64; 3×3, 64] … [3×3, 512; 3×3, 512]; projections where the shape changes.
    assert 'downsample_0' not in params['layer1_0']
    assert kernel('layer2_0', 'conv1') == (3, 3, 64, 128)
    assert kernel('layer2_0', 'downsample_0') == (1, 1, 64, 128)
    assert kernel(last, 'conv2') == (3, 3, 512, 512)
    assert kernel('fc') == (512, 10)
  downsampling = sorted(s for s in sum(stages, []) if 'downsample_0' in params[s])
  assert downsampling == (['layer1_0'] if name == 'resnet50' else []) + [
      'layer2_0', 'layer3_0', 'layer4_0']


@pytest.mark.parametrize('hw,sizes', [
    (224, [112, 56, 28, 14, 7]),  # Table 1's output sizes: conv1, conv2_x … conv5_x.
    (16, [8, 4, 2, 1, 1]),
    (23, [12, 6, 3, 2, 1])])  # odd sizes: PyTorch's floor((H + 2p - k) / s) + 1 at each step.
def test_feature_map_sizes_follow_table_1(hw, sizes):
  model = models.get_model('resnet50', 10)
  variables = models.variable_shapes(model, (hw, hw, 3))
  _, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, capture_intermediates=True, mutable=['intermediates']),
      variables, jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32))
  out = {name: value['__call__'][0].shape for name, value in state['intermediates'].items()
         if name != '__call__'}
  assert out['conv1'] == (1, sizes[0], sizes[0], 64)
  for stage, width in enumerate((256, 512, 1024, 2048)):
    assert out[f'layer{stage + 1}_0'] == (1, sizes[stage + 1], sizes[stage + 1], width)


# ---------------------------------------------------------------------------------------------
# The model contract: logits, batch_stats, dtype.


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('hw', [16, 224])
def test_logits_and_batch_stats_shapes(name, hw):
  model = models.get_model(name, 10)
  variables = models.variable_shapes(model, (hw, hw, 3))
  x = jax.ShapeDtypeStruct((3, hw, hw, 3), jnp.float32)
  logits = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']), variables, x)
  assert logits.shape == (3, 10) and set(updates) == {'batch_stats'}
  assert (jax.tree_util.tree_structure(updates['batch_stats'])
          == jax.tree_util.tree_structure(variables['batch_stats']))


def test_bfloat16_model_gives_float32_logits():
  model = models.get_model('resnet50', 10, dtype=jnp.bfloat16)
  variables = models.variable_shapes(model, (16, 16, 3))
  assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype('float32')}
  logits = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 16, 16, 3),
                                                                       jnp.float32))
  assert logits.dtype == jnp.float32


def test_resnet18_forward_on_small_images_updates_batch_stats():
  model = models.get_model('resnet18', 10)
  variables = models.init_variables(model, (32, 32, 3), jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  (logits, updates), first, second = run_once(
      lambda v, x: (model.apply(v, x, train=True, mutable=['batch_stats']),
                    model.apply(v, x), model.apply(v, x)), variables, x)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  new, old = updates['batch_stats'], variables['batch_stats']
  for layer in (('bn1',), ('layer1_0', 'bn1'), ('layer4_1', 'bn2'), ('layer2_0', 'downsample_1')):
    moved, start = new, old
    for key in layer:
      moved, start = moved[key], start[key]
    assert not np.allclose(moved['mean'], start['mean']), layer
    assert not np.allclose(moved['var'], start['var']), layer
  np.testing.assert_array_equal(first, second)  # train=False: running statistics, no state.


# ---------------------------------------------------------------------------------------------
# Options: zero_init_residual, conv, and the shortcut that does not apply.


@pytest.mark.parametrize('kind', ['basic', 'bottleneck'])
def test_zero_init_residual_zeroes_each_blocks_last_bn_scale(kind):
  last_bn = 'bn2' if kind == 'basic' else 'bn3'
  default = ImageNetResNet(num_classes=5, **SMALL[kind])
  zeroed = default.clone(zero_init_residual=True)
  assert not default.zero_init_residual  # off by default, as torchvision's.
  plain = models.init_variables(default, (8, 8, 3), jax.random.key(1))['params']
  params = models.init_variables(zeroed, (8, 8, 3), jax.random.key(1))['params']
  for scope, layers in params.items():
    for layer, leaves in (layers.items() if scope.startswith('layer') else ()):
      if 'scale' in leaves:
        expected = 0.0 if layer == last_bn else 1.0
        np.testing.assert_array_equal(leaves['scale'], expected, err_msg=f'{scope}/{layer}')
        np.testing.assert_array_equal(plain[scope][layer]['scale'], 1.0)
  jax.tree_util.tree_map(np.testing.assert_array_equal, _without_scales(plain),
                         _without_scales(params))  # the same key: only those scales differ.
  built = models.get_model('resnet18', 10, zero_init_residual=True)
  assert built.zero_init_residual


def _without_scales(params):
  return {scope: ({layer: {k: v for k, v in leaves.items() if k != 'scale'}
                   for layer, leaves in layers.items()} if scope.startswith('layer') else layers)
          for scope, layers in params.items()}


def test_conv_options_give_the_same_variables_outputs_and_gradients():
  xla = ImageNetResNet(num_classes=5, **SMALL['bottleneck'])
  matmul = xla.clone(conv='matmul_dw')
  variables = randomized(models.init_variables(xla, (8, 8, 3), jax.random.key(2)))
  assert (jax.tree_util.tree_structure(models.variable_shapes(matmul, (8, 8, 3)))
          == jax.tree_util.tree_structure(variables))
  x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype(np.float32)

  def outputs(params):  # inference logits, and a training loss and its gradient, per model.
    def loss(model, p):
      return jnp.sum(model.apply({**variables, 'params': p}, x, train=True,
                                 mutable=['batch_stats'])[0] ** 2)
    return [(model.apply({**variables, 'params': params}, x),
             jax.value_and_grad(functools.partial(loss, model))(params))
            for model in (matmul, xla)]
  got, want = run_once(outputs, variables['params'])
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


def test_registry_builds_them_and_ignores_the_shortcut_option():
  for name in NAMES:
    models.check_model_name(name)
    assert name in models.BUILT_IN_MODELS and not models.is_multi_exit(name)
  model = models.get_model('resnet50', 10)
  assert isinstance(model, ImageNetResNet)
  assert (model.block, tuple(model.blocks_per_stage), model.num_classes) == (
      'bottleneck', (3, 4, 6, 3), 10)
  # The plan passes config.model.resnet_shortcut (default 'zero_pad', for the CIFAR ResNets) to
  # every 'resnet*' name: the ImageNet ResNets always project, whichever is given.
  reference = shapes('resnet18', (16, 16, 3))
  for shortcut in ('zero_pad', 'projection'):
    built = models.get_model('resnet18', 10, shortcut=shortcut, conv='matmul_dw',
                             dtype=jnp.bfloat16)
    assert (built.conv, built.dtype) == ('matmul_dw', jnp.bfloat16)
    assert (jax.tree_util.tree_map(lambda s: s.shape, shapes('resnet18', (16, 16, 3),
                                                             shortcut=shortcut))
            == jax.tree_util.tree_map(lambda s: s.shape, reference))
  with pytest.raises(kdjax.KdjaxError, match="unknown ResNet shortcut 'option_c'"):
    models.get_model('resnet18', 10, shortcut='option_c')
  with pytest.raises(kdjax.KdjaxError, match="unknown conv 'cudnn'"):
    models.get_model('resnet34', 10, conv='cudnn')
  assert not set(SPECS) & set(BLOCKS_PER_STAGE)  # no depth is both a CIFAR and an ImageNet one.
  assert isinstance(models.get_model('resnet20', 10), CifarResNet)  # the CIFAR ones stay.
  assert isinstance(models.get_model('resnet110', 10), CifarResNet)


# ---------------------------------------------------------------------------------------------
# An independent reference: the forward pass as torchvision computes it, in PyTorch.


def torch_forward(state, x, block, blocks_per_stage, stage_widths, train=False):
  """torchvision's `ResNet.forward` (v1.5), written with `torch.nn.functional` on a state dict."""
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  w = lambda name: torch.from_numpy(state[name])

  def bn(name, y):
    return F.batch_norm(y, w(f'{name}.running_mean').clone(), w(f'{name}.running_var').clone(),
                        w(f'{name}.weight'), w(f'{name}.bias'), training=train, eps=1e-5)

  def conv(name, y, stride=1, padding=0):
    return F.conv2d(y, w(f'{name}.weight'), stride=stride, padding=padding)

  y = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  y = F.max_pool2d(F.relu(bn('bn1', conv('conv1', y, 2, 3))), 3, 2, 1)
  expansion, inplanes = (1 if block == 'basic' else 4), stage_widths[0]
  for stage, (planes, blocks) in enumerate(zip(stage_widths, blocks_per_stage)):
    for i in range(blocks):
      stride, name = (2 if stage > 0 and i == 0 else 1), f'layer{stage + 1}.{i}'
      if block == 'basic':
        out = F.relu(bn(f'{name}.bn1', conv(f'{name}.conv1', y, stride, 1)))
        out = bn(f'{name}.bn2', conv(f'{name}.conv2', out, 1, 1))
      else:  # the stride on the 3×3 conv2 (v1.5).
        out = F.relu(bn(f'{name}.bn1', conv(f'{name}.conv1', y)))
        out = F.relu(bn(f'{name}.bn2', conv(f'{name}.conv2', out, stride, 1)))
        out = bn(f'{name}.bn3', conv(f'{name}.conv3', out))
      if stride != 1 or inplanes != planes * expansion:  # torchvision's _make_layer rule.
        y = bn(f'{name}.downsample.1', conv(f'{name}.downsample.0', y, stride))
      else:
        assert f'{name}.downsample.0.weight' not in state, name
      y, inplanes = F.relu(out + y), planes * expansion
  y = torch.flatten(F.adaptive_avg_pool2d(y, 1), 1)
  return F.linear(y, w('fc.weight'), w('fc.bias')).numpy()


@pytest.mark.parametrize('kind', ['basic', 'bottleneck'])
@pytest.mark.parametrize('hw', [(32, 32), (21, 18)])
def test_forward_equals_pytorch(kind, hw):
  pytest.importorskip('torch')
  model = ImageNetResNet(num_classes=5, **SMALL[kind])
  variables = randomized(models.init_variables(model, (*hw, 3), jax.random.key(3)), seed=3)
  state = torchvision_state(variables)
  x = np.random.default_rng(3).normal(size=(3, *hw, 3)).astype(np.float32)
  ours = run_once(lambda v, x: (model.apply(v, x),
                                model.apply(v, x, train=True, mutable=['batch_stats'])[0]),
                  variables, x)
  for train, logits in zip((False, True), ours):  # running statistics; the batch's.
    np.testing.assert_allclose(logits, torch_forward(state, x, train=train, **SMALL[kind]),
                               rtol=1e-4, atol=1e-4)
