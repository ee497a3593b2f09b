r"""The TAKD table's programs one by one, per JAX version: where XLA's CPU backend loses time.

  python experiments/bench/programs.py                  # this interpreter's JAX (and PyTorch)
  .venv-py312/bin/python experiments/bench/programs.py  # the newest JAX: its own entry

Rows (batch 128, CIFAR shapes, the plain CNNs of `workload_config.py`):
  inference   the CNN-10 teacher in inference mode, float32 and bfloat16 (what a teacher table
              costs per batch);
  train       each plain CNN's forward + backward pass (BatchNorm in training mode, cross-
              entropy): what a stage's step costs, without the optimiser;
  pool        a 2×2 max-pool's forward + backward pass on [128, 32, 32, 16], as flax's
              `nn.max_pool` lowers it (reduce_window) and as kdjax's plain CNNs pool
              (`layers.max_pool_2x2`: a reshape and a max);
each compiled with XLA's default CPU options and with kdjax's (`CPU_COMPILER_OPTIONS`:
convolutions to Eigen, the options every kdjax CPU program gets), and, where this interpreter
has PyTorch, the same model in PyTorch (`bench.torch_models`, `channels_last`, eager). All rows
are built and warmed up first, then take turns (`--rounds` rounds of `--steps` calls), so load
falls on all alike; reported: the median call in ms.

Then two profiles (`jax.profiler`, kdjax's options): the CNN-10 teacher's and the CNN-2
student's forward + backward pass, their ops' time summed by HLO kind (convolution, fusion,
transpose, …) and their largest ops, which say what limits the step. Each run replaces its JAX version's entry of programs.json and renders
programs.md from all entries.
"""

import argparse
import collections
import datetime
import glob
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)

BATCH, DEPTHS = 128, (10, 8, 6, 4, 2)
COLUMNS = ('jax, xla default', 'jax, kdjax options', 'pytorch channels_last')


def jax_inputs():
  import jax.numpy as jnp
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(BATCH, 32, 32, 3)), jnp.float32),
          jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32))


def jax_train_program(depth: int):
  """(fn, args): plain CNN-`depth`'s forward + backward pass (cross-entropy, BatchNorm in
  training mode) on one batch."""
  import jax
  import jax.numpy as jnp
  from kdjax.models import plain_cnn
  model = plain_cnn.plain_cnn(depth, 10)
  x, y = jax_inputs()
  variables = model.init(jax.random.PRNGKey(0), x[:1])

  def train(variables, x, y):
    def loss(params):
      logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                              mutable=['batch_stats'])
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
    return jax.grad(loss)(variables['params'])

  return train, (variables, x, y), model


def jax_rows():
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from kdjax.models.conv import CPU_COMPILER_OPTIONS
  from kdjax.models.layers import max_pool_2x2
  rows = {}
  for depth in DEPTHS:
    train, args, model = jax_train_program(depth)
    programs = {f'train cnn{depth}': (train, args)}
    if depth == 10:
      for dtype in ('float32', 'bfloat16'):
        def infer(variables, x, dtype=dtype):
          cast = lambda t: t.astype(dtype) if t.dtype == jnp.float32 else t
          return model.apply(jax.tree.map(cast, variables), cast(x)).astype(jnp.float32)
        programs[f'inference cnn10 {dtype}'] = (infer, args[:2])
    if depth == 2:  # the max-pool alone, as flax lowers it and as kdjax's plain CNNs do.
      pooled = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, 32, 32, 16)), jnp.float32)
      for label, pool in (('nn.max_pool', lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))),
                          ('max_pool_2x2', max_pool_2x2)):
        programs[f'pool 32x32x16 fwd+bwd, {label}'] = (
            jax.grad(lambda x, pool=pool: jnp.sum(pool(x) ** 2)), (pooled,))
    for name, (fn, fn_args) in programs.items():
      for options, label in ((None, 'xla default'), (CPU_COMPILER_OPTIONS, 'kdjax options')):
        lowered = jax.jit(fn).lower(*fn_args)
        compiled = lowered.compile(options) if options else lowered.compile()
        rows[f'{name} | jax, {label}'] = (lambda c=compiled, a=fn_args: jax.block_until_ready(c(*a)))
  return rows


def torch_rows():
  try:
    import torch
  except ImportError:
    return {}
  import bench
  import torch.nn.functional as F
  build = bench.torch_models()
  rng = np.random.default_rng(0)
  x = torch.from_numpy(rng.normal(size=(BATCH, 3, 32, 32)).astype(np.float32)).contiguous(
      memory_format=torch.channels_last)
  y = torch.from_numpy(rng.integers(0, 10, BATCH))
  rows = {}
  for depth in DEPTHS:
    model = build(f'plain_cnn_{depth}').to(memory_format=torch.channels_last)

    def train(model=model):
      model.train()
      model.zero_grad(set_to_none=True)
      F.cross_entropy(model(x), y).backward()

    rows[f'train cnn{depth} | pytorch channels_last'] = train
    if depth == 10:
      def infer(model=model):
        model.eval()
        with torch.no_grad():
          model(x)
      rows['inference cnn10 float32 | pytorch channels_last'] = infer
  pooled = torch.from_numpy(np.random.default_rng(1).normal(size=(BATCH, 16, 32, 32)).astype(
      np.float32)).contiguous(memory_format=torch.channels_last).requires_grad_()

  def pool():
    pooled.grad = None
    (F.max_pool2d(pooled, 2, 2) ** 2).sum().backward()

  rows['pool 32x32x16 fwd+bwd, nn.max_pool | pytorch channels_last'] = pool
  return rows


