"""Teachers trained in PyTorch, and students sent back: state dicts ⇄ kdjax Flax variables.

Two public layouts of the CIFAR networks kdjax builds:

  * `'takd'`: the official TAKD code (Mirzadeh et al., AAAI 2020; `resnet_cifar.py`,
    `plain_cnn_cifar.py`): its CIFAR ResNets and its plain CNNs (`conv_layers.<i>` holds Conv2d
    (with bias), BatchNorm2d, ReLU and MaxPool2d in order; `fc_layers.<j>` Linear and ReLU).
  * `'repdistiller'`: the CIFAR ResNets of RepDistiller (Tian et al., ICLR 2020,
    `models/resnet.py`), which mdistiller (`mdistiller/models/cifar/resnet.py`) keeps unchanged.

Both ResNet layouts name their tensors alike: `conv1`/`bn1` (the stem), `layer<s>.<b>.conv1`,
`bn1`, `conv2`, `bn2`, `downsample.0` (1×1 strided conv) and `downsample.1` (BatchNorm) where a
block changes shape, and `fc`. That shortcut is kdjax's `shortcut='projection'`, so an imported
or exported ResNet is always built with it. PyTorch's `AvgPool2d(8)` before `fc` is kdjax's
global mean on 32×32 images, the size both codes train on.

The conversion: conv weights `[O, I, kh, kw]` (OIHW) ⇄ kernels `[kh, kw, I, O]` (HWIO);
Linear weights `[out, in]` ⇄ Dense kernels `[in, out]`; BatchNorm `weight`/`bias` ⇄
`scale`/`bias` in `params`, `running_mean`/`running_var` ⇄ `mean`/`var` in `batch_stats`;
`num_batches_tracked` is read past on import and written as 0 on export. A plain CNN's first
Linear layer reads the conv features flattened in NCHW order (PyTorch's `x.view(B, -1)`), kdjax's
in NHWC order, so that kernel's rows are permuted. Every tensor is checked against the layout
before any is converted; export followed by import gives the same variables bit for bit.

Files: `.pt`, `.pth`, `.pth.tar` are read with `torch.load(..., weights_only=True)`, which
refuses any pickled object but tensors and plain containers (such an object's code never runs);
`.safetensors` are read without PyTorch. torch is imported only inside the functions that need
it (`pip install 'kdjax[torch]'`).
"""

import hashlib
import os
from typing import Dict, List, Optional, Tuple

import flax.linen as nn
import jax
import numpy as np

from kdjax import models
from kdjax.errors import KdjaxError
from kdjax.models.plain_cnn import PlainCNN
from kdjax.models.resnet import CifarResNet

LAYOUTS = {
    'takd': 'the official TAKD code: CIFAR ResNets and plain CNNs',
    'repdistiller': "RepDistiller's (and mdistiller's) CIFAR ResNets",
}
TORCH_SUFFIXES = ('.pt', '.pth', '.pth.tar')
SAFETENSORS_SUFFIX = '.safetensors'
# The entries under which training codes save a state dict beside their epoch and optimizer:
# TAKD's `train.py` ('model_state_dict'), RepDistiller and mdistiller ('model'), and others.
_WRAPPER_KEYS = ('model_state_dict', 'state_dict', 'model')
_INSTALL = "pip install 'kdjax[torch]'"

# An entry of a layout: (PyTorch name, kdjax path, kind). Kinds: 'conv' (OIHW ⇄ HWIO),
# 'linear' ([out, in] ⇄ [in, out]), ('linear_nchw', (H, W, C)) (also the flatten order), and
# 'same' (vectors, as they are).
_Entry = Tuple[str, Tuple[str, ...], object]


# ---------------------------------------------------------------------------------------------
# Reading and writing files.


