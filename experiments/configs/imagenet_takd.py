r"""TAKD on ImageNet (ILSVRC2012): ResNet-50 teacher → ResNet-34 assistant → ResNet-18 student.

Stages, as in `takd_default.py`: the teacher (ResNet-50, cross-entropy), the assistant
(ResNet-34, distilled from the teacher), then the three ResNet-18 students the TAKD paper
compares: NOKD (no teacher), BLKD (from the teacher) and TAKD (from the assistant). A student's
loss is `(1 − λ)·CE + λ·T²·KL(teacher ‖ student)` at T = 5, λ = 0.5 (the CIFAR configs' fixed
mid-points of the official code's search space, not tuned here). The networks are torchvision's
v1.5 ResNets (`resnet18`, `resnet34`, `resnet50`: its parameter counts exactly).

Data. TFDS `imagenet2012` (1,281,167 training images, 1,000 classes), streamed from the host by
random access (`data.pipeline='stream'`, `tfds.data_source`), 10,000 training images held out
for validation (epoch selection never looks at the test set), the 50,000 `validation` images as
the test set (ImageNet's `test` split has no labels). Every image is stored at 224 × 224 when it
is read (`data.image_size`): training images with the shorter side resized to 224 and the
central square kept; test (and held-out validation) images resized to 256, then center-cropped
to 224, the standard evaluation view. Per-channel normalisation by the training set's mean and
std, estimated on 10,000 training images.

Augmentation. Random-resized-crop to 224 (area fraction U(0.08, 1), log-uniform aspect ratio in
[3/4, 4/3], torchvision's 10 tries then central-crop fallback; antialiased bilinear resize) and
a horizontal flip with probability 1/2, on device inside the jitted step
(`data.augment.kind='random_resized_crop'`). The crop is drawn from the stored 224² training
image, not the full-resolution original as torchvision's loader does: crops keep the shorter
side's full extent but lose the ends of the longer side (1/8 of each end for a 4:3 image), and a
small crop is upsampled from fewer pixels. With augmentation on, teachers run live on each
augmented batch (no logits cache), as the student sees it.

Optimisation (He et al. 2016, the standard ImageNet ResNet schedule; the papers' own text is
not reachable here, so this is not checked against it): 90 epochs per stage, batch 256, SGD with
momentum 0.9 (not Nesterov) from learning rate 0.1, ×0.1 after epochs 30 and 60
(`lr_boundaries` 1/3, 2/3), weight decay 1e-4 on every parameter (PyTorch-coupled). One student
per stage (seed 0); checkpoints every 1,000 steps (an epoch is 4,965 steps).

Reported: top-1 test accuracy after the last epoch and at the best validation epoch, and
top-5 after the last epoch (the evaluator adds it above 10 classes).

Prepare ImageNet once in TFDS's array_record format (the tar files downloaded by hand from
image-net.org into MANUAL_DIR), then run:

  tfds build imagenet2012 --file_format=array_record --manual_dir=MANUAL_DIR --data_dir=/data/tfds
  python -m kdjax.main --config=experiments/configs/imagenet_takd.py \
      --workdir=runs/imagenet_takd --config.data.tfds_data_dir=/data/tfds
"""

from experiments.configs import takd_default

IMAGE_SIZE = 224


def imagenet_data(config):
  """ImageNet by random access, stored at 224², RRC-224 + flip, and He et al.'s schedule."""
  config.data.name = 'imagenet2012'
  config.data.pipeline = 'stream'
  config.data.image_size = IMAGE_SIZE  # every image stored at 224² as it is read.
  config.data.test_split = 'validation'
  config.data.validation_size = 10000
  config.data.augment.enabled = True
  config.data.augment.kind = 'random_resized_crop'
  config.data.augment.size = 0  # the stored size, 224.
  config.data.augment.flip = True
  config.train.epochs = 90
  config.train.batch_size = 256
  config.train.eval_batch_size = 512
  config.train.learning_rate = 0.1
  config.train.lr_schedule = 'step'
  config.train.lr_boundaries = (1 / 3, 2 / 3)  # ×0.1 after epochs 30 and 60.
  config.train.lr_decay = 0.1
  config.train.momentum = 0.9
  config.train.nesterov = False
  config.train.weight_decay = 1e-4
  config.train.checkpoint_every_steps = 1000
  return config


def get_config():
  config = imagenet_data(takd_default.get_config())
  config.losses.kd.temperature = 5.0
  config.losses.kd.kd_weight = 0.5
  takd_default.set_chain_models(config, 'resnet50', 'resnet34', 'resnet18')
  return config
