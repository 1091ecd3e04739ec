"""sparse_conv (method="escort") against lax.conv_general_dilated, and the
Pallas kernels against their plain-JAX references.

On the CPU the escort path runs the real Pallas kernels through the Pallas
interpreter, which fills output buffers with NaN before the kernel runs: an
output position the kernel forgets to write shows up as NaN, so every
comparison here also asserts that all outputs are finite.
"""

from __future__ import annotations

from absl.testing import parameterized
import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import KernelConfig, SparseKernel, sparse_conv
from pallas_kernels.direct_sparse_conv import (direct_sparse_conv,
                                               direct_sparse_conv_reference)
from pallas_kernels.row_groups import pack_row_groups
from pallas_kernels.sampled_dense_dense import (sampled_dense_dense,
                                                sampled_dense_dense_reference)
from tests.conftest import (assert_close, enable_x64, hwio_shape,
                            poison_unread, random_array,
                            random_pruned_kernel, random_row_problem,
                            reference_conv, rel_err, signed_bias)

F32_BOUND = 1e-5
LOW_BOUND = 1e-2
F64_BOUND = 1e-12


def make_problem(rng, *, layout="NHWC", n=2, hw=(7, 9), c=4, o=5,
                 kernel_hw=(3, 3), groups=1, sparsity=0.5, bias=False,
                 x_dtype=jnp.float32, k_dtype=jnp.float32,
                 bias_dtype=None):
  """Random input, pruned kernel (dense and sparse), bias, layouts."""
  kernel_layout = "HWIO" if layout == "NHWC" else "OIHW"
  h, w = hw
  x_shape = (n, h, w, c) if layout == "NHWC" else (n, c, h, w)
  x = random_array(rng, x_shape, x_dtype)
  kernel = random_pruned_kernel(
      rng, hwio_shape(kernel_hw, c, o, groups, kernel_layout), sparsity,
      dtype=k_dtype)
  sk = SparseKernel.from_dense(kernel, layout=kernel_layout)
  b = random_array(rng, (o,), bias_dtype or k_dtype) if bias else None
  dn = (layout, kernel_layout, layout)
  return x, kernel, sk, b, dn


CONV_CASES = [
    dict(testcase_name="nhwc_same_batch2", n=2, hw=(7, 9), c=5, o=6,
         kernel_hw=(3, 3), strides=(1, 1), padding="SAME"),
    dict(testcase_name="nchw_valid_batch1_stride", layout="NCHW", n=1,
         hw=(6, 7), c=4, o=5, kernel_hw=(3, 2), strides=(2, 1),
         padding="VALID"),
    dict(testcase_name="nhwc_stride2_bias_relu", n=3, hw=(9, 8), c=3, o=4,
         kernel_hw=(3, 3), strides=(2, 2), padding="SAME", bias=True,
         activation="relu"),
    dict(testcase_name="nchw_asymmetric_explicit_pad", layout="NCHW", n=2,
         hw=(7, 7), c=4, o=3, kernel_hw=(2, 3), strides=(1, 2),
         padding=((1, 2), (0, 3)), bias=True),
    dict(testcase_name="nhwc_negative_pad", n=2, hw=(8, 7), c=3, o=4,
         kernel_hw=(3, 3), strides=(1, 1), padding=((-1, 2), (2, -1))),
    dict(testcase_name="nhwc_dilation", n=2, hw=(9, 9), c=3, o=5,
         kernel_hw=(3, 3), strides=(1, 1), padding="SAME", dilation=(2, 1)),
    dict(testcase_name="nchw_dilation_stride", layout="NCHW", n=2,
         hw=(9, 8), c=2, o=3, kernel_hw=(2, 3), strides=(2, 3),
         padding=((1, 1), (2, 2)), dilation=(2, 2), activation="relu"),
    dict(testcase_name="nhwc_groups2_bias", n=2, hw=(6, 7), c=6, o=4,
         kernel_hw=(3, 3), strides=(1, 1), padding="SAME", groups=2,
         bias=True),
    dict(testcase_name="nchw_depthwise_multiplier2", layout="NCHW", n=2,
         hw=(7, 9), c=4, o=8, kernel_hw=(3, 3), strides=(2, 2),
         padding="SAME", groups=4, bias=True, activation="relu"),
    dict(testcase_name="nhwc_depthwise_5x5_int_padding", n=1, hw=(7, 7),
         c=5, o=5, kernel_hw=(5, 5), strides=(1, 1), padding=2, groups=5),
    dict(testcase_name="nhwc_1x1_int_stride2_valid", n=3, hw=(7, 9), c=5,
         o=3, kernel_hw=(1, 1), strides=2, padding="VALID"),
    dict(testcase_name="nhwc_small_tiles_same_lower", n=2, hw=(7, 9), c=5,
         o=7, kernel_hw=(3, 3), strides=(2, 1), padding="SAME_LOWER",
         sparsity=0.7, bias=True, activation="relu",
         config=KernelConfig(rows_per_program=2, block_q=16)),
    dict(testcase_name="nchw_groups_small_tiles", layout="NCHW", n=3,
         hw=(5, 6), c=4, o=6, kernel_hw=(2, 2), strides=(1, 1),
         padding="VALID", groups=2,
         config=KernelConfig(rows_per_program=4, block_q=32, unroll=1)),
    dict(testcase_name="nhwc_multi_group_programs_q_major", n=2, hw=(6, 9),
         c=4, o=7, kernel_hw=(3, 3), strides=(1, 2), padding="SAME",
         sparsity=0.6, bias=True,
         config=KernelConfig(rows_per_program=2, block_q=16, unroll=3,
                             groups_per_program=3, q_major=True)),
    # Split rows: partial outputs summed after the kernel, then bias/relu.
    dict(testcase_name="nhwc_split3_nhwc_store_bias_relu", n=2, hw=(7, 9),
         c=5, o=6, kernel_hw=(3, 3), strides=(1, 1), padding="SAME",
         sparsity=0.4, bias=True, activation="relu",
         config=KernelConfig(rows_per_program=1, nhwc_out=True, split=3)),
    dict(testcase_name="nchw_split2_wide_groups_stride", layout="NCHW", n=3,
         hw=(8, 7), c=4, o=6, kernel_hw=(3, 2), strides=(2, 1),
         padding="VALID", groups=2, bias=True,
         config=KernelConfig(rows_per_program=2, block_q=16, split=2,
                             unmasked=False)),
    dict(testcase_name="nhwc_split_beyond_row_length", n=1, hw=(5, 6), c=2,
         o=3, kernel_hw=(2, 2), strides=(1, 1), padding="SAME",
         sparsity=0.7, activation="relu",
         config=KernelConfig(rows_per_program=4, block_q=32, split=8)),
]


class SparseConvTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(*CONV_CASES)
  def test_matches_lax_conv_float32(self, n, hw, c, o, kernel_hw, strides,
                                    padding, layout="NHWC", dilation=(1, 1),
                                    groups=1, sparsity=0.5, bias=False,
                                    activation=None, config=None):
    rng = np.random.default_rng(
        [201, n, *hw, c, o, *kernel_hw, groups, int(100 * sparsity)])
    x, kernel, sk, b, dn = make_problem(
        rng, layout=layout, n=n, hw=hw, c=c, o=o, kernel_hw=kernel_hw,
        groups=groups, sparsity=sparsity, bias=bias)

    @self.variant
    def conv(x, sk, b):
      return sparse_conv(x, sk, strides, padding, rhs_dilation=dilation,
                         feature_group_count=groups, dimension_numbers=dn,
                         bias=b, activation=activation, method="escort",
                         config=config)

    y = conv(x, sk, b)
    ref = reference_conv(x, kernel, strides if isinstance(strides, tuple)
                         else (strides, strides),
                         padding if not isinstance(padding, int) else
                         ((padding, padding), (padding, padding)),
                         rhs_dilation=dilation, feature_group_count=groups,
                         dimension_numbers=dn, bias=b, activation=activation)
    chex.assert_shape(y, ref.shape)
    chex.assert_type(y, jnp.float32)
    assert y.shape[0] == n and y.size > 0
    assert_close(y, ref, F32_BOUND)
    if activation == "relu":
      assert float(jnp.min(y)) == 0.0 and float(jnp.max(y)) > 0.0

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("dense", 0.0), ("half", 0.5), ("s90", 0.9), ("s99", 0.99),
      ("all_pruned", 1.0))
  def test_sparsity_levels(self, sparsity):
    rng = np.random.default_rng([202, int(1000 * sparsity)])
    x, kernel, sk, b, dn = make_problem(
        rng, n=2, hw=(7, 9), c=8, o=8, kernel_hw=(3, 3), sparsity=sparsity,
        bias=True)
    assert sk.nnz == round(kernel.size * (1 - sparsity))
    rows = np.diff(sk.structure.indptr)
    if sparsity >= 0.99:
      assert np.any(rows == 0), "expected empty rows at this sparsity"
    conv = self.variant(lambda x, sk, b: sparse_conv(
        x, sk, (1, 1), "SAME", bias=b, method="escort"))
    y = conv(x, sk, b)
    ref = reference_conv(x, kernel, (1, 1), "SAME", bias=b)
    chex.assert_shape(y, (2, 7, 9, 8))
    chex.assert_type(y, jnp.float32)
    assert_close(y, ref, F32_BOUND)
    if sparsity == 1.0:
      # Only the bias is left, in every position.
      np.testing.assert_array_equal(
          np.asarray(y), np.broadcast_to(np.asarray(b), y.shape))

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      ("f32", jnp.float32, jnp.float32, None, None, jnp.float32, F32_BOUND),
      ("bf16", jnp.bfloat16, jnp.bfloat16, None, None, jnp.bfloat16,
       LOW_BOUND),
      ("f16_bias", jnp.float16, jnp.float16, jnp.float16, None, jnp.float16,
       LOW_BOUND),
      ("bf16_x_f32_kernel", jnp.bfloat16, jnp.float32, None, None,
       jnp.float32, F32_BOUND),
      ("f16_x_bf16_kernel", jnp.float16, jnp.bfloat16, None, None,
       jnp.float32, F32_BOUND),
      ("bf16_with_f32_bias", jnp.bfloat16, jnp.bfloat16, jnp.float32, None,
       jnp.float32, F32_BOUND),
      ("bf16_preferred_f32", jnp.bfloat16, jnp.bfloat16, None, jnp.float32,
       jnp.float32, F32_BOUND),
  )
  def test_dtypes(self, x_dtype, k_dtype, bias_dtype, preferred, out_dtype,
                  bound):
    rng = np.random.default_rng(
        [203, jnp.dtype(x_dtype).num, jnp.dtype(k_dtype).num,
         0 if bias_dtype is None else 1, 0 if preferred is None else 1])
    x, kernel, sk, b, dn = make_problem(
        rng, n=2, hw=(7, 9), c=5, o=6, kernel_hw=(3, 3), sparsity=0.5,
        bias=bias_dtype is not None, x_dtype=x_dtype, k_dtype=k_dtype,
        bias_dtype=bias_dtype)
    dtypes = [x_dtype, k_dtype] + ([bias_dtype] if bias_dtype else [])
    expected = jnp.dtype(preferred or jnp.result_type(*dtypes))
    self.assertEqual(expected, jnp.dtype(out_dtype))
    if x_dtype == k_dtype and bias_dtype in (None, x_dtype):
      # lax's own rule, where lax accepts the call.
      lax_dtype = lax.conv_general_dilated(
          x, jnp.asarray(kernel), (1, 1), "SAME", dimension_numbers=dn,
          preferred_element_type=preferred).dtype
      self.assertEqual(expected, lax_dtype)
    conv = self.variant(lambda x, sk, b: sparse_conv(
        x, sk, (2, 1), "SAME", bias=b, activation="relu", method="escort",
        preferred_element_type=preferred))
    y = conv(x, sk, b)
    # The reference: float32 of the same (already rounded) inputs.
    ref = reference_conv(x, kernel, (2, 1), "SAME", bias=b,
                         activation="relu")
    chex.assert_shape(y, ref.shape)
    chex.assert_type(y, out_dtype)
    assert_close(y, ref, bound)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      dict(testcase_name="nhwc_stride_bias_relu", layout="NHWC",
           strides=(2, 1), padding="SAME", dilation=(1, 1), groups=1,
           c=3, o=4, bias=True, activation="relu", k_dtype=jnp.float64),
      dict(testcase_name="nchw_groups_dilation", layout="NCHW",
           strides=(1, 2), padding=((2, 0), (1, 1)), dilation=(1, 2),
           groups=2, c=4, o=6, bias=False, activation=None,
           k_dtype=jnp.float64),
      dict(testcase_name="f32_x_f64_kernel", layout="NHWC", strides=(1, 1),
           padding="VALID", dilation=(1, 1), groups=1, c=3, o=5, bias=True,
           activation=None, k_dtype=jnp.float64, x_dtype=jnp.float32),
  )
  def test_float64(self, layout, strides, padding, dilation, groups, c, o,
                   bias, activation, k_dtype, x_dtype=jnp.float64):
    with enable_x64():
      rng = np.random.default_rng([204, c, o, groups])
      x, kernel, sk, b, dn = make_problem(
          rng, layout=layout, n=2, hw=(7, 8), c=c, o=o, groups=groups,
          sparsity=0.6, bias=bias, x_dtype=x_dtype, k_dtype=k_dtype)
      conv = self.variant(lambda x, sk, b: sparse_conv(
          x, sk, strides, padding, rhs_dilation=dilation,
          feature_group_count=groups, dimension_numbers=dn, bias=b,
          activation=activation, method="escort"))
      y = conv(x, sk, b)
      ref = reference_conv(x, kernel, strides, padding, rhs_dilation=dilation,
                           feature_group_count=groups, dimension_numbers=dn,
                           bias=b, activation=activation, dtype=jnp.float64)
      chex.assert_shape(y, ref.shape)
      chex.assert_type(y, jnp.float64)
      assert_close(y, ref, F64_BOUND)

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.named_parameters(
      dict(testcase_name="nhwc", layout="NHWC", strides=(2, 2),
           padding="SAME", groups=1),
      dict(testcase_name="nchw_groups", layout="NCHW", strides=(1, 1),
           padding=((0, 1), (2, 1)), groups=2),
  )
  def test_methods_agree(self, layout, strides, padding, groups):
    rng = np.random.default_rng([205, groups])
    x, kernel, sk, b, dn = make_problem(rng, layout=layout, n=2, hw=(7, 9),
                                        c=4, o=6, groups=groups, bias=True)
    outs = {}
    for method in ("escort", "dense", "auto"):
      conv = self.variant(lambda x, sk, b, method=method: sparse_conv(
          x, sk, strides, padding, feature_group_count=groups,
          dimension_numbers=dn, bias=b, activation="relu", method=method,
          precision=lax.Precision.HIGHEST))
      outs[method] = conv(x, sk, b)
      chex.assert_type(outs[method], jnp.float32)
    ref = reference_conv(x, kernel, strides, padding,
                         feature_group_count=groups, dimension_numbers=dn,
                         bias=b, activation="relu")
    for method, y in outs.items():
      assert_close(y, ref, F32_BOUND, what=method)
    assert_close(outs["dense"], outs["escort"], F32_BOUND, what="dense")
    if jax.default_backend() != "gpu":
      # Off the GPU, "auto" is exactly "dense". (On a GPU it follows a tuned
      # plan or a cost model, so only the bound above applies.)
      chex.assert_trees_all_equal(outs["auto"], outs["dense"])

  def test_positional_and_keyword_api(self):
    rng = np.random.default_rng(206)
    x, kernel, sk, _, _ = make_problem(rng, n=1, hw=(6, 5), c=3, o=4)
    ref = reference_conv(x, kernel, (1, 1), "SAME")
    y_pos = sparse_conv(x, sk, (1, 1), "SAME", method="escort")
    y_kw = sparse_conv(x, sk, window_strides=(1, 1), padding="SAME",
                       method="escort")
    y_default = sparse_conv(x, sk, method="escort")
    assert_close(y_pos, ref, F32_BOUND)
    chex.assert_trees_all_equal(y_pos, y_kw, y_default)
    y_valid = sparse_conv(x, sk, padding="VALID", window_strides=(2, 1),
                          method="escort")
    assert_close(y_valid, reference_conv(x, kernel, (2, 1), "VALID"),
                 F32_BOUND)
    with pytest.raises(TypeError):
      sparse_conv(x, sk, (1, 1), "SAME", (1, 1))  # rhs_dilation positional
    with pytest.raises(TypeError):
      sparse_conv(x, sk, (1, 1), "SAME", (1, 1), 1)

  def test_empty_outputs_have_lax_shapes(self):
    rng = np.random.default_rng(207)
    x, kernel, sk, _, dn = make_problem(rng, n=2, hw=(2, 5), c=3, o=4,
                                        kernel_hw=(3, 3))
    y = sparse_conv(x, sk, (1, 1), "VALID", method="escort")
    ref = reference_conv(x, kernel, (1, 1), "VALID")
    assert ref.shape == (2, 0, 3, 4)
    chex.assert_shape(y, ref.shape)
    chex.assert_type(y, jnp.float32)
    x0 = jnp.zeros((0, 5, 5, 3), jnp.float32)
    y0 = sparse_conv(x0, sk, (1, 1), "SAME", method="escort")
    chex.assert_shape(y0, reference_conv(x0, kernel, (1, 1), "SAME").shape)

  def test_nan_input_behind_pruned_weights_does_not_spread(self):
    # Input channel 1 is read only by pruned weights: the sparse kernels skip
    # structural zeros, so a NaN there must not reach any output.
    rng = np.random.default_rng(208)
    kernel = random_pruned_kernel(rng, (3, 3, 4, 5), 0.3)
    kernel[:, :, 1, :] = 0
    sk = SparseKernel.from_dense(kernel)
    x = random_array(rng, (2, 7, 9, 4))
    x_nan = x.at[:, 2:5, 3:7, 1].set(jnp.nan)
    y = sparse_conv(x_nan, sk, (1, 1), "SAME", method="escort")
    ref = reference_conv(x.at[:, :, :, 1].set(0.0), kernel, (1, 1), "SAME")
    assert_close(y, ref, F32_BOUND)
    # The same input does poison a dense convolution (0 * NaN = NaN), so the
    # check above has teeth.
    assert np.isnan(np.asarray(reference_conv(x_nan, kernel, (1, 1),
                                              "SAME"))).any()

  def test_kept_nan_weight_stays_visible(self):
    rng = np.random.default_rng(209)
    kernel = random_pruned_kernel(rng, (3, 3, 3, 4), 0.5)
    pos = tuple(np.argwhere(kernel[:, :, :, 2] != 0)[0]) + (2,)
    kernel[pos] = np.nan
    sk = SparseKernel.from_dense(kernel)
    x = random_array(rng, (2, 6, 7, 3))
    y = np.asarray(sparse_conv(x, sk, (1, 1), "SAME", method="escort"))
    ref = np.asarray(reference_conv(x, kernel, (1, 1), "SAME"))
    # Wherever the reference sees the NaN weight meet real input, so does
    # escort; whether it also meets the zero padding (0 * NaN) depends on
    # how a backend pads (XLA:CPU yes, cuDNN no), so that is not pinned.
    assert np.isnan(ref[..., 2]).any()
    assert np.all(np.isnan(y)[np.isnan(ref)])
    assert not np.isnan(y[..., [0, 1, 3]]).any()
    finite = [0, 1, 3]
    assert_close(y[..., finite], ref[..., finite], F32_BOUND)


