"""Direct sparse convolution with a row's nonzeros across lanes, for small
grids; its reference is nonzero_lanes_reference (at the end).

The escort kernel (direct_sparse_conv.py) puts output positions across the
lanes of a program and walks each row's nonzeros in a serial loop, one
nonzero per step. When the output is small (batch 1, 7x7 to 28x28 maps) a
row has few positions and ~100 nonzeros, so that loop is a chain of
dependent global loads and the programs are too few to hide them. Here a
program owns one output row and BQ positions, and each step takes the next
K nonzeros of the row at once:

    acc (K, BQ) += w[j0:j0+K, None] * x_flat[offset[j0:j0+K, None] + q]

so K x BQ independent loads are in flight per step and a row of 100
nonzeros takes ceil(100 / K) steps. One sum over K at the end gives the
row's BQ outputs, then bias and activation: no partial outputs and no
summing pass, unlike a split row. The order of each output's sum is set by
K, BQ and the launch, so runs are bitwise reproducible (escort_jax chooses
them per image, not per batch, for the same bits on any share of a batch).

With `PlaneBounds` the input is instead the unpadded planes, (C, H, W, N)
flattened (batch innermost), and each read is masked to the plane: a tap
that falls outside it reads zero, as the padding would. Then the input pass
is a plain transpose, which XLA fuses into the op that produces the input (a
batch norm and ReLU), where the padded layout costs a pass of its own.

Layout:
  x_flat: (in_len,) the input, any float dtype (escort_jax.conv_geometry),
          or with bounds the (C, H, W, N) planes.
  values: (nnz,) the weights in CSR order (rows ascending).
  tables: row_ptr (num_rows + 1,) and offsets (nnz,) in units of
          offset_unit, CSR order (`NonzeroRows`); with bounds also each
          nonzero's tap t = r * kernel_w + s as the bit 1 << t, and each
          output position's code of the taps that read inside the plane.
  y:      (num_rows, out_len) row-major; or, with `nhwc`, the (N, Ho, Wo,
          num_rows) output written directly (output_layout.NhwcOutput).

Lowering: a pallas_call with Triton compiler params, compiled on NVIDIA GPUs
and run by the interpreter on the CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import output_layout
from pallas_kernels.direct_sparse_conv import (accumulator_dtype,
                                               direct_sparse_conv_reference,
                                               multiply_add)
from pallas_kernels.output_layout import (MAX_GRID_AXIS, NhwcOutput,
                                          check_input_covers, check_int32,
                                          with_optional_refs)
from pallas_kernels.static_tables import pack_tables


@dataclasses.dataclass(frozen=True)
class PlaneBounds:
  """Reads of unpadded input planes, (C, H, W, N) flattened.

  Output position q (wide rows of `width`: q = (ho * width + wo) * batch + n)
  reads, for a nonzero at tap (r, s) with offset o, the input element
  o - base + q, which is pixel (ho + r * dilation_h - pad_top,
  wo + s * dilation_w - pad_left) of the nonzero's plane; where that pixel
  lies outside the height x width plane the read is masked and counts zero.
  base (>= pad_top * width + pad_left, times batch) keeps every offset
  non-negative. Taps are numbered r * kernel_w + s; at most MAX_TAPS.
  """

  height: int
  width: int
  batch: int
  kernel_h: int
  kernel_w: int
  dilation: tuple[int, int]
  pad_top: int
  pad_left: int
  base: int

  def __post_init__(self):
    if self.kernel_h * self.kernel_w > MAX_TAPS:
      raise ValueError(f"a {self.kernel_h}x{self.kernel_w} kernel has more "
                       f"than {MAX_TAPS} taps, the bits of an int32 code")

  @property
  def plane_len(self) -> int:
    return self.height * self.width * self.batch

  def tap_codes(self, out_len: int) -> np.ndarray:
    """(out_len,) int32: bit t of entry q set where tap t of position q
    reads inside its plane."""
    pixel = np.arange(out_len) // self.batch
    out_row, out_col = pixel // self.width, pixel % self.width
    code = np.zeros(out_len, np.int64)
    for r in range(self.kernel_h):
      h = out_row + (r * self.dilation[0] - self.pad_top)
      for s in range(self.kernel_w):
        w = out_col + (s * self.dilation[1] - self.pad_left)
        ok = (h >= 0) & (h < self.height) & (w >= 0) & (w < self.width)
        code |= ok.astype(np.int64) << (r * self.kernel_w + s)
    return code.astype(np.int32)


# Taps per kernel with unpadded planes: each is a bit of an int32 code.
MAX_TAPS = 31


@dataclasses.dataclass(frozen=True, eq=False)
class NonzeroRows:
  """CSR form of a sparse row problem, as this kernel reads it.

  Attributes:
    num_rows: rows of the output.
    row_ptr: (num_rows + 1,) int32; row k's nonzeros are row_ptr[k] up to
      row_ptr[k + 1].
    offsets: (nnz,) int32 source offsets in units of offset_unit.
    offset_unit: every offset is a multiple of it (the kernel multiplies by
      the static number, so that Triton sees aligned loads).
    max_offset: the largest offset, in elements.
    taps: (nnz,) int32 r * kernel_w + s of each nonzero, with bounds.
    bounds: the unpadded planes that the offsets address (PlaneBounds), or
      None for the padded flat layout (no masks).
  """

  num_rows: int
  row_ptr: np.ndarray
  offsets: np.ndarray
  offset_unit: int
  max_offset: int
  taps: np.ndarray | None = None
  bounds: PlaneBounds | None = None

  @property
  def nnz(self) -> int:
    return int(self.row_ptr[-1])


def pack_nonzero_rows(rows: np.ndarray, offsets: np.ndarray,
                      num_rows: int, *, taps: np.ndarray | None = None,
                      bounds: PlaneBounds | None = None) -> NonzeroRows:
  """rows, offsets: (nnz,) destination row and source offset (elements) of
  each weight, rows ascending (CSR order); with bounds (unpadded planes),
  taps: (nnz,) the r * bounds.kernel_w + s of each weight.

  Raises:
    ValueError: if rows are not ascending or out of range, or taps and
      bounds do not come together.
  """
  if (taps is None) != (bounds is None):
    raise ValueError("taps and bounds go together (unpadded planes)")
  rows = np.asarray(rows, np.int64)
  offsets = np.asarray(offsets, np.int64)
  if rows.shape != offsets.shape or rows.ndim != 1:
    raise ValueError(f"rows and offsets must be matching 1-D arrays, got "
                     f"{rows.shape} and {offsets.shape}")
  if rows.size and (np.any(np.diff(rows) < 0) or rows[0] < 0
                    or rows[-1] >= num_rows):
    raise ValueError("rows must be ascending (CSR order) and within "
                     f"[0, {num_rows})")
  if rows.size and offsets.min() < 0:
    raise ValueError("offsets must be non-negative")
  row_ptr = np.concatenate([[0], np.cumsum(np.bincount(
      rows, minlength=num_rows))])
  if taps is not None:
    taps = np.asarray(taps, np.int64)
    if taps.shape != offsets.shape:
      raise ValueError(f"taps must have shape {offsets.shape}, got "
                       f"{taps.shape}")
    if taps.size and (taps.min() < 0 or
                      taps.max() >= bounds.kernel_h * bounds.kernel_w):
      raise ValueError(f"taps must lie in [0, {bounds.kernel_h} x "
                       f"{bounds.kernel_w}), got {taps.min()}..{taps.max()}")
    taps = taps.astype(np.int32)
  unit = max(1, int(np.gcd.reduce(offsets))) if offsets.size else 1
  return NonzeroRows(num_rows=num_rows, row_ptr=row_ptr.astype(np.int32),
                     offsets=(offsets // unit).astype(np.int32),
                     offset_unit=unit,
                     max_offset=int(offsets.max(initial=0)), taps=taps,
                     bounds=bounds)


def _nonzero_lanes_kernel(tables_ref, values_ref, bias_ref, x_ref, y_ref, *,
                          table_starts, lanes, block_q, out_len, row_len,
                          num_rows, offset_unit, relu, acc_dtype, nhwc,
                          spare_region, fused_fma, bounds, q_major):
  ptr_at, offsets_at = table_starts[:2]
  row_axis, q_axis = (1, 0) if q_major else (0, 1)
  row = pl.program_id(row_axis)
  q = pl.program_id(q_axis) * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q_ok = q < out_len
  begin = tables_ref[ptr_at + row]
  end = tables_ref[ptr_at + row + 1]
  lane = jnp.arange(lanes, dtype=jnp.int32)
  read_at = q
  if bounds is not None:
    read_at = q - bounds.base
    # Bit t of code: tap t of this position reads inside the plane (a
    # static table, PlaneBounds.tap_codes). Each nonzero carries 1 << its
    # tap, so a read's mask is one AND (a lane past the row carries 0, a
    # position past out_len has code 0), as cheap as the padded layout's
    # j_ok & q_ok. (Ten integer operations per read, the tap's row and
    # column tested against the plane, made the kernel 1.4-2x slower:
    # benchmarks/NOTES.md, "tenth".)
    code = plgpu.load(tables_ref.at[table_starts[3] + q], mask=q_ok,
                      other=0)

  def step(t, acc):
    j = begin + t * lanes + lane
    j_ok = j < end
    offsets = plgpu.load(tables_ref.at[offsets_at + j], mask=j_ok, other=0)
    # Lanes past the row weigh zero and read nothing (an input NaN must not
    # reach them).
    weights = plgpu.load(values_ref.at[j], mask=j_ok, other=0.0)
    if bounds is None:
      read = j_ok[:, None] & q_ok[None, :]
    else:
      # (Its own table: packed into the offsets' low bits, one load per
      # nonzero fewer, ResNet-50 took 10 µs more, T0721.)
      tap_bits = plgpu.load(tables_ref.at[table_starts[2] + j], mask=j_ok,
                            other=0)
      read = (tap_bits[:, None] & code[None, :]) != 0
    xs = plgpu.load(
        x_ref.at[(offsets * offset_unit)[:, None] + read_at[None, :]],
        mask=read, other=0.0)
    return multiply_add(
        jnp.broadcast_to(weights.astype(acc_dtype)[:, None], acc.shape), xs,
        acc, fused=fused_fma)

  steps = (end - begin + lanes - 1) // lanes
  acc = lax.fori_loop(0, steps, step,
                      jnp.zeros((lanes, block_q), acc_dtype))
  y = jnp.sum(acc, axis=0)
  if bias_ref is not None:
    y = y + bias_ref[row].astype(acc_dtype)
  if relu:
    # Not jnp.maximum: Triton lowers it to a max that drops NaN.
    y = jnp.where(y < 0, jnp.zeros((), acc_dtype), y)
  if nhwc is None:
    plgpu.store(y_ref.at[row * row_len + q], y.astype(y_ref.dtype))
    return
  pixel, q_real = nhwc.pixel_of(q)
  output_layout.store(y_ref, (pixel * num_rows + row)[None, :], y[None, :],
                      q_real[None, :], spare_base=nhwc.pixels * num_rows,
                      spare_region=spare_region)


def nonzero_lanes_conv(x_flat: jax.Array, values: jax.Array,
                       nz: NonzeroRows, *, out_len: int,
                       bias: jax.Array | None = None, relu: bool = False,
                       out_dtype=None, lanes: int = 32, block_q: int = 64,
                       num_warps: int = 4, num_stages: int = 1,
                       q_major: bool = False,
                       nhwc: NhwcOutput | None = None,
                       interpret: bool = False) -> jax.Array:
  """Runs the kernel.

  Args:
    x_flat: (in_len,) flat input; every offset + q with q < out_len must lie
      inside it. With nz.bounds: the (C, H, W, N) planes, exactly.
    values: (nnz,) weights in CSR order.
    nz: the static CSR tables.
    out_len: output positions per row.
    bias: optional (num_rows,) bias, added before the activation.
    relu: apply max(., 0) (NaN stays NaN).
    out_dtype: output dtype; defaults to x_flat's.
    lanes: K, nonzeros per step (a power of two).
    block_q: output positions per program (a power of two).
    num_warps, num_stages: Triton's.
    q_major: put the output blocks on the grid's fastest axis, so that the
      programs launched together (and sharing an SM and its L1) read the
      same positions of the input for different rows (1-3 % faster on 14x14
      and 28x28 maps at batch 1; benchmarks/NOTES.md, "twelfth").
    nhwc: write (N, Ho, Wo, num_rows) instead of rows; its out_len must be
      `out_len`.
    interpret: run through the Pallas interpreter (CPU).

  Returns:
    y: (num_rows, out_len), or (N, Ho, Wo, num_rows) with `nhwc`.
  """
  if x_flat.ndim != 1:
    raise ValueError(f"x_flat must be 1-D, got shape {x_flat.shape}")
  if values.shape != (nz.nnz,):
    raise ValueError(f"values must have shape ({nz.nnz},), got "
                     f"{values.shape}")
  for name, n in (("lanes", lanes), ("block_q", block_q)):
    if n < 1 or n & (n - 1):
      raise ValueError(f"{name} must be a power of two, got {n}")
  if nhwc is not None:
    nhwc.check(out_len)
  if nz.bounds is None:
    check_input_covers(x_flat.shape[0], nz.max_offset, out_len)
  elif x_flat.shape[0] % nz.bounds.plane_len or (
      nz.max_offset - nz.bounds.base >= x_flat.shape[0]):
    raise ValueError(
        f"x_flat has {x_flat.shape[0]} elements: not whole planes of "
        f"{nz.bounds.plane_len} ({nz.bounds.height}x{nz.bounds.width}x"
        f"{nz.bounds.batch}) holding every offset")
  num_q_blocks = pl.cdiv(out_len, block_q)
  if num_q_blocks > MAX_GRID_AXIS:
    raise ValueError(f"{num_q_blocks} output blocks exceed Triton's grid "
                     f"limit of {MAX_GRID_AXIS}; raise block_q")
  row_len = num_q_blocks * block_q
  spare_region = interpret
  if nhwc is None:
    out_size = nz.num_rows * row_len
  else:
    out_size = nhwc.buffer_size(nz.num_rows,
                                block_q if spare_region else 0)
  check_int32(flat_input=x_flat.shape[0], output=out_size)
  out_dtype = jnp.dtype(out_dtype or x_flat.dtype)
  acc_dtype = accumulator_dtype(jnp.result_type(x_flat.dtype, values.dtype))
  tables, table_starts = pack_tables(
      nz.row_ptr, nz.offsets,
      *(() if nz.bounds is None else (np.left_shift(1, nz.taps),
                                      nz.bounds.tap_codes(out_len))))
  kernel = functools.partial(
      _nonzero_lanes_kernel, table_starts=table_starts, lanes=lanes,
      block_q=block_q, out_len=out_len, row_len=row_len,
      num_rows=nz.num_rows, offset_unit=nz.offset_unit, relu=relu,
      acc_dtype=acc_dtype, nhwc=nhwc, spare_region=spare_region,
      fused_fma=not interpret and acc_dtype == jnp.float32,
      bounds=nz.bounds, q_major=q_major)
  kernel = with_optional_refs(kernel, (True, True, bias is not None, True,
                                      True))
  bias_args = () if bias is None else (bias,)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((out_size,), out_dtype),
      grid=((num_q_blocks, nz.num_rows) if q_major
            else (nz.num_rows, num_q_blocks)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="escort_nonzero_lanes_conv",
  )(jnp.asarray(tables),
    # Every load is masked; one zero stands in when nothing is kept.
    values if nz.nnz else jnp.zeros((1,), values.dtype),
    *bias_args, x_flat)
  if nhwc is not None:
    return nhwc.from_buffer(y, nz.num_rows)
  return y.reshape(nz.num_rows, row_len)[:, :out_len]


def nonzero_lanes_reference(x_flat: jax.Array, values: jax.Array,
                            nz: NonzeroRows, *, out_len: int,
                            bias: jax.Array | None = None,
                            relu: bool = False, out_dtype=None) -> jax.Array:
  """Plain-JAX reference of the kernel, read from its packed tables, masks
  included: y (num_rows, out_len), y[k, q] = sum over row k's nonzeros j of
  values[j] * x_flat[offset_j + q] (padded layout), or with nz.bounds of
  values[j] * x_flat[offset_j - base + q] where tap j of position q lies in
  the plane, else 0. Memory O(nnz * out_len): for tests."""
  rows = np.repeat(np.arange(nz.num_rows), np.diff(nz.row_ptr))
  offsets = nz.offsets.astype(np.int64) * nz.offset_unit
  if nz.bounds is None:
    return direct_sparse_conv_reference(
        x_flat, values, rows, offsets, num_rows=nz.num_rows, out_len=out_len,
        bias=bias, relu=relu, out_dtype=out_dtype)
  out_dtype = jnp.dtype(out_dtype or x_flat.dtype)
  acc_dtype = accumulator_dtype(jnp.result_type(x_flat.dtype, values.dtype))
  b = nz.bounds
  q = np.arange(out_len)
  at = offsets[:, None] - b.base + q[None, :]
  r, s = nz.taps // b.kernel_w, nz.taps % b.kernel_w
  pixel = q // b.batch
  h = (pixel // b.width)[None, :] + (r * b.dilation[0] - b.pad_top)[:, None]
  w = (pixel % b.width)[None, :] + (s * b.dilation[1] - b.pad_left)[:, None]
  inside = (h >= 0) & (h < b.height) & (w >= 0) & (w < b.width)
  x = x_flat.astype(acc_dtype)[np.where(inside, at, 0)]
  contrib = jnp.where(inside, values.astype(acc_dtype)[:, None] * x, 0)
  y = jax.ops.segment_sum(contrib, rows.astype(np.int32),
                          num_segments=nz.num_rows)
  if bias is not None:
    y = y + bias.astype(acc_dtype)[:, None]
  if relu:
    y = jnp.where(y < 0, jnp.zeros((), y.dtype), y)
  return y.astype(out_dtype)
