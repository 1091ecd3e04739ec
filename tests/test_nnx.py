"""escort_jax.nnx.SparseConv against flax's nnx.Conv (CPU; dense path mostly,
one escort / Pallas-interpreter test)."""

from __future__ import annotations

import chex
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax.nnx import (DenseConv, SparseConv, SparseLinear,
                            UnsupportedConvError, _get_value, _set_value,
                            magnitude_mask)
from escort_jax.ops import dense_conv_ohwi
from escort_jax.structure import SparseKernel
from tests.conftest import assert_close, enable_x64, requires_gpu

HIGHEST = lax.Precision.HIGHEST
F32_BOUND = 1e-5


def np_init(key, shape, dtype=jnp.float32):
  """A kernel initialiser drawing from numpy, seeded by the key: XLA on the
  CPU takes seconds to compile jax.random's normal for every new shape, so
  the tests use this except where they check flax's own initialisation."""
  if isinstance(key, jax.core.Tracer):  # eval_shape: only the shape counts
    return jnp.zeros(shape, dtype)
  seed = int(np.asarray(jax.random.key_data(key)).sum())
  w = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(w / np.sqrt(np.prod(shape[:-1])), dtype)


def _grad(grads, name):
  """grads[name] of an nnx.grad State as an array (a Variable or a raw
  array, depending on the flax version)."""
  g = grads[name]
  return _get_value(g) if isinstance(g, nnx.Variable) else g


def _x(shape=(2, 8, 8, 4), seed=1, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     dtype)


def _prune_conv(conv: nnx.Conv, sparsity: float) -> np.ndarray:
  """Zeros the smallest entries of conv's kernel in place; returns the
  kept-mask."""
  kernel = _get_value(conv.kernel)
  keep = magnitude_mask(kernel, sparsity)
  _set_value(conv.kernel, jnp.where(keep, kernel, 0).astype(kernel.dtype))
  return keep


CONV_CASES = [
    dict(),
    dict(strides=(2, 1), padding="VALID", use_bias=False),
    dict(padding=((1, 0), (2, 1)), kernel_dilation=2, feature_group_count=2),
    dict(kernel_size=(1, 3), strides=2, padding=[0, 1]),
    dict(kernel_size=(5, 5), strides=2, padding=1),
    dict(padding="SAME_LOWER", kernel_size=(2, 2)),
]


def _pruned_case_conv(kw) -> tuple[nnx.Conv, np.ndarray]:
  """A 4 -> 6 channel nnx.Conv of a CONV_CASES entry, with a random bias
  (where it has one), pruned to 60 %; and its kept-mask."""
  kw = dict(kw)
  ks = kw.pop("kernel_size", (3, 3))
  conv = nnx.Conv(4, 6, ks, precision=HIGHEST, kernel_init=np_init,
                  rngs=nnx.Rngs(0), **kw)
  if kw.get("use_bias", True):
    _set_value(conv.bias, _x((6,), seed=5))
  return conv, _prune_conv(conv, 0.6)


@pytest.mark.parametrize("kw", CONV_CASES)
def test_from_conv_matches_nnx_conv(kw):
  conv, keep = _pruned_case_conv(kw)
  sc = SparseConv.from_conv(conv, method="dense")
  assert sc.nnz == keep.sum()
  chex.assert_trees_all_equal(sc.dense_kernel(), _get_value(conv.kernel))
  x = _x()
  assert_close(sc(x), conv(x), F32_BOUND)
  # Unbatched and several batch dimensions, as nnx.Conv allows.
  for shape in [(8, 8, 4), (2, 1, 8, 8, 4)]:
    x = _x(shape)
    assert_close(sc(x), conv(x), F32_BOUND, f"input {shape}")


@pytest.mark.parametrize("kw", CONV_CASES)
def test_to_conv_round_trips(kw):
  """SparseConv.to_conv: the nnx.Conv with the same hyper-parameters and
  the pruned kernel; with a fused relu, followed by nnx.relu."""
  conv, _ = _pruned_case_conv(kw)
  back = SparseConv.from_conv(conv).to_conv()
  assert type(back) is nnx.Conv
  chex.assert_trees_all_equal(nnx.state(back), nnx.state(conv))
  x = _x()
  chex.assert_trees_all_equal(back(x), conv(x))
  relu = SparseConv.from_conv(conv, activation="relu", method="dense")
  assert_close(relu.to_conv()(x), relu(x), F32_BOUND)