# --------------------------------------------------------------------------
# The Pallas kernels themselves, on random row problems.


# launch: (step_multiple, groups_per_program, q_major); offset_unit: every
# offset is a multiple of it (RowGroups then stores offsets in that unit).
@pytest.mark.parametrize(
    "num_rows,nnz,out_len,rows_per_program,block_q,bias,relu,empty_rows,"
    "launch,offset_unit",
    [
        (11, 40, 37, 4, 16, True, True, True, (1, 1, False), 1),
        (9, 60, 300, 8, 256, False, False, False, (4, 1, False), 1),
        (3, 7, 1, 2, 8, True, False, False, (1, 1, True), 1),
        (6, 25, 50, 8, 32, False, True, True, (3, 1, False), 2),
        (13, 45, 40, 2, 16, True, False, True, (2, 3, True), 3),
        (10, 30, 70, 4, 32, False, False, False, (1, 2, False), 1),
        (5, 0, 20, 8, 8, True, False, True, (1, 1, False), 1),  # nnz = 0
        (4, 0, 9, 2, 8, True, True, True, (4, 3, True), 1),
    ])
def test_direct_sparse_conv_kernel(num_rows, nnz, out_len, rows_per_program,
                                   block_q, bias, relu, empty_rows, launch,
                                   offset_unit):
  rng = np.random.default_rng([301, num_rows, nnz, out_len])
  rows, offsets, in_len = random_row_problem(rng, num_rows, nnz, out_len,
                                              empty_rows)
  offsets = offsets * offset_unit
  in_len = in_len * offset_unit
  step_multiple, groups_per_program, q_major = launch
  x_flat = rng.standard_normal(in_len).astype(np.float32)
  x_poisoned, num_poisoned = poison_unread(x_flat, offsets,
                                            np.arange(out_len))
  assert num_poisoned > 0
  values = jnp.asarray(rng.standard_normal(nnz), jnp.float32)
  b = signed_bias(rng, num_rows) if bias else None
  groups = pack_row_groups(rows, offsets, num_rows, rows_per_program,
                           step_multiple)
  if nnz and offset_unit > 1:
    assert groups.offset_unit % offset_unit == 0
  assert np.all(groups.group_steps % step_multiple == 0)
  y = direct_sparse_conv(jnp.asarray(x_poisoned),
                         groups.gather_values(values), groups,
                         out_len=out_len, bias=b, relu=relu, block_q=block_q,
                         groups_per_program=groups_per_program,
                         q_major=q_major, interpret=True)
  ref = direct_sparse_conv_reference(jnp.asarray(x_flat), values, rows,
                                     offsets, num_rows=num_rows,
                                     out_len=out_len, bias=b, relu=relu)
  chex.assert_shape(y, (num_rows, out_len))
  chex.assert_type(y, jnp.float32)
  assert_close(y, ref, F32_BOUND)
  if empty_rows and not bias:
    empty = np.setdiff1d(np.arange(num_rows), rows)
    assert empty.size
    np.testing.assert_array_equal(np.asarray(y)[empty], 0.0)


