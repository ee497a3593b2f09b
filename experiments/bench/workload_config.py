"""The table `workload.py` times: TAKD's CIFAR-10 plain-CNN table (Mirzadeh et al. 2020), whole.

  teacher    CNN-10, cross-entropy
  ta8 ta6 ta4            CNN-8, 6, 4, each distilled from the teacher
  path6 path4            the full path: CNN-6 from ta8, then CNN-4 from path6
  nokd blkd              CNN-2 students: no teacher; the teacher (baseline KD)
  takd_ta8 takd_ta6 takd_ta4 takd_path   CNN-2 students of each assistant and of the path's end

Every student stage trains `SEEDS` students at once (seeds 0 … 4), the teachers and assistants
one each. The official code's optimisation for plain CNNs, kept constant so the PyTorch
reference needs nothing else: SGD at 0.01 (its `lr_schedule='takd_official'` rate), momentum
0.9, weight decay 1e-4 coupled as in PyTorch, batch 128; KD with T = 5, λ = 0.5 (the fixed
mid-points of `takd_cifar10_cnn.py`). The data (`--config.data.npz`), epochs and augmentation
come from `workload.py`'s command line; with augmentation the views are drawn per example
(`data.augment.draw`), so each teacher's logits on them are computed once for all its students.
"""

import ml_collections

from experiments.configs import takd_default

SEEDS = 5
# (stage, model, teacher): in training order, every teacher before its students.
TABLE = (
    ('teacher', 'plain_cnn_10', ''),
    ('ta8', 'plain_cnn_8', 'teacher'),
    ('ta6', 'plain_cnn_6', 'teacher'),
    ('ta4', 'plain_cnn_4', 'teacher'),
    ('path6', 'plain_cnn_6', 'ta8'),
    ('path4', 'plain_cnn_4', 'path6'),
    ('nokd', 'plain_cnn_2', ''),
    ('blkd', 'plain_cnn_2', 'teacher'),
    ('takd_ta8', 'plain_cnn_2', 'ta8'),
    ('takd_ta6', 'plain_cnn_2', 'ta6'),
    ('takd_ta4', 'plain_cnn_2', 'ta4'),
    ('takd_path', 'plain_cnn_2', 'path4'),
)
STUDENT_MODEL = 'plain_cnn_2'  # the stages trained SEEDS times.
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, BATCH = 0.01, 0.9, 1e-4, 128
TEMPERATURE, KD_WEIGHT = 5.0, 0.5


def get_config():
  config = takd_default.get_config()
  config.data.name = 'npz'
  config.data.augment.enabled = False
  config.data.augment.crop_padding = 4
  config.data.augment.flip = True
  config.data.augment.draw = 'per_example'  # used only with augmentation on.
  config.train.epochs = 2  # workload.py's --epochs sets it.
  config.train.batch_size = BATCH
  config.train.learning_rate = LEARNING_RATE
  config.train.lr_schedule = 'constant'
  config.train.momentum = MOMENTUM
  config.train.weight_decay = WEIGHT_DECAY
  config.train.eval_batch_size = 500
  config.losses.kd.temperature = TEMPERATURE
  config.losses.kd.kd_weight = KD_WEIGHT
  config.stages = ml_collections.ConfigDict()
  for name, model, teacher in TABLE:
    replicas = SEEDS if model == STUDENT_MODEL else 1
    config.stages[name] = takd_default.stage(model, 'kd' if teacher else 'ce', teacher=teacher,
                                             num_replicas=replicas)
  config.stage_order = tuple(name for name, _, _ in TABLE)
  return config
