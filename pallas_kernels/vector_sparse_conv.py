"""Vector-sparse direct convolution on tensor cores, and its reference.

A kernel is *vector-sparse* with width V when every block of V consecutive
output channels keeps the same kernel positions (c, r, s). On the stretched
flat input of escort_jax.conv_geometry each kept position is one source
offset, shared by the whole block, so for block b with kept columns j:

    y[b * V + v, q] = bias[b * V + v]
                      + sum_j values[b, j, v] * x_flat[offset[b, j] + q]

A tile of BQ output positions of one block is then a dense matrix product

    acc (BQ, V) += A (BQ, BK) @ W (BK, V),   A[q, j] = x_flat[offset_j + q]

over chunks of BK kept columns. Each column of A is BQ contiguous inputs, so
the gather is coalesced, and the product runs on the tensor cores (bf16/fp16
in, fp32 accumulate; fp32 inputs use full-precision dot, as lax HIGHEST).

Layout:
  x_flat:  (in_len,) the input, any float dtype, with a run of zeros at
           blocks.zeros_offset that padding columns read (unless they
           repeat kept columns: VectorBlocks.zeros_offset None).
  values:  (nnz,) the weights in the caller's (CSR) order, where block b's
           weights are a row-major (V, kept columns) matrix. The kernel
           loads (block_k, lanes) tiles of it directly, lanes = max(V, 16)
           because a tensor-core product is at least 16 wide; padding reads
           zero. (A separate gather pass would cost a launch per call.)
  bias:    (num_rows,) or None.
  y:       (num_rows, out_len), row-major; or, with `nhwc` given, the
           convolution's output in NHWC directly: position q is image
           q % N at wide row (q // N) // Wb, column (q // N) % Wb, and
           columns >= Wo are dropped (no separate transpose pass); or, with
           `framed`, the channel-major frame that a next layer reads
           (output_layout.FramedOutput, escort_jax.frames).

Lowering: a pallas_call with Triton compiler params (tensor cores through
Triton's dot), compiled on NVIDIA GPUs and run by the interpreter on the CPU.
The packing is numpy and runs once per (structure, input shape).
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

from pallas_kernels.direct_sparse_conv import accumulator_dtype
from pallas_kernels import output_layout
from pallas_kernels.output_layout import (MAX_GRID_AXIS, FramedOutput,
                                          NhwcOutput,
                                          check_input_covers, check_int32,
                                          with_optional_refs)
from pallas_kernels.static_tables import pack_tables

# Triton's dot needs every dimension to be at least 16.
MIN_DOT = 16
# Vector widths the kernel takes, widest first; below 8 the 16-wide product
# would be mostly padding.
VECTOR_WIDTHS = (64, 32, 16, 8)
MIN_VECTOR_WIDTH = VECTOR_WIDTHS[-1]


@dataclasses.dataclass(frozen=True, eq=False)
class VectorBlocks:
  """Packing of a vector-sparse row problem: blocks of V rows that share
  their source offsets, columns padded to a multiple of block_k.

  Attributes:
    num_rows: rows of the output (num_blocks * vector_width).
    vector_width: V, rows per block.
    block_k: columns per step of the kernel's loop (a multiple of 16).
    offsets: (num_blocks, padded_cols) int32 source offsets in units of
      offset_unit, in the caller's order; padding columns hold zeros_offset,
      or, without one, repeat the block's last kept offset.
    steps: (num_blocks,) int32: the steps of block_k columns each block runs.
    block_start: (num_blocks,) int32 where each block's weights begin in the
      value vector (row-major (V, block_cols) there, as in CSR).
    block_cols: (num_blocks,) int32 kept columns of each block.
    zeros_offset: where the caller puts a run of zeros (in elements) at least
      as long as the kernel's padded output rows; or None, where padding
      columns repeat a kept column (their weights are zero, and the input
      they read is read with a real weight by the same outputs, so that
      they add no infinity or NaN that was not there).
    offset_unit: every offset (and zeros_offset) is a multiple of it; the
      kernel multiplies by the static number so that Triton sees aligned
      loads.
    max_offset: the largest offset read, in elements.
  """

  num_rows: int
  vector_width: int
  block_k: int
  offsets: np.ndarray
  steps: np.ndarray
  block_start: np.ndarray
  block_cols: np.ndarray
  zeros_offset: int | None
  offset_unit: int
  max_offset: int

  @property
  def num_blocks(self) -> int:
    return self.num_rows // self.vector_width

  @property
  def padded_cols(self) -> int:
    return self.offsets.shape[1]

  @property
  def lanes(self) -> int:
    """Width of the tensor-core product: V, at least 16."""
    return max(self.vector_width, MIN_DOT)

  @property
  def value_alignment(self) -> int:
    """The largest of 8, 4, 2, 1 that divides every block's kept columns
    (and so, with V >= 8, every block_start): row v of a block's weight tile
    then starts at a multiple of it, and the kernel tells Triton so, which
    lets it load 8 weights (16 bytes of bf16) at once instead of one."""
    return int(np.gcd.reduce(np.concatenate([[8], self.block_cols]),
                             dtype=np.int64))

  @property
  def kept_columns(self) -> int:
    """Kept columns over all blocks (each one V weights)."""
    return int(self.block_cols.sum())

  @property
  def sources(self) -> np.ndarray:
    """(num_blocks, padded_cols, V) int32 index into the value vector of
    each weight, -1 for padding: block_start + v * block_cols + j (what the
    kernel computes; materialised for the reference and tests)."""
    j = np.arange(self.padded_cols)[None, :, None]
    v = np.arange(self.vector_width)[None, None, :]
    start = self.block_start[:, None, None].astype(np.int64)
    cols = self.block_cols[:, None, None].astype(np.int64)
    return np.where(j < cols, start + v * cols + j, -1).astype(np.int32)

  @property
  def lane_sources(self) -> np.ndarray:
    """(num_blocks * padded_cols, lanes) int32: sources widened to the
    product's lanes, -1 for padding."""
    src = np.pad(self.sources,
                 ((0, 0), (0, 0), (0, self.lanes - self.vector_width)),
                 constant_values=-1)
    return src.reshape(-1, self.lanes)

  def gather_values(self, values: jax.Array) -> jax.Array:
    """(nnz,) values in CSR order -> (num_blocks * padded_cols, lanes), zero
    at padding: the weight tiles that the kernel loads straight from the CSR
    values, materialised (for the plain-JAX reference)."""
    padded = jnp.concatenate([values, jnp.zeros((1,), values.dtype)])
    src = self.lane_sources
    return padded[np.where(src >= 0, src, values.shape[0])]


