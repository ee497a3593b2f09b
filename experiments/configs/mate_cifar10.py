r"""MATE vs BYOT vs exit-ensemble vs no distillation on CIFAR-10, multi-exit ResNet-20.

  python -m kdjax.main --config=experiments/configs/mate_cifar10.py --workdir=runs/mate_cifar \
      --config.data.npz=/path/to/cifar10.npz

CIFAR-10 from TFDS (or an npz), pad-4 crop + flip, the He et al. step schedule from 0.1.
"""

from experiments.configs import mate_default
from experiments.configs import takd_cifar10_resnet


def get_config():
  config = takd_cifar10_resnet.get_config()
  config.data.augment.enabled = True
  mate_default.set_exit_distillation(config, temperature=3.0, kd_weight=0.5)
  mate_default.add_methods(config, 'multi_exit_resnet20')
  return config
