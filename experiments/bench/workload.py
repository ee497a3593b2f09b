r"""Time to a paper's table: TAKD's CIFAR-10 plain-CNN table end to end, kdjax against PyTorch.

  python experiments/bench/workload.py --cifar10 cifar10.npz   # decoded CIFAR-10 (see below)

The table (`workload_config.py`): a CNN-10 teacher, assistants CNN-8/6/4 distilled from it,
the full path 10 → 8 → 6 → 4, and CNN-2 students (NOKD, BLKD, TAKD via each assistant and via
the path's end) × 5 seeds: 6 single models and 30 students. Three ways to train it, each on the
same arrays (class-balanced subsets of CIFAR-10's training and test sets, `--train-images` and
`--test-images`), the same models (`bench.torch_models`: kdjax's layer for
layer), optimiser, loss and epochs:

  kdjax            its command and config, as a user runs it: one process; each stage's five
                   students in one program; each teacher's logits computed once for all the
                   stages that learn from it (with augmentation: on per-example views).
  pytorch_official the way the official TAKD code trains (imirzadeh/Teacher-Assistant-
                   Knowledge-Distillation, train.py): one process per stage and seed, the teacher
                   run on every batch in eval mode without `no_grad`, so autograd also goes
                   back through it (its parameters are not stepped), eager, NCHW.
  pytorch_careful  as a careful PyTorch user would write it: one process per stage (the seeds
                   one after another in it), `channels_last`, `torch.compile`d student step,
                   the teacher under `no_grad`.

Each runs without augmentation (the official recipe) and with pad-4 crop + flip. Reported: wall
time per stage and in total (processes started, imports and compiles included), and each
stage's final test accuracy (mean ± std over the seeds). Each framework's compilation caches
start empty and fill within its run, as on a user's first run of the table: JAX's persistent
cache (kdjax's default `compilation_cache_dir`, here a fresh folder) and TorchInductor's
(`TORCHINDUCTOR_CACHE_DIR`, a fresh folder), so a stage whose program an earlier stage compiled
reuses it in both. The accuracies are checked to agree
across frameworks within the seed spread (Welch's interval of the difference of the student
means contains 0, at 95 % jointly over the six student groups: Bonferroni); where they do not,
the speed comparison is void and says so.

Shared settings (`workload_config.py`): SGD 0.01 constant, momentum 0.9, weight decay 1e-4
(PyTorch's coupled form), batch 128 (last partial batch dropped), T = 5, λ = 0.5, the KL
averaged over the batch (the paper's form; the official code's `KLDivLoss()` averages over
classes too, which rescales λ: kdjax's `kl_reduction='elementwise_mean'`), per-channel
normalisation by the training subset's mean and std. The order of batches and the augmentation
draws differ between frameworks (each its own RNG), as two implementations' would.

CIFAR-10 offline: `python3 ../shared/data/convert/cifar10_jpegbytes.py decode
../shared/data/cifar10_jpegbytes.npz cifar10.npz` (the JPEG-decoded set; see that README).
Writes workload.json and workload.md beside this file (`--out` elsewhere, `--name` another stem).

The newest JAX (Python 3.12, where no PyTorch CPU wheel is at hand here): run this script with
the 3.12 venv's interpreter and hand the PyTorch stages to a 3.11 one, so the ratios still come
from one run:

  .venv-py312/bin/python experiments/bench/workload.py --cifar10 cifar10.npz \
      --torch-python=.venv/bin/python --name=workload_newest_jax
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import workload_config  # noqa: E402  (beside this file)

FRAMEWORKS = ('kdjax', 'pytorch_official', 'pytorch_careful')
TARGETS = {False: 3.0, True: 2.0}  # kdjax's end-to-end speed-up over the official way, by aug.
DEFAULTS = dict(train_images=5_000, test_images=2_000, epochs=2)


# ---------------------------------------------------------------- data


def write_subset(cifar10: str, train_images: int, test_images: int, path: str) -> dict:
  """Class-balanced subsets of the training and test sets (the first `images // 10` of each
  class, in their original order: the decoded JPEG set is sorted by class, so its first images
  are all one class), as one `.npz` both frameworks read."""
  with np.load(cifar10) as data:
    x_train, y_train = data['x_train'], data['y_train'].astype(np.int64)
    x_test, y_test = data['x_test'], data['y_test'].astype(np.int64)
  balanced = lambda y, n: np.sort(np.concatenate([np.flatnonzero(y == c)[:n // 10]
                                                  for c in range(10)]))
  train, test = balanced(y_train, train_images), balanced(y_test, test_images)
  np.savez(path, x_train=x_train[train], y_train=y_train[train], x_test=x_test[test],
           y_test=y_test[test])
  return {'train': int(len(train)), 'test': int(len(test))}


# ---------------------------------------------------------------- kdjax


def run_kdjax(data: str, epochs: int, augment: bool, workdir: str) -> dict:
  """The whole table through kdjax's command, its JAX compilation cache empty at the start."""
  command = [sys.executable, '-m', 'kdjax.main', f'--config={HERE}/workload_config.py',
             f'--workdir={workdir}', f'--config.data.npz={data}',
             f'--config.train.epochs={epochs}', f'--config.data.augment.enabled={augment}',
             f'--config.compilation_cache_dir={workdir}-xla-cache', '--config.progress_bar=False']
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env.pop('XLA_FLAGS', None)
  start = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - start
  if done.returncode:
    raise SystemExit(f'kdjax failed:\n{done.stderr[-3000:]}')
  with open(os.path.join(workdir, 'results.json')) as f:
    results = json.load(f)
  stages = {}
  for row in results['stages']:
    accuracies = (row['replicas']['test_accuracy'] if row.get('replicas')
                  else [row['test_accuracy']])
    stages[row['name']] = {'wall_s': row['wall_s'], 'compile_s': row['compile_s'],
                           'test_accuracy': accuracies}
  shown = [c for c in command[1:] if not c.startswith(('--workdir', '--config.data.npz',
                                                       '--config.compilation_cache_dir'))]
  return {'wall_s': wall, 'stages': stages, 'command': ' '.join(shown)}