@pytest.mark.parametrize("kw", CONV_CASES)
def test_to_dense_conv_matches_nnx_conv(kw):
  """SparseConv.to_dense_conv: the kernel held as OHWI (hwio_kernel() gives
  nnx.Conv's back), the same outputs and kernel gradients as nnx.Conv, any
  batch rank; with a fused relu, the relu applied."""
  conv, _ = _pruned_case_conv(kw)
  sc = SparseConv.from_conv(conv, method="dense")
  dc = sc.to_dense_conv()
  kernel = _get_value(conv.kernel)
  assert _get_value(dc.kernel).shape == (6,) + kernel.shape[:2] + (
      kernel.shape[2],)
  chex.assert_trees_all_equal(dc.hwio_kernel(), kernel)
  assert dc.use_bias == conv.use_bias
  for shape in [(2, 8, 8, 4), (8, 8, 4), (2, 1, 8, 8, 4)]:
    x = _x(shape, seed=len(shape))
    y = dc(x)
    assert y.shape == conv(x).shape
    assert_close(y, conv(x), F32_BOUND, f"input {shape}")
  x = _x()
  g_dense = nnx.grad(lambda m: (m(x) ** 2).sum())(dc)
  g_conv = nnx.grad(lambda m: (m(x) ** 2).sum())(conv)
  assert_close(jnp.transpose(_grad(g_dense, "kernel"), (1, 2, 3, 0)),
               _grad(g_conv, "kernel"), 1e-4)
  relu = SparseConv.from_conv(conv, activation="relu", method="dense")
  y = relu.to_dense_conv()(x)
  assert_close(y, relu(x), F32_BOUND)
  assert float(y.min()) == 0.0 and float(y.max()) > 0.0


def test_to_dense_conv_keeps_dtypes_and_rejects_bad_input():
  conv = nnx.Conv(4, 6, (3, 3), dtype=jnp.bfloat16, param_dtype=jnp.float32,
                  precision=HIGHEST, kernel_init=np_init, rngs=nnx.Rngs(0))
  _prune_conv(conv, 0.5)
  dc = SparseConv.from_conv(conv, method="dense").to_dense_conv()
  assert dc.kernel.dtype == jnp.float32
  x = _x(dtype=jnp.float32)
  y, ref = dc(x), conv(x)
  assert y.dtype == ref.dtype == jnp.bfloat16
  assert_close(y.astype(jnp.float32), ref.astype(jnp.float32), 1e-2)
  with pytest.raises(ValueError, match="inputs have 3 channels"):
    dc(_x((2, 8, 8, 3)))
  with pytest.raises(ValueError, match="rank >= 3"):
    dc(_x((8, 4)))
  with pytest.raises(ValueError, match=r"must be \(out_features, kh, kw"):
    DenseConv(jnp.ones((6, 3, 4)))
  with pytest.raises(ValueError, match="bias has shape"):
    DenseConv(jnp.ones((6, 3, 3, 4)), jnp.ones((4,)))
  with pytest.raises(ValueError, match="feature_group_count=4"):
    DenseConv(jnp.ones((6, 3, 3, 4)), feature_group_count=4)
  with pytest.raises(ValueError, match="activation"):
    DenseConv(jnp.ones((6, 3, 3, 4)), activation="gelu")


@pytest.mark.parametrize("x_shape, kernel_shape, strides, padding, matmul", [
    ((3, 1, 1, 10), (7, 1, 1, 10), (1, 1), "SAME", True),
    ((1, 1, 1, 10), (7, 1, 1, 10), (1, 1), ((0, 0), (0, 0)), True),
    ((2, 1, 1, 10), (7, 1, 1, 10), (1, 1), ((1, 0), (0, 1)), False),
    ((2, 1, 1, 10), (7, 1, 1, 10), (2, 2), "VALID", False),
    ((2, 3, 5, 10), (7, 1, 1, 10), (1, 1), "SAME", False),
    ((2, 3, 3, 10), (7, 3, 3, 10), (1, 1), "SAME", False),
])
def test_dense_conv_ohwi_is_lax_conv(x_shape, kernel_shape, strides, padding,
                                     matmul):
  """ops.dense_conv_ohwi equals lax.conv (float64); a 1x1 kernel on a 1x1
  map with nothing else (no padding, stride 1) is the matmul nnx.Linear
  runs, every other case the convolution."""
  with enable_x64():
    x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape))
    k = jnp.asarray(np.random.default_rng(1).standard_normal(kernel_shape))
    y = dense_conv_ohwi(x, k, strides, padding)
    want = lax.conv_general_dilated(x, k, strides, padding,
                                    dimension_numbers=("NHWC", "OHWI",
                                                       "NHWC"))
    chex.assert_trees_all_close(y, want, rtol=1e-12, atol=1e-12)
    prims = {e.primitive.name for e in jax.make_jaxpr(
        lambda x, k: dense_conv_ohwi(x, k, strides, padding))(x, k).eqns}
  # (The matmul reshapes the OHWI kernel to (K, C).)
  assert prims - {"reshape"} == ({"dot_general"} if matmul else
                                 {"conv_general_dilated"}), prims


