"""Normalisation and augmentation, run on device inside the jitted train step."""

import chex
import jax
import jax.numpy as jnp
import numpy as np


def channel_stats(images_uint8: np.ndarray):
  """Per-channel mean and std of a uint8 `[N, H, W, C]` set, in [0, 1] units (float64, host)."""
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
