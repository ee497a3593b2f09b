"""A 2-D convolution whose weight gradient is computed by matrix multiplies; drop-in for `nn.Conv`.

With its default options, XLA's CPU backend (jaxlib 0.10) lowers the *weight* gradient of the
small-channel CIFAR layers to a YNNPACK convolution with a 32×32 window that runs on one core at
a few GFLOP/s (ResNet-8's 32×32×16 layers: about 100 ms each per step of 128 images).
`conv2d` keeps XLA's convolution for the forward pass and the input gradient and computes the
kernel gradient as `kh·kw` matrix multiplies, one per kernel tap:

  ∂L/∂kernel[i, j] = x_ij[B·Ho·Wo, Cin]ᵀ @ ∂L/∂y[B·Ho·Wo, Cout],

where `x_ij` is the padded input shifted by tap `(i, j)` (and strided). This is `conv='matmul_dw'`.
With `CPU_COMPILER_OPTIONS` (convolutions back to Eigen), XLA's own weight gradient is faster
again, and `conv='xla'` is the better choice. A full im2col forward pass (one
`[B·Ho·Wo, kh·kw·Cin] @ [kh·kw·Cin, Cout]` multiply) was slower than XLA's convolution on every
layer shape of these networks: building the patch matrix costs more than the convolution.
Numbers in `experiments/bench/README.md`.

`Conv` has the class name, attributes, parameter names, shapes and initialisers of `nn.Conv`
(`kernel [kh, kw, Cin, Cout]`, `bias [Cout]`), so a model built with it has the same variables and
loads the same checkpoints. Its gradient is a `jax.custom_vjp`: reverse mode only (`jax.jvp` and
forward-mode Hessians through it are not supported).
"""

import functools
from typing import Any, Callable, Sequence, Tuple

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from kdjax.errors import KdjaxError

CONVS = ('xla', 'matmul_dw')

# XLA `DebugOptions` for CPU programs with convolutions: jaxlib 0.10 hands convolutions to YNNPACK
# by default, which ran the small-channel CIFAR layers on one of the two cores here (forward 2× and
# weight gradients up to 10× slower than Eigen's). This keeps YNNPACK for dots and reductions and
# gives convolutions back to Eigen: `jax.jit(f, compiler_options=CPU_COMPILER_OPTIONS)`, or
# `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` for the process.
CPU_COMPILER_OPTIONS = {'xla_cpu_experimental_ynn_fusion_type':
                        'LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE'}


def _xla_conv(x, kernel, strides, padding):
  (ph, pw) = padding
  return lax.conv_general_dilated(x, kernel, strides, ((ph, ph), (pw, pw)),
                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding)


def _conv_fwd(x, kernel, strides, padding):
  return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _xla_conv(x, kernel, strides, padding), x)
  (dx,) = input_vjp(dy)
  return dx, kernel_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1),
           padding: Sequence[int] = (0, 0)) -> jax.Array:
  """`x [B, H, W, Cin]` ⋆ `kernel [kh, kw, Cin, Cout]` → `[B, Ho, Wo, Cout]` (cross-correlation).

  `padding = (ph, pw)` zeros on each side, `Ho = (H + 2·ph − kh) // sh + 1`: the same values as
  `lax.conv_general_dilated(x, kernel, strides, ((ph, ph), (pw, pw)))`, with the kernel gradient
  computed by `kernel_grad`.
  """
  return _conv(x, kernel, tuple(strides), tuple(padding))


def kernel_grad(x: jax.Array, dy: jax.Array, kernel_shape: Tuple[int, ...],
                strides: Sequence[int], padding: Sequence[int]) -> jax.Array:
  """`∂L/∂kernel [kh, kw, Cin, Cout]` from `x [B, H, W, Cin]` and `dy = ∂L/∂y [B, Ho, Wo, Cout]`,
  as one `[Cin, B·Ho·Wo] @ [B·Ho·Wo, Cout]` matrix multiply per kernel tap."""
  kh, kw, cin, cout = kernel_shape
  (sh, sw), (ph, pw) = strides, padding
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  b, ho, wo, _ = dy.shape
  dy = dy.reshape(b * ho * wo, cout)
  taps = []
  for i in range(kh):
    for j in range(kw):
      x_ij = lax.slice(x, (0, i, j, 0), (b, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, cin),
                       (1, sh, sw, 1))
      taps.append(lax.dot_general(x_ij.reshape(b * ho * wo, cin), dy, (((0,), (0,)), ((), ()))))
  return jnp.stack(taps).reshape(kh, kw, cin, cout)


class Conv(nn.Module):
  """`nn.Conv` for `[B, H, W, Cin]` inputs with integer symmetric padding, computed by `conv2d`.

  Named `Conv` so that Flax's automatic names (`Conv_0`, `Conv_1`, …) match `nn.Conv`'s.
  """
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: int = 0
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros_init()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if not isinstance(self.padding, int):
      raise KdjaxError(f'kdjax Conv takes an integer padding, got {self.padding!r}.')
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param('bias', self.bias_init, (self.features,),
                      self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, self.strides, (self.padding, self.padding))
    return y if bias is None else y + bias


def conv_class(conv: str) -> type:
  """The module class for the model option `conv`: `'xla'` → `nn.Conv`, `'matmul_dw'` → `Conv`."""
  if conv not in CONVS:
    raise KdjaxError(f"unknown conv '{conv}'; choose one of: {', '.join(CONVS)}.")
  return Conv if conv == 'matmul_dw' else nn.Conv
