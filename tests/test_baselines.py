"""The dense and BCOO baselines (escort_jax.baselines) against lax.conv at
HIGHEST precision, in every layout, with groups, strides, padding, dilation,
bias and relu; and the im2col feature order they rely on."""

from __future__ import annotations

import zlib

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import SparseKernel, sparse_conv
from escort_jax import baselines as bl
from tests.conftest import (hwio_shape, random_array, random_pruned_kernel,
                            reference_conv, rel_err)

F32_BOUND = 1e-5

LAYOUTS = [
    ("NHWC", "HWIO", "NHWC"),
    ("NCHW", "OIHW", "NCHW"),
    ("NHWC", "OIHW", "NCHW"),
    ("CHWN", "HWIO", "NHCW"),
]

# (C, O, kernel (r, s), input (h, w), groups, strides, padding, dilation)
CASES = [
    (8, 12, (3, 3), (9, 10), 1, (1, 1), "SAME", (1, 1)),
    (8, 12, (3, 3), (9, 10), 2, (2, 1), ((1, 0), (2, 1)), (1, 1)),
    (6, 4, (5, 3), (11, 9), 2, (3, 2), "VALID", (2, 1)),
    (4, 6, (1, 1), (5, 5), 1, (1, 1), ((0, 0), (0, 0)), (1, 1)),
    (6, 6, (3, 3), (7, 7), 3, (1, 1), ((-1, 2), (1, 1)), (1, 1)),
]


def _input_shape(spec, n, c, h, w):
  dims = dict(N=n, C=c, H=h, W=w)
  return tuple(dims[d] for d in spec)


def _case(rng, dn, case, sparsity=0.7):
  c, o, (r, s), (h, w), g, strides, padding, dilation = case
  kernel = random_pruned_kernel(rng, hwio_shape((r, s), c, o, g, dn[1]),
                                sparsity)
  sk = SparseKernel.from_dense(kernel, layout=dn[1])
  x = random_array(rng, _input_shape(dn[0], 2, c, h, w))
  kwargs = dict(window_strides=strides, padding=padding,
                rhs_dilation=dilation, feature_group_count=g,
                dimension_numbers=dn)
  return x, kernel, sk, kwargs


# Every case in Flax's layout and in one other (cycling), to keep the suite
# fast: 10 combinations, each layout three times or more.
COMBOS = [(LAYOUTS[0], c) for c in CASES] + [
    (LAYOUTS[1 + i % 3], c) for i, c in enumerate(CASES)]


@pytest.mark.parametrize(
    "dn,case", COMBOS,
    ids=[f"{''.join(d[0])}-{d[1]}-{d[2]}-case{CASES.index(c)}"
         for d, c in COMBOS])
@pytest.mark.parametrize("which", ["dense", "bcoo"])
def test_matches_lax_highest(dn, case, which):
  rng = np.random.default_rng(zlib.crc32(repr((dn, case, which)).encode()))
  x, kernel, sk, kwargs = _case(rng, dn, case)
  make = bl.make_dense_conv if which == "dense" else bl.make_bcoo_conv
  fn = make(sk, kwargs["window_strides"], kwargs["padding"],
            rhs_dilation=kwargs["rhs_dilation"],
            feature_group_count=kwargs["feature_group_count"],
            dimension_numbers=kwargs["dimension_numbers"],
            precision=lax.Precision.HIGHEST)
  y = fn(x)
  ref = reference_conv(x, kernel, kwargs["window_strides"], kwargs["padding"],
                       rhs_dilation=kwargs["rhs_dilation"],
                       feature_group_count=kwargs["feature_group_count"],
                       dimension_numbers=dn)
  assert y.shape == ref.shape
  assert y.dtype == jnp.float32
  assert rel_err(y, ref) < F32_BOUND


@pytest.mark.parametrize("kernel_layout", ["OHWI", "IOHW"])
@pytest.mark.parametrize("dn,case", COMBOS[1::4])
def test_dense_kernel_held_in_another_layout(dn, case, kernel_layout):
  """kernel_layout (escort_jax.nnx.DenseConv's OHWI, or any permutation)
  changes how the dense kernel is held, not the result."""
  rng = np.random.default_rng(zlib.crc32(repr((dn, case)).encode()))
  x, kernel, sk, kwargs = _case(rng, dn, case)
  fn = bl.make_dense_conv(sk, precision=lax.Precision.HIGHEST,
                          kernel_layout=kernel_layout, **kwargs)
  assert fn.operands[0].shape == tuple(
      sk.shape[sk.layout.index(d)] for d in kernel_layout)
  ref = reference_conv(x, kernel, kwargs["window_strides"], kwargs["padding"],
                       rhs_dilation=kwargs["rhs_dilation"],
                       feature_group_count=kwargs["feature_group_count"],
                       dimension_numbers=dn)
  assert rel_err(fn(x), ref) < F32_BOUND
  with pytest.raises(ValueError, match="a permutation of 'OIHW'"):
    bl.make_dense_conv(sk, kernel_layout="OHW", **kwargs)


