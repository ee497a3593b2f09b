"""Model zoo: names, shapes, parameter counts against published and hand-computed ones; user models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax
from kdjax import models
from tests import user_models  # tests/ is a namespace package; conftest puts the repo on sys.path.


def n_params(name, num_classes=10, image_shape=(32, 32, 3), **kwargs):
  model = models.get_model(name, num_classes, **kwargs)
  return models.count_params(models.variable_shapes(model, image_shape)['params'])


@pytest.mark.parametrize('name,exact,published', [
    # He et al. 2016, Table 6 (option A shortcuts): 0.27M and 1.7M; exact counts as widely
    # reproduced (e.g. 269,722 and 1,727,962 for 10 classes).
    ('resnet20', 269_722, 0.27e6),
    ('resnet110', 1_727_962, 1.7e6),
])
def test_resnet_parameter_counts_match_the_paper(name, exact, published):
  got = n_params(name)
  assert got == exact
  assert abs(got - published) / published < 0.02


def test_resnet_count_by_hand():
  # ResNet-8: stem conv + BN, one block per stage (2 convs + 2 BNs each), dense 64→10.
  stem = 3 * 3 * 3 * 16 + 2 * 16
  block = lambda cin, c: 9 * cin * c + 9 * c * c + 4 * c
  expected = stem + block(16, 16) + block(16, 32) + block(32, 64) + 64 * 10 + 10
  assert n_params('resnet8') == expected


def test_projection_shortcut_adds_the_1x1_convs():
  extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)  # two 1×1 convs + their BatchNorms.
  assert n_params('resnet20', shortcut='projection') == n_params('resnet20') + extra


def plain_count(convs, pools, hidden, num_classes, hw=32, channels=3):
  total, cin = 0, channels
  for c in convs:
    total += 9 * cin * c + c + 2 * c  # kernel, bias, BN scale and offset.
    cin = c
  size = (hw // 2**pools)**2 * cin
  for width in (*hidden, num_classes):
    total += size * width + width
    size = width
  return total


@pytest.mark.parametrize('depth,convs,pools,hidden', [
    (2, [16, 16], 2, []),
    (4, [16, 16, 32, 32], 2, []),
    (6, [16, 16, 32, 32, 64, 64], 3, []),
    (8, [16, 16, 32, 32, 64, 64, 128, 128], 4, [64]),
    (10, [32, 32, 64, 64, 128, 128, 256, 256, 256, 256], 4, [128]),
])
def test_plain_cnn_counts_cifar10(depth, convs, pools, hidden):
  assert n_params(f'plain_cnn_{depth}') == plain_count(convs, pools, hidden, 10)


def test_plain_cnn_uses_cifar100_widths_for_100_classes():
  convs = [32, 32, 64, 64, 128, 128]  # the official CIFAR-100 6-layer net: no third max-pool.
  assert n_params('plain_cnn_6', num_classes=100) == plain_count(convs, 2, [], 100)


@pytest.mark.parametrize('name', list(models.MODELS))
def test_every_model_gives_logits(name):
  model = models.get_model(name, 7)
  variables = models.variable_shapes(model, (32, 32, 3))
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((5, 32, 32, 3), np.float32))
  if models.is_multi_exit(name):  # (exit logits, ensemble-teacher logits), each [E, B, C].
    assert [o.shape for o in out] == [(3, 5, 7), (3, 5, 7)]
  else:
    assert out.shape == (5, 7)


def test_unknown_model_lists_valid_names():
  with pytest.raises(kdjax.KdjaxError, match=r"unknown model 'resnet9'.*plain_cnn_2.*resnet8"):
    models.get_model('resnet9', 10)


def test_too_small_input_for_plain_cnn_says_so():
  model = models.get_model('plain_cnn_10', 10)
  with pytest.raises(kdjax.KdjaxError, match='input too small'):
    models.variable_shapes(model, (8, 8, 1))


def test_init_variables_equals_flax_init():
  model = models.get_model('plain_cnn_2', 10)
  ours = models.init_variables(model, (8, 8, 1), jax.random.key(3))
  flax_init = model.init(jax.random.key(3), np.zeros((1, 8, 8, 1), np.float32), train=False)
  jax.tree_util.tree_map(np.testing.assert_array_equal, ours, flax_init)


def test_lenet5_and_mlp_counts_by_hand():
  # LeNet-5 on 28×28: conv 5×5×1×6 ('SAME'), pool → 14, conv 5×5×6×16 ('VALID') → 10, pool → 5.
  lenet = (25 * 6 + 6) + (25 * 6 * 16 + 16) + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
  assert n_params('lenet5', image_shape=(28, 28, 1)) == lenet
  mlp = (784 * 800 + 800) + (800 * 800 + 800) + (800 * 10 + 10)
  assert n_params('mlp_2x800', image_shape=(28, 28, 1)) == mlp


def test_dropout_mlp_is_the_mlp_in_eval_and_unbiased_in_training():
  plain = models.get_model('mlp_1x100', 10)
  dropout = models.get_model('mlp_1x100_dropout50', 10)
  x = np.random.default_rng(0).uniform(size=(4, 28, 28, 1)).astype(np.float32)
  variables = models.init_variables(dropout, (28, 28, 1), jax.random.key(0))
  eval_out = np.asarray(dropout.apply(variables, x, train=False))
  np.testing.assert_array_equal(eval_out, plain.apply(variables, x, train=False))
  # Inverted dropout at p = 0.5 before a linear layer: each draw differs, and the mean over many
  # draws tends to the eval output (standard error ≈ spread / √4000).
  draws = jax.vmap(lambda k: dropout.apply(variables, x, train=True, rngs={'dropout': k}))(
      jax.random.split(jax.random.key(1), 4000))
  draws = np.asarray(draws)
  assert np.mean(np.abs(draws[0] - eval_out)) > 1e-2
  spread = draws.std(axis=0) / np.sqrt(len(draws))
  assert np.all(np.abs(draws.mean(axis=0) - eval_out) < 5 * spread + 1e-6)


def top_level_names(name, **kwargs):
  variables = models.variable_shapes(models.get_model(name, 10, **kwargs), (8, 8, 3))
  return {collection: sorted(tree) for collection, tree in variables.items()}


def test_variable_names_are_those_of_existing_checkpoints():
  # The stem and blocks take injected conv/norm; the trees must stay as saved checkpoints have
  # them: CifarResNet's stem auto-named at top level, MultiExitResNet's named stem/stem_bn.
  assert top_level_names('resnet8') == {
      'params': ['BasicBlock_0', 'BasicBlock_1', 'BasicBlock_2', 'BatchNorm_0', 'Conv_0',
                 'Dense_0'],
      'batch_stats': ['BasicBlock_0', 'BasicBlock_1', 'BasicBlock_2', 'BatchNorm_0']}
  block = models.variable_shapes(models.get_model('resnet8', 10, shortcut='projection'),
                                 (8, 8, 3))['params']['BasicBlock_1']
  assert sorted(block) == ['BatchNorm_0', 'BatchNorm_1', 'BatchNorm_2', 'Conv_0', 'Conv_1',
                           'Conv_2']
  assert block['Conv_2']['kernel'].shape == (1, 1, 16, 32)
  multi = top_level_names('multi_exit_resnet8', conv='matmul_dw')['params']
  assert multi == ['ensemble_weights', 'exit0', 'exit1', 'exit2', 'stage0_block0',
                   'stage1_block0', 'stage2_block0', 'stem', 'stem_bn']
  assert top_level_names('plain_cnn_2')['params'] == ['BatchNorm_0', 'BatchNorm_1', 'Conv_0',
                                                      'Conv_1', 'Dense_0']


USER_MODEL = 'tests.user_models:TinyNet'  # tests/ is a namespace package below the repo root.


def test_import_path_builds_a_user_module_that_gives_logits():
  model = models.get_model(USER_MODEL, 4, conv='xla', shortcut='zero_pad', dtype=np.float32)
  assert isinstance(model, user_models.TinyNet) and model.num_classes == 4
  variables = models.init_variables(model, (8, 8, 3), jax.random.key(0))
  x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype(np.float32)
  assert model.apply(variables, x, train=False).shape == (2, 4)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (2, 4) and logits.dtype == np.float32
  assert not np.allclose(updates['batch_stats']['BatchNorm_0']['mean'],
                         variables['batch_stats']['BatchNorm_0']['mean'])
  # A factory function is given only the options it takes (here none of dtype/conv/shortcut).
  built = models.get_model('tests.user_models:no_dtype_net', 3, conv='matmul_dw',
                           shortcut='projection', dtype=np.float32)
  assert isinstance(built, user_models.NoDtypeNet) and built.num_classes == 3


def test_register_model_then_get_it_by_name():
  calls = []

  def counting_factory(num_classes, dtype=np.float32):
    calls.append(num_classes)
    return user_models.TinyNet(num_classes=num_classes, dtype=dtype)

  try:
    models.register_model('tiny', user_models.NoDtypeNet)
    models.register_model('tiny', counting_factory)  # again: replaces the first.
    models.check_model_name('tiny')
    assert calls == []  # checking a name builds nothing.
    model = models.get_model('tiny', 3, dtype=jnp.bfloat16, conv='xla')
    assert calls == [3] and isinstance(model, user_models.TinyNet)
    assert model.dtype == jnp.bfloat16  # the factory takes dtype, not conv.
    assert 'tiny' in models.MODELS
    with pytest.raises(kdjax.KdjaxError, match="unknown model 'tin'.*resnet8.*tiny"):
      models.check_model_name('tin')
  finally:
    models.MODELS.pop('tiny', None)
  with pytest.raises(kdjax.KdjaxError, match="'resnet8': it is a built-in model"):
    models.register_model('resnet8', user_models.TinyNet)
  with pytest.raises(kdjax.KdjaxError, match="without ':'"):
    models.register_model('my:net', user_models.TinyNet)
  with pytest.raises(kdjax.KdjaxError, match='not a Flax Module class'):
    models.register_model('three', 3)
  assert 'resnet8' in models.MODELS and 'three' not in models.MODELS


@pytest.mark.parametrize('name,message', [
    ('no_such_pkg.nets:TinyNet',
     r"model 'no_such_pkg.nets:TinyNet': cannot import module 'no_such_pkg.nets' "
     r"\(No module named 'no_such_pkg'\); check .* PYTHONPATH"),
    ('tests.user_models:Missing',
     r"module 'tests.user_models' has no attribute 'Missing'.*its Flax modules: NoDtypeNet, "
     'TinyNet'),
    ('tests.user_models:NOT_A_MODEL', r'NOT_A_MODEL\' is a value of type int, not a Flax Module '
     'class or a function'),
    ('tests.user_models:nn', 'is a value of type module, not a Flax Module class'),
    ('tests.user_models:', r"an import path is 'package.module:ClassName'"),
    ('resnet9', r"^unknown model 'resnet9'; choose one of: plain_cnn_2, plain_cnn_4, .*resnet8, "
     r".*mlp_2x1200_dropout50, or give an import path 'package.module:ClassName'\.$"),
])
def test_bad_model_names_say_what_is_wrong(name, message):
  with pytest.raises(kdjax.KdjaxError, match=message):
    models.check_model_name(name)
  with pytest.raises(kdjax.KdjaxError, match=message):
    models.get_model(name, 10)


def test_a_model_without_dtype_cannot_be_a_bfloat16_teacher():
  with pytest.raises(kdjax.KdjaxError, match='teacher dtype needs a `dtype` field'):
    models.get_model('tests.user_models:NoDtypeNet', 10, dtype=jnp.bfloat16)
  assert models.get_model('tests.user_models:NoDtypeNet', 10, dtype=np.float32).num_classes == 10
  assert models.get_model(USER_MODEL, 10, dtype=jnp.bfloat16).dtype == jnp.bfloat16


class ExitsNet(user_models.TinyNet):
  multi_exit: bool = True  # a user's multi-exit model says so.


def test_is_multi_exit_on_modules_and_names():
  assert models.is_multi_exit(models.get_model('multi_exit_resnet8', 10))
  assert models.is_multi_exit(ExitsNet(num_classes=10))
  assert not models.is_multi_exit(ExitsNet(num_classes=10, multi_exit=False))
  assert not models.is_multi_exit(models.get_model('resnet8', 10))
  assert not models.is_multi_exit(models.get_model(USER_MODEL, 10))
  assert models.is_multi_exit('multi_exit_resnet20')
  assert not models.is_multi_exit('resnet20') and not models.is_multi_exit(USER_MODEL)


def test_max_pool_2x2_is_the_max_of_each_window_and_drops_an_odd_edge():
  from kdjax.models.layers import max_pool_2x2
  import flax.linen as nn
  x = np.random.default_rng(0).normal(size=(2, 7, 6, 3)).astype(np.float32)
  expected = np.empty((2, 3, 3, 3), np.float32)
  for i in range(3):
    for j in range(3):
      expected[:, i, j] = x[:, 2 * i:2 * i + 2, 2 * j:2 * j + 2].max(axis=(1, 2))
  np.testing.assert_array_equal(max_pool_2x2(jnp.asarray(x)), expected)
  np.testing.assert_array_equal(max_pool_2x2(jnp.asarray(x)),
                                nn.max_pool(jnp.asarray(x), (2, 2), strides=(2, 2)))


def test_max_pool_2x2_gradient_is_reduce_windows_without_ties_and_split_on_a_tie():
  from jax.test_util import check_grads
  from kdjax.models.layers import max_pool_2x2
  import flax.linen as nn
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 8, 6, 4)), jnp.float64 if jax.config.jax_enable_x64
                  else jnp.float32)
  weights = jnp.asarray(rng.normal(size=(2, 4, 3, 4)), x.dtype)
  ours = jax.grad(lambda x: jnp.sum(weights * max_pool_2x2(x)))(x)
  reference = jax.grad(lambda x: jnp.sum(weights * nn.max_pool(x, (2, 2), strides=(2, 2))))(x)
  np.testing.assert_array_equal(ours, reference)  # one maximum per window: the same elements.
  check_grads(lambda x: jnp.sum(weights * max_pool_2x2(x)), (x,), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2, eps=1e-3)
  tied = jnp.ones((1, 2, 2, 1))  # all four tie: a quarter each (nn.max_pool: all to one).
  np.testing.assert_allclose(jax.grad(lambda x: max_pool_2x2(x).sum())(tied), 0.25)
  assert float(jax.grad(lambda x: nn.max_pool(x, (2, 2), strides=(2, 2)).sum())(tied).max()) == 1