def test_sparse_linear_dense_fallback_is_a_matmul():
  """A SparseLinear that runs dense (its conv a DenseConv after
  dense_fallback, or method="dense") computes nnx.Linear's matmul, not a
  1x1 convolution."""
  from escort_jax.convert import dense_fallback
  lin, _ = _pruned_linear()
  sl = SparseLinear.from_linear(lin, method="dense")
  x = _x((4, 12))
  for model in (sl, dense_fallback(sl, x)):
    assert "conv_general_dilated" not in str(jax.make_jaxpr(
        lambda x: model(x))(x)), type(model.conv)
    assert_close(model(x), lin(x), F32_BOUND)
  assert type(dense_fallback(sl, x).conv) is DenseConv


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_conv_kernel_is_not_transposed_per_call_on_gpu(dtype):
  """The point of DenseConv: with the parameters as arguments of the jitted
  forward, nnx.Conv's HWIO kernel is transposed on every call (XLA's
  layout assignment for cuDNN), DenseConv's OHWI kernel is not, nor the
  kernel that a SparseConv's dense path scatters from its values."""
  conv = nnx.Conv(64, 64, (3, 3), param_dtype=dtype, kernel_init=np_init,
                  rngs=nnx.Rngs(0))
  dense = SparseConv.from_conv(conv, method="dense").to_dense_conv()
  x = _x((1, 14, 14, 64), dtype=dtype)

  def compiled_hlo(layer):
    graphdef, state = nnx.split(layer)
    fn = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
    return fn.lower(state, x).compile().as_text()

  def transposes(text):
    return [l for l in text.splitlines()
            if " transpose(" in l or "wrapped_transpose" in l.split("=")[0]]
  assert transposes(compiled_hlo(conv)), "nnx.Conv: expected a transpose"
  assert not transposes(compiled_hlo(dense)), transposes(compiled_hlo(dense))
  # The op's own dense path scatters the values into that layout too.
  per_call = SparseConv.from_conv(conv, method="dense")
  assert not transposes(compiled_hlo(per_call)), transposes(
      compiled_hlo(per_call))
  # Both at default precision (TF32 or bf16 tensor cores), in another
  # order of summation.
  assert_close(dense(x).astype(jnp.float32), conv(x).astype(jnp.float32),
               1e-2)


def test_fresh_layer_matches_masked_nnx_conv():
  """Same rngs -> same initial kernel and bias as nnx.Conv; mask= keeps
  exactly the masked entries (zeros included)."""
  mask = np.random.default_rng(3).random((3, 3, 4, 6)) < 0.3
  conv = nnx.Conv(4, 6, (3, 3), mask=jnp.asarray(mask), precision=HIGHEST,
                  rngs=nnx.Rngs(0))
  sc = SparseConv(4, 6, (3, 3), mask=mask, precision=HIGHEST,
                  rngs=nnx.Rngs(0), method="dense")
  assert sc.nnz == mask.sum()
  assert sc.values.shape == (mask.sum(),)
  chex.assert_trees_all_equal(sc.dense_kernel(),
                              _get_value(conv.kernel) * mask)
  x = _x()
  assert_close(sc(x), conv(x), F32_BOUND)
  # Neither mask nor sparsity: every entry kept, same as nnx.Conv.
  full = SparseConv(4, 6, (3, 3), precision=HIGHEST, rngs=nnx.Rngs(0))
  plain = nnx.Conv(4, 6, (3, 3), precision=HIGHEST, rngs=nnx.Rngs(0))
  assert full.nnz == 3 * 3 * 4 * 6
  chex.assert_trees_all_equal(full.dense_kernel(), _get_value(plain.kernel))


