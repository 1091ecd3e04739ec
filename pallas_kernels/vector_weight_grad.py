"""Weight gradient of the vector-sparse convolution on tensor cores, and its
reference.

For the vector-sparse row problem of vector_sparse_conv (blocks of V rows
sharing their kept columns j, source offsets offset[b, j]),

    y[b * V + v, q] = sum_j w[b, v, j] * x_flat[offset[b, j] + q],

the gradient of a loss with respect to the weights is, per block,

    dw[b, v, j] = sum_{q valid} dy[b * V + v, q] * x_flat[offset[b, j] + q]

a matrix product dW_b (V, cols) = dY_b (V, Q) @ A_b (Q, cols) with the same
gathered operand A_b[q, j] = x_flat[offset[b, j] + q] as the forward. Each
program computes one (block, block_k columns) tile over a span of positions
on the tensor cores (bf16/fp16 in, fp32 accumulate; fp32 inputs at full
precision, as lax HIGHEST), and writes a partial sum; the partials are added
in a fixed order afterwards, so that few blocks still fill the GPU and the
result does not depend on the launch.

Position q is valid when q < out_len and (q mod valid_period) < valid_len
(the stretched layout's cropped columns, as in sampled_dense_dense): only
valid positions reach dw, whatever the input holds elsewhere.

Layout:
  dy: (num_rows, out_len) wide output rows; x_flat: (in_len,).
  Returns dw: (nnz,) in CSR order (blocks.sources), float32 (float64 for
  float64 inputs).

Lowering: a pallas_call with Triton compiler params, compiled on NVIDIA
GPUs and run by the interpreter on the CPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.direct_sparse_conv import accumulator_dtype
from pallas_kernels.output_layout import (MAX_GRID_AXIS, check_input_covers,
                                          check_int32, sum_in_order)
from pallas_kernels.vector_sparse_conv import (MIN_DOT, VectorBlocks,
                                               gathered_columns)


def _vector_weight_grad_kernel(offsets_ref, dy_ref, x_ref, dw_ref, *,
                               block_q, block_k, lanes, vector_width,
                               padded_cols, steps_per_split, out_len,
                               valid_period, valid_len, offset_unit,
                               precision, acc_dtype):
  block = pl.program_id(0)
  col = pl.program_id(1) * block_k
  split = pl.program_id(2)
  offsets = offsets_ref[pl.ds(block * padded_cols + col, block_k)] * (
      offset_unit)
  lane = jnp.arange(lanes, dtype=jnp.int32)
  lane_ok = (lane < vector_width)[:, None]
  # Lanes past V (V < 16) read row V - 1 of the block, masked to zero.
  rows = block * vector_width + jnp.minimum(lane, vector_width - 1)
  q0 = split * steps_per_split * block_q

  def step(t, acc):
    q = q0 + t * block_q + jnp.arange(block_q, dtype=jnp.int32)
    valid = (q < out_len) & (q % valid_period < valid_len)
    dy = plgpu.load(dy_ref.at[rows[:, None] * out_len + q[None, :]],
                    mask=lane_ok & valid[None, :], other=0.0)
    # (BQ, BK): column j is BQ contiguous inputs from offset j; masked so
    # that an inf or NaN only cropped outputs read cannot reach dw.
    a = plgpu.load(x_ref.at[q[:, None] + offsets[None, :]],
                   mask=valid[:, None], other=0.0)
    return acc + lax.dot_general(
        dy.astype(a.dtype), a, (((1,), (0,)), ((), ())),
        precision=precision, preferred_element_type=acc_dtype)

  acc = lax.fori_loop(0, steps_per_split, step,
                      jnp.zeros((lanes, block_k), acc_dtype))
  out = ((split * pl.num_programs(0) + block) * lanes + lane[:, None]) * (
      padded_cols) + col + jnp.arange(block_k, dtype=jnp.int32)[None, :]
  plgpu.store(dw_ref.at[out], acc)


def csr_positions(blocks: VectorBlocks) -> np.ndarray:
  """(nnz,) int64: where each CSR weight sits in the flat (num_blocks,
  lanes, padded_cols) gradient tile array."""
  src = blocks.sources  # (num_blocks, padded_cols, V)
  b, j, v = np.nonzero(src >= 0)
  pos = np.empty(int((src >= 0).sum()), np.int64)
  pos[src[b, j, v]] = (b * blocks.lanes + v) * blocks.padded_cols + j
  return pos


def default_splits(blocks: VectorBlocks, steps: int,
                   min_programs: int = 528) -> int:
  """Position spans per (block, column tile): enough programs to fill an
  H100 several times over (4 per SM), each at least 8 steps long."""
  tiles = blocks.num_blocks * (blocks.padded_cols // blocks.block_k)
  want = -(-min_programs // max(tiles, 1))
  return int(max(1, min(want, steps // 8, MAX_GRID_AXIS)))


def vector_weight_grad(dy: jax.Array, x_flat: jax.Array,
                       blocks: VectorBlocks, *, valid_period: int,
                       valid_len: int, block_q: int = 128,
                       splits: int | None = None, num_warps: int = 4,
                       num_stages: int = 2,
                       interpret: bool = False) -> jax.Array:
  """The weights' gradient of vector_sparse_conv, on tensor cores.

  Args:
    dy: (num_rows, out_len) cotangent of the wide output rows.
    x_flat: (in_len,) the forward's flat input; every offset (and
      blocks.zeros_offset) plus out_len must lie inside it.
    blocks: the forward's packing (its block_k is the column tile).
    valid_period, valid_len: which positions are real outputs (above).
    block_q: positions per step (a power of two, >= 16).
    splits: position spans per tile, summed afterwards (default: enough
      programs to fill the GPU).
    num_warps, num_stages: Triton launch parameters.
    interpret: run through the Pallas interpreter (CPU).

  Returns:
    dw: (nnz,) in CSR order, in the accumulator dtype.
  """
  if dy.ndim != 2 or dy.shape[0] != blocks.num_rows:
    raise ValueError(f"dy must have shape ({blocks.num_rows}, out_len), got "
                     f"{dy.shape}")
  if x_flat.ndim != 1:
    raise ValueError(f"x_flat must be 1-D, got shape {x_flat.shape}")
  if block_q & (block_q - 1) or block_q < MIN_DOT:
    raise ValueError(f"block_q must be a power of two >= {MIN_DOT}, got "
                     f"{block_q}")
  out_len = dy.shape[1]
  steps = max(1, pl.cdiv(out_len, block_q))
  splits = default_splits(blocks, steps) if splits is None else int(splits)
  if not 1 <= splits <= MAX_GRID_AXIS:
    raise ValueError(f"splits must be in [1, {MAX_GRID_AXIS}], got {splits}")
  steps_per_split = pl.cdiv(steps, splits)
  # Positions from out_len on are masked (no memory access), so the reads
  # end at the largest offset plus out_len.
  check_input_covers(x_flat.shape[0],
                     max(blocks.max_offset, blocks.zeros_offset), out_len)
  lanes, cols = blocks.lanes, blocks.padded_cols
  tiles = cols // blocks.block_k
  span = splits * steps_per_split * block_q  # positions the index math spans
  check_int32(flat_input=x_flat.shape[0] + span, cotangent=dy.size + span,
              output=splits * blocks.num_blocks * lanes * cols)
  if tiles > MAX_GRID_AXIS:
    raise ValueError(f"{tiles} column tiles exceed Triton's grid limit of "
                     f"{MAX_GRID_AXIS}")
  in_dtype = jnp.result_type(x_flat.dtype, dy.dtype)
  acc_dtype = accumulator_dtype(in_dtype)
  precision = (lax.Precision.HIGHEST if jnp.dtype(in_dtype).itemsize >= 4
               else lax.Precision.DEFAULT)
  kernel = functools.partial(
      _vector_weight_grad_kernel, block_q=block_q, block_k=blocks.block_k,
      lanes=lanes, vector_width=blocks.vector_width, padded_cols=cols,
      steps_per_split=steps_per_split, out_len=out_len,
      valid_period=valid_period, valid_len=valid_len,
      offset_unit=blocks.offset_unit, precision=precision,
      acc_dtype=acc_dtype)
  parts = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct(
          (splits * blocks.num_blocks * lanes * cols,), acc_dtype),
      grid=(blocks.num_blocks, tiles, splits),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps,
                                           num_stages=num_stages),
      interpret=interpret,
      name="escort_vector_weight_grad",
  )(jnp.asarray(blocks.offsets.reshape(-1)),
    dy.astype(in_dtype).reshape(-1), x_flat.astype(in_dtype))
  dw = sum_in_order(parts.reshape(splits, -1), axis=0)
  return dw[jnp.asarray(csr_positions(blocks))]


def vector_weight_grad_reference(dy: jax.Array, x_flat: jax.Array,
                                 blocks: VectorBlocks, *, valid_period: int,
                                 valid_len: int) -> jax.Array:
  """Plain-JAX twin with the kernel's tiling: one gathered (Q, padded_cols)
  operand and one matrix product per block. Memory O(num_blocks *
  padded_cols * out_len): for tests."""
  acc_dtype = accumulator_dtype(jnp.result_type(x_flat.dtype, dy.dtype))
  out_len = dy.shape[1]
  q = np.arange(out_len)
  valid = (q % valid_period) < valid_len
  a = gathered_columns(x_flat.astype(acc_dtype), blocks, out_len)
  a = jnp.where(valid[None, :, None], a, jnp.zeros((), acc_dtype))
  d = jnp.where(valid[None, :], dy.astype(acc_dtype),
                jnp.zeros((), acc_dtype)).reshape(
                    blocks.num_blocks, blocks.vector_width, out_len)
  tiles = jnp.einsum("bvq,bqj->bvj", d, a, precision=lax.Precision.HIGHEST)
  tiles = jnp.pad(tiles, ((0, 0), (0, blocks.lanes - blocks.vector_width),
                          (0, 0)))
  return tiles.reshape(-1)[jnp.asarray(csr_positions(blocks))]
