"""One knowledge-distillation train step, kdjax against a PyTorch reference, in one process.

A step is: gather a batch of uint8 images from the training set, normalise, the teacher's forward
pass in inference mode, the student's forward and backward pass (BatchNorm in training mode), the
KD loss `(1 − λ)·CE + λ·T²·KL(teacher ‖ student)` (T = 4, λ = 0.9, KL summed over classes and
averaged over the batch) and one SGD step (momentum 0.9, coupled weight decay 5e-4). The PyTorch
models below are written to be the kdjax ones layer for layer (widths, 3×3 convs with padding 1,
zero-pad shortcuts, 2×2 max-pools, dense heads, BatchNorm momentum 0.1 / eps 1e-5 in PyTorch's
convention = Flax's 0.9).

Every row is built, compiled and warmed up first; then the rows take turns (`--rounds` rounds of
`--steps-per-round` steps each), so that load from other processes falls on all of them alike and
the ratios stay fair. Reported per row: images/s (batch / median step time), the first call's
time (jit lower + compile for kdjax; the first step for PyTorch, which for `torch.compile` is the
compilation), and peak memory of one step (see `peak_memory_*`).

  python experiments/bench/bench.py            # all rows; writes results.json and results.md here

Rows are produced by the functions in `ROW_BUILDERS`; add one there to add rows.
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

BATCH = 128
IMAGE_SHAPE = (32, 32, 3)
NUM_CLASSES = 10
NUM_TRAIN = 8 * BATCH  # a small device-resident "training set" to gather batches from.
PAIRS = {'resnet110->resnet8': ('resnet110', 'resnet8'),
         'plain_cnn_10->plain_cnn_2': ('plain_cnn_10', 'plain_cnn_2')}
TEMPERATURE, KD_WEIGHT = 4.0, 0.9
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


class Row(NamedTuple):
  """One measured configuration: `step()` runs one train step to completion."""
  pair: str
  framework: str
  variant: str
  step: Callable[[], None]
  compile_s: float
  peak_mib: Optional[float]
  images: int = BATCH  # images trained on per call of `step` (N students × batch for N).


def host_data(seed=0):
  import numpy as np
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (NUM_TRAIN, *IMAGE_SHAPE), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, NUM_TRAIN).astype(np.int32)
  batches = [rng.permutation(NUM_TRAIN)[:BATCH].astype(np.int32) for _ in range(NUM_TRAIN // BATCH)]
  return images, labels, batches


# --------------------------------------------------------------------------------------------
# kdjax


def kdjax_row(pair: str, label: str, conv: str = 'xla', compiler_options=None,
              replicas: int = 0, mesh=None, replica_batching: str = 'auto') -> Row:
  """kdjax's own `make_train_step` for `pair`, both models built with `conv`.

  `compiler_options=None` is what the library compiles with (on CPU, Eigen convolutions:
  `kdjax.train.jit`); `{}` is XLA's defaults. `replicas` N > 0 trains N students in one
  step (`replica_batching` 'vmap' or 'unroll'); `mesh` shards the batch over its devices.
  """
  import jax
  import jax.numpy as jnp
  from kdjax import models
  from kdjax import parallel
  from kdjax import teachers
  from kdjax import train
  teacher, student, teacher_vars, loss, augment_config, normalization = kdjax_setup(pair, conv)
  tx = train.make_optimizer(ml_train_config(), lambda _: LR)
  keys = jnp.stack([jax.random.key(2 + r) for r in range(replicas)]) if replicas else \
      jax.random.key(2)
  make_state = lambda v: train.create_train_state(student, v, tx)
  state = (jax.vmap(make_state) if replicas else make_state)(
      models.init_variables(student, IMAGE_SHAPE, keys))
  images, labels, batches = host_data()
  data = train.DeviceData(jnp.asarray(images), jnp.asarray(labels))
  batches = [jnp.asarray(b) for b in batches]
  if mesh is not None:
    state, teacher_vars, data = parallel.put_replicated((state, teacher_vars, data), mesh)
    batches = [jax.device_put(b, parallel.batch_sharded(mesh)) for b in batches]
  step_fn = train.make_train_step(student, loss, augment_config, normalization,
                                  num_replicas=replicas or None, mesh=mesh,
                                  compiler_options=compiler_options,
                                  replica_batching=replica_batching)
  source = teachers.LiveTeacher(teacher_vars, teacher)
  start = time.perf_counter()
  compiled = step_fn.lower(state, source, data, batches[0], keys).compile()
  compile_s = time.perf_counter() - start
  box = {'state': state, 'i': 0}

  def step():
    box['state'], metrics = compiled(box['state'], source, data,
                                     batches[box['i'] % len(batches)], keys)
    box['i'] += 1
    jax.block_until_ready(metrics['loss'])

  return Row(pair, 'kdjax', label, step, compile_s, peak_memory_xla(compiled, data),
             BATCH * max(replicas, 1))


def kdjax_setup(pair: str, conv: str = 'xla'):
  """(teacher, student, teacher variables, stage loss, augment config, normalization)."""
  import jax
  import jax.numpy as jnp
  import ml_collections
  from kdjax import models
  from kdjax import stage_losses
  from kdjax import train
  teacher_name, student_name = PAIRS[pair]
  teacher = models.get_model(teacher_name, NUM_CLASSES, conv=conv)
  student = models.get_model(student_name, NUM_CLASSES, conv=conv)
  teacher_vars = models.init_variables(teacher, IMAGE_SHAPE, jax.random.key(1))
  loss = stage_losses.get_loss('kd', dict(temperature=TEMPERATURE, kd_weight=KD_WEIGHT,
                                          kl_reduction='batchmean', eta=1.0))
  augment_config = ml_collections.ConfigDict(dict(enabled=False, crop_padding=4, flip=True))
  normalization = train.Normalization(mean=jnp.full((3,), 0.5), std=jnp.full((3,), 0.25))
  return teacher, student, teacher_vars, loss, augment_config, normalization


def ml_train_config():
  import ml_collections
  return ml_collections.ConfigDict(dict(weight_decay=WEIGHT_DECAY, momentum=MOMENTUM,
                                        nesterov=False))


def peak_memory_xla(compiled, data) -> Optional[float]:
  """MiB XLA's buffer assignment holds during one step: arguments + outputs + temporaries, less
  donated (aliased) buffers and the device-resident training set (an argument here)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
           - stats.alias_size_in_bytes - data.images.nbytes - data.labels.nbytes)
  return total / 2**20


