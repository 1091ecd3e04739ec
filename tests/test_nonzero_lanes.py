"""pallas_kernels/nonzero_lanes_conv.py (interpreted on the CPU) against
direct_sparse_conv_reference and its own nonzero_lanes_reference:
NaN-poisoned unread inputs, empty rows, odd lengths, bias and relu, wide and
NHWC outputs, bf16, unpadded planes with masked borders."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.direct_sparse_conv import direct_sparse_conv_reference
from pallas_kernels.nonzero_lanes_conv import (PlaneBounds,
                                               nonzero_lanes_conv,
                                               nonzero_lanes_reference,
                                               pack_nonzero_rows)
from pallas_kernels.output_layout import NhwcOutput
from tests.conftest import (assert_close, poison_unread, random_row_problem,
                            rel_err, signed_bias)


def _csr_problem(rng, num_rows, nnz, out_len, empty_rows, unit=1):
  rows, offsets, in_len = random_row_problem(rng, num_rows, nnz, out_len,
                                             empty_rows)
  order = np.argsort(rows, kind="stable")
  return rows[order], offsets[order] * unit, in_len * unit


@pytest.mark.parametrize(
    "num_rows,nnz,out_len,lanes,block_q,bias,relu,empty_rows,unit,q_major",
    [
        (11, 60, 37, 8, 16, True, True, True, 1, False),
        (11, 60, 37, 8, 16, True, True, True, 1, True),  # blocks fastest
        # rows of ~18 > lanes
        (5, 90, 130, 16, 64, False, False, False, 1, True),
        # fewer nonzeros than lanes
        (7, 21, 5, 32, 8, True, False, True, 2, False),
        (3, 40, 50, 4, 32, False, True, False, 3, False),
        (4, 0, 9, 8, 8, True, True, True, 1, False),  # nnz = 0: bias only
    ])
def test_matches_reference(num_rows, nnz, out_len, lanes, block_q, bias, relu,
                           empty_rows, unit, q_major):
  rng = np.random.default_rng([17, num_rows, nnz, out_len, lanes])
  rows, offsets, in_len = _csr_problem(rng, num_rows, nnz, out_len,
                                       empty_rows, unit)
  x = rng.standard_normal(in_len).astype(np.float32)
  x_poisoned, poisoned = poison_unread(x, offsets, np.arange(out_len))
  assert poisoned > 0
  values = jnp.asarray(rng.standard_normal(nnz), jnp.float32)
  b = signed_bias(rng, num_rows) if bias else None
  nz = pack_nonzero_rows(rows, offsets, num_rows)
  if nnz and unit > 1:
    assert nz.offset_unit % unit == 0
  y = nonzero_lanes_conv(jnp.asarray(x_poisoned), values, nz,
                         out_len=out_len, bias=b, relu=relu, lanes=lanes,
                         block_q=block_q, q_major=q_major, interpret=True)
  ref = direct_sparse_conv_reference(jnp.asarray(x), values, rows, offsets,
                                     num_rows=num_rows, out_len=out_len,
                                     bias=b, relu=relu)
  chex.assert_shape(y, (num_rows, out_len))
  chex.assert_type(y, jnp.float32)
  assert_close(y, ref, 1e-5)
  # The kernel's own reference reads its packed tables (offset_unit too).
  assert_close(nonzero_lanes_reference(jnp.asarray(x), values, nz,
                                       out_len=out_len, bias=b, relu=relu),
               ref, 1e-6)
  if empty_rows and not bias:
    empty = np.setdiff1d(np.arange(num_rows), rows)
    np.testing.assert_array_equal(np.asarray(y)[empty], 0.0)


@pytest.mark.parametrize("dtype,out_dtype,bound", [
    ("float32", "float32", 1e-5), ("bfloat16", "bfloat16", 1e-2),
    ("bfloat16", "float32", 1e-5)])
def test_nhwc_output_and_dtypes(dtype, out_dtype, bound):
  """The NHWC store equals the wide reference cropped and transposed; bf16
  inputs accumulate in float32."""
  nhwc = NhwcOutput(batch=2, out_h=3, row_width=7, out_w=5)
  num_rows = 6
  rng = np.random.default_rng(5)
  rows, offsets, in_len = _csr_problem(rng, num_rows, 70, nhwc.out_len,
                                       empty_rows=True)
  x = jnp.asarray(rng.standard_normal(in_len), dtype)
  values = jnp.asarray(rng.standard_normal(rows.size), dtype)
  b = signed_bias(rng, num_rows)
  nz = pack_nonzero_rows(rows, offsets, num_rows)
  y = nonzero_lanes_conv(x, values, nz, out_len=nhwc.out_len, bias=b,
                         relu=True, out_dtype=out_dtype, lanes=16,
                         block_q=16, nhwc=nhwc, interpret=True)
  ref = direct_sparse_conv_reference(
      x.astype(jnp.float32), values.astype(jnp.float32), rows, offsets,
      num_rows=num_rows, out_len=nhwc.out_len, bias=b, relu=True)
  chex.assert_shape(y, (2, 3, 5, num_rows))
  chex.assert_type(y, jnp.dtype(out_dtype))
  assert rel_err(y, nhwc.from_wide(ref)) <= bound


def test_bad_inputs_name_the_problem():
  rows = np.array([0, 0, 1])
  offsets = np.array([0, 4, 2])
  nz = pack_nonzero_rows(rows, offsets, 2)
  x = jnp.ones(20, jnp.float32)
  v = jnp.ones(3, jnp.float32)
  with pytest.raises(ValueError, match="values must have shape"):
    nonzero_lanes_conv(x, v[:2], nz, out_len=8, interpret=True)
  with pytest.raises(ValueError, match="too short"):
    nonzero_lanes_conv(x[:10], v, nz, out_len=8, interpret=True)
  with pytest.raises(ValueError, match="lanes must be a power of two"):
    nonzero_lanes_conv(x, v, nz, out_len=8, lanes=12, interpret=True)
  with pytest.raises(ValueError, match="ascending"):
    pack_nonzero_rows(np.array([1, 0]), np.array([0, 1]), 2)
  with pytest.raises(ValueError, match="within"):
    pack_nonzero_rows(np.array([0, 2]), np.array([0, 1]), 2)


def _plane_problem(rng, num_rows, nnz, bounds, num_planes, kernel_h):
  """Random nonzeros (row, plane, tap) in CSR order and their offsets into
  unpadded (planes, H, W, N) input."""
  b = bounds
  rows = np.sort(rng.integers(0, num_rows, nnz))
  planes = rng.integers(0, num_planes, nnz)
  taps = rng.integers(0, kernel_h * b.kernel_w, nnz)
  r, s = taps // b.kernel_w, taps % b.kernel_w
  offsets = (((planes * b.height + r * b.dilation[0] - b.pad_top) * b.width
              + s * b.dilation[1] - b.pad_left) * b.batch + b.base)
  return rows, planes, taps, offsets


@pytest.mark.parametrize(
    "batch,height,width,kernel,dilation,pads,lanes,bq,q_major", [
        (1, 5, 7, (3, 3), (1, 1), (1, 1), 8, 16, False),   # SAME 3x3
        (3, 4, 6, (3, 3), (1, 1), (1, 1), 16, 32, False),  # batch innermost
        (2, 6, 5, (3, 2), (2, 1), (2, 0), 4, 8, True),     # dilated, 1-sided
        (1, 6, 6, (3, 3), (1, 1), (0, 0), 32, 64, False),  # VALID: no masks
    ])
def test_unpadded_planes_match_the_padded_layout(batch, height, width, kernel,
                                                 dilation, pads, lanes, bq,
                                                 q_major):
  """With PlaneBounds the kernel reads unpadded (C, H, W, N) planes and masks
  taps that leave the plane: the same as the padded flat layout (zeros
  around each plane) read without masks, and as its own reference; the
  NHWC store crops the wide columns past Wo."""
  rng = np.random.default_rng([23, batch, height, width, lanes])
  kh, kw = kernel
  pt, pl = pads
  base = (pt * width + pl) * batch
  bounds = PlaneBounds(height=height, width=width, batch=batch, kernel_h=kh,
                       kernel_w=kw, dilation=dilation, pad_top=pt,
                       pad_left=pl, base=base)
  num_rows, num_planes = 5, 3
  rows, planes, taps, offsets = _plane_problem(rng, num_rows, 40, bounds,
                                               num_planes, kh)
  out_h = height + 2 * pt - (kh - 1) * dilation[0]
  out_w = width + 2 * pl - (kw - 1) * dilation[1]
  nhwc = NhwcOutput(batch=batch, out_h=out_h, row_width=width, out_w=out_w)
  x = rng.standard_normal((num_planes, height, width, batch)).astype(
      np.float32)
  values = jnp.asarray(rng.standard_normal(rows.size), jnp.float32)
  b = signed_bias(rng, num_rows)
  nz = pack_nonzero_rows(rows, offsets, num_rows, taps=taps, bounds=bounds)
  y = nonzero_lanes_conv(jnp.asarray(x.reshape(-1)), values, nz,
                         out_len=nhwc.out_len, bias=b, relu=True, lanes=lanes,
                         block_q=bq, q_major=q_major, nhwc=nhwc,
                         interpret=True)
  chex.assert_shape(y, (batch, out_h, out_w, num_rows))
  ref = nonzero_lanes_reference(jnp.asarray(x.reshape(-1)), values, nz,
                                out_len=nhwc.out_len, bias=b, relu=True)
  assert_close(y, nhwc.from_wide(ref), 1e-5)
  # The same convolution on the padded layout: planes padded by (pt, pl)
  # in front and enough behind, wide rows of the padded width.
  hp, wp = height + 2 * pt, width + 2 * pl
  padded = np.pad(x, ((0, 0), (pt, pt), (pl, pl), (0, 0)))
  r, s = taps // kw, taps % kw
  p_offsets = ((planes * hp + r * dilation[0]) * wp
               + s * dilation[1]) * batch
  wide = direct_sparse_conv_reference(
      jnp.asarray(np.pad(padded.reshape(-1), (0, wp * batch * 4))), values,
      rows, p_offsets, num_rows=num_rows, out_len=out_h * wp * batch,
      bias=b, relu=True)
  want = NhwcOutput(batch=batch, out_h=out_h, row_width=wp,
                    out_w=out_w).from_wide(wide)
  assert_close(y, want, 1e-5)


def test_unpadded_planes_bad_inputs():
  bounds = PlaneBounds(height=3, width=4, batch=1, kernel_h=3, kernel_w=3,
                       dilation=(1, 1), pad_top=1, pad_left=1, base=5)
  rows, offsets, taps = np.array([0, 1]), np.array([5, 17]), np.array([4, 0])
  with pytest.raises(ValueError, match="taps and bounds go together"):
    pack_nonzero_rows(rows, offsets, 2, taps=taps)
  with pytest.raises(ValueError, match="taps must have shape"):
    pack_nonzero_rows(rows, offsets, 2, taps=taps[:1], bounds=bounds)
  with pytest.raises(ValueError, match=r"taps must lie in \[0, 3 x 3\)"):
    pack_nonzero_rows(rows, offsets, 2, taps=np.array([4, 9]),
                      bounds=bounds)
  with pytest.raises(ValueError, match="more than 31 taps"):
    PlaneBounds(height=8, width=8, batch=1, kernel_h=4, kernel_w=8,
                dilation=(1, 1), pad_top=1, pad_left=1, base=9)
  nz = pack_nonzero_rows(rows, offsets, 2, taps=taps, bounds=bounds)
  v = jnp.ones(2, jnp.float32)
  with pytest.raises(ValueError, match="not whole planes of 12"):
    nonzero_lanes_conv(jnp.ones(20, jnp.float32), v, nz, out_len=12,
                       interpret=True)


def test_tap_codes():
  """Bit r * 3 + s of position (ho, wo): tap (r, s) of a SAME 3x3 reads
  inside the 2x3 plane; batch innermost repeats each pixel's code."""
  b = PlaneBounds(height=2, width=3, batch=2, kernel_h=3, kernel_w=3,
                  dilation=(1, 1), pad_top=1, pad_left=1, base=8)
  codes = b.tap_codes(12)
  chex.assert_shape(codes, (12,))
  np.testing.assert_array_equal(codes[0::2], codes[1::2])

  def bits(*taps):
    return sum(1 << (r * 3 + s) for r, s in taps)
  rows_ok = {0: (1, 2), 1: (0, 1)}      # ho -> taps r inside
  cols_ok = {0: (1, 2), 1: (0, 1, 2), 2: (0, 1)}
  want = [bits(*[(r, s) for r in rows_ok[ho] for s in cols_ok[wo]])
          for ho in range(2) for wo in range(3)]
  np.testing.assert_array_equal(codes[0::2], want)