# ---------------------------------------------------------------- PyTorch


def torch_stage(args) -> None:
  """One stage in PyTorch (`--torch-stage`), for each of `--seeds`: trains, tests, saves."""
  import torch
  import torch.nn.functional as F
  import bench
  official = args.variant == 'pytorch_official'
  with np.load(args.data) as data:
    x_train, y_train, x_test, y_test = (data[k] for k in ('x_train', 'y_train', 'x_test',
                                                           'y_test'))
  flat = x_train.reshape(-1, 3).astype(np.float64) / 255.0
  mean = torch.tensor(flat.mean(0), dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(flat.std(0), dtype=torch.float32).view(1, 3, 1, 1)
  images = torch.from_numpy(x_train).permute(0, 3, 1, 2).contiguous()  # uint8 NCHW
  labels = torch.from_numpy(y_train).long()
  test_images = torch.from_numpy(x_test).permute(0, 3, 1, 2).contiguous()
  test_labels = torch.from_numpy(y_test).long()
  memory_format = torch.contiguous_format if official else torch.channels_last
  build = bench.torch_models()
  teacher = None
  if args.teacher:
    teacher = build(args.teacher_model)
    teacher.load_state_dict(torch.load(args.teacher, weights_only=True))
    teacher.eval().to(memory_format=memory_format)
    if not official:
      for p in teacher.parameters():
        p.requires_grad_(False)
  normalize = lambda x: ((x.float() / 255.0 - mean) / std).contiguous(
      memory_format=memory_format)
  t, lam = workload_config.TEMPERATURE, workload_config.KD_WEIGHT

  if teacher is not None and not official:
    teacher = torch.compile(teacher)

  def loss_fn(forward, x, y):
    logits = forward(x)
    ce = F.cross_entropy(logits, y)
    if teacher is None:
      return ce
    if official:  # as train.py: the teacher's output un-detached, outside any no_grad.
      teacher_logits = teacher(x)
    else:
      with torch.no_grad():
        teacher_logits = teacher(x)
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                  reduction='batchmean', log_target=True)
    return (1 - lam) * ce + lam * t * t * kl

  out = []
  for seed in args.seeds:
    start = time.perf_counter()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    student = build(args.model).train().to(memory_format=memory_format)
    forward = student if official else torch.compile(student)
    optimizer = torch.optim.SGD(student.parameters(), lr=workload_config.LEARNING_RATE,
                                momentum=workload_config.MOMENTUM,
                                weight_decay=workload_config.WEIGHT_DECAY)

    def train_step(x, y):
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(forward, x, y)
      loss.backward()
      optimizer.step()

    batch = workload_config.BATCH
    for _ in range(args.epochs):
      order = torch.from_numpy(rng.permutation(len(labels)))
      for i in range(len(labels) // batch):
        index = order[i * batch:(i + 1) * batch]
        x = images[index]
        if args.with_augment:
          x = pad_crop_flip(x, rng)
        train_step(normalize(x), labels[index])
    student.eval()
    with torch.no_grad():
      correct = sum(int((forward(normalize(test_images[i:i + 500])).argmax(-1)
                         == test_labels[i:i + 500]).sum()) for i in range(0, len(test_labels), 500))
    torch.save(student.state_dict(), os.path.join(args.out_dir, f'{args.stage}_{seed}.pt'))
    out.append({'seed': seed, 'test_accuracy': correct / len(test_labels),
                'train_s': time.perf_counter() - start})
  with open(os.path.join(args.out_dir, f'{args.stage}.json'), 'w') as f:
    json.dump(out, f)


def pad_crop_flip(x, rng):
  """torchvision's RandomCrop(32, padding=4) + RandomHorizontalFlip on a uint8 NCHW batch."""
  import torch
  n, _, h, w = x.shape
  padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
  top, left = rng.integers(0, 9, n), rng.integers(0, 9, n)
  rows = torch.from_numpy(top[:, None] + np.arange(h))[:, None, :, None]
  cols = torch.from_numpy(left[:, None] + np.arange(w))[:, None, None, :]
  crops = padded[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                 rows, cols]
  flip = torch.from_numpy(rng.random(n) < 0.5)
  crops[flip] = crops[flip].flip(-1)
  return crops


def run_torch(variant: str, data: str, epochs: int, augment: bool, folder: str,
              python: str) -> dict:
  """Every stage in order, as `variant` trains it with the interpreter `python`: one process per
  stage and seed (official) or per stage (careful); a stage's teacher is its teacher stage's
  seed-0 model. TorchInductor's caches start empty, in `folder`."""
  os.makedirs(folder, exist_ok=True)
  models = {name: model for name, model, _ in workload_config.TABLE}
  stages, start = {}, time.perf_counter()
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get('PYTHONPATH', ''),
             TORCHINDUCTOR_CACHE_DIR=os.path.join(folder, 'inductor-cache'))
  for name, model, teacher in workload_config.TABLE:
    seeds = list(range(workload_config.SEEDS if model == workload_config.STUDENT_MODEL else 1))
    groups = [[s] for s in seeds] if variant == 'pytorch_official' else [seeds]
    stage_start, rows = time.perf_counter(), []
    for group in groups:
      command = [python, os.path.abspath(__file__), '--torch-stage', f'--variant={variant}',
                 f'--stage={name}', f'--model={model}', f'--data={data}', f'--epochs={epochs}',
                 f'--out-dir={folder}', '--seeds=' + ','.join(map(str, group))]
      if augment:
        command.append('--with-augment')
      if teacher:
        command += [f'--teacher={os.path.join(folder, teacher + "_0.pt")}',
                    f'--teacher-model={models[teacher]}']
      done = subprocess.run(command, env=env, capture_output=True, text=True)
      if done.returncode:
        raise SystemExit(f'{variant} {name} failed:\n{done.stderr[-3000:]}')
      with open(os.path.join(folder, f'{name}.json')) as f:
        rows += json.load(f)
    stages[name] = {'wall_s': time.perf_counter() - stage_start,
                    'test_accuracy': [r['test_accuracy'] for r in rows]}
    print(f'  {variant} {name}: {stages[name]["wall_s"]:.1f} s, accuracy '
          f'{100 * np.mean(stages[name]["test_accuracy"]):.2f} %', flush=True)
  return {'wall_s': time.perf_counter() - start, 'stages': stages}