def sha256(path: str) -> str:
  """The file's SHA-256, hex: what a stage's plan records of an imported teacher."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """`{name: array}` from a `.pt`/`.pth`/`.pth.tar` (PyTorch) or `.safetensors` file.

  A PyTorch file holds a state dict, or a dict with one under `'model_state_dict'`,
  `'state_dict'` or `'model'`; a `module.` prefix on every name (`nn.DataParallel`) is dropped.
  Floating tensors come back as float32.
  """
  if not os.path.isfile(path):
    raise KdjaxError(f"teacher file '{path}' does not exist; check the path.")
  if path.endswith(SAFETENSORS_SUFFIX):
    try:
      from safetensors.numpy import load_file
    except ImportError:
      raise KdjaxError(f"reading '{path}' needs the safetensors package: {_INSTALL}.") from None
    try:
      tensors = load_file(path)
    except Exception as e:  # safetensors raises its own error types for a damaged file.
      raise KdjaxError(f"cannot read '{path}' as safetensors ({_first_line(e)}).") from None
    return _plain(tensors, path)
  if not path.endswith(TORCH_SUFFIXES):
    raise KdjaxError(f"teacher file '{path}': unknown suffix; kdjax reads "
                     f"{', '.join(TORCH_SUFFIXES)} (PyTorch) and {SAFETENSORS_SUFFIX} files.")
  torch = _import_torch(f"reading '{path}'")
  import pickle
  try:
    loaded = torch.load(path, map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    raise KdjaxError(
        f"refused to read '{path}': it holds pickled Python objects besides tensors and plain "
        f'containers ({_first_line(e)}). kdjax loads PyTorch files with weights_only=True and '
        "never unpickles such objects, since that would run code from the file. Save the "
        "weights alone where the model was trained: torch.save(model.state_dict(), "
        "'teacher.pth'), or as .safetensors.") from None
  except Exception as e:
    raise KdjaxError(f"cannot read '{path}' with torch.load ({_first_line(e)}); is it a "
                     'PyTorch checkpoint?') from None
  if isinstance(loaded, dict):
    for key in _WRAPPER_KEYS:
      if isinstance(loaded.get(key), dict):
        loaded = loaded[key]
        break
  if not isinstance(loaded, dict):
    raise KdjaxError(f"'{path}' holds a {type(loaded).__name__}, not a state dict (a mapping of "
                     "names to tensors, or one under 'model_state_dict', 'state_dict' or "
                     "'model'); save model.state_dict().")
  arrays = {}
  for name, value in loaded.items():
    if not isinstance(value, torch.Tensor):
      raise KdjaxError(f"'{path}' is not a plain state dict: '{name}' holds a "
                       f'{type(value).__name__}, not a tensor; save model.state_dict().')
    value = value.detach().cpu()
    arrays[name] = (value.float() if value.is_floating_point() else value).numpy()
  return _plain(arrays, path)


def _plain(arrays: Dict[str, np.ndarray], path: str) -> Dict[str, np.ndarray]:
  if arrays and all(name.startswith('module.') for name in arrays):
    arrays = {name[len('module.'):]: value for name, value in arrays.items()}
  return {name: (value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) else value)
          for name, value in arrays.items()}


def save_torch(state_dict: Dict[str, np.ndarray], path: str) -> None:
  """Writes `state_dict` as a plain PyTorch state dict (`model.load_state_dict(torch.load(path))`).

  Needs PyTorch; `save_safetensors` does not.
  """
  torch = _import_torch(f"writing '{path}'")
  torch.save({name: torch.from_numpy(np.array(value, order='C'))
              for name, value in state_dict.items()}, path)


def save_safetensors(state_dict: Dict[str, np.ndarray], path: str) -> None:
  """Writes `state_dict` as `.safetensors` (`safetensors.torch.load_file` reads it for PyTorch)."""
  try:
    from safetensors.numpy import save_file
  except ImportError:
    raise KdjaxError(f"writing '{path}' needs the safetensors package: {_INSTALL}.") from None
  save_file({name: np.ascontiguousarray(value) for name, value in state_dict.items()}, path)


def _import_torch(what: str):
  try:
    import torch
  except ImportError:
    raise KdjaxError(f'{what} needs PyTorch, which is not installed: {_INSTALL} (the CPU build '
                     'is enough).') from None
  return torch


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


# ---------------------------------------------------------------------------------------------
# The layouts.


def check_model(model_name: str, layout: str) -> None:
  """Raises unless the layout `layout` has the kdjax model `model_name`."""
  if layout not in LAYOUTS:
    raise KdjaxError(f"unknown teacher layout '{layout}'; choose one of: "
                     f"{', '.join(f'{n} ({d})' for n, d in LAYOUTS.items())}. mdistiller's CIFAR "
                     "ResNets are in the 'repdistiller' layout.")
  resnets = [f'resnet{depth}' for depth in sorted(models.CIFAR_RESNET_DEPTHS)]  # not ImageNet's.
  plain = [n for n in models.BUILT_IN_MODELS if n.startswith('plain_cnn_')]
  supported = sorted(resnets) + (sorted(plain) if layout == 'takd' else [])
  if model_name not in supported:
    raise KdjaxError(f"layout '{layout}' has no model '{model_name}'; it has: "
                     f"{', '.join(supported)}. (resnet8x4/resnet32x4, wide ResNets and the "
                     'ImageNet networks are not supported yet.)')


def build_model(model_name: str, num_classes: int, **kwargs) -> nn.Module:
  """The kdjax module a public layout's `model_name` is: ResNets with the projection shortcut."""
  if model_name.startswith('resnet'):
    kwargs['shortcut'] = 'projection'
  return models.get_model(model_name, num_classes, **kwargs)


