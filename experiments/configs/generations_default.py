"""Tolerant teachers in generations (Yang et al., arXiv 1805.05551) on the embedded digits.

Three runs side by side, written D(η, λ) as in the paper, each a patriarch and 3 generations of
the same architecture, generation g+1 taught by generation g:

  D(1.0, 0.0)  strict_g0 → baseline_g1..g3     no teacher at all: the single-generation baseline
  D(1.0, 0.5)  strict_g0 → born_again_g1..g3   born-again networks (strict patriarch)
  D(0.6, 0.6)  tolerant_g0 → tolerant_g1..g3   tolerant patriarch: 0.6·CE + 0.4·TSD

Students learn from `(1 − λ)·CE + λ·KL(teacher ‖ student)` at T = 1 (the paper's formula has no
temperature). Only the patriarch is tolerant by default; give a student `eta` to make it tolerant
too. `results.json` reports every stage's non-true probability mass and prediction entropy, the
secondary information each generation passes on to the next.

  python -m kdjax.main --config=experiments/configs/generations_default.py --workdir=runs/gen
"""

from experiments.configs import takd_default
from experiments.configs.takd_default import stage
import ml_collections

GENERATIONS = 3
TOLERANT_ETA = 0.6      # the paper's best η.
TOLERANT_LAMBDA = 0.6
BORN_AGAIN_LAMBDA = 0.5


def add_generations(config, model, generations=GENERATIONS):
  """Fills `config.stages` with the three D(η, λ) runs for `model`, each a patriarch and
  `generations` students, and sets `config.stage_order`."""
  config.losses.kd.temperature = 1.0
  config.stages = ml_collections.ConfigDict()
  config.stages.strict_g0 = stage(model)
  config.stages.tolerant_g0 = stage(model, eta=TOLERANT_ETA)
  order = ['strict_g0']
  for g in range(1, generations + 1):
    config.stages[f'baseline_g{g}'] = stage(model)
    order.append(f'baseline_g{g}')
  for run, patriarch, weight in (('born_again', 'strict_g0', BORN_AGAIN_LAMBDA),
                                 ('tolerant', 'tolerant_g0', TOLERANT_LAMBDA)):
    if run == 'tolerant':
      order.append('tolerant_g0')
    for g in range(1, generations + 1):
      teacher = patriarch if g == 1 else f'{run}_g{g - 1}'
      config.stages[f'{run}_g{g}'] = stage(model, 'kd', teacher=teacher, kd_weight=weight)
      order.append(f'{run}_g{g}')
  config.stage_order = tuple(order)


def get_config():
  config = takd_default.get_config()
  add_generations(config, 'plain_cnn_4')
  return config