# ---------------------------------------------------------------- report


def agreement(a, b, level: float = 0.95) -> dict:
  """Welch's `level` interval of mean(a) − mean(b) (accuracies); agree when it contains 0.
  One model each: no spread to judge by (None)."""
  from scipy import stats
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff = float(a.mean() - b.mean())
  if len(a) < 2 or len(b) < 2:
    return {'diff': diff, 'ci95': None, 'agree': None}
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = np.sqrt(va + vb)
  dof = (va + vb)**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)) if se > 0 else 1.0
  half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
  return {'diff': diff, 'ci95': [diff - half, diff + half], 'agree': diff - half <= 0 <= diff + half}


def summarise(runs: dict) -> list:
  """Per augmentation setting: totals, the speed-ups, and whether the accuracies agree."""
  out = []
  for augment in (False, True):
    by = {fw: runs[f'{fw}_{"aug" if augment else "noaug"}'] for fw in FRAMEWORKS
          if f'{fw}_{"aug" if augment else "noaug"}' in runs}
    if 'kdjax' not in by:
      continue
    line = {'augment': augment, 'wall_s': {fw: r['wall_s'] for fw, r in by.items()},
            'target': TARGETS[augment], 'agreement': {}}
    for fw in by:
      if fw == 'kdjax':
        continue
      # Several student groups are compared at once: Bonferroni's level keeps the chance that
      # any agreeing pair is called a disagreement at 5 %.
      names = list(by['kdjax']['stages'])
      groups = sum(len(by['kdjax']['stages'][n]['test_accuracy']) > 1 for n in names)
      level = 1 - 0.05 / max(groups, 1)
      checks = {name: agreement(by['kdjax']['stages'][name]['test_accuracy'],
                                by[fw]['stages'][name]['test_accuracy'], level)
                for name in names}
      judged = [c['agree'] for c in checks.values() if c['agree'] is not None]
      line['agreement'][fw] = {'stages': checks, 'all_agree': all(judged)}
      line[f'speedup_vs_{fw}'] = by[fw]['wall_s'] / by['kdjax']['wall_s']
    official = line.get('speedup_vs_pytorch_official')
    line['met'] = (official is not None and official >= TARGETS[augment]
                   and line['agreement']['pytorch_official']['all_agree'])
    out.append(line)
  return out


