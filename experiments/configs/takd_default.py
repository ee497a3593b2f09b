"""TAKD on the embedded 8×8 digits: NOKD vs BLKD vs TAKD in about a minute on 2 CPU cores.

Teacher plain CNN-6 → assistant plain CNN-4 → student plain CNN-2 (the TAKD plain-CNN family;
the 8- and 10-layer nets have four max-pools, too many for 8×8 images). Run with

  python -m kdjax.main --config=experiments/configs/takd_default.py --workdir=runs/takd_default
"""

import ml_collections


def stage(model, loss='ce', teacher='', num_replicas=0, train=None, teachers=None,
          teacher_source=None, **loss_kw):
  """One stage: train `model` with `loss`, distilling from the stage named `teacher` if any.

  `loss_kw`: the loss's own settings for this stage, over `config.losses.<loss>` (e.g.
  `stage('plain_cnn_2', 'kd', teacher='teacher', temperature=2.0)`); `teachers`: several
  teachers with weights, `{'teacher': 0.5, 'assistant': 0.5}`, instead of one `teacher` (for
  loss 'multi_teacher_kd'); `train` and `teacher_source`: per-stage overrides of those blocks
  (e.g. `train={'epochs': 5}`).
  """
  s = ml_collections.ConfigDict()
  s.model = model        # a name in kdjax.models.MODELS, or an import path 'pkg.module:Class'.
  s.loss = loss          # a name in kdjax.stage_losses.LOSSES: 'ce', 'kd', 'noisy_l2', ...
  s.loss_kw = ml_collections.ConfigDict(loss_kw)
  s.teacher = teacher    # name of an earlier stage; '' for none.
  s.teachers = ml_collections.ConfigDict(teachers or {})
  s.num_replicas = num_replicas  # models trained at once; 0: config.num_replicas.
  s.train = ml_collections.ConfigDict(train or {})
  s.teacher_source = ml_collections.ConfigDict(teacher_source or {})
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
  config.data.npy_dir = ''           # a folder of .npy files (kdjax.data.stream), memory-mapped.
  # How images reach the device: 'device' (every split put on every device once), 'stream'
  # (batches read on the host by grain and sent each step), 'auto' ('device' when the splits fit
  # device_budget_mb). The same students either way (kdjax/data/stream.py).
  config.data.pipeline = 'auto'
  config.data.device_budget_mb = 4096
  config.data.augment = ml_collections.ConfigDict()
  config.data.augment.enabled = False  # flips and 4-pixel crops would destroy 8×8 digits.
  config.data.augment.crop_padding = 4
  config.data.augment.flip = True
  # 'pad_crop_flip' (the two above: CIFAR's pad-and-crop) or 'random_resized_crop' (ImageNet's:
  # torchvision's RandomResizedCrop(size) + flip, on device), whose output side is `size` (0: the
  # images' own size; the test images are evaluated as stored, so store them at that size).
  config.data.augment.kind = 'pad_crop_flip'
  config.data.augment.size = 0
  # 'per_batch': each step's batch augmented from the stage's key and the step. 'per_example':
  # example i's view in epoch e drawn from (seed, e, i) alone, the same in every stage, so a
  # cached teacher (teacher_source.cache_logits) computes its logits on each epoch's views once,
  # in WORKDIR/teacher_logits/, for every stage that learns from it (FKD, Shen & Xing 2022).
  config.data.augment.draw = 'per_batch'

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

  # Each loss's settings, shared by every stage that uses that loss (a stage's loss_kw overrides
  # them); the losses and what each setting means: kdjax/stage_losses/.
  config.losses = ml_collections.ConfigDict()
  config.losses.ce = dict(
      eta=1.0,                 # tolerance (Yang et al. 2018): eta < 1 is eta·CE + (1 − eta)·TSD,
      tsd_k=5,                 # over the true class and the tsd_k − 1 best others,
      tsd_scores='softmax')    # on probabilities ('logits': on raw scores).
  config.losses.kd = dict(
      temperature=4.0, kd_weight=0.9,  # TAKD Eq. 2: (1 − λ)·CE + λ·T²·KL(teacher ‖ student).
      kl_reduction='batchmean',        # paper; 'elementwise_mean' = official code's KLDivLoss().
      eta=1.0, tsd_k=5, tsd_scores='softmax')  # a tolerant classification term, as for 'ce'.
  # Noisy teachers (Sau & Balasubramanian 2016): regress teacher logits noised with probability
  # noise_alpha by (1 + xi), xi ~ N(0, noise_sigma²); noise_on='student' noises the student's.
  config.losses.noisy_l2 = dict(noise_alpha=0.0, noise_sigma=0.0, noise_on='teacher',
                                noise_ce_weight=0.0, eta=1.0, tsd_k=5, tsd_scores='softmax')
  # Several teachers for one student: the KL from their weighted mixture ('probabilities'), from
  # their weighted mean logits ('logits', as KD_Lib averages), or the weighted sum of KLs.
  config.losses.multi_teacher_kd = dict(temperature=4.0, kd_weight=0.9, kl_reduction='batchmean',
                                        combine='probabilities', eta=1.0, tsd_k=5,
                                        tsd_scores='softmax')
  # Multi-exit self-distillation; MATE (Sun et al. 2024): primary_weight is an exit's own
  # ensemble teacher's weight, the others share 1 − it.
  config.losses.byot = dict(temperature=4.0, kd_weight=0.9)
  config.losses.exit_ensemble = dict(temperature=4.0, kd_weight=0.9)
  config.losses.mate = dict(temperature=4.0, kd_weight=0.9, primary_weight=0.6)

  # How teachers run. replica: with replicas, 'first' (every student learns from the teacher
  # stage's replica 0, one shared forward) or 'matching' (student replica r from teacher replica
  # r: independent lineages). cache_logits: with augmentation off (TAKD trains without it, so the
  # teacher's logits never change) they are computed once per stage and cached on device; with
  # augmentation drawn per example (data.augment.draw), once per epoch's views, on disk, shared
  # by every stage; with per-batch augmentation the teacher runs on each batch.
  # dtype: 'float32' or 'bfloat16' (the teacher's forward pass in bf16).
  config.teacher_source = ml_collections.ConfigDict()
  config.teacher_source.replica = 'first'
  config.teacher_source.cache_logits = True
  config.teacher_source.dtype = 'float32'

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
  # step; XLA's CPU grouped convolutions are slow), 'auto' (unroll on CPU up to 16 students, else
  # vmap: unrolled copies compile for minutes).
  config.replica_batching = 'auto'
  # train.nan_policy 'skip': a stage that drops more than this fraction of its steps (per student)
  # fails instead of reporting a result trained on what was left. Not part of the experiment:
  # raise it and re-run to resume past that failure.
  config.max_skipped_fraction = 0.01

  config.progress_bar = True
  config.compilation_cache_dir = '~/.cache/kdjax/xla'  # '' disables JAX's persistent cache.
  return config
