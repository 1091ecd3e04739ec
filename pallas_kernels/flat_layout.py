"""The stretched flat input layout of a stride-1 convolution as one Pallas
kernel, and its reference.

escort_jax.conv_geometry.to_flat_input lays an NHWC input out as

    x_flat[((c * Hp + a) * Wp + b) * N + n] = x_padded[n, a, b, c]

(for stride 1 each channel is one phase plane of the padded Hp x Wp input,
the batch innermost), followed by whole zero planes. That is a transpose
which swaps the outermost and innermost axes, plus padding; XLA runs it as
one fusion. This kernel does the same per (padded row a, block of
channels): it loads the (N, W, C-block) slab of input row a - top (zeros
outside the input), transposes it in registers, and stores (C-block, Wp, N)
runs of the output.

Layout:
  x: (N, H, W, C) any dtype.
  Returns (num_planes_total * Hp * Wp * N,) in x's dtype, where
  num_planes_total = C + extra_planes.

Lowering: a pallas_call with Triton compiler params, compiled on NVIDIA
GPUs and run by the interpreter on the CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.output_layout import check_int32

# Most elements of one program's slab (registers across its 8 warps), and
# the fewest programs to aim for (two per H100 SM): measured on 7 layers
# (benchmarks/results/*T1450*-flat-layout.json), where too few programs
# (few channels or rows) or too many small ones lost.
MAX_SLAB = 32768
MIN_PROGRAMS = 264
# 2-byte inputs of at least 16 images: blocks of 16 channels x 16 images
# (32-byte loads along the channels and 32-byte stores along the images) on
# 4 warps were as fast or faster on 7 layers at batch 32, 1.3x on res2a and
# 1.55x on inception_4a/3x3, where the slab rule had cut the channels to 8
# per program (16-byte loads; results/*T1924*-flat-layout-blocks.json).
BLOCK_BYTES = 32
BLOCK_WARPS = 4


def _pow2(n: int) -> int:
  return 1 << max(0, int(n) - 1).bit_length()


def _flat_layout_kernel(x_ref, y_ref, *, n, h, w, c, hp, wp, top, left,
                        planes, nb, wb, cb):
  a = pl.program_id(0)
  c0 = pl.program_id(1) * cb
  ni = pl.program_id(2) * nb + jnp.arange(nb, dtype=jnp.int32)
  bi = jnp.arange(wb, dtype=jnp.int32)
  ci = c0 + jnp.arange(cb, dtype=jnp.int32)
  row = a - top
  col = bi - left
  inside = ((ni < n)[:, None, None] & ((col >= 0) & (col < w))[None, :, None]
            & (ci < c)[None, None, :] & (row >= 0) & (row < h))
  src = (((ni[:, None, None] * h + row) * w + col[None, :, None]) * c
         + ci[None, None, :])
  slab = plgpu.load(x_ref.at[src], mask=inside, other=0)  # (nb, wb, cb)
  out = jnp.transpose(slab, (2, 1, 0))  # (cb, wb, nb)
  dst = (((ci[:, None, None] * hp + a) * wp + bi[None, :, None]) * n
         + ni[None, None, :])
  live = ((ci < planes)[:, None, None] & (bi < wp)[None, :, None]
          & (ni < n)[None, None, :])
  plgpu.store(y_ref.at[dst], out, mask=live)


def flat_layout(x: jax.Array, padding, extra_planes: int = 0, *,
                num_warps: int | None = None, slab: int | None = None,
                channel_block: int | None = None,
                batch_block: int | None = None,
                interpret: bool = False) -> jax.Array:
  """(N, H, W, C) -> the stride-1 stretched flat layout (module docstring).

  Args:
    x: (N, H, W, C).
    padding: ((top, bottom), (left, right)), each >= 0.
    extra_planes: whole zero planes after the C channel planes.
    num_warps: Triton launch parameter (default 8, or BLOCK_WARPS with
      byte blocks).
    slab: elements per program (N and Wp rounded up to powers of two, times
      the channels of a block); default: up to MAX_SLAB, halved while there
      are fewer than MIN_PROGRAMS programs; or, for 2-byte inputs of at
      least BLOCK_BYTES / 2 images, byte blocks: BLOCK_BYTES worth of
      channels and of images per program.
    channel_block, batch_block: channels and images per program (powers of
      two), overriding what `slab` gives.
    interpret: run through the Pallas interpreter (CPU).
  """
  if x.ndim != 4:
    raise ValueError(f"x must be (N, H, W, C), got shape {x.shape}")
  (top, bottom), (left, right) = padding
  if min(top, bottom, left, right) < 0 or extra_planes < 0:
    raise ValueError(f"padding {padding} and extra_planes {extra_planes} "
                     "must be non-negative")
  n, h, w, c = x.shape
  hp, wp = h + top + bottom, w + left + right
  planes = c + extra_planes
  nb, wb = _pow2(n), _pow2(wp)
  cb = max(1, min(_pow2(planes), (slab or MAX_SLAB) // (nb * wb)))
  if slab is None:
    while cb > 1 and hp * pl.cdiv(planes, cb) < MIN_PROGRAMS:
      cb //= 2
  for name, v in (("channel_block", channel_block),
                  ("batch_block", batch_block)):
    if v is not None and (v < 1 or v & (v - 1)):
      raise ValueError(f"{name} must be a power of two, got {v}")
  chunk = BLOCK_BYTES // x.dtype.itemsize
  byte_blocks = (slab is None and x.dtype.itemsize == 2 and n >= chunk)
  if byte_blocks:
    cb, nb = chunk, chunk
  cb = channel_block or cb
  nb = batch_block or nb
  if num_warps is None:
    num_warps = BLOCK_WARPS if byte_blocks else 8
  size = planes * hp * wp * n
  check_int32(input=x.size + nb * wb * cb, output=size + nb * wb * cb)
  kernel = functools.partial(
      _flat_layout_kernel, n=n, h=h, w=w, c=c, hp=hp, wp=wp, top=top,
      left=left, planes=planes, nb=nb, wb=wb, cb=cb)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((size,), x.dtype),
      grid=(hp, pl.cdiv(planes, cb), pl.cdiv(n, nb)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=1),
      interpret=interpret,
      name="escort_flat_layout",
  )(x.reshape(-1))


def flat_layout_reference(x: jax.Array, padding,
                          extra_planes: int = 0) -> jax.Array:
  """Plain-JAX reference: pad, transpose, zero planes."""
  (top, bottom), (left, right) = padding
  y = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  y = jnp.transpose(y, (3, 1, 2, 0))
  y = jnp.pad(y, ((0, extra_planes), (0, 0), (0, 0), (0, 0)))
  return y.reshape(-1)
