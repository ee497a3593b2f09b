"""Noisy teachers (Sau & Balasubramanian, arXiv 1610.09650) on the embedded digits.

A plain CNN-6 teacher; a one-hidden-layer MLP student (100 units) trained three ways: alone
(`alone`, cross-entropy), regressing the clean teacher logits (`noisy_a0`, α = 0), and regressing
logits perturbed `z′ = (1 + ξ)·z`, ξ ~ N(0, σ²), for each example with probability α, over the
grid α ∈ {0.2, 0.5, 0.8, 1.0} × σ ∈ {0.1, 0.5, 1.0} (`noisy_a20_s05` is α = 0.2, σ = 0.5).

  python -m kdjax.main --config=experiments/configs/noisy_default.py --workdir=runs/noisy
"""

from experiments.configs import takd_default
from experiments.configs.takd_default import stage
import ml_collections

ALPHAS = (0.2, 0.5, 0.8, 1.0)
SIGMAS = (0.1, 0.5, 1.0)


def add_noise_grid(config, teacher_model, student_model):
  """Fills `config.stages`: teacher, student alone, clean regression, and the α×σ grid."""
  config.stages = ml_collections.ConfigDict()
  config.stages.teacher = stage(teacher_model)
  config.stages.alone = stage(student_model)
  config.stages.noisy_a0 = stage(student_model, 'noisy_l2', teacher='teacher')
  order = ['teacher', 'alone', 'noisy_a0']
  for alpha in ALPHAS:
    for sigma in SIGMAS:
      name = f'noisy_a{round(alpha * 100)}_s{round(sigma * 10):02d}'
      config.stages[name] = stage(student_model, 'noisy_l2', teacher='teacher',
                                  noise_alpha=alpha, noise_sigma=sigma)
      order.append(name)
  config.stage_order = tuple(order)


def get_config():
  config = takd_default.get_config()
  config.train.learning_rate = 0.01  # logit regression has larger gradients than CE.
  add_noise_grid(config, 'plain_cnn_6', 'mlp_1x100')
  return config
