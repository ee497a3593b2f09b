"""Normalisation and augmentation, run on device inside the jitted train step."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import KdjaxError


def channel_stats(images_uint8: np.ndarray):
  """Per-channel mean and std of a uint8 `[N, H, W, C]` set, in [0, 1] units (float64, host).

  Of a split read by random access (`sources.SplitColumn`, a streamed TFDS dataset), where
  reading every image would be a whole pass over (say) ImageNet: estimated on a fixed sample of
  `STATS_SAMPLE` images (seed 0; all of them if fewer), read in batches.
  """
  if not isinstance(images_uint8, np.ndarray):
    return _sampled_channel_stats(images_uint8)
  flat = images_uint8.reshape(-1, images_uint8.shape[-1])
  mean = np.zeros(flat.shape[-1])
  sq = np.zeros(flat.shape[-1])
  for start in range(0, len(flat), 1 << 22):  # chunks keep the float64 copy small.
    chunk = flat[start:start + (1 << 22)].astype(np.float64) / 255.0
    mean += chunk.sum(0)
    sq += (chunk**2).sum(0)
  mean /= len(flat)
  std = np.sqrt(np.maximum(sq / len(flat) - mean**2, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32)


STATS_SAMPLE = 10_000  # images a random-access split's channel statistics are estimated on.


def _sampled_channel_stats(images, batch: int = 256):
  num = len(images)
  rows = np.sort(np.random.default_rng(0).permutation(num)[:STATS_SAMPLE])
  total = np.zeros(images.shape[-1])
  sq = np.zeros(images.shape[-1])
  for start in range(0, len(rows), batch):
    chunk = np.asarray(images[rows[start:start + batch]], np.float64) / 255.0
    chunk = chunk.reshape(-1, chunk.shape[-1])
    total += chunk.sum(0)
    sq += (chunk**2).sum(0)
  count = len(rows) * int(np.prod(images.shape[1:-1]))
  mean = total / count
  std = np.sqrt(np.maximum(sq / count - mean**2, 1e-12))
  return mean.astype(np.float32), std.astype(np.float32)


def normalize(images_uint8: chex.Array, mean: chex.Array, std: chex.Array) -> chex.Array:
  """uint8 `[B, H, W, C]` → float32 `(x/255 − mean) / std`."""
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std


def random_crop_and_flip(key: jax.Array, images: chex.Array, *, padding: int,
                         flip: bool) -> chex.Array:
  """torchvision's `RandomCrop(size, padding)` + `RandomHorizontalFlip()` for a batch.

  Pads with zeros (on raw pixels, as torchvision does before `Normalize`), takes an independent
  random `H × W` window per image, and flips each image left-right with probability 1/2.

  Args:
    key: PRNG key.
    images: `[B, H, W, C]`.
    padding: pixels of zero padding on each side; 0 disables cropping.
    flip: whether to flip.

  Returns:
    `[B, H, W, C]`, same dtype.
  """
  batch, height, width, _ = images.shape
  crop_key, flip_key = jax.random.split(key)
  if padding > 0:
    padded = jnp.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(crop_key, (batch, 2), 0, 2 * padding + 1)
    crop = lambda image, offset: jax.lax.dynamic_slice(
        image, (offset[0], offset[1], 0), (height, width, image.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if flip:
    do_flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    images = jnp.where(do_flip, images[:, :, ::-1, :], images)
  return images


# Kinds of training augmentation (`config.data.augment.kind`).
KINDS = ('pad_crop_flip', 'random_resized_crop')
# torchvision's RandomResizedCrop defaults: the crop's area fraction of the image and its aspect
# ratio (width / height), and how many draws are tried before the central-crop fallback.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10


def random_resized_crop_boxes(key: jax.Array, batch: int, height: int, width: int, *,
                              scale=RRC_SCALE, ratio=RRC_RATIO,
                              attempts: int = RRC_ATTEMPTS) -> jax.Array:
  """Crop boxes `[B, 4]` int32 `(top, left, h, w)` drawn as torchvision's
  `RandomResizedCrop.get_params` draws them, independently per image.

  Each of `attempts` draws takes an area `U(scale) · H·W` and an aspect ratio `w / h` whose log
  is `U(log ratio)`, rounds `w = √(area·ratio)` and `h = √(area / ratio)` to integers, and is
  kept if the box fits the image; the first draw that fits wins, at a uniform random position.
  If none fits, the central crop of the whole image clamped to the ratio bounds (torchvision's
  fallback, exactly). The draws are made all at once (no loop), which gives the same
  distribution: the first fitting draw of independent draws.
  """
  area_key, ratio_key, top_key, left_key = jax.random.split(key, 4)
  area = height * width * jax.random.uniform(area_key, (batch, attempts), minval=scale[0],
                                             maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(ratio_key, (batch, attempts), minval=np.log(ratio[0]),
                                      maxval=np.log(ratio[1])))
  w = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  h = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = jnp.argmax(fits, axis=1)[:, None]  # the first draw that fits (0 if none does).
  found = jnp.any(fits, axis=1)
  fallback_h, fallback_w = _central_crop(height, width, ratio)
  h = jnp.where(found, jnp.take_along_axis(h, first, 1)[:, 0], fallback_h)
  w = jnp.where(found, jnp.take_along_axis(w, first, 1)[:, 0], fallback_w)
  top = jnp.where(found, jax.random.randint(top_key, (batch,), 0, height - h + 1),
                  (height - fallback_h) // 2)
  left = jnp.where(found, jax.random.randint(left_key, (batch,), 0, width - w + 1),
                   (width - fallback_w) // 2)
  return jnp.stack([top, left, h, w], axis=1).astype(jnp.int32)


def _central_crop(height: int, width: int, ratio):
  """torchvision's fallback box size: the whole image, cut to the nearer ratio bound."""
  in_ratio = width / height
  if in_ratio < min(ratio):
    return int(round(width / min(ratio))), width
  if in_ratio > max(ratio):
    return height, int(round(height * max(ratio)))
  return height, width