def test_sparsity_prunes_by_magnitude_per_layer():
  sc = SparseConv(4, 6, (3, 3), sparsity=0.75, rngs=nnx.Rngs(0))
  plain = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))
  k = np.asarray(_get_value(plain.kernel))
  size = k.size
  assert sc.nnz == size - round(0.75 * size)
  dense = np.asarray(sc.dense_kernel())
  kept = dense != 0
  # The kept entries are the largest magnitudes, with their initial values.
  np.testing.assert_array_equal(dense[kept], k[kept])
  assert np.abs(k[kept]).min() >= np.abs(k[~kept]).max()
  assert sc.density == pytest.approx(sc.nnz / size)


@pytest.mark.parametrize("param_dtype,dtype,x_dtype", [
    (jnp.float32, None, jnp.bfloat16),
    (jnp.bfloat16, None, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16, jnp.float32),
    (jnp.bfloat16, jnp.float32, jnp.float16),
])
def test_dtype_promotion_like_nnx_conv(param_dtype, dtype, x_dtype):
  conv = nnx.Conv(4, 6, (3, 3), dtype=dtype, param_dtype=param_dtype,
                  precision=HIGHEST, kernel_init=np_init, rngs=nnx.Rngs(0))
  _prune_conv(conv, 0.5)
  sc = SparseConv.from_conv(conv, method="dense")
  assert sc.values.dtype == jnp.dtype(param_dtype)
  assert sc.dense_kernel().dtype == jnp.dtype(param_dtype)
  x = _x(dtype=x_dtype)
  y, ref = sc(x), conv(x)
  assert y.dtype == ref.dtype
  assert_close(y.astype(jnp.float32), ref.astype(jnp.float32),
               1e-2 if y.dtype != jnp.float32 else F32_BOUND)


def test_unsupported_configurations_raise():
  rngs = nnx.Rngs(0)
  with pytest.raises(UnsupportedConvError, match="1-D"):
    SparseConv(4, 6, 3, rngs=rngs)
  with pytest.raises(ValueError, match="2-D"):
    SparseConv(4, 6, (3,), rngs=rngs)
  with pytest.raises(ValueError, match="2-D"):
    SparseConv(4, 6, (3, 3, 3), rngs=rngs)
  with pytest.raises(NotImplementedError, match="input_dilation"):
    SparseConv(4, 6, (3, 3), input_dilation=2, rngs=rngs)
  with pytest.raises(UnsupportedConvError, match="CIRCULAR"):
    SparseConv(4, 6, (3, 3), padding="CIRCULAR", rngs=rngs)
  with pytest.raises(ValueError, match="at most one"):
    SparseConv(4, 6, (3, 3), mask=np.ones((3, 3, 4, 6), bool), sparsity=0.5,
               rngs=rngs)
  with pytest.raises(ValueError, match="method"):
    SparseConv(4, 6, (3, 3), method="fast", rngs=rngs)
  with pytest.raises(TypeError, match="rngs"):
    SparseConv(4, 6, (3, 3))
  for bad in [nnx.Conv(4, 6, (3,), kernel_init=np_init, rngs=rngs),
              nnx.Conv(4, 6, (3, 3), padding="CIRCULAR", kernel_init=np_init,
                       rngs=rngs),
              nnx.Conv(4, 6, (3, 3), input_dilation=2, kernel_init=np_init,
                       rngs=rngs)]:
    with pytest.raises(UnsupportedConvError):
      SparseConv.from_conv(bad)
  sc = SparseConv(4, 6, (3, 3), kernel_init=np_init, rngs=rngs)
  with pytest.raises(ValueError, match="channels"):
    sc(_x((1, 8, 8, 5)))