# --------------------------------------------------------------------------------------------
# PyTorch reference


def torch_models():
  """PyTorch twins of `kdjax.models.resnet.CifarResNet` and `kdjax.models.plain_cnn.PlainCNN`."""
  import torch
  from torch import nn
  import torch.nn.functional as F
  from kdjax.models import plain_cnn, resnet

  bn = lambda c: nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)  # Flax momentum 0.9 = PyTorch 0.1.

  class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.bn1 = bn(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.bn2 = bn(cout)
      self.stride, self.extra = stride, cout - cin

    def forward(self, x):
      y = F.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      residual = x
      if self.stride != 1 or self.extra:  # option A: subsample, zero-pad the channels.
        residual = x[:, :, ::self.stride, ::self.stride]
        residual = F.pad(residual, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
      return F.relu(y + residual)

  class CifarResNet(nn.Module):
    def __init__(self, depth, num_classes, widths=(16, 32, 64)):
      super().__init__()
      n = resnet.BLOCKS_PER_STAGE[depth]
      self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 1, 1, bias=False), bn(widths[0]),
                                nn.ReLU())
      blocks, cin = [], widths[0]
      for stage, width in enumerate(widths):
        for block in range(n):
          blocks.append(BasicBlock(cin, width, 2 if stage > 0 and block == 0 else 1))
          cin = width
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
      return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

  class PlainCNN(nn.Module):
    def __init__(self, depth, num_classes):
      super().__init__()
      layer_spec, hidden = plain_cnn.CIFAR10_SPECS[depth]
      layers, cin, hw = [], 3, IMAGE_SHAPE[0]
      for layer in layer_spec:
        if layer == 'M':
          layers.append(nn.MaxPool2d(2, 2))
          hw //= 2
        else:
          layers += [nn.Conv2d(cin, layer, 3, 1, 1), bn(layer), nn.ReLU()]
          cin = layer
      self.features = nn.Sequential(*layers)
      head, size = [], cin * hw * hw
      for width in hidden:
        head += [nn.Linear(size, width), nn.ReLU()]
        size = width
      self.head = nn.Sequential(*head, nn.Linear(size, num_classes))

    def forward(self, x):
      return self.head(torch.flatten(self.features(x), 1))

  def build(name):
    if name.startswith('resnet'):
      return CifarResNet(int(name[len('resnet'):]), NUM_CLASSES)
    return PlainCNN(int(name[len('plain_cnn_'):]), NUM_CLASSES)

  return build


