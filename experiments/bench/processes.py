r"""The cost of crossing processes: 2 processes × 1 device against 1 process × 2 devices.

  python experiments/bench/processes.py      # 94 s on 2 idle cores (2026-12-01)

Trains the same two-stage chain (plain CNN-10 teacher with cross-entropy, then a plain CNN-2
student distilling from its cached logits) on 4,096 random CIFAR-shaped images with kdjax's own
command, once as one process with 2 virtual CPU devices and once as 2 processes with 1 device
each (`--distributed`, gloo collectives over 127.0.0.1), and reports each stage's training
throughput: the median over epochs of `metrics.jsonl`'s images/s, the first epoch (compiles)
left out. Both topologies run the same global program on a 2-device mesh; only the all-reduces
change from in-process copies to TCP. Writes `processes.json` and `processes.md` beside this file.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CONFIG = os.path.join(HERE, 'processes_config.py')


def write_data(path: str, num_train: int = 4096, num_test: int = 512) -> None:
  rng = np.random.default_rng(0)
  labels = lambda n: rng.integers(0, 10, n)
  np.savez(path, x_train=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
           y_train=labels(num_train), x_test=rng.integers(0, 256, (num_test, 32, 32, 3),
                                                         dtype=np.uint8), y_test=labels(num_test))


def command(workdir, data, epochs, *extra):
  return [sys.executable, '-m', 'kdjax.main', f'--config={CONFIG}', f'--workdir={workdir}',
          f'--config.data.npz={data}', f'--config.train.epochs={epochs}',
          '--config.compilation_cache_dir=', '--config.progress_bar=False', *extra]


def run_topology(processes: int, devices: int, data: str, epochs: int, folder: str) -> dict:
  workdir = os.path.join(folder, f'{processes}x{devices}')
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  with contextlib.closing(socket.socket()) as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  flags = lambda i: ([] if processes == 1 else [
      '--distributed', f'--coordinator_address=127.0.0.1:{port}',
      f'--num_processes={processes}', f'--process_id={i}'])
  start = time.perf_counter()
  running = [subprocess.Popen(command(workdir, data, epochs, *flags(i)), cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for i in range(processes)]
  errors = [p.communicate()[1] for p in running]
  if any(p.returncode for p in running):
    raise SystemExit(f'{processes}x{devices} failed:\n' + '\n'.join(e[-2000:] for e in errors))
  rows = {}
  for stage in ('teacher', 'student'):
    with open(os.path.join(workdir, 'stages', stage, 'metrics.jsonl')) as f:
      history = [json.loads(line) for line in f]
    rows[stage] = float(np.median([m['images_per_s'] for m in history[1:]]))
  return {'processes': processes, 'devices_per_process': devices,
          'images_per_s': rows, 'wall_s': time.perf_counter() - start}


def write_markdown(path: str, result: dict) -> None:
  one, two = result['rows']
  lines = [
      f"Machine: {result['machine']}; {result['versions']}; {result['date']}.",
      f"Command: `{result['command']}` ({result['wall_s']:.0f} s).", '',
      '| stage | 1 process × 2 devices (images/s) | 2 processes × 1 device (images/s) | ratio |',
      '|---|---:|---:|---:|']
  for stage, label in (('teacher', 'plain CNN-10, cross-entropy'),
                       ('student', 'plain CNN-2, KD on cached logits')):
    a, b = one['images_per_s'][stage], two['images_per_s'][stage]
    lines.append(f'| {label} | {a:.0f} | {b:.0f} | {b / a:.2f}× |')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epochs', type=int, default=3)
  parser.add_argument('--out', default=HERE)
  args = parser.parse_args()
  import jax
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as folder:
    data = os.path.join(folder, 'data.npz')
    write_data(data)
    rows = [run_topology(1, 2, data, args.epochs, folder),
            run_topology(2, 1, data, args.epochs, folder)]
  result = {
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'versions': f'Python {platform.python_version()}, jax {jax.__version__}',
      'date': datetime.date.today().isoformat(),
      'command': 'python experiments/bench/processes.py' + (
          f' --epochs={args.epochs}' if args.epochs != 3 else ''),
      'wall_s': time.perf_counter() - start, 'rows': rows}
  with open(os.path.join(args.out, 'processes.json'), 'w') as f:
    json.dump(result, f, indent=2)
  write_markdown(os.path.join(args.out, 'processes.md'), result)
  print(open(os.path.join(args.out, 'processes.md')).read())


if __name__ == '__main__':
  main()