def _resize_weights(start: jax.Array, length: jax.Array, in_size: int,
                    out_size: int) -> jax.Array:
  """`[out_size, in_size]`: the weights that resize the window `[start, start + length)` of an
  axis to `out_size` pixels, as PIL's (and torchvision's antialiased) bilinear resize of the
  cropped window does. Output pixel o samples the window at `(o + 0.5)·length / out_size`; a
  triangle kernel, widened by the scale when shrinking (antialiasing), weighs the window's
  pixels, which alone count (the crop is taken first), normalised to sum to 1."""
  scale = length.astype(jnp.float32) / out_size
  support = jnp.maximum(scale, 1.0)
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixels = jnp.arange(in_size)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels + 0.5 - centers[:, None]) / support)
  weights = jnp.where((pixels >= start) & (pixels < start + length), weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def resized_crops(images: chex.Array, boxes: chex.Array, size) -> jax.Array:
  """Each image's box `(top, left, h, w)` cropped and resized to `size` (an int, or `(height,
  width)`) with antialiased bilinear interpolation (PIL's `BILINEAR`, torchvision's
  `resized_crop`): float32 `[B, size_h, size_w, C]`, unrounded.

  A separable resize as two small matrix products per image (`[S, H]` rows, `[S, W]` columns),
  so boxes of any size run under `jit` with static shapes, and pixels outside the box never
  contribute (as with a crop taken first; `jax.image.scale_and_translate` over the whole image
  would blend them in at the box's edges).
  """
  out_h, out_w = (size, size) if isinstance(size, int) else tuple(size)
  _, height, width, _ = images.shape
  rows = jax.vmap(lambda b: _resize_weights(b[0], b[2], height, out_h))(boxes)
  cols = jax.vmap(lambda b: _resize_weights(b[1], b[3], width, out_w))(boxes)
  highest = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes: pixels to within rounding.
  out = jnp.einsum('bsh,bhwc->bswc', rows, images.astype(jnp.float32), precision=highest)
  return jnp.einsum('btw,bswc->bstc', cols, out, precision=highest)


def random_resized_crop_and_flip(key: jax.Array, images: chex.Array, *, size, scale=RRC_SCALE,
                                 ratio=RRC_RATIO, flip: bool = True) -> jax.Array:
  """torchvision's `RandomResizedCrop(size, scale, ratio)` + `RandomHorizontalFlip()` for a
  batch, inside `jit`: uint8 `[B, H, W, C]` → uint8 `[B, size, size, C]` (`size` an int, or
  `(height, width)`).

  Boxes as `random_resized_crop_boxes` draws them (10 tries, then torchvision's central-crop
  fallback), each resized with antialiased bilinear interpolation (`resized_crops`) and rounded
  to uint8, as torchvision's PIL path gives, so `normalize` runs after it unchanged; then each
  image flipped left-right with probability 1/2.
  """
  batch, height, width, _ = images.shape
  box_key, flip_key = jax.random.split(key)
  boxes = random_resized_crop_boxes(box_key, batch, height, width, scale=scale, ratio=ratio)
  out = jnp.clip(jnp.round(resized_crops(images, boxes, size)), 0, 255).astype(jnp.uint8)
  if flip:
    do_flip = jax.random.bernoulli(flip_key, 0.5, (batch, 1, 1, 1))
    out = jnp.where(do_flip, out[:, :, ::-1, :], out)
  return out


def augmenter(augment_config):
  """`(key, images) → images`: the training augmentation `augment_config` names (a config
  block or `plan.Augment`: `kind`, `crop_padding`, `flip`, `size`; a block without `kind` is
  'pad_crop_flip', the one kind kdjax had before). `size` 0 is the images' own size."""
  kind = getattr(augment_config, 'kind', 'pad_crop_flip')
  flip = bool(augment_config.flip)
  if kind == 'pad_crop_flip':
    padding = augment_config.crop_padding
    return lambda key, images: random_crop_and_flip(key, images, padding=padding, flip=flip)
  if kind == 'random_resized_crop':
    size = getattr(augment_config, 'size', 0)
    return lambda key, images: random_resized_crop_and_flip(
        key, images, size=size or images.shape[1:3], flip=flip)
  raise KdjaxError(f"unknown data.augment.kind '{kind}'; choose one of: {', '.join(KINDS)}.")


# How a training batch's augmentation is drawn (`config.data.augment.draw`).
DRAWS = ('per_batch', 'per_example')


@dataclasses.dataclass(frozen=True)
class ExampleViews:
  """`data.augment.draw='per_example'`: example i's augmented view in epoch e is drawn from the
  key `fold_in(fold_in(key(seed), e), i)`, a function of (seed, epoch, example index) alone.

  The same in every stage of a run, whatever its batch order or batch size, so a teacher's
  logits on those views are the same for every stage and replica that learns from it and can be
  computed once (FKD's idea: Shen & Xing, ECCV 2022; `kdjax.teachers.disk_cache` with views).
  With 'per_batch' (the default, and what a stage did before) a step's batch is augmented from
  the stage's own key and the step, so its views depend on which examples share the batch.
  """
  seed: int
  steps_per_epoch: int

  def epoch(self, step):
    return step // self.steps_per_epoch

  def keys(self, epoch, indices) -> jax.Array:
    """`[B]` keys: the views of examples `indices` (`[B]` int) in `epoch`."""
    base = jax.random.fold_in(jax.random.key(self.seed), VIEWS_SALT)
    epoch_key = jax.random.fold_in(base, epoch)
    return jax.vmap(lambda i: jax.random.fold_in(epoch_key, i))(indices)


VIEWS_SALT = 0x76696577  # 'view': keeps the views' keys apart from the stages' own draws.


def per_example(augment):
  """`(keys [B], images [B, ...]) → images`: `augment` (`(key, images) → images`, as
  `augmenter` gives) applied to each image alone with its own key."""
  return lambda keys, images: jax.vmap(lambda k, x: augment(k, x[None])[0])(keys, images)
