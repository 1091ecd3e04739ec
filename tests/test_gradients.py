"""Gradients of sparse_conv's escort path (custom_vjp around the Pallas
kernels) against finite differences and against the masked gradients of a
dense lax convolution; vmap and jit(grad)."""

from __future__ import annotations

import chex
import jax
from jax import lax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from escort_jax import KernelConfig, SparseKernel, sparse_conv
from tests.conftest import (assert_close, enable_x64, hwio_shape,
                            random_array, random_pruned_kernel,
                            reference_conv, rel_err)


def _problem(rng, *, layout="NHWC", n=2, hw=(6, 7), c=4, o=4,
             kernel_hw=(3, 3), groups=1, sparsity=0.5, dtype=jnp.float32,
             bias=True):
  kernel_layout = "HWIO" if layout == "NHWC" else "OIHW"
  x_shape = (n, *hw, c) if layout == "NHWC" else (n, c, *hw)
  x = random_array(rng, x_shape, dtype)
  kernel = random_pruned_kernel(
      rng, hwio_shape(kernel_hw, c, o, groups, kernel_layout), sparsity,
      dtype=dtype)
  sk = SparseKernel.from_dense(kernel, layout=kernel_layout)
  b = random_array(rng, (o,), dtype) if bias else None
  return x, kernel, sk, b, (layout, kernel_layout, layout)


def _escort_and_dense_grads(rng, x, kernel, sk, b, dn, conv_kw,
                            activation=None, config=None,
                            ref_dtype=jnp.float32, preferred=None):
  """(escort grads of values, bias, x) and (dense grads of kernel, bias, x)
  of <cotangent, conv(x)>, with a random cotangent."""

  def escort_conv(values, bias, x):
    return sparse_conv(x, sk.with_values(values), bias=bias,
                       activation=activation, method="escort", config=config,
                       dimension_numbers=dn, preferred_element_type=preferred,
                       **conv_kw)

  def dense_conv(kernel, bias, x):
    return reference_conv(x, kernel, conv_kw["window_strides"],
                          conv_kw["padding"],
                          rhs_dilation=conv_kw.get("rhs_dilation", (1, 1)),
                          feature_group_count=conv_kw.get(
                              "feature_group_count", 1),
                          dimension_numbers=dn, bias=bias,
                          activation=activation, dtype=ref_dtype)

  y = jax.eval_shape(escort_conv, sk.values, b, x)
  ct = jnp.asarray(rng.standard_normal(y.shape), y.dtype)

  escort_grads = jax.jit(jax.grad(
      lambda v, bb, xx: jnp.sum(ct.astype(ref_dtype) *
                                escort_conv(v, bb, xx).astype(ref_dtype)),
      argnums=(0, 1, 2)))(sk.values, b, x)
  dense_grads = jax.grad(
      lambda k, bb, xx: jnp.sum(ct.astype(ref_dtype) * dense_conv(k, bb, xx)),
      argnums=(0, 1, 2))(jnp.asarray(kernel, ref_dtype),
                         None if b is None else b.astype(ref_dtype),
                         x.astype(ref_dtype))
  return escort_grads, dense_grads


GRAD_CASES = [
    dict(id="nhwc_stride_bias_relu", layout="NHWC", conv=dict(
        window_strides=(2, 1), padding="SAME"), activation="relu"),
    dict(id="nchw_groups_dilation_bias_relu", layout="NCHW", c=4, o=6,
         groups=2, conv=dict(window_strides=(1, 1),
                             padding=((2, 1), (0, 2)), rhs_dilation=(2, 1),
                             feature_group_count=2), activation="relu"),
    dict(id="nhwc_depthwise_stride2_small_tiles", layout="NHWC", c=4, o=4,
         groups=4, hw=(7, 9), conv=dict(window_strides=(2, 2),
                                        padding="VALID",
                                        feature_group_count=4),
         config=KernelConfig(rows_per_program=2, block_q=16)),
    dict(id="nchw_sparse99_empty_rows_bias_relu", layout="NCHW", c=8, o=8,
         sparsity=0.99, conv=dict(window_strides=(1, 2), padding="SAME",
                                  rhs_dilation=(1, 2)), activation="relu"),
    dict(id="nhwc_dense_kernel_dilation_stride", layout="NHWC", c=3, o=5,
         sparsity=0.0, kernel_hw=(2, 3), n=1, hw=(9, 8),
         conv=dict(window_strides=(2, 3), padding=((1, 0), (1, 3)),
                   rhs_dilation=(2, 2))),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=[c["id"] for c in GRAD_CASES])
