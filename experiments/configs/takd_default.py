"""TAKD on the embedded 8×8 digits: NOKD vs BLKD vs TAKD in about a minute on 2 CPU cores.

Teacher plain CNN-6 → assistant plain CNN-4 → student plain CNN-2 (the TAKD plain-CNN family;
the 8- and 10-layer nets have four max-pools, too many for 8×8 images). Run with

  python -m kdjax.main --config=experiments/configs/takd_default.py --workdir=runs/takd_default
"""

import ml_collections


def stage(model, loss='ce', teacher='', num_replicas=0, train=None, **kd_overrides):
  """One stage: train `model` with `loss`, distilling from the stage named `teacher` if any.

  `train`: per-stage overrides of `config.train` (e.g. `{'epochs': 5}`); `kd_overrides`: of
  `config.kd`.
  """
  s = ml_collections.ConfigDict()
  s.model = model
  s.loss = loss          # 'ce' (no teacher), 'kd' (Hinton KD, TAKD Eq. 2) or 'noisy_l2'.
  s.teacher = teacher    # name of an earlier stage; '' for none.
  s.num_replicas = num_replicas  # models trained at once; 0: config.num_replicas.
  s.train = ml_collections.ConfigDict(train or {})
  s.kd = ml_collections.ConfigDict(kd_overrides)  # per-stage overrides of config.kd.
  return s


def set_chain_models(config, teacher, assistant, student):
  """Puts `teacher` → `assistant` → `student` into the five TAKD stages of `get_config()`."""
  config.stages.teacher.model = teacher
  config.stages.assistant.model = assistant
  for name in ('nokd', 'blkd', 'takd'):
    config.stages[name].model = student


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.name = 'digits'        # embedded (no download); or a TFDS name such as 'cifar10'.
  config.data.npz = ''               # a .npz with x_train, y_train, x_test, y_test overrides name.
  config.data.num_classes = 0        # 0: inferred from the labels.
  config.data.tfds_data_dir = ''
  config.data.validation_size = 0    # training images held out to select epochs (never the test set).
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.enabled = False  # flips and 4-pixel crops would destroy 8×8 digits.
  config.data.augment.crop_padding = 4
  config.data.augment.flip = True

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 12
  config.train.batch_size = 64
  config.train.learning_rate = 0.05
  config.train.lr_schedule = 'step'  # 'step' (paper), 'takd_official', 'cosine', 'constant'.
  config.train.lr_boundaries = (0.5, 0.75)
  config.train.lr_decay = 0.1
  config.train.momentum = 0.9
  config.train.nesterov = False
  config.train.weight_decay = 5e-4
  config.train.eval_batch_size = 512
  config.train.checkpoint_every_steps = 0  # 0: only at the end of each epoch.
  config.train.checkpoints_to_keep = 3
  config.train.nan_policy = 'stop'  # a non-finite loss stops the stage; 'skip' drops the step.

  config.model = ml_collections.ConfigDict()
  config.model.resnet_shortcut = 'zero_pad'  # He et al. option A; 'projection' = TAKD code.
  # How convolutions are differentiated: 'xla', or 'matmul_dw' (kernel gradients as matmuls; only
  # faster on CPU under XLA's default options, see experiments/bench). Same variables either way.
  config.model.conv = 'xla'

  # Knowledge-distillation hyper-parameters shared by every 'kd' stage (a stage may override).
  config.kd = ml_collections.ConfigDict()
  config.kd.temperature = 4.0
  config.kd.kd_weight = 0.9
  config.kd.kl_reduction = 'batchmean'  # paper; 'elementwise_mean' = official code's KLDivLoss().
  # Tolerance (Yang et al. 2018): eta < 1 replaces CE by eta·CE + (1 − eta)·TSD.
  config.kd.eta = 1.0
  config.kd.tsd_k = 5
  config.kd.tsd_scores = 'softmax'     # or 'logits'.
  # Noisy teachers (Sau & Balasubramanian 2016), for loss 'noisy_l2'.
  config.kd.noise_alpha = 0.0          # probability that an example's teacher logits are noised.
  config.kd.noise_sigma = 0.0          # std of the multiplicative noise xi.
  config.kd.noise_ce_weight = 0.0      # weight of the classification term mixed with the L2.
  # With replicas: 'first' (every student learns from the teacher stage's replica 0, one shared
  # forward) or 'matching' (student replica r from teacher replica r: independent lineages).
  config.kd.teacher_replica = 'first'
  config.kd.noise_on = 'teacher'       # paper; 'student': the same noise on the student's logits.
  # MATE (Sun et al. 2024): weight of an exit's own ensemble teacher; the rest share 1 − it.
  config.kd.primary_weight = 0.6
  # The teacher's cost (TAKD trains without augmentation, so its logits never change): with
  # augmentation off they are computed once per stage and cached on device.
  config.kd.cache_teacher_logits = True
  config.kd.teacher_dtype = 'float32'  # or 'bfloat16': the teacher's forward pass in bf16.

  config.stages = ml_collections.ConfigDict()
  config.stages.teacher = stage('plain_cnn_6')
  config.stages.assistant = stage('plain_cnn_4', 'kd', teacher='teacher')
  config.stages.nokd = stage('plain_cnn_2')
  config.stages.blkd = stage('plain_cnn_2', 'kd', teacher='teacher')
  config.stages.takd = stage('plain_cnn_2', 'kd', teacher='assistant')

  config.stage_order = ('teacher', 'assistant', 'nokd', 'blkd', 'takd')  # teachers first.

  # N > 1 trains N students per stage at once (jax.vmap), seeds seed … seed + N − 1, sharing each
  # batch and one teacher forward pass; the table then reports mean ± std over the N.
  config.num_replicas = 1
  # How the N student updates run: 'vmap' (batched; fast on GPU/TPU), 'unroll' (N copies in the
  # step; XLA's CPU grouped convolutions are slow), 'auto' (unroll on CPU, else vmap).
  config.replica_batching = 'auto'

  config.progress_bar = True
  config.compilation_cache_dir = '~/.cache/kdjax/xla'  # '' disables JAX's persistent cache.
  return config
