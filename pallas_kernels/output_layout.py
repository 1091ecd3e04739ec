"""What the sparse kernels share about their launch and their output.

The kernels compute "wide" rows: output position q of channel k is image
q % N at wide row (q // N) // Wb, column (q // N) % Wb, for columns up to the
padded input width Wb (escort_jax.conv_geometry). They either store those
rows as they are, (num_rows, out_len), or write the (N, Ho, Wo, K) output
directly, dropping columns >= Wo and rows >= Ho, which saves the transpose
pass that would otherwise follow them (`NhwcOutput`), or (the vector
kernel) write them into the channel-major frame that a next layer reads
(`FramedOutput`).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

# Triton caps grid axes 1 and 2 at 65535 programs.
MAX_GRID_AXIS = 65535
INT32_MAX = int(np.iinfo(np.int32).max)


@dataclasses.dataclass(frozen=True)
class WideOutput:
  """Where a kernel over wide positions writes: its wide rows.

  Attributes: batch N, out_h Ho, row_width Wb (wide rows), out_w Wo <= Wb.
  """

  batch: int
  out_h: int
  row_width: int
  out_w: int

  @property
  def out_len(self) -> int:
    """Wide positions per channel: Ho * Wb * N."""
    return self.out_h * self.row_width * self.batch

  def check(self, out_len: int) -> None:
    """Raises unless this output covers `out_len` wide positions."""
    if self.out_len != out_len:
      raise ValueError(f"the {type(self).__name__} has {self.out_len} wide "
                       f"positions, but out_len is {out_len}")


@dataclasses.dataclass(frozen=True)
class NhwcOutput(WideOutput):
  """The NHWC output of a kernel over wide positions."""

  @property
  def pixels(self) -> int:
    """N * Ho * Wo."""
    return self.batch * self.out_h * self.out_w

  def pixel_of(self, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Wide positions q -> (NHWC pixel index, whether q is a real output)."""
    n, t = q % self.batch, q // self.batch
    y, x = t // self.row_width, t % self.row_width
    return (n * self.out_h + y) * self.out_w + x, (x < self.out_w) & (
        y < self.out_h)

  def buffer_size(self, num_rows: int, spare: int) -> int:
    """Elements of the kernel's flat output buffer: the output, then
    `spare` elements for masked lanes (interpret mode; see `store`)."""
    return self.pixels * num_rows + spare

  def from_buffer(self, y: jax.Array, num_rows: int) -> jax.Array:
    """The kernel's flat buffer -> (N, Ho, Wo, num_rows)."""
    return y[:self.pixels * num_rows].reshape(self.batch, self.out_h,
                                              self.out_w, num_rows)

  def from_wide(self, y: jax.Array) -> jax.Array:
    """(K, out_len) wide rows -> (N, Ho, Wo, K): crop and transpose."""
    y = y.reshape(-1, self.out_h, self.row_width, self.batch)
    return y[:, :, :self.out_w, :].transpose(3, 1, 2, 0)