def test_gradients_match_masked_dense_gradients(case):
  rng = np.random.default_rng([401, len(case["id"]), case.get("c", 4)])
  x, kernel, sk, b, dn = _problem(
      rng, layout=case["layout"], n=case.get("n", 2), hw=case.get("hw", (6, 7)),
      c=case.get("c", 4), o=case.get("o", 4),
      kernel_hw=case.get("kernel_hw", (3, 3)), groups=case.get("groups", 1),
      sparsity=case.get("sparsity", 0.5))
  (dv, db, dx), (dk_dense, db_ref, dx_ref) = _escort_and_dense_grads(
      rng, x, kernel, sk, b, dn, case["conv"],
      activation=case.get("activation"), config=case.get("config"))
  chex.assert_shape(dv, (sk.nnz,))
  chex.assert_trees_all_equal_shapes_and_dtypes((dv, db, dx),
                                                (sk.values, b, x))
  pos = sk.structure.dense_positions()
  mask = np.zeros(kernel.shape, bool)
  mask[pos] = True
  if sk.nnz:
    assert_close(dv, np.asarray(dk_dense)[pos], 1e-5, what="d values")
  assert_close(db, db_ref, 1e-5, what="d bias")
  assert_close(dx, dx_ref, 1e-5, what="d x")
  # As a dense kernel, the gradient lives on the kept positions only ...
  dk_sparse = np.asarray(sk.with_values(dv).todense())
  np.testing.assert_array_equal(dk_sparse[~mask], 0.0)
  np.testing.assert_allclose(dk_sparse[mask], np.asarray(dk_dense)[mask],
                             rtol=1e-4, atol=1e-4)
  # ... while the dense gradient is nonzero at pruned positions too, so the
  # masking above is a real property, not an accident of the data.
  if (~mask).any():
    assert np.abs(np.asarray(dk_dense)[~mask]).max() > 0


def test_gradients_low_precision():
  rng = np.random.default_rng(402)
  x, kernel, sk, b, dn = _problem(rng, dtype=jnp.bfloat16, c=4, o=6)
  conv_kw = dict(window_strides=(1, 2), padding="SAME")
  (dv, db, dx), (dk, db_ref, dx_ref) = _escort_and_dense_grads(
      rng, x, kernel, sk, b, dn, conv_kw, activation="relu")
  chex.assert_trees_all_equal_shapes_and_dtypes((dv, db, dx),
                                                (sk.values, b, x))
  pos = sk.structure.dense_positions()
  assert_close(dv, np.asarray(dk)[pos], 1e-2, what="d values")
  assert_close(db, db_ref, 1e-2, what="d bias")
  assert_close(dx, dx_ref, 1e-2, what="d x")
  # bfloat16 inputs with a float32 output: float32 cotangents.
  (dv, db, dx), (dk, db_ref, dx_ref) = _escort_and_dense_grads(
      rng, x, kernel, sk, b, dn, conv_kw, preferred=jnp.float32)
  chex.assert_trees_all_equal_shapes_and_dtypes((dv, db, dx),
                                                (sk.values, b, x))
  assert_close(dv, np.asarray(dk)[pos], 1e-2, what="d values (f32 out)")
  assert_close(dx, dx_ref, 1e-2, what="d x (f32 out)")