def test_nnx_transforms_split_merge_state():
  conv = nnx.Conv(4, 6, (3, 3), precision=HIGHEST, kernel_init=np_init,
                  rngs=nnx.Rngs(0))
  _prune_conv(conv, 0.7)
  sc = SparseConv.from_conv(conv, method="dense")
  x = _x()

  # State holds only values and bias; the structure is static.
  state = nnx.state(sc)
  params = nnx.state(sc, nnx.Param)
  leaves = jax.tree_util.tree_leaves(state)
  assert len(leaves) == 2
  assert sorted(l.shape for l in leaves) == [(6,), (sc.nnz,)]
  chex.assert_trees_all_equal(jax.tree_util.tree_leaves(params), leaves)

  graphdef, state = nnx.split(sc)
  again = nnx.merge(graphdef, state)
  assert again.structure == sc.structure
  chex.assert_trees_all_equal(again(x), sc(x))

  @nnx.jit
  def forward(model, x):
    return model(x)

  assert_close(forward(sc, x), conv(x), F32_BOUND)

  # Gradients w.r.t. values = dense kernel gradients at the kept entries.
  def loss(model):
    return jnp.sum(model(x) ** 2)

  grads = nnx.grad(loss)(sc)
  dense_grads = nnx.grad(loss)(conv)
  gv, gk = _grad(grads, "values"), _grad(dense_grads, "kernel")
  assert_close(gv, gk[sc.structure.dense_positions()], F32_BOUND, "dvalues")


def test_dense_kernel_is_differentiable():
  sc = SparseConv(4, 6, (3, 3), sparsity=0.5, kernel_init=np_init,
                  rngs=nnx.Rngs(0))
  values = _get_value(sc.values)
  structure = sc.structure

  def f(v):
    return jnp.sum(SparseKernel(v, structure).todense() ** 2)

  def g(model):
    return jnp.sum(model.dense_kernel() ** 2)

  grads = nnx.grad(g)(sc)
  gv = _grad(grads, "values")
  chex.assert_trees_all_close(gv, 2 * values)
  chex.assert_trees_all_close(jax.grad(f)(values), 2 * values)


def test_escort_method_matches_nnx_conv():
  """The Pallas kernels (interpreted on CPU): forward and gradients."""
  conv = nnx.Conv(3, 4, (3, 3), strides=2, precision=HIGHEST,
                  kernel_init=np_init, rngs=nnx.Rngs(0))
  _set_value(conv.bias, jnp.arange(4, dtype=jnp.float32) / 4)
  _prune_conv(conv, 0.6)
  sc = SparseConv.from_conv(conv, method="escort")
  x = _x((2, 8, 8, 3))
  assert_close(sc(x), conv(x), F32_BOUND)

  def loss(model):
    return jnp.sum(jnp.sin(model(x)))

  g = nnx.grad(loss)(sc)
  gd = nnx.grad(loss)(conv)
  gv, gk = _grad(g, "values"), _grad(gd, "kernel")
  assert_close(gv, gk[sc.structure.dense_positions()], F32_BOUND, "dvalues")
  relu = SparseConv.from_conv(conv, method="escort", activation="relu")
  assert_close(relu(x), jax.nn.relu(conv(x)), F32_BOUND, "relu")


def _vector_sparse_kernel(shape=(3, 3, 4, 16), v=8, sparsity=0.6, seed=0):
  """An HWIO kernel that keeps whole vectors of v output channels."""
  from escort_jax.prune import vector_mask
  k = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  return k * vector_mask(k, sparsity, v)