@pytest.mark.parametrize(
    "batch,out_h,row_width,out_w,rows_per_program,block_q,unmasked,nhwc_out",
    [(2, 3, 6, 4, 4, 16, True, True), (1, 5, 7, 7, 2, 32, False, True),
     (3, 2, 5, 3, 8, 16, True, False), (2, 4, 4, 2, 4, 8, False, False)])
def test_kernel_reads_csr_values_and_writes_nhwc(batch, out_h, row_width,
                                                 out_w, rows_per_program,
                                                 block_q, unmasked, nhwc_out):
  """values_by_row (no gather pass) and the NHWC store (no transpose pass)
  give the reference's numbers, on NaN-poisoned unread inputs and with empty
  rows; the NHWC output is the wide one cropped and transposed."""
  from pallas_kernels.output_layout import NhwcOutput
  nhwc = NhwcOutput(batch=batch, out_h=out_h, row_width=row_width,
                    out_w=out_w)
  out_len, num_rows = nhwc.out_len, 11
  rng = np.random.default_rng([batch, out_h, row_width, rows_per_program])
  rows, offsets, in_len = random_row_problem(rng, num_rows, 50, out_len,
                                              empty_rows=True)
  order = np.argsort(rows, kind="stable")  # CSR order: grouped by row
  rows, offsets = rows[order], offsets[order]
  read_len = -(-out_len // block_q) * block_q
  zeros_at = in_len + read_len if unmasked else None
  x = rng.standard_normal(in_len + 2 * read_len).astype(np.float32)
  x[in_len:] = 0.0
  x_poisoned, _ = poison_unread(x, offsets, np.arange(out_len))
  x_poisoned[in_len:] = 0.0
  values = jnp.asarray(rng.standard_normal(rows.shape[0]), jnp.float32)
  b = jnp.asarray(rng.standard_normal(num_rows), jnp.float32)
  groups = pack_row_groups(rows, offsets, num_rows, rows_per_program, 2,
                           zeros_offset=zeros_at)
  assert groups.lane_start is not None
  y = direct_sparse_conv(jnp.asarray(x_poisoned), values, groups,
                         out_len=out_len, bias=b, relu=True, block_q=block_q,
                         values_by_row=True,
                         nhwc=nhwc if nhwc_out else None, interpret=True)
  ref = direct_sparse_conv_reference(jnp.asarray(x), values, rows, offsets,
                                     num_rows=num_rows, out_len=out_len,
                                     bias=b, relu=True)
  if nhwc_out:
    ref = ref.reshape(num_rows, out_h, row_width, batch)[:, :, :out_w, :]
    ref = ref.transpose(3, 1, 2, 0)
  chex.assert_shape(y, ref.shape)
  assert np.all(np.isfinite(np.asarray(y)))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5,
                             atol=1e-5)
  # Nonzeros given in any other order cannot be read by row.
  shuffled = pack_row_groups(rows[::-1], offsets[::-1], num_rows,
                             rows_per_program)
  assert shuffled.lane_start is None
  with pytest.raises(ValueError, match="values_by_row needs row groups"):
    direct_sparse_conv(jnp.asarray(x), values, shuffled, out_len=out_len,
                       values_by_row=True, interpret=True)