@pytest.mark.parametrize("layout,conv_kw,activation", [
    ("NHWC", dict(window_strides=(1, 2), padding="SAME"), None),
    ("NCHW", dict(window_strides=(2, 1), padding=((1, 2), (0, 1)),
                  rhs_dilation=(1, 2), feature_group_count=2), None),
])
def test_check_grads_float64(layout, conv_kw, activation):
  with enable_x64():
    rng = np.random.default_rng([403, len(conv_kw)])
    groups = conv_kw.get("feature_group_count", 1)
    x, kernel, sk, b, dn = _problem(rng, layout=layout, n=1, hw=(5, 6), c=4,
                                    o=4, groups=groups, dtype=jnp.float64)

    @jax.jit
    def f(values, bias, x):
      return sparse_conv(x, sk.with_values(values), bias=bias,
                         activation=activation, dimension_numbers=dn,
                         method="escort", **conv_kw)

    assert f(sk.values, b, x).dtype == jnp.float64
    # Central differences are exact for this bilinear map up to rounding,
    # so float64 allows tolerances far below jax's default 1e-5.
    check_grads(f, (sk.values, b, x), order=1, modes=["rev"], atol=1e-9,
                rtol=1e-9)
    check_grads(lambda bb: f(sk.values, bb, x), (b,), order=1,
                modes=["rev"], atol=1e-9, rtol=1e-9)
    check_grads(lambda v: f(v, b, x), (sk.values,), order=1, modes=["rev"],
                atol=1e-9, rtol=1e-9)
    check_grads(lambda xx: f(sk.values, b, xx), (x,), order=1,
                modes=["rev"], atol=1e-9, rtol=1e-9)
    # Must fail for a wrong gradient: a scaled VJP is caught.
    wrong = jax.custom_vjp(lambda v: f(v, b, x))
    wrong.defvjp(lambda v: (f(v, b, x), v),
                 lambda v, ct: (1.01 * jax.vjp(lambda vv: f(vv, b, x), v)[1](
                     ct)[0],))
    with pytest.raises(AssertionError):
      check_grads(wrong, (sk.values,), order=1, modes=["rev"], atol=1e-9,
                  rtol=1e-9)


def test_float64_gradients_of_values_and_x_match_dense():
  with enable_x64():
    rng = np.random.default_rng(404)
    x, kernel, sk, b, dn = _problem(rng, dtype=jnp.float64, c=4, o=6,
                                    groups=2)
    conv_kw = dict(window_strides=(2, 1), padding="SAME",
                   feature_group_count=2)
    (dv, db, dx), (dk, db_ref, dx_ref) = _escort_and_dense_grads(
        rng, x, kernel, sk, b, dn, conv_kw, activation="relu",
        ref_dtype=jnp.float64)
    chex.assert_trees_all_equal_shapes_and_dtypes((dv, db, dx),
                                                  (sk.values, b, x))
    assert_close(dv, np.asarray(dk)[sk.structure.dense_positions()], 1e-12,
                 what="d values")
    assert_close(dx, dx_ref, 1e-12, what="d x")


def test_float64_bias_gradient_is_float64_accurate():
  # Regression: the bias gradient was once summed in float32 for every dtype
  # (rel_err ~7e-8 here); it must accumulate in float64 for float64.
  with enable_x64():
    rng = np.random.default_rng(405)
    x, kernel, sk, b, dn = _problem(rng, dtype=jnp.float64, n=2, hw=(7, 9),
                                    c=3, o=4)
    conv_kw = dict(window_strides=(1, 1), padding="SAME")
    (_, db, _), (_, db_ref, _) = _escort_and_dense_grads(
        rng, x, kernel, sk, b, dn, conv_kw, ref_dtype=jnp.float64)
    chex.assert_type(db, jnp.float64)
    assert_close(db, db_ref, 1e-12, what="d bias")