def profile_train_step(depth: int, steps: int = 5) -> dict:
  """Plain CNN-`depth`'s forward + backward pass under kdjax's options, traced with
  `jax.profiler`: per step, the ms its XLA ops ran, summed over threads, by HLO kind (the op's
  name without `wrapped_` and its number) and for its largest ops."""
  import jax
  from kdjax.models.conv import CPU_COMPILER_OPTIONS
  train, args, _ = jax_train_program(depth)
  compiled = jax.jit(train).lower(*args).compile(CPU_COMPILER_OPTIONS)
  jax.block_until_ready(compiled(*args))
  with tempfile.TemporaryDirectory() as folder:
    jax.profiler.start_trace(folder)
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    (path,) = glob.glob(os.path.join(folder, '**', '*.xplane.pb'), recursive=True)
    data = jax.profiler.ProfileData.from_file(path)
  by_kind, by_op = collections.Counter(), collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      if not line.name.startswith('tf_XLA'):  # XLA's threads (Eigen's pool, the client's).
        continue
      for event in line.events:
        if event.name.startswith(('ThreadpoolListener', 'ThunkExecutor', 'end: ', '$')):
          continue  # the thread pool's and the executor's own spans, not ops.
        ms = event.duration_ns / 1e6 / steps
        by_kind[event.name.removeprefix('wrapped_').split('.')[0]] += ms
        by_op[event.name] += ms
  return {'ms_by_kind': dict(by_kind.most_common()), 'largest_ops_ms': dict(by_op.most_common(8))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--out', default=HERE)
  args = parser.parse_args()
  import jax
  load_before = os.getloadavg()[0]
  rows = {**jax_rows(), **torch_rows()}
  for step in rows.values():  # warm-up (PyTorch's first calls allocate).
    step(), step()
  times = collections.defaultdict(list)
  for _ in range(args.rounds):
    for name, step in rows.items():
      for _ in range(args.steps):
        start = time.perf_counter()
        step()
        times[name].append(1000 * (time.perf_counter() - start))
  versions = f'Python {platform.python_version()}, jax {jax.__version__}'
  try:
    import torch
    versions += f', torch {torch.__version__}'
  except ImportError:
    pass
  entry = {'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
           'versions': versions, 'date': datetime.date.today().isoformat(),
           'load': [load_before, os.getloadavg()[0]],
           'median_ms': {name: statistics.median(t) for name, t in times.items()},
           'profiles': {f'train cnn{d}': profile_train_step(d) for d in (10, 2)}}
  path = os.path.join(args.out, 'programs.json')
  result = json.load(open(path)) if os.path.exists(path) else {}
  result[jax.__version__] = entry
  with open(path, 'w') as f:
    json.dump(result, f, indent=1, sort_keys=True)
  write_markdown(os.path.join(args.out, 'programs.md'), result)
  print(open(os.path.join(args.out, 'programs.md')).read())


def write_markdown(path: str, result: dict) -> None:
  lines = ['Command: `python experiments/bench/programs.py`, once per JAX version. Median ms per '
           'call, batch 128.', '']
  for version, entry in sorted(result.items()):
    lines += [f"### jax {version}", '',
              f"Machine: {entry['machine']}; {entry['versions']}; {entry['date']}; load (1 min) "
              f"before / after {entry['load'][0]:.2f} / {entry['load'][1]:.2f}.", '']
    programs = sorted({name.split(' | ')[0] for name in entry['median_ms']})
    columns = [c for c in COLUMNS if any(n.endswith(' | ' + c) for n in entry['median_ms'])]
    lines += ['| program | ' + ' | '.join(columns) + ' |', '|---|' + '---:|' * len(columns)]
    for program in programs:
      cells = [entry['median_ms'].get(f'{program} | {c}') for c in columns]
      lines.append(f'| {program} | ' + ' | '.join('—' if v is None else f'{v:.1f}' for v in cells)
                   + ' |')
    lines.append('')
    for program, profile in entry['profiles'].items():
      total = sum(profile['ms_by_kind'].values())
      kinds = sorted(profile['ms_by_kind'].items(), key=lambda kv: (-kv[1], kv[0]))
      lines += [f'Profile of `{program}` (kdjax options): {total:.0f} ms of named XLA ops per '
                'step (summed over threads; the executor\'s and the thread pool\'s own spans '
                'are not counted) by HLO kind: ' + ', '.join(
                    f'{k} {v:.0f}' for k, v in kinds if v >= 1) + '.', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


if __name__ == '__main__':
  main()