def torch_kd_loss(student_logits, teacher_logits, labels):
  """kdjax's `stage_loss` with loss 'kd', kl_reduction 'batchmean', eta 1."""
  import torch.nn.functional as F
  ce = F.cross_entropy(student_logits, labels)
  log_p_s = F.log_softmax(student_logits / TEMPERATURE, -1)
  log_p_t = F.log_softmax(teacher_logits / TEMPERATURE, -1)
  kl = F.kl_div(log_p_s, log_p_t, reduction='batchmean', log_target=True)
  return (1 - KD_WEIGHT) * ce + KD_WEIGHT * TEMPERATURE**2 * kl


def check_losses_agree():
  """The PyTorch loss equals kdjax's `stage_loss` on the same logits (float64 tolerance aside)."""
  import numpy as np
  import torch
  from kdjax import stage_losses
  rng = np.random.default_rng(0)
  student, teacher = (rng.normal(size=(BATCH, NUM_CLASSES)).astype(np.float32) * 3 for _ in 'st')
  labels = rng.integers(0, NUM_CLASSES, BATCH)
  loss = stage_losses.get_loss('kd', dict(temperature=TEMPERATURE, kd_weight=KD_WEIGHT,
                                          kl_reduction='batchmean'))
  ours = float(np.mean(loss(student, teacher, labels.astype(np.int32), None)))
  theirs = float(torch_kd_loss(torch.from_numpy(student), torch.from_numpy(teacher),
                               torch.from_numpy(labels)))
  assert abs(ours - theirs) <= 1e-5 * abs(ours), (ours, theirs)


def pytorch_row(pair: str, variant: str) -> Row:
  """The same step in PyTorch: `variant` is 'eager', 'channels_last' or 'compile'."""
  import torch
  teacher_name, student_name = PAIRS[pair]
  build = torch_models()
  torch.manual_seed(0)
  teacher, student = build(teacher_name).eval(), build(student_name).train()
  for p in teacher.parameters():
    p.requires_grad_(False)
  memory_format = torch.channels_last if variant == 'channels_last' else torch.contiguous_format
  teacher.to(memory_format=memory_format)
  student.to(memory_format=memory_format)
  optimizer = torch.optim.SGD(student.parameters(), lr=LR, momentum=MOMENTUM,
                              weight_decay=WEIGHT_DECAY)
  images, labels, batches = host_data()
  images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 [N, C, H, W].
  labels = torch.from_numpy(labels).long()
  batches = [torch.from_numpy(b).long() for b in batches]
  mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)

  def forward_loss(x, y):
    x = ((x.float() / 255.0 - mean) / std).contiguous(memory_format=memory_format)
    with torch.no_grad():  # inference mode for the teacher: running BN statistics, no graph.
      teacher_logits = teacher(x)
    return torch_kd_loss(student(x), teacher_logits, y)

  if variant == 'compile':
    forward_loss = torch.compile(forward_loss)
  box = {'i': 0}

  def step():
    index = batches[box['i'] % len(batches)]
    box['i'] += 1
    optimizer.zero_grad(set_to_none=True)
    loss = forward_loss(images[index], labels[index])
    loss.backward()
    optimizer.step()
    loss.item()

  start = time.perf_counter()
  step()
  compile_s = time.perf_counter() - start
  step()
  return Row(pair, 'pytorch', variant, step, compile_s, peak_memory_torch(step))


