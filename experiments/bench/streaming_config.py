"""The chain `streaming.py` times: a teacher trained with cross-entropy, then a student
distilling from its cached logits (`--config.stages.*.model=` picks the pair).

Batch 128, augmentation off (TAKD's setting, so the teacher's logits are cached); the data
(`--config.data.npy_dir`) and `--config.data.pipeline` ('device' or 'stream') come from the
command line.
"""

import ml_collections

from experiments.configs import takd_default


def get_config():
  config = takd_default.get_config()
  config.train.batch_size = 128
  config.stages = ml_collections.ConfigDict()
  # Epochs per stage (`--config.stages.NAME.train.epochs=`): a student epoch costs a fraction of
  # a teacher's, so the student gets more of them to take the median over.
  config.stages.teacher = takd_default.stage('plain_cnn_10', train={'epochs': 3})
  config.stages.student = takd_default.stage('plain_cnn_2', 'kd', teacher='teacher',
                                             train={'epochs': 6})
  config.stage_order = ('teacher', 'student')
  return config
