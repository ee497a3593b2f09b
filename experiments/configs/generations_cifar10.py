"""Tolerant teachers in generations on CIFAR-10 with a small ResNet (ResNet-20).

As `generations_default.py`, on CIFAR-10 (TFDS `cifar10`, or `--config.data.npz=FILE`), with
pad-4 crop + flip augmentation and the He et al. step schedule from 0.1. The paper trains each
generation as long as the patriarch; scale `--config.train.epochs` to your budget.
"""

from experiments.configs import generations_default
from experiments.configs import takd_cifar10_resnet


def get_config():
  config = takd_cifar10_resnet.get_config()
  config.data.augment.enabled = True
  config.train.weight_decay = 1e-4
  generations_default.add_generations(config, 'resnet20')
  return config
