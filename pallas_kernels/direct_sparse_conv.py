"""Direct sparse convolution (Escort) as a Pallas kernel, and its reference.

The op layer (escort_jax) turns a convolution into a *stretched* row problem
on a flat input, with no im2col: every nonzero weight (k, c, r, s) becomes one
source offset into the flat, padded input, and

    y[k, q] = bias[k] + sum_{j in row k} w_j * x_flat[offset_j + q]

for every output position q in [0, out_len). Each output row is a sum of
shifted, contiguous slices of the input. The same kernel computes the gradient
with respect to the input, with the transposed structure (see
escort_jax.conv_geometry).

Layout:
  x_flat: (in_len,) the input, any float dtype.
  values: (padded_entries,) the weights, laid out by RowGroups.gather_values;
          or (values_by_row) the (nnz,) weights in CSR order, which the
          kernel reads through RowGroups.lane_start (no gather pass).
  bias:   (num_rows,) or None.
  y:      (num_rows, out_len), row-major; or, with `nhwc`, the (N, Ho, Wo,
          num_rows) output written directly (pallas_kernels/output_layout.py).

Lowering: a plain pallas_call with Triton compiler params, so that one
definition runs compiled on NVIDIA GPUs and in interpret mode on the CPU.
Compiled, the float32 multiply-adds are inline PTX fma instructions
(`multiply_add`); interpreted, they are `c + a * b`.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import output_layout
from pallas_kernels.output_layout import (MAX_GRID_AXIS, NhwcOutput,
                                          check_input_covers, check_int32,
                                          with_optional_refs)
from pallas_kernels.row_groups import RowGroups
from pallas_kernels.static_tables import pack_tables


def accumulator_dtype(dtype) -> jnp.dtype:
  """float32 accumulation, or float64 for float64 inputs (CPU references)."""
  return jnp.promote_types(jnp.float32, dtype)


# Two bfloat16 inputs arrive packed in one 32-bit register ($4; element 0 in
# the low half); a bfloat16's float32 value is its bits shifted up by 16, so
# the unpacking is one shift or mask per element (Triton's own conversion
# took about 1.75 instructions per element).
_BF16X2_FMA = """{
.reg .b32 lo, hi;
shl.b32 lo, $4, 16;
and.b32 hi, $4, 0xffff0000;
fma.rn.f32 $0, $2, lo, $5;
fma.rn.f32 $1, $3, hi, $6;
}"""


def multiply_add(a: jax.Array, b: jax.Array, c: jax.Array, *,
                 fused: bool, packed_bf16: bool = False) -> jax.Array:
  """a * b + c elementwise in c's dtype (a, b, c of one shape; b is cast).

  With `fused` (float32 c, compiled kernels only): one fma.rn.f32 per
  element. XLA's Triton pipeline leaves a Pallas `a * b + c` as a multiply
  and an add (FMUL + FADD in the SASS), a sixth of the escort kernel's
  instructions (benchmarks/NOTES.md, sixth session); inline PTX asks for the
  fused instruction, which also rounds once instead of twice. With
  `packed_bf16` too (b bfloat16, an even number of elements per thread), the
  same asm also unpacks b, two elements at a time.
  """
  if not fused:
    return c + a * b.astype(c.dtype)
  out = [jax.ShapeDtypeStruct(c.shape, c.dtype)]
  if packed_bf16 and b.dtype == jnp.bfloat16:
    return plgpu.elementwise_inline_asm(
        _BF16X2_FMA, args=[a, b, c], constraints="=r,=r,r,r,r,r,r", pack=2,
        result_shape_dtypes=out)[0]
  return plgpu.elementwise_inline_asm(
      "fma.rn.f32 $0, $1, $2, $3;", args=[a, b.astype(c.dtype), c],
      constraints="=r,r,r,r", pack=1, result_shape_dtypes=out)[0]


def _direct_sparse_conv_kernel(tables_ref, values_ref, bias_ref, x_ref, y_ref,
                               *, table_starts, rows_per_program, block_q,
                               out_len, row_len, num_rows, offset_unit, unroll,
                               groups_per_program, q_major, masked, relu,
                               acc_dtype, nhwc, spare_region, fused_fma,
                               packed_bf16):
  rows_at, start_at, steps_at, offsets_at, lane_start_at, lane_len_at = (
      table_starts)
  by_row = lane_start_at is not None
  group_axis, q_axis = (1, 0) if q_major else (0, 1)
  q_block = pl.program_id(q_axis)
  # Read outside the loop: the interpreter cannot lower program_id inside one.
  first_group = pl.program_id(group_axis) * groups_per_program
  q = q_block * block_q + jnp.arange(block_q, dtype=jnp.int32)
  q_ok = q < out_len

  def one_group(i, carry):
    # Several groups per program share one input window; meant for L1 reuse,
    # it measured slower on the H100 (benchmarks/NOTES.md), so the default
    # is one group.
    g = first_group + i
    rows = tables_ref[pl.ds(rows_at + g * rows_per_program, rows_per_program)]
    row_ok = rows >= 0
    start = tables_ref[start_at + g]
    steps = tables_ref[steps_at + g]
    if by_row:
      lane_start = tables_ref[pl.ds(lane_start_at + g * rows_per_program,
                                    rows_per_program)]
      lane_len = tables_ref[pl.ds(lane_len_at + g * rows_per_program,
                                  rows_per_program)]

    def load_step(t):
      base = start + t * rows_per_program
      offsets = tables_ref[pl.ds(offsets_at + base, rows_per_program)]
      if not by_row:
        weights = values_ref[pl.ds(base, rows_per_program)]
      else:
        # Padding steps weigh zero, whatever their input.
        weights = plgpu.load(values_ref.at[lane_start + t], mask=t < lane_len,
                             other=0.0)
      if not masked:
        # Padding entries read zeros and every read is in bounds.
        idx = (offsets * offset_unit)[:, None] + q[None, :]
        return weights, plgpu.load(x_ref.at[idx])
      live = (offsets >= 0)[:, None] & q_ok[None, :]
      idx = (jnp.maximum(offsets, 0) * offset_unit)[:, None] + q[None, :]
      return weights, plgpu.load(x_ref.at[idx], mask=live, other=0.0)

    def unrolled_steps(u, acc):
      # All loads of `unroll` steps are issued before the first FMA, so that
      # several gathers are in flight at once (the loop is latency bound).
      loaded = [load_step(u * unroll + j) for j in range(unroll)]
      for weights, xs in loaded:
        acc = multiply_add(
            jnp.broadcast_to(weights.astype(acc_dtype)[:, None], acc.shape),
            xs, acc, fused=fused_fma, packed_bf16=packed_bf16)
      return acc

    acc = lax.fori_loop(0, steps // unroll, unrolled_steps,
                        jnp.zeros((rows_per_program, block_q), acc_dtype))
    if bias_ref is not None:
      bias = plgpu.load(bias_ref.at[jnp.maximum(rows, 0)], mask=row_ok,
                        other=0.0)
      acc = acc + bias.astype(acc_dtype)[:, None]
    if relu:
      # Not jnp.maximum: Triton lowers it to a max that drops NaN.
      acc = jnp.where(acc < 0, jnp.zeros((), acc_dtype), acc)
    if nhwc is None:
      # Every lane stores, with no mask: lanes past the last row write a
      # spare row, and positions past out_len the padded tail of each row.
      # Masked scatters with repeated addresses are not well defined in
      # interpret mode.
      out_idx = (jnp.where(row_ok, rows, num_rows)[:, None] * row_len
                 + q[None, :])
      plgpu.store(y_ref.at[out_idx], acc.astype(y_ref.dtype))
      return carry
    pixel, q_real = nhwc.pixel_of(q)
    output_layout.store(
        y_ref, pixel[None, :] * num_rows + rows[:, None], acc,
        row_ok[:, None] & q_real[None, :],
        spare_base=nhwc.pixels * num_rows, spare_region=spare_region)
    return carry

  lax.fori_loop(0, groups_per_program, one_group, 0)


def direct_sparse_conv(x_flat: jax.Array, values: jax.Array,
                       groups: RowGroups, *, out_len: int,
                       bias: jax.Array | None = None, relu: bool = False,
                       out_dtype=None, block_q: int = 256, num_warps: int = 4,
                       num_stages: int = 1, groups_per_program: int = 1,
                       q_major: bool = False, values_by_row: bool = False,
                       nhwc: NhwcOutput | None = None,
                       interpret: bool = False) -> jax.Array:
  """Runs the direct sparse convolution kernel.

  Args:
    x_flat: (in_len,) flat input. Every offset + q with q < out_len must be
      inside it; with groups.zeros_offset set, every q below out_len rounded
      up to block_q, and a run of that many zeros at zeros_offset.
    values: (groups.padded_entries,) weights from `groups.gather_values`, or
      with values_by_row the (nnz,) weights in CSR order (groups must then
      have lane_start: packed from nonzeros grouped by row).
    groups: the static row packing.
    out_len: output positions per row.
    bias: optional (num_rows,) bias, added before the activation.
    relu: apply max(., 0) to the output.
    out_dtype: output dtype; defaults to x_flat's.
    block_q: output positions per program (a power of two).
    num_warps, num_stages: Triton launch parameters.
    groups_per_program: row groups that one program runs in turn, over the
      same output positions.
    q_major: order the grid with output blocks on the fastest axis.
    values_by_row: see `values`.
    nhwc: write the (N, Ho, Wo, num_rows) output directly; its out_len must
      be `out_len`.
    interpret: run through the Pallas interpreter (CPU).

  Returns:
    y: (num_rows, out_len), or (N, Ho, Wo, num_rows) with `nhwc`.
  """
  if x_flat.ndim != 1:
    raise ValueError(f"x_flat must be 1-D, got shape {x_flat.shape}")
  if values_by_row:
    if groups.lane_start is None:
      raise ValueError("values_by_row needs row groups packed from nonzeros "
                       "grouped by row (CSR order)")
    nnz = int(groups.lane_len.sum())
    if values.shape != (nnz,):
      raise ValueError(f"values must have shape ({nnz},), got "
                       f"{values.shape}")
  elif values.shape != (groups.padded_entries,):
    raise ValueError(f"values must have shape ({groups.padded_entries},), "
                     f"got {values.shape}")
  if nhwc is not None:
    nhwc.check(out_len)
  if block_q & (block_q - 1):
    raise ValueError(f"block_q must be a power of two, got {block_q}")
  masked = groups.zeros_offset is None
  # Unmasked, every program reads whole blocks of block_q positions.
  read_len = out_len if masked else pl.cdiv(out_len, block_q) * block_q
  check_input_covers(x_flat.shape[0], groups.max_offset, read_len)
  num_q_blocks = pl.cdiv(out_len, block_q)
  # Compiled, the NHWC output is exactly the result; interpreted, a spare
  # region follows it (output_layout.store).
  spare_region = interpret
  if nhwc is None:
    out_size = (groups.num_rows + 1) * num_q_blocks * block_q
  else:
    out_size = nhwc.buffer_size(groups.num_rows, groups.rows_per_program *
                                block_q if spare_region else 0)
  check_int32(flat_input=x_flat.shape[0], output=out_size)
  out_dtype = jnp.dtype(out_dtype or x_flat.dtype)
  acc_dtype = accumulator_dtype(jnp.result_type(x_flat.dtype, values.dtype))
  num_programs = pl.cdiv(groups.num_groups, groups_per_program)
  spare = num_programs * groups_per_program - groups.num_groups
  # Spare groups have no rows and no steps: they store into the spare row.
  group_rows = np.pad(groups.group_rows,
                      (0, spare * groups.rows_per_program),
                      constant_values=-1)
  group_start = np.pad(groups.group_start, (0, spare))
  group_steps = np.pad(groups.group_steps, (0, spare))
  # Triton caps grid axis 1 (not 0): large outputs put their blocks first.
  q_major = q_major or num_q_blocks > MAX_GRID_AXIS
  grid = (num_programs, num_q_blocks)
  if q_major:
    grid = grid[::-1]
  if max(grid[1:]) > MAX_GRID_AXIS:
    raise ValueError(f"the grid {grid} exceeds Triton's limit of "
                     f"{MAX_GRID_AXIS} programs on axis 1; raise block_q")
  lane_tables = ()
  if values_by_row:
    lane_tables = (np.pad(groups.lane_start,
                          (0, spare * groups.rows_per_program)),
                   np.pad(groups.lane_len,
                          (0, spare * groups.rows_per_program)))
    if values.shape[0] == 0:  # every load is masked; nothing may be empty
      values = jnp.zeros((1,), values.dtype)
  tables, table_starts = pack_tables(group_rows, group_start, group_steps,
                                     groups.offsets, *lane_tables)
  table_starts += (None,) * (6 - len(table_starts))
  kernel = functools.partial(
      _direct_sparse_conv_kernel, table_starts=table_starts,
      rows_per_program=groups.rows_per_program, block_q=block_q,
      out_len=out_len,
      row_len=num_q_blocks * block_q, num_rows=groups.num_rows,
      offset_unit=groups.offset_unit, unroll=groups.step_multiple,
      groups_per_program=groups_per_program, q_major=q_major, masked=masked,
      relu=relu, acc_dtype=acc_dtype, nhwc=nhwc, spare_region=spare_region,
      fused_fma=not interpret and acc_dtype == jnp.float32,
      # Pairs need an even number of positions in each thread.
      packed_bf16=(groups.rows_per_program * block_q) % (64 * num_warps) == 0)
  kernel = with_optional_refs(kernel, (True, True, bias is not None, True,
                                      True))
  bias_args = () if bias is None else (bias,)
  y = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((out_size,), out_dtype),
      grid=grid,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="escort_direct_sparse_conv",
  )(jnp.asarray(tables), values, *bias_args, x_flat)
  if nhwc is not None:
    return nhwc.from_buffer(y, groups.num_rows)
  return y.reshape(groups.num_rows + 1, -1)[:groups.num_rows, :out_len]


def direct_sparse_conv_reference(x_flat: jax.Array, values: jax.Array,
                                 rows: np.ndarray, offsets: np.ndarray, *,
                                 num_rows: int, out_len: int,
                                 bias: jax.Array | None = None,
                                 relu: bool = False,
                                 out_dtype=None) -> jax.Array:
  """Plain-JAX reference, straight from the CSR form (no packing).

  Args:
    x_flat: (in_len,) flat input.
    values: (nnz,) weights in the order of `rows`/`offsets`.
    rows, offsets: (nnz,) destination row and source offset of each weight.

  Returns:
    y: (num_rows, out_len). Memory is O(nnz * out_len): for tests.
  """
  out_dtype = jnp.dtype(out_dtype or x_flat.dtype)
  acc_dtype = accumulator_dtype(jnp.result_type(x_flat.dtype, values.dtype))
  q = np.arange(out_len)
  slices = x_flat.astype(acc_dtype)[np.asarray(offsets)[:, None] + q[None, :]]
  contrib = values.astype(acc_dtype)[:, None] * slices
  y = jax.ops.segment_sum(contrib, np.asarray(rows, np.int32),
                          num_segments=num_rows)
  if bias is not None:
    y = y + bias.astype(acc_dtype)[:, None]
  if relu:
    y = jnp.where(y < 0, jnp.zeros((), y.dtype), y)
  return y.astype(out_dtype)