@pytest.mark.parametrize("dtype,out_dtype,bound", [
    (jnp.bfloat16, jnp.bfloat16, LOW_BOUND),
    (jnp.float16, jnp.float32, F32_BOUND),
    (jnp.float64, jnp.float64, F64_BOUND),
])
def test_direct_sparse_conv_kernel_dtypes(dtype, out_dtype, bound):
  with enable_x64():
    rng = np.random.default_rng([302, jnp.dtype(dtype).num])
    rows, offsets, in_len = random_row_problem(rng, 7, 30, 45, True)
    x_flat = jnp.asarray(rng.standard_normal(in_len), dtype)
    values = jnp.asarray(rng.standard_normal(30), dtype)
    b = jnp.asarray(rng.standard_normal(7), dtype)
    groups = pack_row_groups(rows, offsets, 7, 4)
    y = direct_sparse_conv(x_flat, groups.gather_values(values), groups,
                           out_len=45, bias=b, relu=True, block_q=16,
                           out_dtype=out_dtype, interpret=True)
    ref = direct_sparse_conv_reference(
        x_flat.astype(jnp.float64), values.astype(jnp.float64), rows, offsets,
        num_rows=7, out_len=45, bias=b.astype(jnp.float64), relu=True)
    chex.assert_type(y, out_dtype)
    assert_close(y, ref, bound)


