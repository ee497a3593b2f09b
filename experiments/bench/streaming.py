r"""Streaming input path against device-resident data: training images/s through kdjax's command.

  python experiments/bench/streaming.py      # about 15 min on 2 cores (see streaming.json)

`--config.data.pipeline=stream` leaves the splits on the host (here memory-mapped `.npy` files)
and grain's threads gather each step's batch ahead of the step; `device` puts the whole split on
the device once and gathers the batch inside `jit`. For each of two teacher → student chains (a
teacher trained with cross-entropy, then a student distilling from its cached logits; batch 128,
augmentation off, random CIFAR-10-shaped uint8 images and 10 classes: synthetic, not CIFAR-10
itself, which changes nothing about speed), this runs `python -m kdjax.main` once per pipeline
per round, interleaved (device, stream, device, stream, ...), so load from other processes falls
on both alike. A stage's throughput is what the run records: the median over epochs of
`metrics.jsonl`'s `images_per_s`, the first epoch left out; its compile time is the stage's
`compile_s` (the train step's lower + compile, cold: the compilation cache is off). Across
rounds the median is reported. It also times the host side of one streamed batch in this
process (the row gather from the memory-mapped file, and the transfer to the device), so that a
gap between the two pipelines can be put against it.

Writes `streaming.json` and `streaming.md` beside this file (`--out` elsewhere).
"""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, 'streaming_config.py')
PIPELINES = ('device', 'stream')
STAGES = ('teacher', 'student')
TARGET = {'resnet': 0.9}  # the issue: streaming ≥ 0.9× device-resident for the ResNet pair.
DEFAULTS = dict(rounds=3, teacher_epochs=3, student_epochs=6, plain_images=2048,
                resnet_images=1536, resnet_teacher='resnet110', resnet_student='resnet8',
                test_images=512, ab_turns=5)


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def write_data(folder: str, num_train: int, num_test: int) -> None:
  """Random CIFAR-10-shaped data as the `.npy` folder both pipelines read."""
  from kdjax.data import stream
  rng = np.random.default_rng(0)
  images = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  labels = lambda n: rng.integers(0, 10, n).astype(np.int32)
  stream.write_npy_folder(types.SimpleNamespace(
      name='random_cifar10_shape', num_classes=10, x_train=images(num_train),
      y_train=labels(num_train), x_test=images(num_test), y_test=labels(num_test)), folder)


def busy_cpu_s() -> float:
  """CPU-seconds every process on the machine has used since boot (`/proc/stat`)."""
  with open('/proc/stat') as f:
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
  return (user + nice + system + irq + softirq + steal) / os.sysconf('SC_CLK_TCK')


def children_cpu_s() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def kdjax_revision() -> dict:
  """The commit the measured kdjax is, and whether its `kdjax/` differs from that commit."""
  git = lambda *a: subprocess.run(['git', '-C', REPO, *a], capture_output=True, text=True).stdout
  return {'commit': git('rev-parse', 'HEAD').strip(),
          'kdjax_modified': bool(git('status', '--porcelain', '--', 'kdjax').strip())}


def workloads(args) -> dict:
  return {
      'plain': dict(label='plain CNN-10 → CNN-2', teacher='plain_cnn_10', student='plain_cnn_2',
                    images=args.plain_images),
      'resnet': dict(label=f'ResNet-{args.resnet_teacher[6:]} → ResNet-{args.resnet_student[6:]}',
                     teacher=args.resnet_teacher, student=args.resnet_student,
                     images=args.resnet_images),
  }


def command(workdir: str, data: str, epochs: tuple, work: dict, pipeline: str) -> list:
  return [sys.executable, '-m', 'kdjax.main', f'--config={CONFIG}', f'--workdir={workdir}',
          f'--config.data.npy_dir={data}', f'--config.data.pipeline={pipeline}',
          f"--config.stages.teacher.model={work['teacher']}",
          f"--config.stages.student.model={work['student']}",
          f'--config.stages.teacher.train.epochs={epochs[0]}',
          f'--config.stages.student.train.epochs={epochs[1]}', '--config.compilation_cache_dir=',
          '--config.progress_bar=False']


