r"""TAKD, CIFAR-10, plain CNNs (Mirzadeh et al. 2020, Table 1): teacher 10 → assistant 4 → student 2.

Stages: the teacher and assistant, then the three students the paper compares: NOKD (no
teacher), BLKD (teacher → student) and TAKD (teacher → assistant → student).

Data comes from TFDS (`cifar10`); offline, point it at an `.npz`:

  python -m kdjax.main --config=experiments/configs/takd_cifar10_cnn.py --workdir=runs/cnn \
      --config.data.npz=/path/to/cifar10.npz

Settings follow the official code where the paper is silent (BUILD_NOTES.md lists each):
160 epochs (its config.yml), batch 128, SGD momentum 0.9, weight decay 1e-4, no augmentation
(its loaders default to `crop=False`). Plain CNNs start at 0.01, the rate the official code
trains them at, with the step decay at 1/2 and 3/4 of training; `lr_schedule='takd_official'`
gives the code's constant 0.01 instead. T = 5 and λ = 0.5 are fixed mid-points of the official
NNI search space (T ∈ {1, 2, 5, 10, 15, 20}, λ ∈ [0.05, 1]), not tuned on the test set as the
official search did.
"""

from experiments.configs import takd_default


def get_config():
  config = takd_default.get_config()
  config.data.name = 'cifar10'
  config.data.augment.enabled = False

  config.train.epochs = 160
  config.train.batch_size = 128
  config.train.learning_rate = 0.01
  config.train.weight_decay = 1e-4

  config.losses.kd.temperature = 5.0
  config.losses.kd.kd_weight = 0.5

  takd_default.set_chain_models(config, 'plain_cnn_10', 'plain_cnn_4', 'plain_cnn_2')
  return config