def test_nan_in_unread_input_keeps_gradients_finite():
  # W=8, a 3-wide kernel, stride 2, VALID: column 7 is read by no real
  # output, only by the "wide" columns that the stretched layout computes and
  # crops. A NaN there must reach neither the output nor any gradient.
  rng = np.random.default_rng(406)
  x, kernel, sk, b, dn = _problem(rng, n=2, hw=(7, 8), c=3, o=4,
                                  sparsity=0.3)
  conv_kw = dict(window_strides=(2, 2), padding="VALID")
  x_nan = x.at[:, :, 7, :].set(jnp.nan)
  x_zero = x.at[:, :, 7, :].set(0.0)
  ct = random_array(rng, (2, 3, 3, 4))

  def loss(v, bb, xx, method):
    y = sparse_conv(xx, sk.with_values(v), bias=bb, method=method,
                    precision=lax.Precision.HIGHEST, **conv_kw)
    return jnp.sum(ct * y)

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)),
                  static_argnums=3)(sk.values, b, x_nan, "escort")
  ref = jax.grad(loss, argnums=(0, 1, 2))(sk.values, b, x_zero, "dense")
  for name, g, r in zip(("values", "bias", "x"), grads, ref):
    assert_close(g, r, 1e-5, what=f"d {name}")
  np.testing.assert_array_equal(np.asarray(grads[2])[:, :, 7, :], 0.0)


def test_vmap_over_leading_batch_dim_equals_loop():
  rng = np.random.default_rng(407)
  x, kernel, sk, b, dn = _problem(rng, n=2, hw=(6, 7), c=4, o=6, groups=2)
  xs = random_array(rng, (3, 2, 6, 7, 4))
  ct = random_array(rng, (3, 2, 3, 7, 6))

  @jax.jit
  def conv(x, values):
    return sparse_conv(x, sk.with_values(values), (2, 1), "SAME",
                       feature_group_count=2, bias=b, activation="relu",
                       method="escort")

  ys = jax.vmap(conv, in_axes=(0, None))(xs, sk.values)
  loop = jnp.stack([conv(xs[i], sk.values) for i in range(3)])
  chex.assert_shape(ys, (3, 2, 3, 7, 6))
  assert_close(ys, loop, 1e-6)
  for i in range(3):
    assert_close(ys[i], reference_conv(xs[i], kernel, (2, 1), "SAME",
                                       feature_group_count=2, bias=b,
                                       activation="relu"), 1e-5)
  # Gradients through vmap: per-example x gradients and the summed values
  # gradient equal the loop's.
  def loss(values, xs):
    return jnp.sum(ct * jax.vmap(conv, in_axes=(0, None))(xs, values))

  dv, dxs = jax.jit(jax.grad(loss, argnums=(0, 1)))(sk.values, xs)
  one = jax.jit(jax.grad(lambda v, xx, c: jnp.sum(c * conv(xx, v)),
                         argnums=(0, 1)))
  per_example = [one(sk.values, xs[i], ct[i]) for i in range(3)]
  dv_loop = sum(g[0] for g in per_example)
  dx_loop = jnp.stack([g[1] for g in per_example])
  assert_close(dv, dv_loop, 1e-5, what="d values")
  assert_close(dxs, dx_loop, 1e-5, what="d x")


def test_jit_of_grad_equals_eager_grad():
  rng = np.random.default_rng(408)
  x, kernel, sk, b, dn = _problem(rng, n=1, hw=(5, 7), c=3, o=5)
  ct = random_array(rng, (1, 5, 7, 5))

  def loss(sk, b, x):
    y = sparse_conv(x, sk, (1, 1), "SAME", bias=b, activation="relu",
                    method="escort")
    return jnp.sum(ct * y)

  grad = jax.grad(loss, argnums=(0, 1, 2))
  eager = grad(sk, b, x)
  jitted = jax.jit(grad)(sk, b, x)
  # The gradient with respect to a SparseKernel is a SparseKernel of the
  # same structure.
  assert isinstance(jitted[0], SparseKernel)
  assert jitted[0].structure == sk.structure
  chex.assert_trees_all_close(jitted, eager, rtol=1e-5, atol=1e-5)
  dense = jax.grad(lambda k, bb, xx: jnp.sum(ct * reference_conv(
      xx, k, (1, 1), "SAME", bias=bb, activation="relu")),
                   argnums=(0, 1, 2))(jnp.asarray(kernel), b, x)
  assert_close(jitted[0].values,
               np.asarray(dense[0])[sk.structure.dense_positions()], 1e-5)
  assert_close(jitted[2], dense[2], 1e-5)
  assert rel_err(jitted[1], dense[1]) <= 1e-5
