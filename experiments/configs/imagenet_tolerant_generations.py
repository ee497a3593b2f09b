r"""Tolerant teachers in generations on ImageNet (ILSVRC2012), ResNet-18 (Yang et al., AAAI 2019,
arXiv 1805.05551: "Training deep neural networks in generations: a more tolerant teacher
educates better students").

Lineages, written D(η, λ) as in the paper, each generation the same ResNet-18 trained from
scratch, generation g+1 taught by generation g:

  D(1.0, 0.0)  strict_g0                       from scratch: plain cross-entropy
  D(1.0, 0.5)  strict_g0 → born_again_g1..g3   strict patriarch (born-again networks)
  D(0.6, 0.6)  tolerant_g0 → tolerant_g1..g3   tolerant patriarch: 0.6·CE + 0.4·TSD (top 5)

The patriarch's loss is η·CE + (1 − η)·TSD, TSD the top-score difference over the true class and
the 4 strongest others, on softmax scores; each later generation learns (1 − λ)·CE +
λ·KL(previous generation ‖ student) at T = 1 (the generations formula has no temperature).
D(1.0, 0.0)'s later generations are not trained: with λ = 0 a generation ignores its teacher,
so it is the patriarch's training again with another seed (as in
`repro_generations_cifar10.py`). η, λ and K are kdjax's generations settings
(`generations_default.py`); the paper's ImageNet values are not reachable here to check.
The network is torchvision's v1.5 ResNet-18 (`resnet18`, 11.7 M parameters).

Data. TFDS `imagenet2012` (1,281,167 training images, 1,000 classes), streamed from the host by
random access (`data.pipeline='stream'`, `tfds.data_source`), 10,000 training images held out
for validation, the 50,000 `validation` images as the test set (ImageNet's `test` split has no
labels). Images are stored at 224 × 224 as they are read (`data.image_size`): training images
with the shorter side resized to 224 and the central square kept; test (and held-out
validation) images resized to 256, then center-cropped to 224. Per-channel normalisation by the
training set's mean and std, estimated on 10,000 training images.

Augmentation. Random-resized-crop to 224 (area fraction U(0.08, 1), log-uniform aspect ratio in
[3/4, 4/3], 10 tries then torchvision's central-crop fallback; antialiased bilinear) and a
horizontal flip with probability 1/2, on device inside the jitted step. The crop is drawn from
the stored 224² training image, not the full-resolution original (see `imagenet_takd.py`).
Teachers run live on each augmented batch.

Optimisation (He et al. 2016's ImageNet schedule, every generation; not checked against the
paper's text, which is not reachable here): 90 epochs, batch 256, SGD with momentum 0.9 from
0.1, ×0.1 after epochs 30 and 60, weight decay 1e-4. One model per stage (seed 0); 8 stages of
90 epochs.

Reported: top-1 and top-5 test accuracy of every generation (top-1 also at the best
validation epoch), with each stage's non-true probability mass and prediction entropy, the
secondary information a generation passes on. The paper's ResNet-18 figures, as error rates:
top-1 30.50 → 29.60, top-5 11.07 → 10.11.

Prepare ImageNet once in TFDS's array_record format (see `imagenet_takd.py`), then:

  python -m kdjax.main --config=experiments/configs/imagenet_tolerant_generations.py \
      --workdir=runs/imagenet_generations --config.data.tfds_data_dir=/data/tfds
"""

from experiments.configs import generations_default
from experiments.configs import imagenet_takd
from experiments.configs import takd_default

MODEL = 'resnet18'
GENERATIONS = 3  # after the patriarch.


def get_config():
  config = imagenet_takd.imagenet_data(takd_default.get_config())
  generations_default.add_generations(config, MODEL, GENERATIONS)
  dropped = [f'baseline_g{g}' for g in range(1, GENERATIONS + 1)]  # λ = 0: see above.
  for name in dropped:
    del config.stages[name]
  config.stage_order = tuple(n for n in config.stage_order if n not in dropped)
  return config