def peak_memory_torch(step) -> Optional[float]:
  """MiB: the profiler's peak of bytes allocated by PyTorch's CPU allocator during one step,
  parameters, gradients and momentum buffers included (they are alive throughout)."""
  import torch
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
    step()
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'trace.json')
    prof.export_chrome_trace(path)
    with open(path) as f:
      events = json.load(f)['traceEvents']
  totals = [e['args']['Total Allocated'] for e in events
            if e.get('name') == '[memory]' and 'Total Allocated' in e.get('args', {})]
  del torch
  return max(totals) / 2**20 if totals else None


# --------------------------------------------------------------------------------------------
# Scale: N students in one program, a whole stage with cached teacher logits, 8 devices.


def sequentially(row: Row, n: int, variant: str) -> Row:
  """`row`'s step `n` times per call: N students trained one after another, each with its own
  teacher forward. Parameter values do not change a step's cost, so one model stands for N."""
  def step():
    for _ in range(n):
      row.step()
  return row._replace(variant=variant, step=step, images=n * row.images)


def reuse(rows: List[Row], framework: str, variant: str, build: Callable[[], Row]) -> Row:
  """The already compiled and warmed-up row, if the step rows have it."""
  return next((r for r in rows if (r.framework, r.variant) == (framework, variant)), None) or \
      build()


def torch_step_row(pair: str, step_rows: List[Row], args) -> Row:
  variant = args.scale_torch_variant
  return reuse(step_rows, 'pytorch', variant, lambda: pytorch_row(pair, variant))


def student_rows(pair: str, step_rows: List[Row], args) -> List[Row]:
  """N students: kdjax in one step (one teacher forward per batch; the student updates vmapped
  or unrolled) vs N sequential steps of kdjax and of the `--scale-torch-variant` PyTorch step."""
  n = args.students
  kdjax_single = reuse(step_rows, 'kdjax', 'default', lambda: kdjax_row(pair, 'default'))
  torch_single = torch_step_row(pair, step_rows, args)
  return [kdjax_row(pair, f'{n} students in one step, vmapped', replicas=n,
                    replica_batching='vmap'),
          kdjax_row(pair, f'{n} students in one step, unrolled', replicas=n,
                    replica_batching='unroll'),
          sequentially(kdjax_single, n, f'{n} students, sequential'),
          sequentially(torch_single, n, f'{n} students, sequential ({args.scale_torch_variant})')]


def stage_rows(pair: str, step_rows: List[Row], args) -> List[Row]:
  """A whole distillation stage without augmentation (`--stage-epochs` epochs over the
  `NUM_TRAIN` images): kdjax computes the teacher's logits once (`teacher_logits_table`) and
  trains on them; PyTorch runs the teacher every step, as the official TAKD code does."""
  import jax
  import jax.numpy as jnp
  from kdjax import models
  from kdjax import teachers
  from kdjax import train
  epochs, steps_per_epoch = args.stage_epochs, NUM_TRAIN // BATCH
  teacher, student, teacher_vars, loss, augment_config, normalization = kdjax_setup(pair)
  state = train.create_train_state(
      student, models.init_variables(student, IMAGE_SHAPE, jax.random.key(2)),
      train.make_optimizer(ml_train_config(), lambda _: LR))
  images, labels, batches = host_data()
  data = train.DeviceData(jnp.asarray(images), jnp.asarray(labels))
  batches = [jnp.asarray(b) for b in batches]
  key = jax.random.key(3)
  start = time.perf_counter()
  logits_fn = train.make_teacher_logits_fn(teacher, normalization)
  cached = lambda: teachers.CachedTeacher(train.teacher_logits_table(
      teacher, teacher_vars, data, normalization, 4 * BATCH, logits_fn=logits_fn))
  table = cached()
  cached_step = train.make_train_step(student, loss, augment_config, normalization)
  cached_step = cached_step.lower(state, table, data, batches[0], key).compile()
  compile_s = time.perf_counter() - start
  box = {'state': state}

  def kdjax_stage():
    table = cached()
    for i in range(epochs * steps_per_epoch):
      box['state'], metrics = cached_step(box['state'], table, data, batches[i % len(batches)],
                                          key)
    jax.block_until_ready(metrics['loss'])

  torch_single = torch_step_row(pair, step_rows, args)

  def torch_stage():
    for _ in range(epochs * steps_per_epoch):
      torch_single.step()

  box['i'] = 0

  def kdjax_cached_step():  # what every epoch after the cache pass costs, per step.
    box['state'], metrics = cached_step(box['state'], table, data,
                                        batches[box['i'] % len(batches)], key)
    box['i'] += 1
    jax.block_until_ready(metrics['loss'])

  images = epochs * steps_per_epoch * BATCH
  label = f'stage of {epochs} epochs'
  return [Row(pair, 'kdjax', f'{label}, cached teacher logits', kdjax_stage, compile_s, None,
              images),
          Row(pair, 'kdjax', 'one step on cached logits (a long stage\'s limit)',
              kdjax_cached_step, compile_s, None, BATCH),
          torch_single._replace(variant=f'{label} ({args.scale_torch_variant})',
                                step=torch_stage, images=images)]


