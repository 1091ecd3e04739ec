"""The vector-sparse (tensor-core) path: structure detection, the packing,
the kernel against its plain-JAX twin and the CSR reference, and
sparse_conv(method="vector") against lax.conv_general_dilated.

On the CPU the kernel runs through the Pallas interpreter (which fills
outputs with NaN first, so unwritten outputs fail the finiteness checks);
tests/test_gpu.py runs it compiled.
"""

from __future__ import annotations

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import SparseKernel, sparse_conv
from escort_jax import dispatch
from escort_jax.conv_geometry import make_geometry
from escort_jax.ops import KernelConfig, VectorConfig, structure_vector_width
from pallas_kernels.direct_sparse_conv import direct_sparse_conv_reference
from pallas_kernels.sampled_dense_dense import sampled_dense_dense_reference
from pallas_kernels.vector_sparse_conv import (pack_vector_blocks,
                                               vector_sparse_conv,
                                               vector_sparse_conv_reference,
                                               vector_width_of)
from pallas_kernels.vector_weight_grad import (vector_weight_grad,
                                               vector_weight_grad_reference)
from tests.conftest import (assert_close, enable_x64, random_array,
                            random_vector_kernel, reference_conv)

F32_BOUND = 1e-5
LOW_BOUND = 1e-2
F64_BOUND = 1e-12