@pytest.mark.parametrize("which", ["dense", "bcoo"])
def test_convenience_functions_bias_relu(which):
  rng = np.random.default_rng(1)
  dn = ("NCHW", "OIHW", "NCHW")
  x, kernel, sk, kwargs = _case(rng, dn, CASES[1])
  bias = random_array(rng, (12,))
  f = bl.dense_conv if which == "dense" else bl.bcoo_conv
  y = f(x, sk, bias=bias, activation="relu",
        precision=lax.Precision.HIGHEST, **kwargs)
  ref = reference_conv(x, kernel, kwargs["window_strides"], kwargs["padding"],
                       feature_group_count=2, dimension_numbers=dn,
                       bias=bias, activation="relu")
  assert rel_err(y, ref) < F32_BOUND
  # Same as the op's dense path, bit for bit up to summation order.
  y_op = sparse_conv(x, sk, bias=bias, activation="relu", method="dense",
                     precision=lax.Precision.HIGHEST, **kwargs)
  assert rel_err(y, y_op) < F32_BOUND


def test_patches_are_channel_major():
  """conv_general_dilated_patches orders features (C, R, S), which the BCOO
  column index (c * R + r) * S + s assumes."""
  rng = np.random.default_rng(2)
  x = random_array(rng, (2, 6, 7, 3))
  r, s = 2, 3
  p = lax.conv_general_dilated_patches(
      x, (r, s), (1, 1), "VALID", dimension_numbers=("NHWC", "OIHW", "CNHW"),
      precision=lax.Precision.HIGHEST)
  assert p.shape == (3 * r * s, 2, 5, 5)
  for c in range(3):
    for i in range(r):
      for j in range(s):
        np.testing.assert_array_equal(p[(c * r + i) * s + j],
                                      x[:, i:i + 5, j:j + 5, c])


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_bcoo_matrix_is_block_diagonal(groups):
  rng = np.random.default_rng(3)
  c, o, r, s = 8, 8, 3, 2
  kernel = random_pruned_kernel(rng, (r, s, c // groups, o), 0.6)
  sk = SparseKernel.from_dense(kernel)
  m = np.asarray(bl.bcoo_weight_matrix(sk, groups).todense())
  assert m.shape == (o, c * r * s)
  expect = np.zeros((o, c * r * s), np.float32)
  oirs = kernel.transpose(3, 2, 0, 1).reshape(o, -1)  # (O, C/G * R * S)
  width = (c // groups) * r * s
  per = o // groups
  for k in range(o):
    g = k // per
    expect[k, g * width:(g + 1) * width] = oirs[k]
  np.testing.assert_array_equal(m, expect)


def test_bf16_and_preferred_element_type():
  rng = np.random.default_rng(4)
  x, kernel, sk, kwargs = _case(rng, LAYOUTS[0], CASES[0])
  skb = sk.with_values(sk.values.astype(jnp.bfloat16))
  xb = x.astype(jnp.bfloat16)
  ref = reference_conv(xb, skb.todense(), (1, 1), "SAME")
  for make in (bl.make_dense_conv, bl.make_bcoo_conv):
    y = make(skb)(xb)
    assert y.dtype == jnp.bfloat16
    assert rel_err(y, ref) < 2e-2
    y32 = make(skb, preferred_element_type=jnp.float32)(xb)
    assert y32.dtype == jnp.float32
    assert rel_err(y32, ref) < 1e-5


def test_builder_reuse_jit_and_empty_batch():
  rng = np.random.default_rng(5)
  x, kernel, sk, kwargs = _case(rng, LAYOUTS[0], CASES[0])
  for make in (bl.make_dense_conv, bl.make_bcoo_conv):
    fn = make(sk, precision=lax.Precision.HIGHEST)
    ref = reference_conv(x, kernel, (1, 1), "SAME")
    assert rel_err(fn(x), ref) < F32_BOUND
    assert rel_err(jax.jit(fn)(x), ref) < F32_BOUND  # inside another jit
    x1 = x[:1, :5]  # another shape, same builder
    assert rel_err(fn(x1), reference_conv(x1, kernel, (1, 1), "SAME")) < (
        F32_BOUND)
    assert fn(x[:0]).shape == (0, 9, 10, 12)


def test_cusparse_flag_runs():
  """On the CPU the flag changes nothing; it must still trace and agree."""
  rng = np.random.default_rng(6)
  x, kernel, sk, kwargs = _case(rng, LAYOUTS[0], CASES[1])
  y = bl.make_bcoo_conv(sk, cusparse=True, **kwargs)(x)
  ref = reference_conv(x, kernel, kwargs["window_strides"], kwargs["padding"],
                       feature_group_count=2)
  assert rel_err(y, ref) < F32_BOUND


def test_validation_is_the_ops():
  rng = np.random.default_rng(7)
  x, kernel, sk, kwargs = _case(rng, LAYOUTS[0], CASES[0])
  for make in (bl.make_dense_conv, bl.make_bcoo_conv):
    with pytest.raises(ValueError, match="unknown activation"):
      make(sk, activation="gelu")(x)
    with pytest.raises(ValueError, match="kernel layout"):
      make(sk, dimension_numbers=("NCHW", "OIHW", "NCHW"))(x)
    with pytest.raises(ValueError, match="feature_group_count"):
      make(sk, feature_group_count=3)(x[..., :6])
    with pytest.raises(TypeError, match="SparseKernel"):
      make(np.zeros((3, 3, 8, 12)))
