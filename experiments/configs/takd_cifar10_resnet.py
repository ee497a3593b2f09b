r"""TAKD, CIFAR-10, ResNets (Mirzadeh et al. 2020, Table 1): ResNet-110 → ResNet-20 → ResNet-8.

  python -m kdjax.main --config=experiments/configs/takd_cifar10_resnet.py --workdir=runs/resnet \
      --config.data.npz=/path/to/cifar10.npz

As `takd_cifar10_cnn.py`, but ResNets start at 0.1 and drop ×0.1 at 1/2 and 3/4 of training
(He et al. 2016; the schedule the official code's `adjust_learning_rate` was written to give).
Shortcuts are He et al.'s parameter-free option A; `--config.model.resnet_shortcut=projection`
gives the official code's 1×1-conv shortcuts.
"""

from experiments.configs import takd_cifar10_cnn
from experiments.configs import takd_default


def get_config():
  config = takd_cifar10_cnn.get_config()
  config.train.learning_rate = 0.1
  takd_default.set_chain_models(config, 'resnet110', 'resnet20', 'resnet8')
  return config