def _entries(model: nn.Module, image_shape) -> List[_Entry]:
  """The layout of `model` (a kdjax module): every PyTorch tensor and the kdjax leaf it fills."""
  entries: List[_Entry] = []

  def batch_norm(torch_name, kdjax_scope):
    entries.extend([(f'{torch_name}.weight', ('params', *kdjax_scope, 'scale'), 'same'),
                    (f'{torch_name}.bias', ('params', *kdjax_scope, 'bias'), 'same'),
                    (f'{torch_name}.running_mean', ('batch_stats', *kdjax_scope, 'mean'), 'same'),
                    (f'{torch_name}.running_var', ('batch_stats', *kdjax_scope, 'var'), 'same')])

  if isinstance(model, CifarResNet):
    entries.append(('conv1.weight', ('params', 'Conv_0', 'kernel'), 'conv'))
    batch_norm('bn1', ('BatchNorm_0',))
    channels = model.stage_widths[0]
    for stage, width in enumerate(model.stage_widths):
      for block in range(model.blocks_per_stage):
        torch_block = f'layer{stage + 1}.{block}'
        scope = f'BasicBlock_{stage * model.blocks_per_stage + block}'
        entries.append((f'{torch_block}.conv1.weight', ('params', scope, 'Conv_0', 'kernel'),
                        'conv'))
        batch_norm(f'{torch_block}.bn1', (scope, 'BatchNorm_0'))
        entries.append((f'{torch_block}.conv2.weight', ('params', scope, 'Conv_1', 'kernel'),
                        'conv'))
        batch_norm(f'{torch_block}.bn2', (scope, 'BatchNorm_1'))
        if (stage > 0 and block == 0) or channels != width:
          entries.append((f'{torch_block}.downsample.0.weight',
                          ('params', scope, 'Conv_2', 'kernel'), 'conv'))
          batch_norm(f'{torch_block}.downsample.1', (scope, 'BatchNorm_2'))
        channels = width
    entries.extend([('fc.weight', ('params', 'Dense_0', 'kernel'), 'linear'),
                    ('fc.bias', ('params', 'Dense_0', 'bias'), 'same')])
    return entries
  if isinstance(model, PlainCNN):
    index, conv = 0, 0
    height, width, channels = image_shape
    for layer in model.layers:
      if layer == 'M':  # MaxPool2d(2, 2) floors odd sizes, as nn.max_pool's VALID padding does.
        height, width, index = height // 2, width // 2, index + 1
        continue
      entries.extend([(f'conv_layers.{index}.weight', ('params', f'Conv_{conv}', 'kernel'),
                       'conv'),
                      (f'conv_layers.{index}.bias', ('params', f'Conv_{conv}', 'bias'), 'same')])
      batch_norm(f'conv_layers.{index + 1}', (f'BatchNorm_{conv}',))
      index, conv, channels = index + 3, conv + 1, layer  # Conv2d, BatchNorm2d, ReLU.
    for dense in range(len(model.hidden_widths) + 1):
      kind = ('linear_nchw', (height, width, channels)) if dense == 0 else 'linear'
      entries.extend([(f'fc_layers.{2 * dense}.weight', ('params', f'Dense_{dense}', 'kernel'),
                       kind),
                      (f'fc_layers.{2 * dense}.bias', ('params', f'Dense_{dense}', 'bias'),
                       'same')])  # Linear, then ReLU between two of them.
    return entries
  raise KdjaxError(f'no PyTorch layout for a {type(model).__name__}; the layouts hold CIFAR '
                   'ResNets and plain CNNs.')