def run_once(name: str, work: dict, pipeline: str, round_: int, data: str, epochs: tuple,
             folder: str) -> dict:
  workdir = os.path.join(folder, f'{name}_{pipeline}_{round_}')
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)  # one CPU device, what `python -m kdjax.main` gets by default.
  load_before = os.getloadavg()[0]
  busy, own = busy_cpu_s(), children_cpu_s()
  start = time.perf_counter()
  done = subprocess.run(command(workdir, data, epochs, work, pipeline), cwd=REPO, env=env,
                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  wall_s = time.perf_counter() - start
  own_cores = (children_cpu_s() - own) / wall_s
  # Cores other processes kept busy meanwhile: the machine's busy time less the run's own.
  other_cores = max(0.0, (busy_cpu_s() - busy) / wall_s - own_cores)
  if done.returncode:
    raise SystemExit(f'{name} {pipeline} round {round_} failed:\n{done.stdout[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    compile_s = {s['name']: s['compile_s'] for s in json.load(f)['stages']}
  stages = {}
  for stage in STAGES:
    with open(os.path.join(workdir, 'stages', stage, 'metrics.jsonl')) as f:
      per_epoch = [json.loads(line)['images_per_s'] for line in f]
    stages[stage] = {'images_per_s': float(np.median(per_epoch[1:])),
                     'epochs_images_per_s': per_epoch, 'compile_s': compile_s[stage]}
  row = {'workload': name, 'pipeline': pipeline, 'round': round_, 'wall_s': wall_s,
         'load_1min_before': load_before, 'load_1min_after': os.getloadavg()[0],
         'own_cores': own_cores, 'other_cores': other_cores, 'stages': stages}
  print(f"{name:6s} {pipeline:6s} round {round_}: " + ', '.join(
      f"{s} {v['images_per_s']:.0f} images/s (compile {v['compile_s']:.1f} s)"
      for s, v in stages.items()) + f'; {wall_s:.0f} s, load {load_before:.2f}, '
      f'other processes {other_cores:.2f} cores', flush=True)
  return row


def host_batch_cost(data: str, batch: int = 128, repeats: int = 200) -> dict:
  """ms per batch of the host side of streaming, timed here (`kdjax.data.stream`'s steps):
  the 128-row gather from the memory-mapped images, and that plus the transfer to the device
  (`parallel.global_rows`, as each step's batch is sent)."""
  import jax
  from kdjax import parallel
  from kdjax.data import stream
  arrays = stream.open_npy_folder(data)
  images, labels = arrays['x_train'], arrays['y_train']
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(1)
  orders = [np.sort(rng.permutation(len(images))[:batch]) for _ in range(repeats)]
  gather, send = [], []
  for rows in orders:
    t0 = time.perf_counter()
    x, y = np.asarray(images[rows]), np.asarray(labels[rows])
    t1 = time.perf_counter()
    jax.block_until_ready((parallel.global_rows(x, mesh, batch),
                           parallel.global_rows(y, mesh, batch)))
    t2 = time.perf_counter()
    gather.append(t1 - t0)
    send.append(t2 - t0)
  # The whole streaming loader alone (grain's threads, prefetch, transfer), nothing training.
  from kdjax import train
  loader = stream.training_batches(train.HostData(images, labels), lambda step: orders[step], 0,
                                   repeats, mesh)
  t0 = time.perf_counter()
  for item in loader:  # (batch, indices, ...)
    jax.block_until_ready(item[0])
  loader_ms = 1e3 * (time.perf_counter() - t0) / repeats
  return {'gather_ms': 1e3 * float(np.median(gather)),
          'gather_and_send_ms': 1e3 * float(np.median(send)), 'loader_ms': loader_ms,
          'batch': batch, 'repeats': repeats}


AB_FEEDS = ('device', 'stream', 'stream_ready', 'device+loader')


def step_ab(work: dict, data: str, workdir: str, epochs: tuple, blocks: int,
            block: int = 16) -> dict:
  """ms per step of the student stage's compiled train step in this one process, fed four ways
  in turns of `block` steps (so that load falls on all four alike; the first turn warms up):
  'device' (the split on device, gathered in jit), 'stream' (kdjax's streaming loader feeding
  the streamed step), 'stream_ready' (the streamed step fed batches already on the device: the
  program alone, no loader) and 'device+loader' (the device step while the streaming loader runs
  beside it, its batches dropped: what the loader's threads take from the step). The teacher is
  the one the last device run trained in `workdir`; the loop is `experiment.run_stage`'s."""
  import importlib.util
  import jax
  import jax.numpy as jnp
  from kdjax import data as kd_data, experiment, models, parallel, teachers, train
  from kdjax import plan as planning
  spec = importlib.util.spec_from_file_location('streaming_config', CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.npy_dir = data
  for stage, n in zip(STAGES, epochs):
    config.stages[stage].model = work[stage]
    config.stages[stage].train.epochs = n
  dataset = experiment.load_dataset(config)
  mesh = parallel.make_mesh()
  plan = planning.plan(config, planning.DataInfo.of(dataset), num_devices=mesh.devices.size,
                       backend=jax.default_backend())[STAGES.index('student')]
  mean, std = kd_data.channel_stats(dataset.x_train)
  normalization = train.Normalization(jnp.asarray(mean), jnp.asarray(std))
  splits = {'device': experiment.device_splits(dataset, mesh).train,
            'stream': experiment.host_splits(dataset).train}
  variables = models.init_variables(plan.model, plan.image_shape,
                                    experiment._replica_keys(plan, 'init'))
  fresh = lambda: parallel.put_replicated(
      train.create_train_state(plan.model, variables, plan.train.optimizer), mesh)
  keys = experiment._replica_keys(plan, 'augment')
  source, step = {}, {}
  for kind, split in splits.items():
    source[kind] = teachers.make_source(plan, workdir, split, normalization, mesh, log=id)
    step[kind] = experiment.compile_steps(plan, fresh(), source[kind], split, normalization,
                                          mesh)[0]

  def endless(kind):  # (teacher, data, indices) for each step, over and over.
    while True:
      yield from experiment.training_inputs(plan, splits[kind], source[kind], 0, mesh)

  ready = list(zip(range(block), endless('stream')))
  feeds = {'device': endless('device'), 'stream': endless('stream'),
           'stream_ready': None, 'device+loader': endless('device')}
  beside, states = endless('stream'), {kind: fresh() for kind in AB_FEEDS}
  times = {kind: [] for kind in AB_FEEDS}
  for turn in range(blocks + 1):
    for kind in AB_FEEDS:
      feed = iter([item for _, item in ready]) if kind == 'stream_ready' else feeds[kind]
      runs, metrics = ('device' if kind.startswith('device') else 'stream'), []
      start = time.perf_counter()
      for _ in range(block):
        if kind == 'device+loader':
          next(beside)
        teacher, batch_data, indices = next(feed)
        states[kind], m = step[runs](states[kind], teacher, batch_data, indices, keys)
        metrics.append(m)
        experiment._bound_run_ahead(metrics)
      jax.block_until_ready(metrics[-1])
      if turn:
        times[kind].append(1e3 * (time.perf_counter() - start) / block)
  return {kind: float(np.median(t)) for kind, t in times.items()} | {
      'model': work['student'], 'turns': blocks, 'steps_per_turn': block}


def summarise(rows: list, names: dict) -> list:
  """One line per (workload, stage): the medians over rounds and their ratio."""
  out = []
  for name, work in names.items():
    for stage in STAGES:
      median = lambda key, p: float(np.median([r['stages'][stage][key] for r in rows
                                               if r['workload'] == name and r['pipeline'] == p]))
      device, streamed = median('images_per_s', 'device'), median('images_per_s', 'stream')
      line = {'workload': name, 'label': work['label'], 'stage': stage,
              'model': work[stage], 'device_images_per_s': device,
              'stream_images_per_s': streamed, 'ratio': streamed / device,
              'device_compile_s': median('compile_s', 'device'),
              'stream_compile_s': median('compile_s', 'stream'),
              'device_ms_per_step': 1e3 * 128 / device, 'stream_ms_per_step': 1e3 * 128 / streamed}
      if name in TARGET:
        line['target'] = TARGET[name]
        line['met'] = line['ratio'] >= TARGET[name]
      out.append(line)
  return out


def write_markdown(path: str, result: dict) -> None:
  load = result['load_average']
  host = result['host_batch']
  others = [r['other_cores'] for r in result['runs']]
  kdjax = result['kdjax']
  lines = [
      f"Machine: {result['machine']}; {result['versions']}; {result['date']}; kdjax at "
      f"{kdjax['commit'][:7]}{' with kdjax/ modified' if kdjax['kdjax_modified'] else ''}.",
      f"Command: `{result['command']}` ({result['wall_s']:.0f} s; "
      f"{result['rounds']} rounds, device and stream interleaved).",
      f"Load average (1, 5, 15 min): {load['before'][0]:.2f}, {load['before'][1]:.2f}, "
      f"{load['before'][2]:.2f} before; {load['after'][0]:.2f}, {load['after'][1]:.2f}, "
      f"{load['after'][2]:.2f} after.",
      f"Other processes kept {min(others):.2f}–{max(others):.2f} cores busy during the runs "
      "(the machine's busy CPU time less the runs' own, per run).",
      f"Data: {result['data']}.", '',
      '| workload | stage | device (images/s) | stream (images/s) | stream / device | '
      'target | compile s (device / stream) |',
      '|---|---|---:|---:|---:|---|---:|']
  for s in result['summary']:
    target = (f"≥ {s['target']:.1f}×: **{'met' if s['met'] else 'missed'}**"
              if 'target' in s else '—')
    stage = ('cross-entropy' if s['stage'] == 'teacher' else 'KD on cached logits')
    lines.append(f"| {s['label']} | {s['model']}, {stage} | {s['device_images_per_s']:.0f} | "
                 f"{s['stream_images_per_s']:.0f} | {s['ratio']:.2f}× | {target} | "
                 f"{s['device_compile_s']:.1f} / {s['stream_compile_s']:.1f} |")
  if result['step_ab']:
    some = next(iter(result['step_ab'].values()))
    lines += ['', f"The student's train step alone, in one process, the four feeds taking turns "
              f"({some['turns']} turns of {some['steps_per_turn']} steps each; ms per step, "
              'median over turns):', '',
              '| workload | step | device | stream | stream, batches ready | device, loader '
              'beside | stream / device |', '|---|---|---:|---:|---:|---:|---:|']
    for name, ab in result['step_ab'].items():
      label = next(s['label'] for s in result['summary'] if s['workload'] == name)
      lines.append(f"| {label} | {ab['model']}, KD on cached logits | {ab['device']:.1f} | "
                   f"{ab['stream']:.1f} | {ab['stream_ready']:.1f} | {ab['device+loader']:.1f} | "
                   f"{ab['device'] / ab['stream']:.2f}× |")
  lines += ['', f"Host side of one streamed batch of {host['batch']} (median of "
            f"{host['repeats']}, in the benchmark's own process): row gather from the "
            f"memory-mapped file {host['gather_ms']:.3f} ms; gather + transfer to the device "
            f"{host['gather_and_send_ms']:.3f} ms; kdjax's whole streaming loader alone "
            f"(grain threads, prefetch, transfer; no training) {host['loader_ms']:.3f} ms per "
            'batch.']
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=DEFAULTS['rounds'])
  parser.add_argument('--teacher-epochs', type=int, default=DEFAULTS['teacher_epochs'],
                      help='the first epoch of each stage is left out of images/s.')
  parser.add_argument('--student-epochs', type=int, default=DEFAULTS['student_epochs'])
  parser.add_argument('--plain-images', type=int, default=DEFAULTS['plain_images'])
  parser.add_argument('--resnet-images', type=int, default=DEFAULTS['resnet_images'])
  parser.add_argument('--resnet-teacher', default=DEFAULTS['resnet_teacher'])
  parser.add_argument('--resnet-student', default=DEFAULTS['resnet_student'])
  parser.add_argument('--test-images', type=int, default=DEFAULTS['test_images'])
  parser.add_argument('--ab-turns', type=int, default=DEFAULTS['ab_turns'],
                      help="turns of the in-process student-step comparison (0: none).")
  parser.add_argument('--workloads', default='plain,resnet')
  parser.add_argument('--no-hugepages', action='store_true',
                      help="keep glibc's malloc defaults (kdjax.main turns huge pages on).")
  parser.add_argument('--out', default=HERE)
  args = parser.parse_args()
  sys.path.insert(0, REPO)  # this checkout's kdjax, as the runs (PYTHONPATH) import it.
  if not args.no_hugepages:  # as `python -m kdjax.main` does, for this process's own timings.
    from kdjax.main import malloc_huge_pages_env
    env = malloc_huge_pages_env(os.environ)
    if env is not None:
      os.execve(sys.executable, [sys.executable, *sys.argv], env)
  import importlib.metadata
  import jax
  load_before = os.getloadavg()
  start = time.perf_counter()
  names = {k: v for k, v in workloads(args).items() if k in args.workloads.split(',')}
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    data = {}
    for name, work in names.items():
      data[name] = os.path.join(folder, f"data_{work['images']}")
      if not os.path.isdir(data[name]):
        write_data(data[name], work['images'], args.test_images)
    host = host_batch_cost(next(iter(data.values())))
    for round_ in range(args.rounds):
      for name, work in names.items():
        for pipeline in PIPELINES:
          rows.append(run_once(name, work, pipeline, round_, data[name],
                               (args.teacher_epochs, args.student_epochs), folder))
    ab = {name: step_ab(work, data[name], os.path.join(folder, f'{name}_device_{args.rounds - 1}'),
                        (args.teacher_epochs, args.student_epochs), args.ab_turns)
          for name, work in names.items()} if args.ab_turns else {}
  flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in DEFAULTS
           if getattr(args, k) != DEFAULTS[k]]
  flags += [f'--workloads={args.workloads}'] if args.workloads != 'plain,resnet' else []
  flags += ['--no-hugepages'] if args.no_hugepages else []
  version = importlib.metadata.version
  result = {
      'machine': f'{cpu_model()}, {os.cpu_count()} cores ({platform.machine()})',
      'versions': (f'Python {platform.python_version()}, jax {jax.__version__}, '
                   f"jaxlib {version('jaxlib')}, grain {version('grain')}"),
      'date': datetime.date.today().isoformat(), 'kdjax': kdjax_revision(),
      'command': ' '.join(['python experiments/bench/streaming.py', *flags]),
      'data': ('random uint8 32×32×3 images and labels of 10 classes (synthetic, CIFAR-10\'s '
               'shapes): ' + ', '.join(f"{v['images']} train ({k})" for k, v in names.items())
               + f' and {args.test_images} test images, as memory-mapped .npy files (read from '
               'the page cache)'),
      'rounds': args.rounds,
      'epochs': {'teacher': args.teacher_epochs, 'student': args.student_epochs},
      'batch': 128, 'devices': 1,
      'load_average': {'before': list(load_before), 'after': list(os.getloadavg())},
      'wall_s': time.perf_counter() - start, 'host_batch': host,
      'summary': summarise(rows, names), 'step_ab': ab, 'runs': rows}
  with open(os.path.join(args.out, 'streaming.json'), 'w') as f:
    json.dump(result, f, indent=2)
  write_markdown(os.path.join(args.out, 'streaming.md'), result)
  print(open(os.path.join(args.out, 'streaming.md')).read())


if __name__ == '__main__':
  main()