def write_markdown(path: str, result: dict) -> None:
  lines = [f"Machine: {result['machine']}; {result['versions']}; {result['date']}.",
           f"Command: `{result['command']}` ({result['wall_s']:.0f} s in all).",
           f"Data: {result['data']}. Epochs per stage: {result['epochs']}.",
           f"Load average (1 min) before / after: {result['load'][0]:.2f} / "
           f"{result['load'][1]:.2f}.", '']
  for line in result['summary']:
    setting = 'with pad-4 crop + flip' if line['augment'] else 'without augmentation'
    suffix = 'aug' if line['augment'] else 'noaug'
    lines += [f'### {setting}', '',
              '| stage | ' + ' | '.join(f'{fw} (s, accuracy %)' for fw in line['wall_s']) + ' |',
              '|---|' + '---:|' * len(line['wall_s'])]
    for name, _, _ in workload_config.TABLE:
      cells = []
      for fw in line['wall_s']:
        stage = result['runs'][f'{fw}_{suffix}']['stages'][name]
        acc = 100 * np.asarray(stage['test_accuracy'])
        spread = f' ± {acc.std(ddof=1):.2f}' if len(acc) > 1 else ''
        cells.append(f"{stage['wall_s']:.1f}, {acc.mean():.2f}{spread}")
      lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
    lines.append('| **total** | ' + ' | '.join(f"**{s:.0f}**" for s in line['wall_s'].values())
                 + ' |')
    lines.append('')
    for fw, check in line['agreement'].items():
      speedup = line[f'speedup_vs_{fw}']
      verdict = ('accuracies agree within the seed spread' if check['all_agree'] else
                 'accuracies DISAGREE for ' + ', '.join(
                     n for n, c in check['stages'].items() if c['agree'] is False)
                 + ': the comparison is void')
      lines.append(f'- kdjax vs {fw}: **{speedup:.2f}×** end to end; {verdict}.')
    official = line.get('speedup_vs_pytorch_official')
    if official is not None:  # (kdjax alone, --frameworks: nothing to judge the target by.)
      verdict = ('met' if line['met'] else f'missed ({official:.2f}×)'
                 if official < line['target'] else
                 f'not shown: {official:.2f}×, but the comparison is void')
      lines.append(f"- target ≥ {line['target']:.0f}× the official way: **{verdict}**.")
    lines.append('')
  with open(path, 'w') as f:
    f.write('\n'.join(lines))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--cifar10', help='decoded CIFAR-10 .npz (x_train, y_train, x_test, y_test)')
  parser.add_argument('--train-images', type=int, default=DEFAULTS['train_images'])
  parser.add_argument('--test-images', type=int, default=DEFAULTS['test_images'])
  parser.add_argument('--epochs', type=int, default=DEFAULTS['epochs'])
  parser.add_argument('--frameworks', default=','.join(FRAMEWORKS))
  parser.add_argument('--augment', default='no,yes', help="'no', 'yes' or 'no,yes'")
  parser.add_argument('--out', default=HERE)
  parser.add_argument('--name', default='workload',
                      help='file name of the table, without .json/.md (workload_newest_jax for '
                           'the newest JAX)')
  parser.add_argument('--torch-python', default=sys.executable,
                      help='the interpreter that runs the PyTorch stages (default: this one); '
                           'e.g. a Python 3.11 venv with torch when this one has the newest JAX')
  # One PyTorch stage (run by this script in a process of its own).
  parser.add_argument('--torch-stage', action='store_true', help=argparse.SUPPRESS)
  for flag in ('--variant', '--stage', '--model', '--data', '--out-dir', '--teacher',
               '--teacher-model'):
    parser.add_argument(flag, default='', help=argparse.SUPPRESS)
  parser.add_argument('--seeds', type=lambda s: [int(x) for x in s.split(',')],
                      help=argparse.SUPPRESS)
  parser.add_argument('--with-augment', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.torch_stage:
    return torch_stage(args)
  if not args.cifar10:
    parser.error('--cifar10 is required (a decoded CIFAR-10 .npz; see the docstring).')
  import jax
  torch_version = subprocess.run([args.torch_python, '-c', 'import torch; print(torch.__version__)'],
                                 capture_output=True, text=True, check=True).stdout.strip()
  start, load_before = time.perf_counter(), os.getloadavg()[0]
  runs = {}
  with tempfile.TemporaryDirectory() as folder:
    data = os.path.join(folder, 'subset.npz')
    sizes = write_subset(args.cifar10, args.train_images, args.test_images, data)
    for setting in args.augment.split(','):
      augment = setting == 'yes'
      suffix = 'aug' if augment else 'noaug'
      for fw in args.frameworks.split(','):
        print(f'{fw}, augmentation {setting}:', flush=True)
        where = os.path.join(folder, f'{fw}_{suffix}')
        runs[f'{fw}_{suffix}'] = (run_kdjax(data, args.epochs, augment, where) if fw == 'kdjax'
                                  else run_torch(fw, data, args.epochs, augment, where,
                                                 args.torch_python))
        print(f"  {fw}: {runs[f'{fw}_{suffix}']['wall_s']:.0f} s", flush=True)
  flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in DEFAULTS
           if getattr(args, k) != DEFAULTS[k]]
  flags += [f'--augment={args.augment}'] if args.augment != 'no,yes' else []
  flags += [f'--frameworks={args.frameworks}'] if args.frameworks != ','.join(FRAMEWORKS) else []
  flags += ['--torch-python=PYTHON_WITH_TORCH'] if args.torch_python != sys.executable else []
  flags += [f'--name={args.name}'] if args.name != 'workload' else []
  result = {
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores',
      'versions': f'Python {platform.python_version()}, jax {jax.__version__}, '
                  f'torch {torch_version}',
      'date': datetime.date.today().isoformat(),
      'command': ' '.join(['python experiments/bench/workload.py --cifar10 CIFAR10.npz', *flags]),
      'data': (f"CIFAR-10 (decoded from the JPEG set), {sizes['train']} training and "
               f"{sizes['test']} test images, class-balanced"),
      'epochs': args.epochs, 'load': [load_before, os.getloadavg()[0]],
      'wall_s': time.perf_counter() - start, 'runs': runs, 'summary': summarise(runs)}
  with open(os.path.join(args.out, args.name + '.json'), 'w') as f:
    json.dump(result, f, indent=1)
  write_markdown(os.path.join(args.out, args.name + '.md'), result)
  print(open(os.path.join(args.out, args.name + '.md')).read())


if __name__ == '__main__':
  main()
