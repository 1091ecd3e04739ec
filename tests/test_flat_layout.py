"""pallas_kernels/flat_layout.py (interpreted on the CPU, compiled on a GPU)
against its reference and against conv_geometry.to_flat_input, bit for
bit."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import conv_geometry as cg
from escort_jax.structure import SparseStructure
from pallas_kernels.flat_layout import flat_layout, flat_layout_reference
from tests.conftest import requires_gpu


@pytest.mark.parametrize("shape,padding,extra,slab,cb,nb", [
    ((2, 5, 7, 3), ((1, 1), (1, 1)), 2, 16384, None, None),
    ((3, 6, 6, 17), ((2, 0), (0, 1)), 0, 256, None, None),
    ((1, 4, 9, 40), ((0, 0), (0, 0)), 1, 64, None, None),
    ((2, 6, 5, 9), ((1, 2), (2, 1)), 3, None, None, None),
    # Explicit blocks: images split over programs, a partial last block.
    ((5, 4, 6, 9), ((1, 1), (1, 1)), 2, None, 4, 2),
    ((3, 3, 5, 20), ((0, 1), (2, 0)), 1, None, 16, 1),
])
def test_flat_layout_matches_reference(shape, padding, extra, slab, cb, nb):
  rng = np.random.default_rng(list(shape))
  x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  y = flat_layout(x, padding, extra, slab=slab, channel_block=cb,
                  batch_block=nb, interpret=True)
  want = flat_layout_reference(x, padding, extra)
  chex.assert_shape(y, want.shape)
  chex.assert_type(y, x.dtype)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_flat_layout_byte_blocks_for_2_byte_batches():
  """bfloat16 with 16 or more images runs blocks of 16 channels x 16 images
  (a partial last block of each here) and equals the reference."""
  x = jnp.asarray(np.random.default_rng(6).standard_normal((19, 3, 4, 21)),
                  jnp.bfloat16)
  y = flat_layout(x, ((1, 1), (1, 1)), 1, interpret=True)
  np.testing.assert_array_equal(
      np.asarray(y, np.float32),
      np.asarray(flat_layout_reference(x, ((1, 1), (1, 1)), 1), np.float32))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flat_layout_is_to_flat_input_at_stride_one(dtype):
  x = jnp.asarray(np.random.default_rng(3).standard_normal((2, 7, 6, 5)),
                  dtype)
  st = SparseStructure.from_mask(np.ones((3, 5, 5, 4), bool))
  g = cg.make_geometry(x.shape, st, (1, 1), "SAME", (1, 1), 1)
  tail = 3 * g.plane_len + 7
  want = cg.to_flat_input(x, g, tail)
  got = flat_layout(x, g.padding, -(-tail // g.plane_len), interpret=True)
  np.testing.assert_array_equal(np.asarray(got, np.float32),
                                np.asarray(want, np.float32))


def test_flat_layout_input_checks():
  with pytest.raises(ValueError, match="must be non-negative"):
    flat_layout(jnp.zeros((1, 2, 2, 1)), ((-1, 0), (0, 0)), interpret=True)
  with pytest.raises(ValueError, match=r"must be \(N, H, W, C\)"):
    flat_layout(jnp.zeros((2, 2, 1)), ((0, 0), (0, 0)), interpret=True)
  with pytest.raises(ValueError, match="batch_block must be a power of two"):
    flat_layout(jnp.zeros((2, 2, 2, 1)), ((0, 0), (0, 0)), batch_block=3,
                interpret=True)


def test_flat_input_kernel_value_and_transpose_match_xla():
  """escort_jax.ops.flat_input_kernel (the kernel, interpreted here, with
  XLA's transpose as its VJP) against conv_geometry.to_flat_input."""
  import jax
  from escort_jax import ops
  x = jnp.asarray(np.random.default_rng(4).standard_normal((3, 5, 6, 4)),
                  jnp.float32)
  st = SparseStructure.from_mask(np.ones((3, 3, 4, 2), bool))
  g = cg.make_geometry(x.shape, st, (1, 1), "SAME", (1, 1), 1)
  tail = g.plane_len + 3
  y, vjp = jax.vjp(lambda x: ops.flat_input_kernel(x, g, tail), x)
  want, want_vjp = jax.vjp(lambda x: cg.to_flat_input(x, g, tail), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(want))
  ct = jnp.asarray(np.random.default_rng(5).standard_normal(y.shape),
                   jnp.float32)
  np.testing.assert_array_equal(np.asarray(vjp(ct)[0]),
                                np.asarray(want_vjp(ct)[0]))


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("shape,dtype", [
    ((32, 56, 56, 64), "bfloat16"),   # byte blocks, res2a's input
    ((19, 14, 14, 256), "bfloat16"),  # byte blocks, a partial image block
    ((8, 28, 28, 128), "bfloat16"),   # the slab rule (fewer images)
    ((1, 28, 28, 128), "float32"),
])
def test_flat_layout_compiled_matches_reference(shape, dtype):
  x = jnp.asarray(np.random.default_rng(list(shape)).standard_normal(shape),
                  dtype)
  y = flat_layout(x, ((1, 1), (1, 1)), 2)
  want = flat_layout_reference(x, ((1, 1), (1, 1)), 2)
  chex.assert_shape(y, want.shape)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(want, np.float32))