@pytest.mark.parametrize(
    "num_rows,nnz,out_len,period,valid,block_j,block_q,programs,empty_rows",
    [
        (6, 37, 100, 10, 7, 16, 16, 8, True),
        (4, 5, 33, 1, 1, 16, 128, 2048, False),
        (8, 50, 260, 13, 13, 8, 32, 4, True),
        (5, 3, 17, 6, 2, 4, 8, 1, False),
    ])
def test_sampled_dense_dense_kernel(num_rows, nnz, out_len, period, valid,
                                    block_j, block_q, programs, empty_rows):
  rng = np.random.default_rng([303, num_rows, nnz, out_len])
  rows, offsets, in_len = random_row_problem(rng, num_rows, nnz, out_len,
                                              empty_rows)
  q = np.arange(out_len)
  valid_q = q[q % period < valid]
  x_flat = rng.standard_normal(in_len).astype(np.float32)
  dy = rng.standard_normal((num_rows, out_len)).astype(np.float32)
  # Poison everything that a valid position does not read: the dy columns of
  # invalid positions, and x_flat outside every entry's valid window.
  dy_poisoned = dy.copy()
  dy_poisoned[:, q % period >= valid] = np.nan
  x_poisoned, _ = poison_unread(x_flat, offsets, valid_q)
  dw = sampled_dense_dense(
      jnp.asarray(dy_poisoned), jnp.asarray(x_poisoned), rows, offsets,
      valid_period=period, valid_len=valid, block_j=block_j,
      block_q=block_q, target_programs=programs, interpret=True)
  ref = sampled_dense_dense_reference(
      jnp.asarray(dy), jnp.asarray(x_flat), rows, offsets,
      valid_period=period, valid_len=valid)
  chex.assert_shape(dw, (nnz,))
  chex.assert_type(dw, jnp.float32)
  assert_close(dw, ref, F32_BOUND)
  # Cross-check against a direct numpy evaluation.
  direct = np.array([
      np.dot(dy[r, valid_q].astype(np.float64),
             x_flat[o + valid_q].astype(np.float64))
      for r, o in zip(rows, offsets)
  ])
  assert rel_err(dw, direct) <= F32_BOUND


def test_sampled_dense_dense_kernel_nnz0_and_bf16():
  rng = np.random.default_rng(304)
  dy = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
  x_flat = jnp.asarray(rng.standard_normal(40), jnp.float32)
  empty = sampled_dense_dense(dy, x_flat, np.zeros(0, np.int64),
                              np.zeros(0, np.int64), interpret=True)
  chex.assert_shape(empty, (0,))
  chex.assert_type(empty, jnp.float32)
  rows, offsets, in_len = random_row_problem(rng, 5, 21, 30, True)
  dy = jnp.asarray(rng.standard_normal((5, 30)), jnp.bfloat16)
  x_flat = jnp.asarray(rng.standard_normal(in_len), jnp.bfloat16)
  dw = sampled_dense_dense(dy, x_flat, rows, offsets, valid_period=6,
                           valid_len=5, block_q=8, interpret=True)
  ref = sampled_dense_dense_reference(dy, x_flat, rows, offsets,
                                      valid_period=6, valid_len=5)
  chex.assert_type(dw, jnp.float32)  # float32 accumulation and result
  assert_close(dw, ref, F32_BOUND)


