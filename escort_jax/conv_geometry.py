"""Geometry of a 2-D convolution and its stretched flat layout.

Escort's trick: lay the padded input out so that each output channel is a
sum of shifted, contiguous input slices. Here the input is laid out as

    x_flat[((plane * Ha + a) * Wb + b) * N + n]          plane = (c, i, j)

where (i, j) is the stride phase: padded input row a * sh + i and column
b * sw + j, so a strided convolution becomes a stride-1 convolution over
C * sh * sw phase planes of Ha x Wb. The batch is innermost, so one vector of
outputs spans pixels and images together (small 7x7 maps still fill the GPU).

Output positions use the same row width Wb ("wide" rows):

    y[k, (y * Wb + x) * N + n]     for y < Ho, x < Wb

and columns x >= Wo are cropped afterwards. Kernel entry (k, c, r, s) reads
plane (c_global, (r*dh) % sh, (s*dw) % sw) at shift ((r*dh)//sh, (s*dw)//sw),
which is one offset into x_flat. Feature groups only change c_global.

All of this is static numpy, computed at trace time from the input shape.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax.structure import SparseStructure
from pallas_kernels.nonzero_lanes_conv import MAX_TAPS, PlaneBounds
from pallas_kernels.output_layout import NhwcOutput
from pallas_kernels.vector_sparse_conv import vector_width_of


@dataclasses.dataclass(frozen=True)
class ConvGeometry:
  """A 2-D convolution's static shape parameters, NHWC, after validation.

  Attributes:
    batch, in_h, in_w, in_channels: the input (N, H, W, C).
    out_channels, kernel_h, kernel_w: the kernel (O, R, S).
    strides, dilation: (sh, sw), (dh, dw) positive.
    padding: ((top, bottom), (left, right)), possibly negative.
    groups: feature_group_count.
  """

  batch: int
  in_h: int
  in_w: int
  in_channels: int
  out_channels: int
  kernel_h: int
  kernel_w: int
  strides: tuple[int, int]
  dilation: tuple[int, int]
  padding: tuple[tuple[int, int], tuple[int, int]]
  groups: int

  @property
  def padded_h(self) -> int:
    """Input height after padding."""
    return self.in_h + sum(self.padding[0])

  @property
  def padded_w(self) -> int:
    """Input width after padding."""
    return self.in_w + sum(self.padding[1])

  @property
  def out_h(self) -> int:
    """Output height (Ho)."""
    span = (self.kernel_h - 1) * self.dilation[0] + 1
    return max(0, (self.padded_h - span) // self.strides[0] + 1)

  @property
  def out_w(self) -> int:
    """Output width (Wo)."""
    span = (self.kernel_w - 1) * self.dilation[1] + 1
    return max(0, (self.padded_w - span) // self.strides[1] + 1)

  @property
  def plane_h(self) -> int:
    """Height of a stride-phase plane (Ha)."""
    return -(-max(self.padded_h, 1) // self.strides[0])

  @property
  def plane_w(self) -> int:
    """Width of a stride-phase plane (Wb), also the wide output row width."""
    return -(-max(self.padded_w, 1) // self.strides[1])

  @property
  def num_planes(self) -> int:
    """Phase planes of the flat input: C * sh * sw."""
    return self.in_channels * self.strides[0] * self.strides[1]

  @property
  def plane_len(self) -> int:
    """Elements of one phase plane in x_flat: Ha * Wb * N."""
    return self.plane_h * self.plane_w * self.batch

  @property
  def out_len(self) -> int:
    """Wide output positions per channel: Ho * Wb * N."""
    return self.out_h * self.plane_w * self.batch

  @property
  def valid_period(self) -> int:
    """Output position q is a real (not cropped) one when
    q % valid_period < valid_len."""
    return self.plane_w * self.batch

  @property
  def valid_len(self) -> int:
    """See valid_period."""
    return self.out_w * self.batch

  @property
  def max_shift(self) -> int:
    """The largest in-plane shift of any kernel position (Dmax)."""
    du = ((self.kernel_h - 1) * self.dilation[0]) // self.strides[0]
    dv = ((self.kernel_w - 1) * self.dilation[1]) // self.strides[1]
    return (du * self.plane_w + dv) * self.batch

  def nhwc_output(self) -> NhwcOutput:
    """Where the wide output positions land in the (N, Ho, Wo, K) output."""
    return NhwcOutput(batch=self.batch, out_h=self.out_h,
                      row_width=self.plane_w, out_w=self.out_w)

  @property
  def flops(self) -> int:
    """Dense FLOPs (2 per multiply-add)."""
    return (2 * self.batch * self.out_h * self.out_w * self.out_channels *
            (self.in_channels // self.groups) * self.kernel_h * self.kernel_w)


def _pair(v, name: str) -> tuple[int, int]:
  if isinstance(v, (int, np.integer)):
    v = (int(v), int(v))
  try:
    v = tuple(v)
  except TypeError:
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
  if len(v) != 2 or not all(isinstance(e, (int, np.integer)) for e in v):
    raise ValueError(f"{name} must be a pair of ints for a 2-D convolution, "
                     f"got {v!r}")
  if any(e <= 0 for e in v):
    raise ValueError(f"{name} must be positive, got {v!r}")
  return int(v[0]), int(v[1])


def resolve_padding(padding, in_hw: Sequence[int], window: Sequence[int],
                    strides: Sequence[int]
                    ) -> tuple[tuple[int, int], tuple[int, int]]:
  """Resolves lax-style padding to explicit ((top, bottom), (left, right)).

  Accepts "SAME", "SAME_LOWER", "VALID", an int, or two (low, high) pairs
  (or two ints), as lax.conv_general_dilated and Flax do. `window` is the
  dilated kernel extent.
  """
  if isinstance(padding, str):
    name = padding.upper()
    if name not in ("SAME", "SAME_LOWER", "VALID"):
      raise ValueError(f"unknown padding {padding!r}: expected 'SAME', "
                       "'SAME_LOWER', 'VALID', an int, or two (low, high) "
                       "pairs")
    pads = lax.padtype_to_pads(tuple(in_hw), tuple(window), tuple(strides),
                               name)
    return tuple((int(lo), int(hi)) for lo, hi in pads)  # type: ignore
  if isinstance(padding, (int, np.integer)):
    p = int(padding)
    return ((p, p), (p, p))
  try:
    pads = list(padding)
  except TypeError:
    raise TypeError(f"unknown padding {padding!r}") from None
  if len(pads) != 2:
    raise ValueError(f"padding must give 2 spatial dimensions, got "
                     f"{padding!r}")
  out = []
  for p in pads:
    if isinstance(p, (int, np.integer)):
      out.append((int(p), int(p)))
      continue
    p = tuple(p)
    if len(p) != 2 or not all(isinstance(e, (int, np.integer)) for e in p):
      raise ValueError(f"each padding entry must be an int or a (low, high) "
                       f"pair of ints, got {padding!r}")
    out.append((int(p[0]), int(p[1])))
  return tuple(out)  # type: ignore


def make_geometry(x_shape_nhwc: Sequence[int], structure: SparseStructure,
                  window_strides, padding, rhs_dilation,
                  feature_group_count) -> ConvGeometry:
  """Validates a convolution and returns its geometry (input in NHWC)."""
  n, h, w, c = (int(d) for d in x_shape_nhwc)
  o, i, r, s = structure.oirs
  strides = _pair(window_strides, "window_strides")
  dilation = _pair(rhs_dilation, "rhs_dilation")
  if not isinstance(feature_group_count, (int, np.integer)) or (
      feature_group_count <= 0):
    raise ValueError("feature_group_count must be a positive int, got "
                     f"{feature_group_count!r}")
  g = int(feature_group_count)
  if c % g:
    raise ValueError(f"feature_group_count={g} does not divide the input's "
                     f"{c} channels")
  if o % g:
    raise ValueError(f"feature_group_count={g} does not divide the kernel's "
                     f"{o} output channels")
  if c // g != i:
    raise ValueError(
        f"the input has {c} channels, so with feature_group_count={g} the "
        f"kernel needs {c // g} input channels per group, but it has {i} "
        f"(kernel shape {structure.shape}, {structure.layout})")
  window = ((r - 1) * dilation[0] + 1, (s - 1) * dilation[1] + 1)
  pads = resolve_padding(padding, (h, w), window, strides)
  for size, (lo, hi), axis in ((h, pads[0], "height"), (w, pads[1], "width")):
    if size + lo + hi < 0:
      raise ValueError(f"padding {pads} crops more than the input's {axis} "
                       f"of {size}")
  return ConvGeometry(batch=n, in_h=h, in_w=w, in_channels=c,
                      out_channels=o, kernel_h=r, kernel_w=s,
                      strides=strides, dilation=dilation, padding=pads,
                      groups=g)


@dataclasses.dataclass(frozen=True, eq=False)
class StretchedProblem:
  """The convolution as a row problem on the flat layout.

  Attributes:
    rows: (nnz,) output channel of each nonzero, CSR order.
    offsets: (nnz,) its offset into x_flat: plane * plane_len + shift.
    planes: (nnz,) the phase plane it reads.
    shifts: (nnz,) its in-plane shift.
  """

  rows: np.ndarray
  offsets: np.ndarray
  planes: np.ndarray
  shifts: np.ndarray


def input_channels(k: np.ndarray, c: np.ndarray,
                    g: ConvGeometry) -> np.ndarray:
  """The input channel (of all groups) that a nonzero of output channel k
  and in-group input channel c reads."""
  return (k // (g.out_channels // g.groups)) * (
      g.in_channels // g.groups) + c


def _check_int32_offsets(offsets: np.ndarray, out_len: int,
                         g: ConvGeometry) -> None:
  """Raises OverflowError where offset + output position can pass int32."""
  if offsets.size and offsets.max() + out_len > np.iinfo(np.int32).max:
    raise OverflowError(
        f"the input ({g.batch}x{g.in_h}x{g.in_w}x{g.in_channels}) is too "
        "large for int32 offsets; split the batch")


@functools.lru_cache(maxsize=4096)
def stretched_problem(structure: SparseStructure,
                      geometry: ConvGeometry) -> StretchedProblem:
  """Offsets of every nonzero into the flat layout of `geometry`."""
  k, c, r, s = structure.coordinates()
  g = geometry
  sh, sw = g.strides
  u, v = r * g.dilation[0], s * g.dilation[1]
  planes = (input_channels(k, c, g) * sh + u % sh) * sw + v % sw
  shifts = ((u // sh) * g.plane_w + v // sw) * g.batch
  offsets = planes * g.plane_len + shifts
  _check_int32_offsets(offsets, g.out_len, g)
  return StretchedProblem(rows=k, offsets=offsets, planes=planes,
                          shifts=shifts)


# --------------------------------------------------------------------------
# Unpadded planes: the input as (C, H, W, N), reads masked at the borders.


def reads_unpadded_planes(g: ConvGeometry) -> bool:
  """Whether the convolution reads its input as unpadded planes
  (plane_problem) with config.unpadded: stride 1, wide output rows as wide
  as the input rows (Wo <= W, as with 'SAME'), at most MAX_TAPS taps, and
  some padding (without, the flat layout is that same transpose already,
  and the masks would buy nothing)."""
  return (g.strides == (1, 1) and 0 < g.out_w <= g.in_w and g.out_h > 0
          and g.kernel_h * g.kernel_w <= MAX_TAPS
          and any(p > 0 for pair in g.padding for p in pair))


@dataclasses.dataclass(frozen=True, eq=False)
class PlaneProblem:
  """The convolution as a row problem on unpadded planes.

  Output position q = (ho * W + wo) * N + n (wide rows of the input's width
  W; columns wo >= Wo are cropped) reads x_planes[offset - base + q], masked
  to the plane (pallas_kernels.nonzero_lanes_conv.PlaneBounds).

  Attributes:
    rows: (nnz,) output channel of each nonzero, CSR order.
    offsets: (nnz,) its offset into x_planes, plus bounds.base (>= 0).
    taps: (nnz,) r * kernel_w + s.
    bounds: the planes' PlaneBounds.
    out_len: wide output positions, Ho * W * N.
    nhwc: where they land in the (N, Ho, Wo, K) output.
  """

  rows: np.ndarray
  offsets: np.ndarray
  taps: np.ndarray
  bounds: PlaneBounds
  out_len: int
  nhwc: NhwcOutput


@functools.lru_cache(maxsize=4096)
def plane_problem(structure: SparseStructure,
                  geometry: ConvGeometry) -> PlaneProblem:
  """Offsets of every nonzero into the unpadded planes of `geometry`.

  Raises:
    ValueError: if not reads_unpadded_planes(geometry).
  """
  g = geometry
  if not reads_unpadded_planes(g):
    raise ValueError(
        f"unpadded planes need stride 1, Wo <= W and some padding; got "
        f"strides {g.strides}, output width {g.out_w}, input width "
        f"{g.in_w}, padding {g.padding}")
  k, c, r, s = structure.coordinates()
  (pad_top, _), (pad_left, _) = g.padding
  base = max(0, (pad_top * g.in_w + pad_left) * g.batch)
  offsets = (((input_channels(k, c, g) * g.in_h + r * g.dilation[0]
               - pad_top) * g.in_w + s * g.dilation[1] - pad_left) * g.batch
             + base)
  out_len = g.out_h * g.in_w * g.batch
  _check_int32_offsets(offsets, out_len, g)
  bounds = PlaneBounds(height=g.in_h, width=g.in_w, batch=g.batch,
                       kernel_h=g.kernel_h, kernel_w=g.kernel_w,
                       dilation=g.dilation,
                       pad_top=pad_top, pad_left=pad_left, base=base)
  return PlaneProblem(
      rows=k, offsets=offsets, taps=r * g.kernel_w + s, bounds=bounds,
      out_len=out_len,
      nhwc=NhwcOutput(batch=g.batch, out_h=g.out_h, row_width=g.in_w,
                      out_w=g.out_w))


def to_unpadded_planes(x_nhwc: jax.Array) -> jax.Array:
  """(N, H, W, C) -> x_planes (C * H * W * N,): a plain transpose, which XLA
  fuses into the elementwise ops that produce x."""
  return jnp.transpose(x_nhwc, (3, 1, 2, 0)).reshape(-1)


@functools.lru_cache(maxsize=4096)
def structure_vector_width(structure: SparseStructure,
                           geometry: ConvGeometry) -> int:
  """V of the structure on this geometry: blocks of V output channels with
  the same source offsets (so also within one feature group), or 1."""
  problem = stretched_problem(structure, geometry)
  return vector_width_of(problem.rows, problem.offsets,
                         geometry.out_channels)


def to_flat_input(x_nhwc: jax.Array, g: ConvGeometry,
                  tail: int | None = None) -> jax.Array:
  """(N, H, W, C) -> x_flat (num_planes * plane_len + at least tail,): pad,
  split phases, batch innermost, then at least `tail` zeros (default
  max_shift: the wide columns of the last plane read up to max_shift past its
  end; those outputs are cropped, but the reads must stay in bounds)."""
  sh, sw = g.strides
  (pt, pb), (pl_, pr) = g.padding
  # Extra rows/columns complete the last phase; no real output reads them.
  pb += g.plane_h * sh - g.padded_h
  pr += g.plane_w * sw - g.padded_w
  zero = jnp.zeros((), x_nhwc.dtype)
  tail = g.max_shift if tail is None else tail
  x = lax.pad(x_nhwc, zero,
              ((0, 0, 0), (pt, pb, 0), (pl_, pr, 0), (0, 0, 0)))
  x = x.reshape(g.batch, g.plane_h, sh, g.plane_w, sw, g.in_channels)
  x = x.transpose(5, 2, 4, 1, 3, 0)  # (C, i, j, Ha, Wb, N)
  # The tail as whole zero planes, and no cut to length: XLA fuses the
  # padding into the transpose, where a flat pad or slice would each cost
  # another copy of the input (benchmarks/layout_passes.py).
  planes = -(-tail // g.plane_len)
  x = lax.pad(x.reshape(g.num_planes, g.plane_h, g.plane_w, g.batch), zero,
              ((0, planes, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)))
  return x.reshape(-1)


def to_wide_output(y_nhwc: jax.Array, g: ConvGeometry) -> jax.Array:
  """(N, Ho, Wo, K) -> (K, out_len) wide rows, zeros in the cropped columns:
  the inverse of from_wide_output (and its transpose)."""
  y = y_nhwc.transpose(3, 1, 2, 0)
  y = jnp.pad(y, ((0, 0), (0, 0), (0, g.plane_w - g.out_w), (0, 0)))
  return y.reshape(g.out_channels, g.out_len)


def from_wide_output(y: jax.Array, g: ConvGeometry) -> jax.Array:
  """(K, out_len) wide rows -> (N, Ho, Wo, K): crop and transpose."""
  return g.nhwc_output().from_wide(y)
