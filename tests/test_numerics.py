"""NaN semantics and run-to-run determinism of sparse_conv.

NaN semantics (README, "NaN semantics"): the escort kernels skip pruned
weights, so a NaN in the input reaches exactly the outputs that some *kept*
weight reads it into:

    y[n, oy, ox, k] is NaN  <=>  some kept weight (r, s, c, k) reads
    x[n, oy * sh + r * dh - pad_top, ox * sw + s * dw - pad_left, c_global]
    and that input is NaN,

with c_global the input channel of c in k's feature group. method="dense"
multiplies the pruned zeros too (0 * NaN = NaN), so there a NaN reaches at
least every output whose receptive field holds it (it may spread further,
depending on the backend's convolution algorithm): a strictly larger set
whenever a pruned weight reads the NaN. A weight kept with the value zero
(SparseKernel.from_mask, mask True where the value is 0) is not a structural
zero: 0 * NaN = NaN goes through it in escort as well.

Also: int32 indexing. The escort kernels index the flat input and output
with int32; an input whose flat layout reaches 2**31 elements must raise a
clear OverflowError at trace time (jax.eval_shape, nothing allocated).
"""

from __future__ import annotations

import tracemalloc

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import KernelConfig, SparseKernel, sparse_conv
from escort_jax.conv_geometry import make_geometry
from tests.conftest import (hwio_shape, random_array, random_pruned_kernel,
                            reference_conv, rel_err)


