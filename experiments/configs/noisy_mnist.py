r"""Noisy teachers on MNIST: a LeNet-5 teacher and a one-hidden-layer MLP student (100 units).

The paper's MNIST pairing is "a LeNet-style teacher and a small MLP student"; the exact
architectures are not reachable here, so these are the conventional ones (see kdjax/models/small.py).

  python -m kdjax.main --config=experiments/configs/noisy_mnist.py --workdir=runs/noisy_mnist \
      --config.data.npz=/path/to/mnist.npz
"""

from experiments.configs import noisy_default


def get_config():
  config = noisy_default.get_config()
  config.data.name = 'mnist'
  config.train.epochs = 10
  config.train.batch_size = 128
  noisy_default.add_noise_grid(config, 'lenet5', 'mlp_1x100')
  return config