def device_rows(pair: str, args) -> List[dict]:
  """kdjax's step on 8 simulated CPU devices against a 1-device mesh, in a subprocess started
  with `--xla_force_host_platform_device_count=8` (the device count is fixed at start-up)."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8')
  done = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--devices-worker', '--pairs', pair,
       '--rounds', str(args.scale_rounds), '--steps-per-round', str(args.steps_per_round)],
      env=env, capture_output=True, text=True)
  if done.returncode:
    raise RuntimeError(f'the 8-device worker failed:\n{done.stderr[-3000:]}')
  line = next(l for l in done.stdout.splitlines() if l.startswith('ROWS '))
  return json.loads(line[len('ROWS '):])


def devices_worker(args) -> None:
  import jax
  from kdjax import parallel
  assert jax.device_count() == 8, jax.devices()
  for pair in args.pairs:
    rows = [kdjax_row(pair, '1 device', mesh=parallel.make_mesh(jax.devices()[:1])),
            kdjax_row(pair, '8 simulated devices (batch split 8 ways)',
                      mesh=parallel.make_mesh())]
    times = time_rows(rows, args.rounds, args.steps_per_round)
    print('ROWS ' + json.dumps([result_row(r, t, 'devices') for r, t in zip(rows, times)]))


# --------------------------------------------------------------------------------------------
# Rows, timing, output

# label: (conv option, compiler options). None = the library's own (on CPU, convolutions to
# Eigen instead of YNNPACK: kdjax.train.jit); {} = XLA's defaults.
KDJAX_VARIANTS = {'default': ('xla', None),
                  'matmul_dw conv': ('matmul_dw', None),
                  'XLA default options': ('xla', {})}
TORCH_VARIANTS = ('eager', 'channels_last', 'compile')


def kdjax_rows(pair: str, args) -> List[Row]:
  return [kdjax_row(pair, label, *KDJAX_VARIANTS[label]) for label in args.kdjax_variants]


def pytorch_rows(pair: str, args) -> List[Row]:
  return [pytorch_row(pair, variant) for variant in args.torch_variants]


# Each builder maps (pair, args) to rows; add builders (e.g. vmapped students) here.
ROW_BUILDERS = [kdjax_rows, pytorch_rows]


def result_row(row: Row, times: List[float], group: str) -> dict:
  median = statistics.median(times)
  return {'pair': row.pair, 'group': group, 'framework': row.framework, 'variant': row.variant,
          'batch': BATCH, 'images_per_s': row.images / median, 'compile_s': row.compile_s,
          'peak_mib': row.peak_mib, 'call_s': sorted(times)}


def time_rows(rows: List[Row], rounds: int, steps_per_round: int) -> List[List[float]]:
  """Per-step seconds for each row; the rows take turns round by round."""
  times = [[] for _ in rows]
  for _ in range(rounds):
    for row, row_times in zip(rows, times):
      for _ in range(steps_per_round):
        start = time.perf_counter()
        row.step()
        row_times.append(time.perf_counter() - start)
  return times


def versions() -> dict:
  import flax
  import jax
  import jaxlib
  import numpy
  import torch
  return {'python': platform.python_version(), 'jax': jax.__version__,
          'jaxlib': jaxlib.__version__, 'flax': flax.__version__, 'torch': torch.__version__,
          'numpy': numpy.__version__}


def machine(load_at_start) -> dict:
  model = ''
  try:
    with open('/proc/cpuinfo') as f:
      model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')),
                   '')
  except OSError:
    pass
  return {'cpu': model or platform.processor(), 'cores': os.cpu_count(),
          'platform': platform.platform(), 'load_average_at_start': load_at_start,
          'malloc': os.environ.get('GLIBC_TUNABLES', 'glibc defaults')}


GROUPS = {
    'step': 'One KD train step (teacher forward + student forward/backward + SGD update)',
    'students': 'N students per batch: kdjax in one step (one teacher forward) vs one after '
                'another',
    'stage': 'A whole stage without augmentation: kdjax caches the teacher\'s logits once, '
             'PyTorch runs the teacher every step',
    'devices': 'kdjax on 8 simulated CPU devices vs a 1-device mesh (same 2 cores; the cost of '
               'the sharded path)',
}


def baseline(rows: List[dict], row: dict) -> Optional[dict]:
  """What a row is compared with: the best PyTorch row of its pair and group, or for the
  'devices' group the 1-device row."""
  same = [r for r in rows if r['pair'] == row['pair'] and r['group'] == row['group']]
  if row['group'] == 'devices':
    return next((r for r in same if r['variant'] == '1 device'), None)
  return max((r for r in same if r['framework'] == 'pytorch'), key=lambda r: r['images_per_s'],
             default=None)


def write_markdown(path, result):
  """`results.md` from `results.json`'s content alone (tests/bench_test.py checks the two agree)."""
  rows, command, wall_s = result['rows'], result['command'], result['wall_s']
  idle = result['machine']['load_average_at_start'][0] < 1
  lines = [
      '# Knowledge distillation on CPU: kdjax vs PyTorch', '',
      f"Command: `{command}` ({wall_s / 60:.1f} min). Date: {result['date']}.", '',
      f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
      f"{result['machine']['platform']}; malloc: `{result['machine']['malloc']}`. 1-minute load "
      f"average before the run {result['machine']['load_average_at_start'][0]:.2f} (other "
      f"processes), at its end {result['machine']['load_average_at_end'][0]:.2f} (this run's "
      f"own threads included, about 2): the cores were "
      f"{'idle' if idle else 'shared with other work'} when it started.", '',
      'Versions: ' + ', '.join(f'{k} {v}' for k, v in result['versions'].items()) + '.', '',
      f"Batch {BATCH}, {IMAGE_SHAPE[0]}×{IMAGE_SHAPE[1]}×{IMAGE_SHAPE[2]} float32, "
      f"{NUM_CLASSES} classes. images/s = images trained on per call ÷ the median call time "
      f"(single steps: {result['timed_steps']} interleaved calls per row after warm-up; the "
      f"other groups: {result['scale_calls']} calls). For N students, images count once per "
      'student.', '']
  for group, title in GROUPS.items():
    members = [r for r in rows if r['group'] == group]
    if not members:
      continue
    lines += [f'## {title}', '',
              '| pair | framework | variant | images/s | ratio | first call (s) | peak MiB |',
              '|---|---|---|---:|---:|---:|---:|']
    for row in members:
      base = baseline(rows, row)
      ratio = f"{row['images_per_s'] / base['images_per_s']:.2f}" if base else ''
      peak = f"{row['peak_mib']:.0f}" if row['peak_mib'] is not None else ''
      lines.append(f"| {row['pair']} | {row['framework']} | {row['variant']} | "
                   f"{row['images_per_s']:.0f} | {ratio} | {row['compile_s']:.1f} | {peak} |")
    lines.append('')
  lines += ['Ratio: images/s ÷ the best PyTorch row of the same pair and table (for the devices '
            'table, ÷ the 1-device row). Peak MiB: kdjax = XLA buffer assignment of the step '
            '(arguments + outputs + temporaries − donated − the training set); PyTorch = peak of '
            'the CPU allocator\'s bytes in use during one step (profiler). First call: jit lower + '
            'compile (kdjax; for the stage, also the teacher-logits program), the first step '
            '(PyTorch; for `compile` this is torch.compile\'s compilation).', '']
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--pairs', nargs='+', default=list(PAIRS), choices=list(PAIRS))
  parser.add_argument('--kdjax-variants', nargs='*', default=list(KDJAX_VARIANTS),
                      choices=list(KDJAX_VARIANTS))
  parser.add_argument('--torch-variants', nargs='*', default=list(TORCH_VARIANTS),
                      choices=TORCH_VARIANTS)
  parser.add_argument('--rounds', type=int, default=4)
  parser.add_argument('--steps-per-round', type=int, default=3)
  parser.add_argument('--threads', type=int, default=os.cpu_count())
  parser.add_argument('--no-hugepages', action='store_true',
                      help='keep glibc malloc\'s defaults (4 KiB pages faulted in every step)')
  parser.add_argument('--students', type=int, default=8,
                      help='N for the N-students rows (0: skip them)')
  parser.add_argument('--stage-epochs', type=int, default=4,
                      help='epochs of the whole-stage rows (0: skip them)')
  parser.add_argument('--no-devices', action='store_true', help='skip the 8-device rows')
  parser.add_argument('--scale-torch-variant', default='compile', choices=TORCH_VARIANTS,
                      help='the PyTorch step that the N-students and stage rows repeat')
  parser.add_argument('--scale-rounds', type=int, default=3,
                      help='timed calls per row for the N-students, stage and device rows')
  parser.add_argument('--devices-worker', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--out', default=HERE, help='folder for results.json and results.md')
  args = parser.parse_args(argv)
  if args.devices_worker:
    devices_worker(args)
    return

  if not args.no_hugepages:
    # Transparent huge pages for glibc's malloc, as `python -m kdjax.main` does. XLA and PyTorch
    # allocate every large buffer with malloc; without this, each step faults in every 4 KiB
    # page of its fresh buffers again (see README.md). glibc reads the tunable once at start,
    # hence the restart. kdjax.main imports only absl here, not jax.
    from kdjax.main import malloc_huge_pages_env
    env = malloc_huge_pages_env(os.environ)
    if env is not None:
      os.execve(sys.executable, [sys.executable, *sys.argv], env)
  # First-call times are cold compilations: no inductor/FX cache from an earlier run (JAX's
  # persistent cache is off unless configured, and this script does not configure it).
  os.environ['TORCHINDUCTOR_FORCE_DISABLE_CACHES'] = '1'
  load_at_start = os.getloadavg()  # before any work: later values include this script's threads.

  import torch
  torch.set_num_threads(args.threads)  # XLA's CPU client uses every core too.
  check_losses_agree()
  wall_start = time.perf_counter()
  results = []
  for pair in args.pairs:
    step_rows = [row for builder in ROW_BUILDERS for row in builder(pair, args)]
    groups = [('step', step_rows, args.rounds, args.steps_per_round)]
    if args.students:
      groups.append(('students', student_rows(pair, step_rows, args), args.scale_rounds, 1))
    if args.stage_epochs:
      groups.append(('stage', stage_rows(pair, step_rows, args), args.scale_rounds, 1))
    for group, rows, rounds, calls_per_round in groups:
      for row in rows:
        print(f'{row.pair} {group} {row.framework} {row.variant}: first call '
              f'{row.compile_s:.1f} s', flush=True)
      times = time_rows(rows, rounds, calls_per_round)
      for row, row_times in zip(rows, times):
        results.append(result_row(row, row_times, group))
        print(f"{row.pair} {group} {row.framework} {row.variant}: "
              f"{results[-1]['images_per_s']:.1f} images/s", flush=True)
    del step_rows, groups
    if not args.no_devices:
      results += device_rows(pair, args)
      for row in results[-2:]:
        print(f"{row['pair']} devices kdjax {row['variant']}: {row['images_per_s']:.1f} images/s",
              flush=True)
  result = {'machine': machine(load_at_start), 'versions': versions(),
            'date': datetime.date.today().isoformat(),
            'timed_steps': args.rounds * args.steps_per_round, 'scale_calls': args.scale_rounds,
            'rows': results}
  result['machine']['load_average_at_end'] = os.getloadavg()
  command = shlex.join(['python', 'experiments/bench/bench.py',
                        *(argv if argv is not None else sys.argv[1:])])
  result.update(command=command, wall_s=time.perf_counter() - wall_start)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump(result, f, indent=1)
  write_markdown(os.path.join(args.out, 'results.md'), result)


if __name__ == '__main__':
  main()
