"""Sampled dense-dense product: the gradient of direct sparse convolution with
respect to its kept weights, as a Pallas kernel, and its reference.

For the row problem of direct_sparse_conv,

    y[k, q] = sum_{j in row k} w_j * x_flat[offset_j + q],

the gradient of a loss with respect to weight j is a dot product of two
contiguous slices, evaluated only at the nonzero positions:

    dw_j = sum_{q valid} dy[row_j, q] * x_flat[offset_j + q].

Position q is valid when (q mod valid_period) < valid_len. The op layer uses
this to skip the "wide" columns that the stretched layout computes and then
crops, so an input value that only those columns read cannot reach dw.

Layout:
  dy: (num_rows, out_len); x_flat: (in_len,); rows, offsets: (nnz,) int32.
  Returns dw: (nnz,) in float32 (float64 for float64 inputs).

Programs tile (nonzeros x output positions); each accumulates a
(block_j, block_q) tile of products over its span of positions, sums it
over the positions once, and writes that partial sum; the partials are added
afterwards, so that layers with few nonzeros still fill the GPU.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.direct_sparse_conv import accumulator_dtype, multiply_add
from pallas_kernels.output_layout import check_input_covers


def _sddmm_kernel(rows_ref, offsets_ref, dy_ref, x_ref, dw_ref, *, block_j,
                  block_q, steps_per_split, nnz, padded_nnz, out_len,
                  valid_period, valid_len, acc_dtype, fused_fma):
  j_block = pl.program_id(0)
  split = pl.program_id(1)
  j = j_block * block_j + jnp.arange(block_j, dtype=jnp.int32)
  j_ok = j < nnz
  rows = plgpu.load(rows_ref.at[j], mask=j_ok, other=0)
  offsets = plgpu.load(offsets_ref.at[j], mask=j_ok, other=0)
  q0 = split * steps_per_split * block_q

  def step(t, acc):
    q = q0 + t * block_q + jnp.arange(block_q, dtype=jnp.int32)
    q_ok = (q < out_len) & (q % valid_period < valid_len)
    live = j_ok[:, None] & q_ok[None, :]
    dy = plgpu.load(dy_ref.at[rows[:, None] * out_len + q[None, :]],
                    mask=live, other=0.0)
    xs = plgpu.load(x_ref.at[offsets[:, None] + q[None, :]], mask=live,
                    other=0.0)
    return multiply_add(dy.astype(acc_dtype), xs, acc, fused=fused_fma)

  # One sum over the positions at the end: a sum per step costs a
  # cross-lane reduction every step (1.0-1.45x slower at batch 1, 1.0-1.25x
  # at batch 32; benchmarks/results/*T0121*-sampled-dense-dense-tile.json).
  acc = lax.fori_loop(0, steps_per_split, step,
                      jnp.zeros((block_j, block_q), acc_dtype))
  plgpu.store(dw_ref.at[split * padded_nnz + j], jnp.sum(acc, axis=1),
              mask=j_ok)


def sampled_dense_dense(dy: jax.Array, x_flat: jax.Array, rows: np.ndarray,
                        offsets: np.ndarray, *, valid_period: int = 1,
                        valid_len: int = 1, block_j: int = 16,
                        block_q: int = 128, target_programs: int = 2048,
                        num_warps: int = 4,
                        interpret: bool = False) -> jax.Array:
  """dw_j = sum over valid q of dy[rows_j, q] * x_flat[offsets_j + q].

  Args:
    dy: (num_rows, out_len) output cotangent.
    x_flat: (in_len,) flat input of the forward pass.
    rows, offsets: (nnz,) static row and source offset of each weight.
    valid_period, valid_len: position q counts when q % valid_period <
      valid_len.
    block_j, block_q: tile of (weights, positions) per step; powers of two.
    target_programs: splits the positions so that about this many programs
      run.
    interpret: run through the Pallas interpreter (CPU).

  Returns:
    dw: (nnz,) accumulator dtype (float32, or float64 for float64 inputs).
  """
  num_rows, out_len = dy.shape
  nnz = int(np.shape(rows)[0])
  acc_dtype = accumulator_dtype(jnp.result_type(dy.dtype, x_flat.dtype))
  if nnz == 0:
    return jnp.zeros((0,), acc_dtype)
  check_input_covers(x_flat.shape[0], int(np.max(offsets)), out_len)
  if int(np.max(rows)) >= num_rows:
    raise ValueError("a row index exceeds the rows of dy")
  num_j_blocks = pl.cdiv(nnz, block_j)
  q_steps = pl.cdiv(out_len, block_q)
  splits = int(min(q_steps, max(1, target_programs // num_j_blocks), 65535))
  steps_per_split = pl.cdiv(q_steps, splits)
  splits = pl.cdiv(q_steps, steps_per_split)
  padded = num_j_blocks * block_j
  kernel = functools.partial(
      _sddmm_kernel, block_j=block_j, block_q=block_q,
      steps_per_split=steps_per_split, nnz=nnz, padded_nnz=padded,
      out_len=out_len,
      valid_period=valid_period, valid_len=valid_len, acc_dtype=acc_dtype,
      fused_fma=not interpret and acc_dtype == jnp.float32)
  partial_sums = pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((splits * padded,), acc_dtype),
      grid=(num_j_blocks, splits),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name="escort_sampled_dense_dense",
  )(jnp.asarray(rows, jnp.int32), jnp.asarray(offsets, jnp.int32),
    dy.reshape(-1), x_flat)
  return partial_sums.reshape(splits, padded).sum(axis=0)[:nnz]


def sampled_dense_dense_reference(dy: jax.Array, x_flat: jax.Array,
                                  rows: np.ndarray, offsets: np.ndarray, *,
                                  valid_period: int = 1,
                                  valid_len: int = 1) -> jax.Array:
  """Plain-JAX reference of `sampled_dense_dense`; O(nnz * out_len) memory."""
  num_rows, out_len = dy.shape
  acc_dtype = accumulator_dtype(jnp.result_type(dy.dtype, x_flat.dtype))
  q = np.arange(out_len)
  valid = (q % valid_period < valid_len).astype(np.float64)
  xs = x_flat.astype(acc_dtype)[np.asarray(offsets)[:, None] + q[None, :]]
  dys = dy.astype(acc_dtype)[np.asarray(rows)]
  return jnp.sum(jnp.where(valid[None, :] > 0, dys * xs, 0), axis=1)