def vector_row_problem(rng, num_blocks, v, out_len, max_cols, empty=True,
                       col_multiple=1):
  """rows/offsets in CSR order for num_blocks blocks of v rows each, each
  block keeping a multiple of col_multiple columns."""
  rows, offsets = [], []
  for b in range(num_blocks):
    n = 0 if (empty and b == 1) else col_multiple * int(
        rng.integers(1, max_cols // col_multiple + 1))
    offs = rng.choice(4 * out_len, size=n, replace=False)
    for r in range(v):
      rows.append(np.full(n, b * v + r))
      offsets.append(offs)
  return np.concatenate(rows), np.concatenate(offsets)


# ---------------------------------------------------------------------------
# Structure.


@pytest.mark.parametrize("v", [8, 16, 32, 64])
def test_vector_width_is_detected(v):
  rng = np.random.default_rng(v)
  k = random_vector_kernel(rng, (3, 3, 8, 128), 0.8, v)
  sk = SparseKernel.from_dense(k, vector_width=v)
  assert sk.structure.vector_width() % v == 0
  assert sk.structure.vector_width() >= v


def test_unstructured_kernel_has_vector_width_one():
  rng = np.random.default_rng(1)
  k = (rng.standard_normal((3, 3, 8, 32)) * (rng.random((3, 3, 8, 32)) < .3)
       ).astype(np.float32)
  sk = SparseKernel.from_dense(k)
  assert sk.structure.vector_width() == 1
  with pytest.raises(ValueError, match="not vector-sparse with vector_width"
                     "=16: output channel"):
    SparseKernel.from_dense(k, vector_width=16)


def test_vector_width_argument_errors():
  k = np.ones((1, 1, 4, 24), np.float32)
  with pytest.raises(ValueError, match="vector_width must be one of"):
    SparseKernel.from_dense(k, vector_width=12)
  with pytest.raises(ValueError, match="does not divide the kernel's 24"):
    SparseKernel.from_dense(k, vector_width=16)
  assert SparseKernel.from_dense(k, vector_width=8).structure.vector_width(
  ) == 8


def test_groups_split_blocks():
  # Blocks of 16 rows that straddle two feature groups read different
  # channels, so on that geometry the structure is only 8-wide.
  rng = np.random.default_rng(2)
  k = random_vector_kernel(rng, (3, 3, 4, 48), 0.5, 16)
  sk = SparseKernel.from_dense(k)
  assert sk.structure.vector_width() == 16
  g = make_geometry((1, 6, 6, 24), sk.structure, (1, 1), "SAME", (1, 1), 6)
  assert structure_vector_width(sk.structure, g) == 8


# ---------------------------------------------------------------------------
# Packing.


def test_pack_vector_blocks_layout():
  rng = np.random.default_rng(3)
  rows, offsets = vector_row_problem(rng, 4, 16, 40, 37)
  blocks = pack_vector_blocks(rows, offsets * 4, 64, 16, 32,
                              zeros_offset=4000)
  assert blocks.offset_unit == 4
  assert blocks.padded_cols % 32 == 0
  assert blocks.steps[1] == 0  # the empty block
  for b in range(4):
    kept = blocks.sources[b, :, 0] >= 0
    n = int(kept.sum())
    assert blocks.steps[b] == -(-n // 32)
    got = blocks.offsets[b, :n].astype(np.int64) * 4
    np.testing.assert_array_equal(got, offsets[rows == b * 16] * 4)
    assert blocks.block_cols[b] == n
    assert blocks.block_start[b] == np.searchsorted(rows, b * 16)
    assert np.all(blocks.offsets[b, n:] * 4 == 4000)
    # Each source points at its own row's entry with that offset.
    src = blocks.sources[b, :n, :]
    np.testing.assert_array_equal(rows[src], b * 16 + np.arange(16)[None, :]
                                  + 0 * src)
    np.testing.assert_array_equal(offsets[src] * 4, got[:, None] + 0 * src)


def test_pack_vector_blocks_without_a_zero_run_repeats_kept_columns():
  rng = np.random.default_rng(4)
  rows, offsets = vector_row_problem(rng, 4, 16, 40, 37)
  blocks = pack_vector_blocks(rows, offsets, 64, 16, 32, zeros_offset=None)
  assert blocks.zeros_offset is None
  for b in range(4):
    n = int(blocks.block_cols[b])
    if n:
      assert np.all(blocks.offsets[b, n:] == offsets[rows == b * 16][-1])
  assert blocks.steps[1] == 0  # the empty block reads nothing


@pytest.mark.parametrize("counts,want", [((16, 0, 24), 8), ((12, 4), 4),
                                         ((8, 6), 2), ((8, 5), 1)])
def test_value_alignment(counts, want):
  """The alignment the kernel promises Triton divides every block's columns
  and where its weights start."""
  v = 8
  rows = np.concatenate([np.full(n * v, b * v + np.repeat(np.arange(v), n))
                         if n else np.zeros(0, int)
                         for b, n in enumerate(counts)])
  rows = np.sort(rows)
  offsets = np.concatenate([np.tile(np.arange(n), v) for n in counts])
  blocks = pack_vector_blocks(rows, offsets, v * len(counts), v, 16, 100)
  assert blocks.value_alignment == want
  assert np.all(blocks.block_cols % want == 0)
  assert np.all(blocks.block_start % want == 0)


def test_pack_rejects_non_vector_rows():
  rows = np.array([0, 0, 1, 1])
  with pytest.raises(ValueError, match="rows 0..1 keep different positions"):
    pack_vector_blocks(rows, np.array([1, 2, 1, 3]), 2, 2, 16, 100)
  with pytest.raises(ValueError, match="different numbers of weights"):
    pack_vector_blocks(np.array([0, 0, 1]), np.array([1, 2, 1]), 2, 2, 16,
                       100)
  with pytest.raises(ValueError, match="block_k must be a multiple of 16"):
    pack_vector_blocks(rows, np.array([1, 2, 1, 2]), 2, 2, 24, 100)


# ---------------------------------------------------------------------------
# The kernel.


@pytest.mark.parametrize(
    "v,num_blocks,out_len,max_cols,block_q,block_k,bias,relu,mult,prefetch",
    [
        (16, 3, 37, 40, 16, 16, True, True, 1, 0),
        (8, 4, 50, 20, 32, 32, False, False, 1, 0),
        (32, 2, 19, 70, 16, 32, True, False, 1, 0),
        (16, 2, 1, 5, 16, 16, False, True, 1, 0),
        # Blocks of a multiple of 8 (or 4) columns: aligned weight rows.
        (16, 3, 37, 40, 16, 16, True, True, 8, 0),
        (8, 4, 50, 36, 32, 32, False, False, 4, 0),
        # Offsets a step ahead: blocks of one step, of several, empty ones.
        (16, 3, 37, 40, 16, 16, True, True, 8, 1),
        (32, 2, 19, 70, 16, 32, True, False, 1, 1),
        (16, 2, 1, 5, 16, 16, False, True, 1, 1),
    ])
def test_vector_kernel_matches_references(v, num_blocks, out_len, max_cols,
                                          block_q, block_k, bias, relu,
                                          mult, prefetch):
  rng = np.random.default_rng([v, num_blocks, out_len])
  rows, offsets = vector_row_problem(rng, num_blocks, v, out_len, max_cols,
                                     col_multiple=mult)
  num_rows = num_blocks * v
  read_len = -(-out_len // block_q) * block_q
  zeros_at = 4 * out_len + read_len
  x = rng.standard_normal(zeros_at + read_len).astype(np.float32)
  x[zeros_at:] = 0.0
  # NaN wherever no kept column reads: a stray read would poison an output.
  read = np.zeros(x.shape[0], bool)
  for off in offsets:
    read[off:off + out_len] = True
  read[zeros_at:] = True
  x_poisoned = np.where(read, x, np.nan).astype(np.float32)
  assert np.isnan(x_poisoned).any()
  values = jnp.asarray(rng.standard_normal(rows.shape[0]), jnp.float32)
  b = jnp.asarray(rng.standard_normal(num_rows), jnp.float32) if bias else None
  blocks = pack_vector_blocks(rows, offsets, num_rows, v, block_k, zeros_at)
  assert blocks.value_alignment % mult == 0
  y = vector_sparse_conv(jnp.asarray(x_poisoned), values, blocks,
                         out_len=out_len, bias=b, relu=relu, block_q=block_q,
                         prefetch=prefetch, interpret=True)
  chex.assert_shape(y, (num_rows, out_len))
  chex.assert_type(y, jnp.float32)
  csr = direct_sparse_conv_reference(jnp.asarray(x), values, rows, offsets,
                                     num_rows=num_rows, out_len=out_len,
                                     bias=b, relu=relu)
  twin = vector_sparse_conv_reference(jnp.asarray(x_poisoned), values,
                                      blocks, out_len=out_len, bias=b,
                                      relu=relu)
  if bias or not relu:
    assert_close(y, csr, F32_BOUND)
  else:
    np.testing.assert_allclose(np.asarray(y), np.asarray(csr), atol=1e-5)
  np.testing.assert_allclose(np.asarray(twin), np.asarray(csr), rtol=1e-5,
                             atol=1e-5)


def test_vector_kernel_input_checks():
  rows, offsets = vector_row_problem(np.random.default_rng(0), 1, 16, 8, 3,
                                     empty=False)
  blocks = pack_vector_blocks(rows, offsets, 16, 16, 16, zeros_offset=64)
  values = jnp.ones(rows.shape[0])
  with pytest.raises(ValueError, match="too short for its offsets"):
    vector_sparse_conv(jnp.zeros(40), values, blocks, out_len=8,
                       interpret=True)
  with pytest.raises(ValueError, match="values must have shape"):
    vector_sparse_conv(jnp.zeros(200), values[:-1], blocks, out_len=8,
                       interpret=True)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    vector_sparse_conv(jnp.zeros(200), values, blocks, out_len=8,
                       block_q=24, interpret=True)
  with pytest.raises(ValueError, match="prefetch must be 0 or 1"):
    vector_sparse_conv(jnp.zeros(200), values, blocks, out_len=8,
                       prefetch=2, interpret=True)


@pytest.mark.parametrize(
    "v,num_blocks,out_len,max_cols,period,valid,block_q,block_k,splits",
    [
        (16, 3, 37, 40, 10, 7, 16, 16, None),
        (8, 4, 50, 20, 25, 25, 32, 32, 2),
        (32, 2, 19, 60, 19, 19, 16, 32, 1),
        (16, 2, 45, 9, 9, 6, 16, 16, 3),
    ])
def test_vector_weight_grad_matches_references(v, num_blocks, out_len,
                                               max_cols, period, valid,
                                               block_q, block_k, splits):
  rng = np.random.default_rng([v, out_len, period])
  rows, offsets = vector_row_problem(rng, num_blocks, v, out_len, max_cols)
  num_rows = num_blocks * v
  zeros_at = 5 * out_len
  x = rng.standard_normal(zeros_at + out_len).astype(np.float32)
  # Inputs that only cropped (q % period >= valid) or no positions read are
  # NaN: they must not reach dw.
  q = np.arange(out_len)
  read = np.zeros(x.shape[0], bool)
  for off in offsets:
    read[off + q[q % period < valid]] = True
  x_poisoned = np.where(read, x, np.nan).astype(np.float32)
  if valid < period:
    assert np.isnan(x_poisoned[:zeros_at]).any()
  dy = rng.standard_normal((num_rows, out_len)).astype(np.float32)
  blocks = pack_vector_blocks(rows, offsets, num_rows, v, block_k, zeros_at)
  dw = vector_weight_grad(jnp.asarray(dy), jnp.asarray(x_poisoned), blocks,
                          valid_period=period, valid_len=valid,
                          block_q=block_q, splits=splits, interpret=True)
  chex.assert_shape(dw, (rows.shape[0],))
  chex.assert_type(dw, jnp.float32)
  chex.assert_tree_all_finite(dw)
  csr = sampled_dense_dense_reference(jnp.asarray(dy), jnp.asarray(x), rows,
                                      offsets, valid_period=period,
                                      valid_len=valid)
  twin = vector_weight_grad_reference(jnp.asarray(dy), jnp.asarray(x),
                                      blocks, valid_period=period,
                                      valid_len=valid)
  assert_close(dw, csr, F32_BOUND)
  np.testing.assert_allclose(np.asarray(twin), np.asarray(csr), rtol=1e-5,
                             atol=1e-5)


def test_vector_weight_grad_input_checks():
  rows, offsets = vector_row_problem(np.random.default_rng(0), 1, 16, 8, 3,
                                     empty=False)
  blocks = pack_vector_blocks(rows, offsets, 16, 16, 16, zeros_offset=64)
  dy = jnp.ones((16, 8))
  kw = dict(valid_period=8, valid_len=8, interpret=True)
  with pytest.raises(ValueError, match="too short for its offsets"):
    vector_weight_grad(dy, jnp.zeros(40), blocks, **kw)
  with pytest.raises(ValueError, match="dy must have shape"):
    vector_weight_grad(dy[:8], jnp.zeros(200), blocks, **kw)
  with pytest.raises(ValueError, match="block_q must be a power of two"):
    vector_weight_grad(dy, jnp.zeros(200), blocks, block_q=24, **kw)
  with pytest.raises(ValueError, match="splits must be"):
    vector_weight_grad(dy, jnp.zeros(200), blocks, splits=0, **kw)


# ---------------------------------------------------------------------------
# sparse_conv(method="vector") against lax.


CONV_CASES = [
    # (n, hw, c, o, kernel_hw, strides, dilation, padding, groups, v)
    dict(n=2, hw=(7, 9), c=8, o=32, k=(3, 3), strides=(1, 1), padding="SAME",
         v=16),
    dict(n=1, hw=(9, 8), c=6, o=16, k=(3, 3), strides=(2, 2), padding="SAME",
         v=8, bias=True, relu=True),
    dict(n=3, hw=(5, 6), c=16, o=64, k=(1, 1), strides=(1, 1),
         padding="VALID", v=32, bias=True),
    dict(n=2, hw=(8, 7), c=8, o=32, k=(3, 3), strides=(1, 2),
         padding=((2, 0), (1, 1)), dilation=(2, 1), groups=2, v=16),
    dict(n=1, hw=(6, 6), c=4, o=64, k=(5, 5), strides=(1, 1), padding="SAME",
         v=64, layout="NCHW"),
]


def _conv_case(case, dtype, seed):
  rng = np.random.default_rng(seed)
  c, o, g = case["c"], case["o"], case.get("groups", 1)
  r, s = case["k"]
  kernel = random_vector_kernel(rng, (r, s, c // g, o), 0.75, case["v"],
                                dtype)
  n, (h, w) = case["n"], case["hw"]
  x = random_array(rng, (n, h, w, c), dtype)
  b = random_array(rng, (o,), dtype) if case.get("bias") else None
  return x, kernel, b


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"v{c['v']}")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vector_conv_matches_lax(case, dtype):
  x, kernel, b = _conv_case(case, dtype, [len(case["hw"]), case["o"]])
  layout = case.get("layout", "NHWC")
  klayout = "HWIO"
  if layout == "NCHW":
    x, kernel, klayout = x.transpose(0, 3, 1, 2), kernel.transpose(
        3, 2, 0, 1), "OIHW"
  sk = SparseKernel.from_dense(kernel, layout=klayout,
                               vector_width=case["v"])
  kw = dict(rhs_dilation=case.get("dilation", (1, 1)),
            feature_group_count=case.get("groups", 1),
            dimension_numbers=(layout, klayout, layout))
  act = "relu" if case.get("relu") else None

  def run(x):
    return sparse_conv(x, sk, case["strides"], case["padding"], bias=b,
                       activation=act, method="vector", **kw)
  y = jax.jit(run)(x)
  ref = reference_conv(x, kernel, case["strides"], case["padding"], bias=b,
                       activation=act, **kw)
  chex.assert_shape(y, ref.shape)
  chex.assert_type(y, x.dtype)
  assert_close(y, ref, F32_BOUND if dtype == "float32" else LOW_BOUND)


def test_vector_conv_float64_and_gradients():
  case = CONV_CASES[3]
  with enable_x64():
    x, kernel, _ = _conv_case(case, np.float64, 11)
    sk = SparseKernel.from_dense(kernel, vector_width=16)
    kw = dict(rhs_dilation=case["dilation"], feature_group_count=2)

    def loss(values, x, method):
      y = sparse_conv(x, sk.with_values(values), case["strides"],
                      case["padding"], method=method, activation="relu",
                      precision="highest", **kw)
      return jnp.sum(y * jnp.cos(y))
    y = sparse_conv(x, sk, case["strides"], case["padding"], method="vector",
                    **kw)
    ref = reference_conv(x, kernel, case["strides"], case["padding"],
                         dtype=jnp.float64, **kw)
    assert_close(y, ref, F64_BOUND)
    grads = jax.grad(loss, argnums=(0, 1))(sk.values, x, "vector")
    want = jax.grad(loss, argnums=(0, 1))(sk.values, x, "dense")
    for got, exp, what in zip(grads, want, ("d values", "d x")):
      assert_close(got, exp, F64_BOUND, what)


@pytest.mark.parametrize("v", [16, 64])
def test_default_vector_config_follows_the_width(v):
  """With no config or plan, V = 64 kernels get the wide config (block_k
  64 on 8 warps, measured faster there) and narrower ones the default;
  grids of under VECTOR_PREFETCH_WARPS warps load each step's offsets a
  step ahead, larger ones do not."""
  from escort_jax import ops
  rng = np.random.default_rng(v)
  kernel = random_vector_kernel(rng, (3, 3, 8, 128), 0.75, v, "float32")
  sk = SparseKernel.from_dense(kernel, vector_width=v)
  g = make_geometry((2, 6, 6, 8), sk.structure, (1, 1), "SAME", (1, 1), 1)
  call = ops._SparseCall(structure=sk.structure, geometry=g, method="vector",
                         config=None, relu=False, out_dtype=jnp.float32)
  want = ops.WIDE_VECTOR_CONFIG if v == 64 else ops.DEFAULT_VECTOR_CONFIG
  assert want.prefetch == 0
  # 128 / v blocks x 1 block of positions: a small grid.
  assert call._forward_config(g, 2) == dataclasses.replace(want, prefetch=1)
  assert ops.default_vector_config(v) == want
  # res3a at batch 32 (28 x 30 wide positions per image): 8 x 210 programs
  # at V = 16, 2 x 210 at V = 64.
  big = ops.default_vector_config(v, 128, 32 * 28 * 30)
  assert big == want
  edge = ops.VECTOR_PREFETCH_WARPS // want.num_warps * want.block_q
  assert ops.default_vector_config(v, v, edge).prefetch == 0
  assert ops.default_vector_config(v, v, edge - want.block_q).prefetch == 1


def test_vector_method_errors():
  rng = np.random.default_rng(5)
  k = rng.standard_normal((3, 3, 4, 16)) * (rng.random((3, 3, 4, 16)) < .3)
  sk = SparseKernel.from_dense(k.astype(np.float32))
  x = jnp.ones((1, 5, 5, 4))
  with pytest.raises(ValueError, match="method='vector' needs a "
                     "vector-sparse kernel"):
    sparse_conv(x, sk, method="vector")
  skv = SparseKernel.from_dense(random_vector_kernel(rng, (3, 3, 4, 16), .5,
                                                     16))
  with pytest.raises(TypeError, match="method='vector' takes a VectorConfig"):
    sparse_conv(x, skv, method="vector", config=KernelConfig())
  with pytest.raises(TypeError, match="method='escort' takes a KernelConfig"):
    sparse_conv(x, skv, method="escort", config=VectorConfig())


def test_cost_model_weighs_the_vector_path():
  rng = np.random.default_rng(6)
  sk = SparseKernel.from_dense(random_vector_kernel(rng, (3, 3, 256, 256),
                                                    0.9, 16))
  g = make_geometry((32, 28, 28, 256), sk.structure, (1, 1), "SAME", (1, 1),
                    1)
  t = dispatch.predicted_seconds(g, sk.nnz, jnp.bfloat16, None, 16)
  assert set(t) == {"escort", "vector", "dense"}
  assert t["vector"] < t["escort"]
  none = dispatch.predicted_seconds(g, sk.nnz, jnp.bfloat16, None, 1)
  assert "vector" not in none
  choice = dispatch.choose(sk.structure, g, jnp.bfloat16, None, "auto", None,
                           on_gpu=True, slug="no-such-device",
                           vector_width=16)
  assert choice.method == min(t, key=t.get)
  assert choice.source == "cost-model"


def test_vector_width_of_candidates():
  rows = np.repeat(np.arange(16), 2)
  offsets = np.tile([3, 7], 16)
  assert vector_width_of(rows, offsets, 16) == 16
  offsets2 = offsets.copy()
  offsets2[-1] = 9  # the last row differs, so no block of 8 agrees either
  assert vector_width_of(rows, offsets2, 16) == 1


@pytest.mark.parametrize("batch,out_h,row_width,out_w,v,block_q",
                         [(2, 3, 5, 4, 16, 16), (3, 2, 4, 4, 8, 32),
                          (1, 4, 7, 5, 32, 16)])
def test_vector_kernel_writes_nhwc(batch, out_h, row_width, out_w, v,
                                   block_q):
  """The NHWC store (cropped columns dropped, no transpose pass) equals the
  wide rows cropped and transposed."""
  from pallas_kernels.output_layout import NhwcOutput
  nhwc = NhwcOutput(batch=batch, out_h=out_h, row_width=row_width,
                    out_w=out_w)
  out_len = nhwc.out_len
  rng = np.random.default_rng([batch, out_h, row_width, v])
  rows, offsets = vector_row_problem(rng, 3, v, out_len, 20)
  read_len = -(-out_len // block_q) * block_q
  zeros_at = 4 * out_len + read_len
  x = rng.standard_normal(zeros_at + read_len).astype(np.float32)
  x[zeros_at:] = 0.0
  values = jnp.asarray(rng.standard_normal(rows.shape[0]), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(3 * v), jnp.float32)
  blocks = pack_vector_blocks(rows, offsets, 3 * v, v, 16, zeros_at)
  kw = dict(out_len=out_len, bias=bias, relu=True)
  y = vector_sparse_conv(jnp.asarray(x), values, blocks, block_q=block_q,
                         nhwc=nhwc, interpret=True, **kw)
  wide = direct_sparse_conv_reference(jnp.asarray(x), values, rows, offsets,
                                      num_rows=3 * v, **kw)
  want = wide.reshape(3 * v, out_h, row_width, batch)[:, :, :out_w, :]
  chex.assert_shape(y, (batch, out_h, out_w, 3 * v))
  assert np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(want.transpose(
      3, 1, 2, 0)), rtol=1e-5, atol=1e-5)
  twin = vector_sparse_conv_reference(jnp.asarray(x), values, blocks,
                                      nhwc=nhwc, **kw)
  np.testing.assert_allclose(np.asarray(twin), np.asarray(y), rtol=1e-5,
                             atol=1e-5)
  with pytest.raises(ValueError, match="wide positions, but out_len"):
    vector_sparse_conv(jnp.asarray(x), values, blocks, block_q=block_q,
                       nhwc=nhwc, interpret=True, out_len=out_len + 1)