def _to_torch(kind, array: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return np.transpose(array, (3, 2, 0, 1))
  if kind == 'linear':
    return np.transpose(array)
  if isinstance(kind, tuple):  # rows in NHWC order → columns in NCHW order.
    height, width, channels = kind[1]
    kernel = array.reshape(height, width, channels, -1)
    return np.transpose(kernel, (3, 2, 0, 1)).reshape(kernel.shape[-1], -1)
  return array


def _to_kdjax(kind, array: np.ndarray) -> np.ndarray:
  if kind == 'conv':
    return np.transpose(array, (2, 3, 1, 0))
  if kind == 'linear':
    return np.transpose(array)
  if isinstance(kind, tuple):
    height, width, channels = kind[1]
    weight = array.reshape(-1, channels, height, width)
    return np.transpose(weight, (2, 3, 1, 0)).reshape(height * width * channels, -1)
  return array


def _shape_of(tree, path):
  for part in path:
    tree = tree[part]
  return tuple(tree.shape)


def expected_state_dict_shapes(model: nn.Module, image_shape) -> Dict[str, Tuple[int, ...]]:
  """`{PyTorch name: shape}` of the state dict that holds `model` (without num_batches_tracked)."""
  shapes = models.variable_shapes(model, image_shape)
  return {name: _to_torch(kind, np.empty(_shape_of(shapes, path), np.float32)).shape
          for name, path, kind in _entries(model, image_shape)}


def check_state_dict(state_dict: Dict[str, np.ndarray], model: nn.Module, image_shape,
                     layout: str, source: str) -> None:
  """Raises one paragraph naming the first missing, extra or mis-shaped tensors, if any."""
  expected = expected_state_dict_shapes(model, image_shape)
  tracked = {name.rsplit('.', 1)[0] + '.num_batches_tracked' for name in expected
             if name.endswith('.running_mean')}
  missing = [name for name in expected if name not in state_dict]
  extra = [name for name in state_dict if name not in expected and name not in tracked]
  misshaped = [name for name in expected
               if name in state_dict and tuple(state_dict[name].shape) != expected[name]]
  if not (missing or extra or misshaped):
    return
  problems = []
  if missing:
    problems.append(_listed('missing key', missing,
                            lambda n: f"'{n}' (expected shape {list(expected[n])})"))
  if extra:
    problems.append(_listed('unexpected key', extra,
                            lambda n: f"'{n}' (shape {list(state_dict[n].shape)})"))
  if misshaped:
    problems.append(_listed('mis-shaped key', misshaped,
                            lambda n: f"'{n}' has shape {list(state_dict[n].shape)}, expected "
                                      f'{list(expected[n])}'))
  guess = _looks_like(state_dict)
  hint = f' Its keys look like {guess}.' if guess else ''
  classes = ''
  if any(n.startswith(('fc.', 'fc_layers.')) for n in misshaped):
    classes = (' A mis-shaped fc layer can also mean another number of classes or image size '
               f'than the data here ({image_shape}).')
  raise KdjaxError(
      f"{source} does not hold {_model_label(model)} in the '{layout}' layout: "
      f"{'; '.join(problems)}.{hint}{classes} Set the teacher's model (and layout) to the "
      'network the file holds, or point it at the right file.')


def _listed(what: str, names: List[str], describe, shown: int = 3) -> str:
  text = f"{what}{'s' if len(names) > 1 else ''} " + ', '.join(map(describe, names[:shown]))
  return text + (f' and {len(names) - shown} more' if len(names) > shown else '')


def _model_label(model: nn.Module) -> str:
  if isinstance(model, CifarResNet):
    return f'a ResNet-{6 * model.blocks_per_stage + 2} ({model.num_classes} classes)'
  if isinstance(model, PlainCNN):
    convs = sum(1 for layer in model.layers if layer != 'M')
    return f'a {convs}-layer plain CNN ({model.num_classes} classes)'
  return f'a {type(model).__name__}'


def _looks_like(state_dict) -> str:
  """Which public network a state dict's names suggest, or '' if none is recognised."""
  names = set(state_dict)
  if any(n.startswith('conv_layers.') for n in names):
    convs = sum(1 for n in names if n.startswith('conv_layers.') and n.endswith('.weight')
                and state_dict[n].ndim == 4)
    return f'a TAKD plain CNN with {convs} conv layers (plain_cnn_{convs})'
  blocks = {n.split('.')[1] for n in names if n.startswith('layer1.')}
  if blocks and 'layer1.0.conv1.weight' in names:
    if any('.conv3.' in n for n in names):
      return 'a bottleneck CIFAR ResNet, which kdjax does not build'
    depth, width = 6 * len(blocks) + 2, state_dict['layer1.0.conv1.weight'].shape[0]
    if width == 16:
      return f'a CIFAR ResNet-{depth} (resnet{depth})'
    return (f'resnet{depth}x{width // 16} (stage widths {width}/{2 * width}/{4 * width}), which '
            'kdjax does not build')
  return ''


# ---------------------------------------------------------------------------------------------
# Converting.


def to_variables(state_dict: Dict[str, np.ndarray], model: nn.Module, image_shape, layout: str,
                 source: str = 'the state dict') -> dict:
  """kdjax `{params, batch_stats}` (numpy float32) for `model` from a checked state dict."""
  check_state_dict(state_dict, model, image_shape, layout, source)
  variables: dict = {}
  for name, path, kind in _entries(model, image_shape):
    node = variables
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(_to_kdjax(kind, state_dict[name]), dtype=np.float32)
  return variables


def load_variables(path: str, model: nn.Module, image_shape, layout: str,
                   fingerprint: Optional[str] = None, source: Optional[str] = None) -> dict:
  """The kdjax variables of the teacher file `path`; with `fingerprint`, the file must still be
  the one the run was planned with (its SHA-256)."""
  source = source or f"'{path}'"
  if fingerprint and sha256(path) != fingerprint:
    raise KdjaxError(f'{source} has changed since this run was planned (its SHA-256 is no longer '
                     f'{fingerprint[:12]}…); run again to plan with the new file.')
  return to_variables(read_state_dict(path), model, image_shape, layout, source)


def import_state_dict(path: str, model_name: str, layout: str, num_classes: int,
                      image_shape=(32, 32, 3)) -> dict:
  """`load_variables` by model name: the variables of `model_name` (a kdjax name) in `path`."""
  check_model(model_name, layout)
  return load_variables(path, build_model(model_name, num_classes), image_shape, layout)


def export_state_dict(variables, model_name: str, layout: str,
                      image_shape: Optional[Tuple[int, int, int]] = None) -> Dict[str, np.ndarray]:
  """The PyTorch state dict (`{name: array}`) of kdjax variables of `model_name` in `layout`.

  `image_shape` defaults to 32×32 with the channels of the first conv (the layouts' CIFAR size);
  a plain CNN trained on other sizes needs it. ResNets must have been trained with
  `--config.model.resnet_shortcut=projection` (the layouts' shortcut). Write the result with
  `save_torch` or `save_safetensors`.
  """
  check_model(model_name, layout)
  variables = jax.tree_util.tree_map(np.asarray, jax.device_get(dict(variables)))
  try:
    params = variables['params']
    num_classes = int(params[f'Dense_{max(int(k[6:]) for k in params if k.startswith("Dense_"))}']
                      ['bias'].shape[0])
    image_shape = tuple(image_shape or (32, 32, params['Conv_0']['kernel'].shape[2]))
  except (KeyError, ValueError, TypeError):
    raise KdjaxError(f"these variables are not a kdjax {model_name}'s ({{params, batch_stats}} "
                     'with Conv_0 and Dense layers).') from None
  model = build_model(model_name, num_classes)
  _check_variables(variables, models.variable_shapes(model, image_shape), model_name)
  exported = {}
  for name, path, kind in _entries(model, image_shape):
    node = variables
    for part in path:
      node = node[part]
    exported[name] = np.array(_to_torch(kind, node), dtype=np.float32, order='C')  # a copy.
    if name.endswith('.running_var'):
      exported[name[:-len('running_var')] + 'num_batches_tracked'] = np.zeros((), np.int64)
  return exported


def _check_variables(variables, shapes, model_name: str) -> None:
  flat = lambda tree: {jax.tree_util.keystr(p): tuple(np.shape(leaf)) for p, leaf
                       in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat({k: variables.get(k) for k in ('params', 'batch_stats')}), flat(shapes)
  if have == want:
    return
  missing = [k for k in want if k not in have]
  wrong = [k for k in want if k in have and have[k] != want[k]]
  hint = ''
  if any('Conv_2' in k for k in missing) and model_name.startswith('resnet'):
    hint = (" The public layouts' ResNets have projection shortcuts: train the student with "
            '--config.model.resnet_shortcut=projection.')
  detail = (_listed('missing', missing, str) if missing else
            _listed('mis-shaped', wrong, lambda k: f'{k} {list(have[k])} (expected '
                                                   f'{list(want[k])})') if wrong else
            _listed('unexpected', [k for k in have if k not in want], str))
  raise KdjaxError(f"these variables are not a kdjax {model_name} for the image shape given "
                   f'({detail}).{hint} Stacked replicas export one at a time '
                   '(kdjax.train.replica(variables, r)).')
