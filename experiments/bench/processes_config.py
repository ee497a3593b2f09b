"""The chain `processes.py` times: a plain CNN-10 teacher, then a CNN-2 student on its cached logits.

Batch 128 on CIFAR-shaped images (the data file is given with `--config.data.npz`).
"""

import ml_collections

from experiments.configs import takd_default


def get_config():
  config = takd_default.get_config()
  config.train.batch_size = 128
  config.stages = ml_collections.ConfigDict()
  config.stages.teacher = takd_default.stage('plain_cnn_10')
  config.stages.student = takd_default.stage('plain_cnn_2', 'kd', teacher='teacher')
  config.stage_order = ('teacher', 'student')
  return config
