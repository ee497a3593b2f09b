"""A two-stage chain small enough for the kill/resume tests: teacher → student on digits."""

import ml_collections

from experiments.configs import takd_default


def get_config():
  config = takd_default.get_config()
  config.train.epochs = 6
  config.train.batch_size = 32
  config.train.checkpoint_every_steps = 10
  config.stages = ml_collections.ConfigDict()
  config.stages.teacher = takd_default.stage('plain_cnn_4')
  config.stages.student = takd_default.stage('plain_cnn_2', 'kd', teacher='teacher')
  config.stage_order = ('teacher', 'student')
  config.progress_bar = False
  return config
