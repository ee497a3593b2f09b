r"""Reproduction (issue 7) of MATE's per-exit claim, CIFAR-10 (JPEG copy), multi-exit ResNet-8.

Sun et al. 2024 (MATE, FITEE): every exit of a multi-exit network learns mainly from its own
trainable ensemble teacher. Four ways to train the same network, each 3 times (seeds 0–2, paired):

  exits_ce        every exit learns from the labels only (no distillation)
  byot            every exit also distils from the deepest exit (Zhang et al. 2019)
  exit_ensemble   every exit distils from the average of all exits
  mate            exit i distils from the E ensemble teachers, its own weighted 0.5

5,000 training images are held out for validation; nothing is selected on the test set.

What differs from the paper: it trains larger multi-exit ResNets on CIFAR-100 for hundreds of
epochs; here a multi-exit ResNet-8 (an exit after each of its 3 stages) on CIFAR-10 for 6 epochs
(about 1.6 CPU-hours on 2 cores for the four methods × 3 seeds), pad-4 crop + flip, SGD
momentum 0.9 from 0.1 with the step decay at 1/2 and 3/4, weight decay 1e-4, batch 128, T = 3,
λ = 0.5. The paper's CIFAR-100 numbers are not comparable, so none are printed beside ours.

  python -m kdjax.main --config=experiments/configs/repro_mate_cifar10.py \
      --workdir=runs/repro_mate_cifar10 --config.data.npz=/tmp/cifar10.npz
"""

from experiments.configs import mate_default
from experiments.configs import takd_cifar10_resnet

MODEL = 'multi_exit_resnet8'


def get_config():
  config = takd_cifar10_resnet.get_config()
  config.data.augment.enabled = True
  config.data.validation_size = 5000
  config.num_replicas = 3
  config.train.epochs = 6
  config.train.weight_decay = 1e-4
  config.train.checkpoint_every_steps = 100
  mate_default.set_exit_distillation(config, temperature=3.0, kd_weight=0.5)
  mate_default.add_methods(config, MODEL)
  return config


def paper():
  """The paper's claims, for `experiments/repro_report.py` (`stage@exitN` is exit N's row)."""
  return {
      'source': 'Sun et al. 2024, MATE (FITEE; CIFAR-100 and ImageNet, no CIFAR-10 table)',
      'rows': {},
      'claims': [
          ("MATE's shallowest exit beats no distillation", [('mate@exit1', 'exits_ce@exit1')]),
          ("MATE's shallowest exit beats BYOT's", [('mate@exit1', 'byot@exit1')]),
          ("MATE's shallowest exit beats exit-ensemble distillation's",
           [('mate@exit1', 'exit_ensemble@exit1')]),
          ("MATE's gain over no distillation is largest at the shallowest exit",
           [({'gain': ('mate', 'exits_ce', 1)}, {'gain': ('mate', 'exits_ce', 3)})]),
      ],
  }


def extra_markdown(rows):
  """Each method's gain over no distillation at every exit, and how far training got."""
  import numpy as np  # only the report needs these.
  from kdjax.report import fit_summary, format_table
  methods = ('byot', 'exit_ensemble', 'mate')
  num_exits = max(row.get('exit', 0) for row in rows.values())
  gain = lambda method, i: 100 * np.mean(np.subtract(rows[f'{method}@exit{i}']['test'],
                                                     rows[f'exits_ce@exit{i}']['test']))
  table = [['method', *(f'exit {i}' for i in range(1, num_exits + 1))]]
  table += [[m, *(f'{gain(m, i):+.2f}' for i in range(1, num_exits + 1))] for m in methods]
  fit = fit_summary(rows, ('exits_ce', *methods))
  return '\n'.join([
      'Gain over no distillation (`exits_ce`) at each exit, test accuracy points after the last '
      'epoch (mean of the paired differences over seeds):', '', format_table(table), '',
      f'How far training got (deepest exit, last epoch; training accuracy is the running mean '
      f'over that epoch\'s augmented batches): {fit}.'])