def expected_nan_mask(nan_in: np.ndarray, structure, groups: int, strides,
                      padding, dilation) -> np.ndarray:
  """(N, Ho, Wo, O) bool: the outputs a NaN of `nan_in` (N, H, W, C) reaches
  through the kept weights of `structure` (any layout)."""
  n, h, w, c = nan_in.shape
  g = make_geometry(nan_in.shape, structure, strides, padding, dilation,
                    groups)
  (pt, pb), (pl, pr) = g.padding
  assert min(pt, pb, pl, pr) >= 0, "negative padding: not modelled here"
  padded = np.pad(nan_in, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  out = np.zeros((n, g.out_h, g.out_w, g.out_channels), bool)
  sh, sw = g.strides
  dh, dw = g.dilation
  k, ci, r, s = structure.coordinates()
  per_group_in = c // groups
  per_group_out = g.out_channels // groups
  for kk, cc, rr, ss in zip(k, ci, r, s):
    c_global = (kk // per_group_out) * per_group_in + cc
    y0, x0 = rr * dh, ss * dw
    window = padded[:, y0:y0 + (g.out_h - 1) * sh + 1:sh,
                    x0:x0 + (g.out_w - 1) * sw + 1:sw, c_global]
    out[..., kk] |= window
  return out


def inputs_read(x_shape, structure, groups: int, strides, padding,
                dilation) -> np.ndarray:
  """(N, H, W, C) bool: the inputs some kept weight reads for some output
  (the transpose of expected_nan_mask)."""
  n, h, w, c = x_shape
  g = make_geometry(x_shape, structure, strides, padding, dilation, groups)
  (pt, pb), (pl, pr) = g.padding
  read = np.zeros((n, h + pt + pb, w + pl + pr, c), bool)
  sh, sw = g.strides
  dh, dw = g.dilation
  k, ci, r, s = structure.coordinates()
  for kk, cc, rr, ss in zip(k, ci, r, s):
    c_global = (kk // (g.out_channels // groups)) * (c // groups) + cc
    read[:, rr * dh:rr * dh + (g.out_h - 1) * sh + 1:sh,
         ss * dw:ss * dw + (g.out_w - 1) * sw + 1:sw, c_global] = True
  return read[:, pt:pt + h, pl:pl + w, :]


def full_structure(shape, layout="HWIO"):
  """Every position kept: what the dense path effectively multiplies."""
  return SparseKernel.from_mask(np.zeros(shape, np.float32),
                                np.ones(shape, bool), layout).structure


def _nhwc(a, layout):
  return a if layout == "NHWC" else np.transpose(a, (0, 2, 3, 1))


NAN_CASES = [
    dict(id="same_3x3", n=2, hw=(7, 9), c=4, o=5, kernel_hw=(3, 3),
         strides=(1, 1), padding="SAME", dilation=(1, 1), groups=1),
    dict(id="stride2_dilation_asym_pad_relu_bias", n=2, hw=(9, 8), c=3, o=4,
         kernel_hw=(3, 2), strides=(2, 1), padding=((2, 0), (1, 3)),
         dilation=(1, 2), groups=1, relu=True, bias=True),
    dict(id="groups2_stride3", n=3, hw=(9, 9), c=4, o=6, kernel_hw=(2, 3),
         strides=(3, 2), padding="VALID", dilation=(2, 1), groups=2),
    dict(id="depthwise_nchw", layout="NCHW", n=2, hw=(8, 7), c=4, o=8,
         kernel_hw=(3, 3), strides=(1, 2), padding="SAME", dilation=(1, 1),
         groups=4),
]


@pytest.mark.parametrize("case", NAN_CASES, ids=[c["id"] for c in NAN_CASES])
def test_nan_reaches_exactly_the_outputs_of_kept_weights(case):
  layout = case.get("layout", "NHWC")
  kernel_layout = "HWIO" if layout == "NHWC" else "OIHW"
  dn = (layout, kernel_layout, layout)
  n, (h, w), c, o = case["n"], case["hw"], case["c"], case["o"]
  groups = case["groups"]
  rng = np.random.default_rng([801, len(case["id"])])
  kernel = random_pruned_kernel(
      rng, hwio_shape(case["kernel_hw"], c, o, groups, kernel_layout), 0.7)
  sk = SparseKernel.from_dense(kernel, layout=kernel_layout)
  x_shape = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
  x = np.array(random_array(rng, x_shape))
  # NaNs at the corners and edges (where the wide rows of the stretched
  # layout wrap around) and at a few random positions.
  nan_in = np.zeros((n, h, w, c), bool)
  nan_in[0, 0, 0, 0] = True
  nan_in[-1, h - 1, w - 1, c - 1] = True
  nan_in[0, h // 2, w - 1, c // 2] = True
  nan_in[n // 2, 1, 0, 1 % c] = True
  for _ in range(3):
    nan_in[tuple(rng.integers(0, d) for d in nan_in.shape)] = True
  nan_in_layout = nan_in if layout == "NHWC" else nan_in.transpose(0, 3, 1, 2)
  x_nan = np.where(nan_in_layout, np.nan, x).astype(np.float32)
  b = random_array(rng, (o,)) if case.get("bias") else None
  activation = "relu" if case.get("relu") else None
  kw = dict(feature_group_count=groups, dimension_numbers=dn,
            rhs_dilation=case["dilation"], activation=activation)

  y = np.asarray(jax.jit(lambda x, sk, b: sparse_conv(
      x, sk, case["strides"], case["padding"], bias=b, method="escort",
      **kw))(jnp.asarray(x_nan), sk, b))
  y_dense = np.asarray(sparse_conv(jnp.asarray(x_nan), sk, case["strides"],
                                   case["padding"], bias=b, method="dense",
                                   **kw))
  expected = expected_nan_mask(nan_in, sk.structure, groups,
                               case["strides"], case["padding"],
                               case["dilation"])
  receptive = expected_nan_mask(nan_in, full_structure(kernel.shape,
                                                       kernel_layout),
                                groups, case["strides"], case["padding"],
                                case["dilation"])
  y_mask = _nhwc(np.isnan(y), layout)
  dense_mask = _nhwc(np.isnan(y_dense), layout)

  assert expected.any() and (~expected).any(), "a vacuous NaN pattern"
  np.testing.assert_array_equal(
      y_mask, expected,
      err_msg="escort: NaN outputs differ from those of the kept weights")
  # The dense path: at least the whole receptive field, and here strictly
  # more than escort (some pruned weight reads a NaN).
  assert np.all(dense_mask[receptive]), "dense misses a NaN of 0 * NaN"
  assert np.all(dense_mask[expected])
  assert (dense_mask & ~expected).any(), (
      "this case should show the documented escort/dense difference")
  # The outputs the NaN does not reach are the convolution of the clean
  # input.
  ref = _nhwc(np.asarray(reference_conv(
      jnp.asarray(x), kernel, case["strides"], case["padding"],
      rhs_dilation=case["dilation"], feature_group_count=groups,
      dimension_numbers=dn, bias=b, activation=activation)), layout)
  y_nhwc = _nhwc(y, layout)
  assert not np.isnan(ref).any()
  assert rel_err(y_nhwc[~expected], ref[~expected]) <= 1e-5


def test_kept_zero_weights_propagate_nan():
  # Input channel 1 is read only by weights whose value is 0. from_dense
  # drops them (structural zeros: no NaN), from_mask with mask True there
  # keeps them (0 * NaN = NaN, in escort as in dense).
  rng = np.random.default_rng(802)
  kernel = random_pruned_kernel(rng, (3, 3, 3, 4), 0.5)
  kernel[:, :, 1, :] = 0.0
  mask = kernel != 0
  mask[1, 1, 1, 2] = True   # kept zeros: centre tap, output channel 2
  mask[0, 2, 1, 0] = True   # and a corner tap, output channel 0
  sk_dropped = SparseKernel.from_dense(kernel)
  sk_kept = SparseKernel.from_mask(kernel, mask)
  assert sk_kept.nnz == sk_dropped.nnz + 2
  np.testing.assert_array_equal(np.asarray(sk_kept.todense()), kernel)

  x = np.array(random_array(rng, (2, 6, 7, 3)))
  nan_in = np.zeros(x.shape, bool)
  nan_in[0, 2, 3, 1] = True
  nan_in[1, 5, 6, 1] = True
  x_nan = jnp.asarray(np.where(nan_in, np.nan, x))
  expected = expected_nan_mask(nan_in, sk_kept.structure, 1, (1, 1), "SAME",
                               (1, 1))
  assert expected[..., 2].any() and expected[..., 0].any()
  assert not expected[..., [1, 3]].any()
  # Unsplit rows, and rows split in parts (whose boundaries move with the
  # two extra entries, so the sums run in another order there).
  for config, bitwise in ((KernelConfig(), True),
                          (KernelConfig(1, nhwc_out=True, split=4), False)):
    conv = jax.jit(lambda x, sk, config=config: sparse_conv(
        x, sk, (1, 1), "SAME", method="escort", config=config))
    y_dropped = np.asarray(conv(x_nan, sk_dropped))
    y_kept = np.asarray(conv(x_nan, sk_kept))
    assert not np.isnan(y_dropped).any()
    np.testing.assert_array_equal(np.isnan(y_kept), expected)
    # Elsewhere both compute the same numbers (the kept zeros add 0).
    if bitwise:
      np.testing.assert_array_equal(y_kept[~expected], y_dropped[~expected])
    else:
      np.testing.assert_allclose(y_kept[~expected], y_dropped[~expected],
                                 rtol=1e-5, atol=1e-6)


def test_nan_behind_only_pruned_weights_reaches_nothing_in_escort():
  # A random structure, and NaNs at every input position that no kept
  # weight reads for any output: escort stays finite, dense does not.
  rng = np.random.default_rng(803)
  kernel = random_pruned_kernel(rng, (3, 3, 4, 4), 0.8)
  sk = SparseKernel.from_dense(kernel)
  x = np.array(random_array(rng, (2, 7, 7, 4)))
  read = inputs_read(x.shape, sk.structure, 1, (2, 2), "VALID", (1, 1))
  assert (~read).any() and read.any()
  x_nan = jnp.asarray(np.where(read, x, np.nan))
  y = np.asarray(sparse_conv(x_nan, sk, (2, 2), "VALID", method="escort"))
  y_dense = np.asarray(sparse_conv(x_nan, sk, (2, 2), "VALID",
                                   method="dense"))
  assert np.all(np.isfinite(y))
  ref = np.asarray(reference_conv(jnp.asarray(x), kernel, (2, 2), "VALID"))
  assert rel_err(y, ref) <= 1e-5
  assert np.isnan(y_dense).any()


# --------------------------------------------------------------------------
# Determinism.


def _problem(seed):
  rng = np.random.default_rng(seed)
  kernel = random_pruned_kernel(rng, (3, 3, 6, 8), 0.6)
  sk = SparseKernel.from_dense(kernel)
  x = random_array(rng, (3, 9, 8, 6))
  b = random_array(rng, (8,))
  ct = random_array(rng, (3, 5, 6, 8))
  return x, sk, b, ct


def _forward(x, sk, b):
  return sparse_conv(x, sk, (2, 1), ((1, 2), (0, 2)), rhs_dilation=(1, 2),
                     bias=b, activation="relu", method="escort")


def _grads(x, sk, b, ct):
  return jax.grad(lambda v, b, x: jnp.sum(ct * _forward(x, sk.with_values(v),
                                                        b)),
                  argnums=(0, 1, 2))(sk.values, b, x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_escort_is_bitwise_deterministic(dtype):
  x, sk, b, ct = _problem(804)
  x, b = x.astype(dtype), b.astype(dtype)
  sk = sk.with_values(sk.values.astype(dtype))
  fwd = jax.jit(_forward)
  y1 = fwd(x, sk, b)
  y2 = fwd(x, sk, b)
  assert y1.shape == ct.shape and y1.dtype == dtype
  assert np.all(np.isfinite(np.asarray(y1, np.float32)))
  chex.assert_trees_all_equal(y1, y2)
  # A second, independent compilation gives the same bits too.
  y3 = jax.jit(lambda x, sk, b: _forward(x, sk, b))(x, sk, b)
  chex.assert_trees_all_equal(y1, y3)

  if dtype == jnp.float32:
    grads = jax.jit(_grads)
    g1 = grads(x, sk, b, ct)
    g2 = grads(x, sk, b, ct)
    chex.assert_trees_all_equal(g1, g2)
    assert all(np.any(np.asarray(g) != 0) for g in g1)


def test_determinism_check_has_teeth():
  # Two different inputs give different bits: the equality above is not
  # comparing constants.
  x, sk, b, _ = _problem(805)
  fwd = jax.jit(_forward)
  y1 = np.asarray(fwd(x, sk, b))
  y2 = np.asarray(fwd(x.at[0, 4, 4, 0].add(1.0), sk, b))
  assert not np.array_equal(y1, y2)


# --------------------------------------------------------------------------
# int32 indexing: huge inputs, traced abstractly (nothing is allocated).


def _abstract_sk(shape, layout="HWIO", only_first_channel=False):
  kernel = random_pruned_kernel(np.random.default_rng(806), shape, 0.5)
  if only_first_channel:  # every kept weight reads input channel 0
    if layout == "HWIO":
      kernel[:, :, 1:, :] = 0
    else:
      kernel[:, 1:, :, :] = 0
    kernel[(0,) * 4] = 1.0
  return SparseKernel.from_dense(kernel, layout=layout)


OVERFLOW_CASES = [
    # (id, x shape, kernel shape, layout, kwargs, only_first_channel)
    ("nhwc_2pow31_elements", (8192, 64, 64, 64), (3, 3, 64, 64), "NHWC",
     {}, False),
    ("one_channel_1x1_exactly_2pow31", (2**31 // 4096, 64, 64, 1),
     (1, 1, 1, 1), "NHWC", {}, False),
    ("nchw_stride2_groups", (4096, 128, 64, 64), (128, 64, 3, 3), "NCHW",
     dict(window_strides=(2, 2), feature_group_count=2), False),
    # Every kept weight reads channel 0, so no offset is large: the flat
    # input itself is what overflows.
    ("reads_only_channel_0", (2**20, 32, 32, 3), (3, 3, 3, 4), "NHWC",
     {}, True),
]


@pytest.mark.parametrize("x_shape,k_shape,layout,kw,only_first",
                         [c[1:] for c in OVERFLOW_CASES],
                         ids=[c[0] for c in OVERFLOW_CASES])
def test_int32_overflow_is_a_clear_error_without_allocating(
    x_shape, k_shape, layout, kw, only_first):
  assert np.prod(x_shape, dtype=np.int64) >= 2**31
  kernel_layout = "HWIO" if layout == "NHWC" else "OIHW"
  sk = _abstract_sk(k_shape, kernel_layout, only_first)
  dn = (layout, kernel_layout, layout)
  x = jax.ShapeDtypeStruct(x_shape, jnp.float32)

  def conv(x, method="escort"):
    return sparse_conv(x, sk, dimension_numbers=dn, method=method, **kw)

  tracemalloc.start()
  try:
    for fn in (conv, jax.grad(lambda x: conv(x).sum())):
      # The three checks (offsets, flat sizes, packed offsets) word it
      # differently; each names int32 and the input or the remedy.
      with pytest.raises(OverflowError,
                         match=r"int32.*(input|split the batch)|input.*int32"):
        jax.eval_shape(fn, x)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # The check runs on shapes and nnz-sized metadata only.
  assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MB traced while failing"
  # The dense path (XLA indexes with 64 bits) takes the same input.
  y = jax.eval_shape(lambda x: conv(x, "dense"), x)
  assert y.shape[0] == x_shape[0] and y.dtype == jnp.float32


def test_large_input_below_the_int32_limit_traces():
  # 2**29 elements: no overflow error, forward and gradient.
  sk = _abstract_sk((3, 3, 256, 256))
  x = jax.ShapeDtypeStruct((8192, 16, 16, 256), jnp.float32)
  conv = lambda x: sparse_conv(x, sk, method="escort")  # noqa: E731
  y = jax.eval_shape(conv, x)
  assert y.shape == (8192, 16, 16, 256)
  dx = jax.eval_shape(jax.grad(lambda x: conv(x).sum()), x)
  assert dx.shape == x.shape


def test_batch256_imagenet_input_traces_with_the_default_config():
  # 2**25 input elements, far from the int32 limit.
  sk = _abstract_sk((3, 3, 3, 64))
  x = jax.ShapeDtypeStruct((256, 224, 224, 3), jnp.float32)
  # The explicit workaround traces ...
  y = jax.eval_shape(lambda x: sparse_conv(
      x, sk, method="escort", config=KernelConfig(q_major=True)), x)
  assert y.shape == (256, 224, 224, 64)
  # ... the default config does not (yet): an xfail while the error is the
  # known one, a pass once it traces.
  try:
    y = jax.eval_shape(lambda x: sparse_conv(x, sk, method="escort"), x)
  except ValueError as e:
    if "exceeds Triton's limit" not in str(e):
      raise
    pytest.xfail(
        "library limitation: with the default KernelConfig (q_major=False) "
        "the output blocks sit on grid axis 1, capped at 65535 programs, so "
        "a layer with more than 65535 * block_q (8.4M) wide output "
        "positions per channel fails with 'the grid ... exceeds Triton's "
        "limit' although its indices fit int32 (here batch 256 at "
        "224x224), on the CPU too, where the interpreter has no such "
        "limit; KernelConfig(q_major=True) traces. Fix: choose q_major (or "
        f"fold the q blocks) automatically. [{str(e)[:120]}]")
  assert y.shape == (256, 224, 224, 64)