def unshared_block(rows: np.ndarray, cols: np.ndarray, num_rows: int,
                   v: int) -> tuple[int, int] | None:
  """Where blocks of v consecutive rows stop sharing their columns.

  rows: (nnz,) sorted (CSR order); cols: (nnz,) each entry's column (or
  source offset), in a fixed order within a row. Returns None when every
  block's rows keep the same columns in the same order; else (block, row):
  the first block that does not and, within it, the first row that differs
  from the block's first row (row is -1 when the counts already differ).
  v must divide num_rows.
  """
  counts = np.bincount(rows, minlength=num_rows).reshape(-1, v)
  starts = np.concatenate([[0], np.cumsum(counts.reshape(-1))])
  for b in range(num_rows // v):
    if np.any(counts[b] != counts[b, 0]):
      return b, -1
    seg = np.asarray(cols[starts[b * v]:starts[(b + 1) * v]]).reshape(
        v, counts[b, 0])
    differs = np.any(seg != seg[:1], axis=1)
    if differs.any():
      return b, int(np.argmax(differs))
  return None


def vector_width_of(rows: np.ndarray, cols: np.ndarray, num_rows: int,
                    candidates=VECTOR_WIDTHS) -> int:
  """The largest V in `candidates` for which the row problem is vector-sparse
  (blocks of V consecutive rows with identical column lists), else 1.

  rows must be sorted (CSR order); cols within a row in a fixed order.
  """
  for v in candidates:
    if num_rows % v == 0 and unshared_block(rows, cols, num_rows, v) is None:
      return v
  return 1


def pack_vector_blocks(rows: np.ndarray, offsets: np.ndarray, num_rows: int,
                       vector_width: int, block_k: int,
                       zeros_offset: int | None) -> VectorBlocks:
  """Packs a vector-sparse row problem (CSR order: rows sorted).

  Args:
    rows, offsets: (nnz,) destination row and source offset (elements) of
      each weight, grouped by row.
    num_rows: output rows; a multiple of vector_width.
    vector_width: V.
    block_k: a multiple of 16.
    zeros_offset: start of the caller's zero run (elements), or None: no
      zero run, padding columns repeat the block's last kept column.

  Raises:
    ValueError: if a block's rows do not share their offsets.
  """
  v = int(vector_width)
  if block_k % MIN_DOT:
    raise ValueError(f"block_k must be a multiple of {MIN_DOT}, got {block_k}")
  if num_rows % v:
    raise ValueError(f"{num_rows} rows are not a whole number of blocks of "
                     f"{v}")
  rows = np.asarray(rows, np.int64)
  offsets = np.asarray(offsets, np.int64)
  bad = unshared_block(rows, offsets, num_rows, v)
  if bad is not None:
    what = ("keep different numbers of weights" if bad[1] < 0 else
            "keep different positions")
    raise ValueError(f"the structure is not vector-sparse with V={v}: rows "
                     f"{bad[0] * v}..{bad[0] * v + v - 1} {what}")
  counts = np.bincount(rows, minlength=num_rows).reshape(-1, v)
  num_blocks = num_rows // v
  per_block = counts[:, 0]
  steps = -(-per_block // block_k)
  padded_cols = max(1, int(steps.max(initial=0))) * block_k
  starts = np.concatenate([[0], np.cumsum(counts.reshape(-1))])
  block_offsets = np.full((num_blocks, padded_cols), zeros_offset or 0,
                          np.int64)
  for b in range(num_blocks):
    n = int(per_block[b])
    if n == 0:
      continue  # no steps: nothing is read
    if zeros_offset is None:
      block_offsets[b, n:] = offsets[starts[b * v] + n - 1]
    # The block's first row, in the caller's order, so that the weights of
    # a (block_k, V) tile sit at start + v * n + j and the kernel loads them
    # with no index array. (In CSR order, offsets ascend within a phase plane
    # anyway.)
    block_offsets[b, :n] = offsets[starts[b * v]:starts[b * v] + n]
  unit = int(np.gcd.reduce(np.concatenate(
      [block_offsets.reshape(-1), [zeros_offset or 0]])))
  unit = max(unit, 1)
  return VectorBlocks(
      num_rows=num_rows, vector_width=v, block_k=block_k,
      offsets=(block_offsets // unit).astype(np.int32),
      steps=steps.astype(np.int32),
      block_start=starts[::v][:num_blocks].astype(np.int32),
      block_cols=per_block.astype(np.int32),
      zeros_offset=None if zeros_offset is None else int(zeros_offset),
      offset_unit=unit,
      max_offset=int(block_offsets.max(initial=0)))


def _vector_sparse_conv_kernel(tables_ref, values_ref, bias_ref, x_ref, y_ref,
                               *, table_starts, block_q, block_k, lanes,
                               vector_width, num_rows, padded_cols, row_len,
                               offset_unit, value_alignment, relu, precision,
                               acc_dtype, nhwc, framed, spare_region,
                               prefetch):
  steps_at, start_at, cols_at, offsets_at = table_starts
  block = pl.program_id(0)
  q = pl.program_id(1) * block_q + jnp.arange(block_q, dtype=jnp.int32)
  first = offsets_at + block * padded_cols
  start = tables_ref[start_at + block]
  cols = tables_ref[cols_at + block]
  if value_alignment > 1:
    start = pl.multiple_of(start, value_alignment)
    cols = pl.multiple_of(cols, value_alignment)
  lane = jnp.arange(lanes, dtype=jnp.int32)
  lane_ok = (lane < vector_width)[None, :]

  num_steps = tables_ref[steps_at + block]

  def load_offsets(t):
    return tables_ref[pl.ds(first + t * block_k, block_k)] * offset_unit

  def load_tiles(t, offsets):
    # (BQ, BK): column j is BQ contiguous inputs from offset j.
    a = plgpu.load(x_ref.at[q[:, None] + offsets[None, :]])
    j = t * block_k + jnp.arange(block_k, dtype=jnp.int32)
    w = plgpu.load(values_ref.at[start + lane[None, :] * cols + j[:, None]],
                   mask=(j < cols)[:, None] & lane_ok, other=0.0)
    return a, w

  def product(a, w):
    return lax.dot_general(a, w, (((1,), (0,)), ((), ())),
                           precision=precision,
                           preferred_element_type=acc_dtype)

  acc = jnp.zeros((block_q, lanes), acc_dtype)
  if prefetch:
    # The next step's offsets are loaded a step ahead, so that the gather's
    # addresses do not wait on a table load. The load past the loop's end
    # stays on the block's last step of table (a block has at least one,
    # even with nothing kept).
    last = jnp.maximum(num_steps - 1, 0)

    def step(t, carry):
      acc, offsets = carry
      nxt = load_offsets(jnp.minimum(t + 1, last))
      return acc + product(*load_tiles(t, offsets)), nxt
    acc, _ = lax.fori_loop(0, num_steps, step, (acc, load_offsets(0)))
  else:
    def step(t, acc):
      return acc + product(*load_tiles(t, load_offsets(t)))
    acc = lax.fori_loop(0, num_steps, step, acc)
  if lanes == vector_width:
    rows = block * vector_width + lane  # contiguous: vector stores
  else:
    rows = block * vector_width + jnp.minimum(lane, vector_width - 1)
  if bias_ref is not None:
    acc = acc + plgpu.load(bias_ref.at[rows]).astype(acc_dtype)[None, :]
  if relu:
    # Not jnp.maximum: Triton lowers it to a max that drops NaN.
    acc = jnp.where(acc < 0, jnp.zeros((), acc_dtype), acc)
  if framed is not None:
    _store_framed(y_ref, q, rows, lane, acc, framed=framed,
                  block_q=block_q, vector_width=vector_width,
                  num_rows=num_rows, num_q_tiles=row_len // block_q,
                  spare_region=spare_region)
    return
  if nhwc is None:
    # Every lane stores, unmasked: lanes past V (only when V < 16) write a
    # spare row.
    out_rows = jnp.where(lane_ok[0], rows, num_rows)
    out_idx = q[:, None] + out_rows[None, :] * row_len
    plgpu.store(y_ref.at[out_idx], acc.astype(y_ref.dtype))
    return
  pixel, q_ok = nhwc.pixel_of(q)
  ok = q_ok[:, None]
  if lanes != vector_width:
    ok = ok & lane_ok
  # Masked lanes keep their (unused) addresses: a select would hide from
  # Triton that a pixel's V channels are contiguous.
  output_layout.store(y_ref, pixel[:, None] * num_rows + rows[None, :], acc,
                      ok, spare_base=nhwc.pixels * num_rows,
                      spare_region=spare_region)


def _store_framed(y_ref, q, rows, lane, acc, *, framed: FramedOutput,
                  block_q, vector_width, num_rows, num_q_tiles,
                  spare_region):
  """Writes a program's tile into the frame, and its share of the frame's
  zeros: zeros wherever the frame has no data. The wide columns of the tile
  fall on the frame's margins; the plane's head (the top margin) and tail
  (the bottom margin past the last tile) are cut into chunks of block_q
  positions, dealt out over the block's programs; the last block also
  writes the zero planes after the last channel over the same ranges. (So
  the grid is the NHWC store's: programs that only store zeros would make a
  second wave of programs on small grids, 1.2-1.4x slower.)"""
  block_is_last = pl.program_id(0) == num_rows // vector_width - 1
  row_ok = lane < vector_width
  lanes = lane.shape[0]
  spare_base = framed.buffer_size(num_rows, 0)

  def put(dest, value, end):
    in_plane = (dest >= 0) & (dest < end)
    output_layout.store(
        y_ref, dest[:, None] + rows[None, :] * framed.plane_len, value,
        in_plane[:, None] & row_ok[None, :], spare_base=spare_base,
        spare_region=spare_region)

    # Only the last block's programs, and under a branch: a masked store of
    # every program would still cost each of them its instructions.
    @pl.when(block_is_last)
    def _():
      for first in range(0, framed.extra_planes, lanes):
        planes_ok = lane < min(lanes, framed.extra_planes - first)
        output_layout.store(
            y_ref, dest[:, None] + (num_rows + first + lane)[None, :]
            * framed.plane_len, jnp.zeros_like(value),
            in_plane[:, None] & planes_ok[None, :], spare_base=spare_base,
            spare_region=spare_region)

  put(q + framed.shift,
      jnp.where(framed.is_real(q)[:, None], acc, jnp.zeros((), acc.dtype)),
      framed.plane_len)
  head = framed.head_tiles(block_q)
  tail_start = framed.shift + num_q_tiles * block_q
  chunks = head + max(framed.plane_len - tail_start + block_q - 1,
                      0) // block_q
  offsets = jnp.arange(block_q, dtype=jnp.int32)
  zeros = jnp.zeros_like(acc)
  tile = pl.program_id(1)  # outside the loop: the interpreter needs it so

  def chunk(i, carry):
    e = tile + i * num_q_tiles
    in_head = (e < head).astype(jnp.int32)
    start = in_head * (e * block_q) + (1 - in_head) * (
        tail_start + (e - head) * block_q)
    end = in_head * framed.shift + (1 - in_head) * framed.plane_len
    put(start + offsets, zeros, end)
    return carry

  lax.fori_loop(0, (chunks - tile + num_q_tiles - 1)
                // num_q_tiles, chunk, 0)


def vector_sparse_conv(x_flat: jax.Array, values: jax.Array,
                       blocks: VectorBlocks, *, out_len: int,
                       bias: jax.Array | None = None, relu: bool = False,
                       out_dtype=None, block_q: int = 128,
                       num_warps: int = 4, num_stages: int = 2,
                       prefetch: int = 0,
                       nhwc: NhwcOutput | None = None,
                       framed: FramedOutput | None = None,
                       interpret: bool = False) -> jax.Array:
  """Runs the vector-sparse convolution kernel.

  Args:
    x_flat: (in_len,) flat input; every offset + q for q below out_len
      rounded up to block_q must lie inside it, and (unless
      blocks.zeros_offset is None) a run of that many zeros must start at
      blocks.zeros_offset.
    values: (nnz,) weights in CSR order (blocks.sources shows where each
      tile entry comes from).
    blocks: the static packing.
    out_len: output positions per row.
    bias: optional (num_rows,) bias, added before the activation.
    relu: apply max(., 0) (NaN stays NaN).
    out_dtype: output dtype; defaults to x_flat's.
    block_q: output positions per program (a power of two, >= 16).
    num_warps, num_stages: Triton launch parameters.
    prefetch: 1 loads each step's source offsets during the step before
      (faster on small grids, where few warps hide the table load), 0 leaves
      the loads to Triton's pipeliner. (Carrying the next step's input and
      weight tiles as well was slower: benchmarks/NOTES.md, "thirteenth".)
    nhwc: write (N, Ho, Wo, num_rows) instead of wide rows; its out_len must
      equal `out_len`.
    framed: write the frame (num_rows + extra_planes, Ha, Wb, N) that a
      next layer reads (output_layout.FramedOutput; its out_len must equal
      `out_len`).
    interpret: run through the Pallas interpreter (CPU).

  Returns:
    y: (num_rows, out_len), (N, Ho, Wo, num_rows) with `nhwc`, or
    (num_rows + extra_planes, Ha, Wb, N) with `framed`.
  """
  if x_flat.ndim != 1:
    raise ValueError(f"x_flat must be 1-D, got shape {x_flat.shape}")
  if nhwc is not None and framed is not None:
    raise ValueError("give nhwc or framed, not both")
  if nhwc is not None:
    nhwc.check(out_len)
  if framed is not None:
    framed.check(out_len)
  nnz = blocks.kept_columns * blocks.vector_width
  if values.shape != (nnz,):
    raise ValueError(f"values must have shape ({nnz},), got {values.shape}")
  if prefetch not in (0, 1):
    raise ValueError(f"prefetch must be 0 or 1, got {prefetch!r}")
  if block_q & (block_q - 1) or block_q < MIN_DOT:
    raise ValueError(f"block_q must be a power of two >= {MIN_DOT}, got "
                     f"{block_q}")
  num_q_blocks = pl.cdiv(out_len, block_q)
  read_len = num_q_blocks * block_q
  check_input_covers(x_flat.shape[0],
                     max(blocks.max_offset, blocks.zeros_offset or 0),
                     read_len)
  # Compiled, the NHWC output is exactly the result (no copy to slice it
  # out); interpreted, a spare region follows it (output_layout.store).
  spare_region = interpret
  spare = block_q * blocks.lanes if spare_region else 0
  grid = (blocks.num_blocks, num_q_blocks)
  if framed is not None:
    out_size = framed.buffer_size(blocks.num_rows, spare)
  elif nhwc is None:
    out_size = (blocks.num_rows + 1) * read_len
  else:
    out_size = nhwc.buffer_size(blocks.num_rows, spare)
  check_int32(flat_input=x_flat.shape[0], output=out_size)
  if grid[1] > MAX_GRID_AXIS:
    raise ValueError(f"{grid[1]} output blocks exceed Triton's grid "
                     f"limit of {MAX_GRID_AXIS}; raise block_q")
  out_dtype = jnp.dtype(out_dtype or x_flat.dtype)
  in_dtype = jnp.result_type(x_flat.dtype, values.dtype)
  acc_dtype = accumulator_dtype(in_dtype)
  # fp32 inputs must not silently drop to TF32: lax HIGHEST is the contract.
  precision = (lax.Precision.HIGHEST if jnp.dtype(in_dtype).itemsize >= 4
               else lax.Precision.DEFAULT)
  tables, table_starts = pack_tables(blocks.steps, blocks.block_start,
                                     blocks.block_cols, blocks.offsets)
  kernel = functools.partial(
      _vector_sparse_conv_kernel, table_starts=table_starts,
      block_q=block_q, block_k=blocks.block_k,
      lanes=blocks.lanes, vector_width=blocks.vector_width,
      num_rows=blocks.num_rows, padded_cols=blocks.padded_cols,
      row_len=read_len,
      offset_unit=blocks.offset_unit,
      value_alignment=blocks.value_alignment, relu=relu, precision=precision,
      acc_dtype=acc_dtype, nhwc=nhwc, framed=framed,
      spare_region=spare_region, prefetch=prefetch)
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
      name="escort_vector_sparse_conv",
  )(jnp.asarray(tables),
    # Every load is masked; one zero stands in when nothing is kept.
    values.astype(in_dtype) if nnz else jnp.zeros((1,), in_dtype),
    *bias_args, x_flat.astype(in_dtype))
  if nhwc is not None:
    return nhwc.from_buffer(y, blocks.num_rows)
  if framed is not None:
    return framed.from_buffer(y, blocks.num_rows)
  return y.reshape(blocks.num_rows + 1, read_len)[:blocks.num_rows, :out_len]


def gathered_columns(x_flat: jax.Array, blocks: VectorBlocks,
                     out_len: int) -> jax.Array:
  """(num_blocks, out_len, padded_cols): A[b, q, j] = x_flat[offset[b, j] +
  q], the operand that the kernels gather tile by tile, materialised (for
  the references)."""
  offs = blocks.offsets.astype(np.int64) * blocks.offset_unit
  q = np.arange(out_len)
  return x_flat[offs[:, None, :] + q[None, :, None]]


def vector_sparse_conv_reference(x_flat: jax.Array, values: jax.Array,
                                 blocks: VectorBlocks, *, out_len: int,
                                 bias: jax.Array | None = None,
                                 relu: bool = False,
                                 out_dtype=None,
                                 nhwc: NhwcOutput | None = None,
                                 framed: FramedOutput | None = None
                                 ) -> jax.Array:
  """Plain-JAX twin with the kernel's tiling: the same packed offsets and
  value tiles, one gathered (out_len, padded_cols) matrix product per block.

  values: (nnz,) as for vector_sparse_conv.

  Returns y: (num_rows, out_len), (N, Ho, Wo, num_rows) with `nhwc`, or
  the frame (num_rows + extra_planes, Ha, Wb, N) with `framed`.
  Memory O(num_blocks * padded_cols * out_len): for tests.
  """
  out_dtype = jnp.dtype(out_dtype or x_flat.dtype)
  in_dtype = jnp.result_type(x_flat.dtype, values.dtype)
  acc_dtype = accumulator_dtype(in_dtype)
  v = blocks.vector_width
  a = gathered_columns(x_flat.astype(acc_dtype), blocks, out_len)
  # Padding columns are structural zeros, whatever lies at zeros_offset.
  real = (blocks.sources[:, :, 0] >= 0)[:, None, :]
  a = jnp.where(real, a, jnp.zeros((), acc_dtype))
  w = blocks.gather_values(values.astype(acc_dtype)).reshape(
      blocks.num_blocks, blocks.padded_cols, blocks.lanes)[:, :, :v]
  y = jnp.einsum("bqj,bjv->bvq", a, w,
                 precision=lax.Precision.HIGHEST).reshape(-1, out_len)
  if bias is not None:
    y = y + bias.astype(acc_dtype)[:, None]
  if relu:
    y = jnp.where(y < 0, jnp.zeros((), y.dtype), y)
  if nhwc is not None:
    y = nhwc.from_wide(y)
  if framed is not None:
    y = framed.from_wide(y)
  return y.astype(out_dtype)
