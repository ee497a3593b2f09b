"""Two multi-exit stages for one epoch: enough to run the MATE path end to end in a test."""

from experiments.configs import mate_default


def get_config():
  config = mate_default.get_config()
  config.train.epochs = 1
  config.stages = {k: v for k, v in config.stages.items() if k in ('byot', 'mate')}
  config.stage_order = ('byot', 'mate')
  config.progress_bar = False
  return config