@dataclasses.dataclass(frozen=True)
class FramedOutput(WideOutput):
  """The output of a stride-1 kernel written into a channel-major frame.

  A frame holds activations as (C + extra_planes, Ha, Wb, N): channel c's
  image n at [c, top + y, left + x, n], zeros everywhere else (the margins,
  and extra_planes whole zero planes after the last channel, which cover
  the wide reads of a kernel that reads the frame). With the frame's width
  Wb equal to the kernel's wide row width, wide position q lands at
  q + shift of its row's plane, shift = (top * Wb + left) * N, and the wide
  columns x >= Wo fall on the margins of the frame, where the kernel writes
  zeros; so one contiguous store per channel fills a plane, and the next
  layer reads it with no layout pass (escort_jax.frames).

  Attributes: WideOutput's, and top, left (the data's origin in the frame),
  plane_h Ha, extra_planes.
  """

  top: int
  left: int
  plane_h: int
  extra_planes: int

  def __post_init__(self):
    if not (0 <= self.left and self.out_w + self.left <= self.row_width
            and 0 <= self.top and self.top + self.out_h <= self.plane_h):
      raise ValueError(
          f"an output of {self.out_h}x{self.out_w} at ({self.top}, "
          f"{self.left}) does not fit a frame of {self.plane_h}x"
          f"{self.row_width}")

  @property
  def plane_len(self) -> int:
    """Elements of one plane of the frame: Ha * Wb * N."""
    return self.plane_h * self.row_width * self.batch

  @property
  def shift(self) -> int:
    """Where wide position 0 lands in its plane."""
    return (self.top * self.row_width + self.left) * self.batch

  def head_tiles(self, block_q: int) -> int:
    """Chunks of block_q positions that cover the head of each plane (its
    top margin, before wide position 0)."""
    return -(-self.shift // block_q)

  def is_real(self, q: jax.Array) -> jax.Array:
    """Whether wide position q (any int, negative before the data) is a
    real output: in range and not a wide column."""
    x = (q // self.batch) % self.row_width
    return (q >= 0) & (q < self.out_len) & (x < self.out_w)

  def buffer_size(self, num_rows: int, spare: int) -> int:
    """Elements of the kernel's flat output buffer: num_rows + extra_planes
    planes, then `spare` elements for masked lanes (interpret mode)."""
    return (num_rows + self.extra_planes) * self.plane_len + spare

  def from_buffer(self, y: jax.Array, num_rows: int) -> jax.Array:
    """The kernel's flat buffer -> (num_rows + extra_planes, Ha, Wb, N)."""
    planes = num_rows + self.extra_planes
    return y[:planes * self.plane_len].reshape(planes, self.plane_h,
                                               self.row_width, self.batch)

  def from_wide(self, y: jax.Array) -> jax.Array:
    """(K, out_len) wide rows -> (K + extra_planes, Ha, Wb, N): the wide
    columns zeroed, the rows placed at the data's origin (the reference of
    what the kernel writes)."""
    k = y.shape[0]
    q = np.arange(self.out_len)
    y = jnp.where(np.asarray(self.is_real(q))[None, :], y,
                  jnp.zeros((), y.dtype))
    y = jnp.pad(y, ((0, self.extra_planes),
                    (self.shift, self.plane_len - self.shift - self.out_len)))
    return y.reshape(k + self.extra_planes, self.plane_h, self.row_width,
                     self.batch)


def store(y_ref, out_idx: jax.Array, value: jax.Array, ok: jax.Array, *,
          spare_base: int, spare_region: bool) -> None:
  """Stores the tile `value` at `out_idx` where `ok`.

  Compiled, a masked store. The Pallas interpreter instead turns a masked
  store into a scatter of all lanes in which masked lanes rewrite what they
  read, so a masked lane that aliases a live one could undo its write; there
  the masked lanes go to distinct addresses of a spare region that starts at
  `spare_base` (value.size elements).
  """
  value = value.astype(y_ref.dtype)
  if not spare_region:
    plgpu.store(y_ref.at[out_idx], value, mask=ok)
    return
  rows, cols = value.shape
  spare = (spare_base + jnp.arange(rows, dtype=jnp.int32)[:, None] * cols
           + jnp.arange(cols, dtype=jnp.int32)[None, :])
  plgpu.store(y_ref.at[jnp.where(ok, out_idx, spare)], value)


def sum_in_order(parts: jax.Array, axis: int) -> jax.Array:
  """Sums `parts` over `axis` one slice after another: a fixed association,
  where a reduction's would be XLA's choice by shape, so that kernels whose
  partial results are summed give the same bits for any launch or batch."""
  total = lax.index_in_dim(parts, 0, axis, keepdims=False)
  for i in range(1, parts.shape[axis]):
    total = total + lax.index_in_dim(parts, i, axis, keepdims=False)
  return total


def check_int32(**sizes: int) -> None:
  """Raises OverflowError naming the first size that int32 indexing of the
  kernels cannot address."""
  for what, size in sizes.items():
    if size > INT32_MAX:
      raise OverflowError(
          f"the {what.replace('_', ' ')} ({size} elements) has 2**31 "
          "elements or more, beyond the int32 indexing of these kernels; "
          "split the batch")


def check_input_covers(input_len: int, last_offset: int,
                       read_len: int) -> None:
  """Raises ValueError unless an input of input_len elements holds every
  read of a kernel: read_len positions from each offset up to last_offset."""
  if last_offset + read_len > input_len:
    raise ValueError(
        f"the input is too short for its offsets: offset {last_offset} plus "
        f"{read_len} positions exceeds {input_len}")


def with_optional_refs(kernel: Callable, present: Sequence[bool]) -> Callable:
  """kernel(*refs) that takes None for each absent ref, as a pallas_call body
  that receives only the present ones (in order)."""
  present = tuple(present)

  def body(*refs):
    given = iter(refs)
    return kernel(*(next(given) if p else None for p in present))
  return body