@pytest.mark.parametrize("config", [KernelConfig(nhwc_out=True),
                                    KernelConfig(2, 32, nhwc_out=True,
                                                 unmasked=False),
                                    KernelConfig(1, 32, nhwc_out=True,
                                                 split=4),
                                    KernelConfig(1, 32, nhwc_out=True,
                                                 nonzero_lanes=8),
                                    KernelConfig(1, 16, nonzero_lanes=4),
                                    KernelConfig(1, 16, nonzero_lanes=4,
                                                 q_major=True),
                                    KernelConfig(1, 32, nhwc_out=True,
                                                 nonzero_lanes=4, split=3),
                                    KernelConfig(1, 16, nonzero_lanes=2,
                                                 split=2)])
def test_escort_nhwc_store_matches_lax(config):
  """KernelConfig(nhwc_out=True): the forward kernel writes NHWC itself
  (with split, float32 partial outputs summed by XLA; with nonzero_lanes,
  the kernel that takes several nonzeros of a row per step, which also
  writes wide rows, splits rows the same way, and with q_major orders its
  grid by output blocks); gradients are those of the default config."""
  rng = np.random.default_rng(77)
  for kw in (dict(n=2, hw=(7, 9), c=5, o=6, strides=(1, 1)),
             dict(n=3, hw=(9, 8), c=4, o=8, strides=(2, 1), groups=2)):
    n, hw, c, o, strides = kw["n"], kw["hw"], kw["c"], kw["o"], kw["strides"]
    x, kernel, sk, b, dn = make_problem(rng, n=n, hw=hw, c=c, o=o,
                                        groups=kw.get("groups", 1),
                                        bias=True)
    conv = dict(feature_group_count=kw.get("groups", 1))

    def f(values, x):
      return sparse_conv(x, sk.with_values(values), strides, "SAME", bias=b,
                         activation="relu", method="escort", config=config,
                         **conv)
    y = jax.jit(f)(sk.values, x)
    ref = reference_conv(x, kernel, strides, "SAME", bias=b,
                         activation="relu", **conv)
    assert_close(y, ref, F32_BOUND)
    ct = random_array(rng, y.shape)
    grads = jax.grad(lambda v, x: jnp.sum(ct * f(v, x)), (0, 1))(sk.values, x)
    want = jax.grad(lambda v, x: jnp.sum(ct * sparse_conv(
        x, sk.with_values(v), strides, "SAME", bias=b, activation="relu",
        method="escort", **conv)), (0, 1))(sk.values, x)
    for got, exp in zip(grads, want):
      assert_close(got, exp, F32_BOUND, "gradient")


def test_nonzero_lanes_config_runs_one_row_per_program():
  with pytest.raises(ValueError, match="one row per program"):
    KernelConfig(rows_per_program=4, nonzero_lanes=16)
  with pytest.raises(ValueError, match="one row per program"):
    KernelConfig(1, groups_per_program=2, nonzero_lanes=16)


@pytest.mark.parametrize("case", [
    dict(n=1, hw=(7, 7), c=6, o=5, kernel_hw=(3, 3), padding="SAME"),
    dict(n=3, hw=(6, 9), c=4, o=8, kernel_hw=(3, 3), padding="VALID",
         groups=2),
    dict(n=2, hw=(8, 5), c=5, o=4, kernel_hw=(3, 2),
         padding=((2, 0), (1, 0)), dilation=(2, 1)),
    dict(n=1, hw=(5, 6), c=3, o=4, kernel_hw=(1, 1), padding="SAME"),
    # Unpadded planes where only the bottom and right are padded.
    dict(n=2, hw=(5, 6), c=3, o=4, kernel_hw=(2, 2), padding="SAME"),
    # Stride 2 cannot read unpadded planes: the padded layout serves it.
    dict(n=2, hw=(9, 8), c=4, o=4, kernel_hw=(3, 3), padding="SAME",
         strides=(2, 2)),
])
@pytest.mark.parametrize("config", [
    KernelConfig(1, 16, nonzero_lanes=4, unpadded=True),
    KernelConfig(1, 32, nonzero_lanes=8, unpadded=True, split=2,
                 nhwc_out=True, q_major=True)])