def test_vector_method_and_config_pass_through():
  """method="vector" with a VectorConfig reaches sparse_conv: the
  tensor-core kernel (Pallas interpreter here) computes the conv of a
  vector-sparse kernel, and refuses an unstructured one."""
  from escort_jax import VectorConfig
  k = _vector_sparse_kernel()
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 6, 6, 4)),
                  jnp.float32)
  conv = SparseConv(4, 16, (3, 3), sparse_kernel=SparseKernel.from_dense(k),
                    use_bias=False, method="vector", precision=HIGHEST,
                    config=VectorConfig(32, 16, 4, 2))
  assert conv.method == "vector" and conv.config == VectorConfig(32, 16, 4, 2)
  ref = lax.conv_general_dilated(x, jnp.asarray(k), (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=HIGHEST)
  assert_close(conv(x), ref, 1e-4)
  dense = nnx.Conv(4, 16, (3, 3), use_bias=False, rngs=nnx.Rngs(0))
  _set_value(dense.kernel, jnp.asarray(k))
  assert SparseConv.from_conv(dense, method="vector").method == "vector"
  unstructured = np.where(np.random.default_rng(2).random(k.shape) < 0.4,
                          1.0, 0.0).astype(np.float32)
  bad = SparseConv(4, 16, (3, 3), use_bias=False, method="vector",
                   sparse_kernel=SparseKernel.from_dense(unstructured))
  with pytest.raises(ValueError, match="vector-sparse"):
    bad(x)


def test_package_exports():
  import escort_jax as ej
  from escort_jax import ops
  assert ej.VectorConfig is ops.VectorConfig and "VectorConfig" in ej.__all__
  for name in ("sharding", "bench_sharded"):
    assert name in ej.__all__
    assert getattr(ej, name).__name__ == f"escort_jax.{name}"


# --------------------------------------------------------------------------
# SparseLinear: a pruned nnx.Linear, run as a 1x1 SparseConv.


def _pruned_linear(in_features=12, out_features=7, sparsity=0.6, seed=0,
                   **kw):
  lin = nnx.Linear(in_features, out_features, precision=HIGHEST,
                   kernel_init=np_init, rngs=nnx.Rngs(seed), **kw)
  keep = magnitude_mask(_get_value(lin.kernel), sparsity)
  _set_value(lin.kernel, jnp.where(keep, _get_value(lin.kernel), 0))
  if lin.bias is not None and _get_value(lin.bias) is not None:
    _set_value(lin.bias, _x((out_features,), seed=9))
  return lin, keep


@pytest.mark.parametrize("use_bias", [True, False])
def test_sparse_linear_matches_nnx_linear(use_bias):
  """from_linear keeps exactly the nonzeros and the bias; the outputs equal
  nnx.Linear's for any number of batch dimensions; gradients reach the
  values; the same rngs initialise the same kernel."""
  lin, keep = _pruned_linear(use_bias=use_bias)
  sl = SparseLinear.from_linear(lin, method="dense")
  assert sl.nnz == keep.sum() and sl.density == pytest.approx(keep.mean())
  chex.assert_trees_all_equal(sl.dense_kernel(), _get_value(lin.kernel))
  for shape in [(3, 12), (12,), (2, 3, 12)]:
    x = _x(shape, seed=len(shape))
    y = sl(x)
    chex.assert_shape(y, shape[:-1] + (7,))
    assert_close(y, lin(x), F32_BOUND, f"input {shape}")
  x = _x((4, 12))
  g = nnx.grad(lambda m: (m(x) ** 2).sum())(sl)
  want = jax.grad(lambda w: ((jnp.dot(x, w, precision=HIGHEST) + (
      _get_value(lin.bias) if use_bias else 0)) ** 2).sum())(
          _get_value(lin.kernel))
  _, _, c, k = sl.conv.structure.dense_positions()  # CSR order
  assert_close(_grad(g["conv"], "values"), want[c, k], 1e-5, "gradient")
  fresh = SparseLinear(12, 7, kernel_init=np_init, rngs=nnx.Rngs(4))
  chex.assert_trees_all_equal(
      fresh.dense_kernel(),
      _get_value(nnx.Linear(12, 7, kernel_init=np_init,
                            rngs=nnx.Rngs(4)).kernel))


def test_sparse_linear_escort_and_construction():
  """The escort kernel (Pallas interpreter) computes the same as the dense
  matmul at HIGHEST; mask= and sparsity= prune the initialised kernel; bad
  inputs name the problem."""
  lin, _ = _pruned_linear(in_features=40, out_features=24, sparsity=0.8)
  sl = SparseLinear.from_linear(lin, method="escort")
  x = _x((3, 40))
  assert_close(sl(x), lin(x), F32_BOUND)
  mask = np.random.default_rng(2).random((40, 24)) < 0.25
  masked = SparseLinear(40, 24, mask=mask, kernel_init=np_init,
                        rngs=nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(masked.dense_kernel()) != 0, mask)
  pruned = SparseLinear(40, 24, sparsity=0.9, rngs=nnx.Rngs(1))
  assert pruned.nnz == round(40 * 24 * 0.1)
  with pytest.raises(ValueError, match=r"expects \(\.\.\., 40\)"):
    sl(_x((3, 41)))
  with pytest.raises(ValueError, match="mask has shape"):
    SparseLinear(40, 24, mask=mask.T, rngs=nnx.Rngs(1))
  with pytest.raises(UnsupportedConvError, match="not an nnx.Linear"):
    SparseLinear.from_linear(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
