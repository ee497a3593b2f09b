"""Multi-exit self-distillation on the embedded digits: no distillation vs BYOT vs exit-ensemble
vs MATE (Sun et al., FITEE 2024), each a multi-exit ResNet-8 with an exit after every stage.

  exits_ce        every exit learns from the labels only
  byot            every exit also distils from the deepest exit (Zhang et al. 2019)
  exit_ensemble   every exit distils from the average of all exits
  mate            exit i distils from all E trainable ensemble teachers, its own teacher i
                  weighted `primary_weight`; each teacher learns its weights with CE

The results table adds each exit's accuracy, the exits' ensemble and the MACs per exit, and
`exits_accuracy_vs_macs.png` plots the trade-off.

  python -m kdjax.main --config=experiments/configs/mate_default.py --workdir=runs/mate
"""

from experiments.configs import takd_default
from experiments.configs.takd_default import stage
import ml_collections

METHODS = ('exits_ce', 'byot', 'exit_ensemble', 'mate')


def set_exit_distillation(config, temperature, kd_weight):
  """The distillation settings of every self-distilling loss (BYOT, exit ensemble, MATE)."""
  for method in ('byot', 'exit_ensemble', 'mate'):
    config.losses[method].temperature = temperature
    config.losses[method].kd_weight = kd_weight


def add_methods(config, model):
  config.stages = ml_collections.ConfigDict()
  for method in METHODS:
    config.stages[method] = stage(model, method)
  config.stage_order = METHODS


def get_config():
  config = takd_default.get_config()
  set_exit_distillation(config, temperature=3.0, kd_weight=0.5)
  add_methods(config, 'multi_exit_resnet8')
  return config