def test_unpadded_planes_match_lax(case, config):
  """KernelConfig(unpadded=True): the nonzero-lanes forward reads the input
  as (C, H, W, N) planes with masked borders (one transpose, no layout
  kernel): equal to lax at HIGHEST, with bias and relu, and its gradients
  to those of the default config."""
  from escort_jax import conv_geometry as cg
  from escort_jax.ops import escort_plan
  case = dict(case)
  strides = case.pop("strides", (1, 1))
  padding = case.pop("padding")
  dilation = case.pop("dilation", (1, 1))
  groups = case.get("groups", 1)
  rng = np.random.default_rng([91, case["n"], case["c"], case["o"]])
  x, kernel, sk, b, _ = make_problem(rng, bias=True, **case)
  g = cg.make_geometry(x.shape, sk.structure, strides, padding, dilation,
                       groups)
  plan = escort_plan(sk.structure, g, config)
  # Without padding (VALID, or SAME with a 1x1 kernel) the flat layout is
  # already the plain transpose: no masks.
  assert (plan.planes is not None) == (
      strides == (1, 1) and any(p for pair in g.padding for p in pair))
  conv = dict(rhs_dilation=dilation, feature_group_count=groups)

  def f(values, x, config=config):
    return sparse_conv(x, sk.with_values(values), strides, padding, bias=b,
                       activation="relu", method="escort", config=config,
                       **conv)
  y = jax.jit(f)(sk.values, x)
  ref = reference_conv(x, kernel, strides, padding, bias=b,
                       activation="relu", **conv)
  chex.assert_shape(y, ref.shape)
  assert_close(y, ref, F32_BOUND)
  ct = random_array(rng, y.shape)
  got = jax.grad(lambda v, x: jnp.sum(ct * f(v, x)), (0, 1))(sk.values, x)
  want = jax.grad(lambda v, x: jnp.sum(ct * f(v, x, None)), (0, 1))(
      sk.values, x)
  for a, e in zip(got, want):
    assert_close(a, e, F32_BOUND, "gradient")


def test_nonzero_lanes_split_packs_partial_rows():
  """With split S the nonzero-lanes kernel runs S partial rows per output
  channel (split_rows), each with its part of the row's nonzeros."""
  from escort_jax import conv_geometry as cg
  from escort_jax.ops import escort_plan
  rng = np.random.default_rng(79)
  x, _, sk, _, _ = make_problem(rng, n=1, hw=(7, 7), c=6, o=5)
  g = cg.make_geometry(x.shape, sk.structure, (1, 1), "SAME", (1, 1), 1)
  for split in (1, 3):
    plan = escort_plan(sk.structure, g, KernelConfig(
        1, 16, nonzero_lanes=4, split=split))
    assert plan.nonzero_rows.num_rows == 5 * split


def test_split_rows_parts_and_low_precision():
  """split_rows keeps rows ascending and cuts each row into near-equal
  contiguous parts; split partial sums are float32, so a bf16 call stays
  within the bf16 bound and keeps bf16 output."""
  from escort_jax.ops import split_rows
  rows = np.repeat(np.arange(5), [7, 0, 1, 4, 9])
  parts = split_rows(rows, 5, 3)
  assert np.all(np.diff(parts) >= 0)
  np.testing.assert_array_equal(parts // 3, rows)
  sizes = np.bincount(parts, minlength=15).reshape(5, 3)
  np.testing.assert_array_equal(sizes.sum(1), [7, 0, 1, 4, 9])
  assert np.all(sizes.max(1) - sizes.min(1) <= 1)
  rng = np.random.default_rng(78)
  x, kernel, sk, b, _ = make_problem(rng, n=2, hw=(7, 8), c=6, o=5,
                                     bias=True)
  xb = x.astype(jnp.bfloat16)
  skb = sk.with_values(sk.values.astype(jnp.bfloat16))
  y = sparse_conv(xb, skb, (1, 1), "SAME", bias=b.astype(jnp.bfloat16),
                  method="escort",
                  config=KernelConfig(1, 32, nhwc_out=True, split=2))
  chex.assert_type(y, jnp.bfloat16)
  ref = reference_conv(xb.astype(jnp.float32),
                       jnp.asarray(kernel).astype(jnp.bfloat16).astype(
                           jnp.float32), (1, 1), "SAME",
                       bias=b.astype(jnp.bfloat16).astype(jnp.float32))
  assert_close(y.astype(jnp.float32), ref, LOW_BOUND)
  with pytest.raises(ValueError, match="split must be a positive int"):
    sparse_conv(x, sk, method="escort", config=KernelConfig(split=0))


def test_flat_input_of_one_pixel_is_a_reshape():
  """One 1x1 image with no padding and no tail is its own flat layout (a
  fully connected layer as a 1x1 conv): flat_input reshapes, and agrees
  with conv_geometry.to_flat_input; a stride or a tail takes the general
  route."""
  from escort_jax import conv_geometry as cg
  from escort_jax.ops import flat_input
  rng = np.random.default_rng(93)
  x = random_array(rng, (1, 1, 1, 6))
  sk = SparseKernel.from_dense(random_pruned_kernel(rng, (1, 1, 6, 3), 0.5))
  g = cg.make_geometry(x.shape, sk.structure, (1, 1), "VALID", (1, 1), 1)
  jaxpr = str(jax.make_jaxpr(lambda x: flat_input(x, g, 0))(x))
  assert "reshape" in jaxpr and "pallas_call" not in jaxpr and "pad" not in (
      jaxpr)
  np.testing.assert_array_equal(flat_input(x, g, 0), cg.to_flat_input(x, g, 0))
  for other, tail in ((cg.make_geometry(x.shape, sk.structure, (2, 2),
                                        "VALID", (1, 1), 1), 0), (g, 4)):
    np.testing.assert_array_equal(flat_input(x, other, tail),
                                  cg.to_flat_input(x, other, tail))
