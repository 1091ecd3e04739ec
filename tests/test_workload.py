"""Vector-sparse workload kernels: escort_jax.workload.make_kernel with
vector_width=V (whole vectors of V consecutive output channels)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from escort_jax import conv_geometry as cg
from escort_jax import ops
from escort_jax import workload as wl
from escort_jax.structure import SparseKernel
from pallas_kernels.vector_sparse_conv import vector_width_of


def _vector_width_on_geometry(layer: wl.Layer, kernel: np.ndarray) -> int:
  sk = SparseKernel.from_dense(kernel)
  g = cg.make_geometry(layer.input_shape(1), sk.structure,
                       layer.window_strides, layer.explicit_padding, (1, 1),
                       layer.groups)
  return ops.structure_vector_width(sk.structure, g)


def _vectors(kernel: np.ndarray, v: int) -> np.ndarray:
  """(k, k, C, O // V, V) view: one vector per (r, s, c, block)."""
  k = np.asarray(kernel)
  return k.reshape(k.shape[:3] + (k.shape[3] // v, v))


@pytest.mark.parametrize("name,v", [
    ("googlenet/inception_3a/5x5", 16),   # 16 -> 32, 5x5
    ("resnet50/res3a_branch2b", 8),       # 128 -> 128, 3x3
    ("caffenet/conv2", 32),               # grouped: 128 outputs per group
])
def test_vector_kernel_structure_and_nnz(name, v):
  layer = wl.get_layer(name)
  k = wl.make_kernel(layer, vector_width=v)
  assert k.shape == layer.kernel_shape and k.dtype == np.float32
  keep = round(layer.size * (1 - layer.sparsity) / v)
  assert np.count_nonzero(k) == v * keep == layer.nnz(vector_width=v)
  # Each vector is kept whole or not at all.
  nz = np.count_nonzero(_vectors(k, v), axis=-1)
  assert set(np.unique(nz)) <= {0, v}
  assert (nz == v).sum() == keep
  # The structure is vector-sparse with (at least) V, on the CSR rows and on
  # the layer's geometry (blocks within one feature group).
  struct = SparseKernel.from_dense(k).structure
  assert struct.vector_width() % v == 0
  rows = np.repeat(np.arange(struct.oirs[0]), np.diff(struct.indptr))
  assert vector_width_of(rows, struct.indices, struct.oirs[0]) % v == 0
  small = layer.scaled(6)
  assert _vector_width_on_geometry(small, k) % v == 0
  # Unstructured kernels of the workload are not vector-sparse.
  assert _vector_width_on_geometry(small, wl.make_kernel(layer)) == 1


def test_vector_kernel_deterministic_nested_and_values():
  layer = wl.get_layer("resnet50/res3a_branch2b")
  v = 16
  a = wl.make_kernel(layer, vector_width=v)
  np.testing.assert_array_equal(a, wl.make_kernel(layer, vector_width=v))
  assert not np.array_equal(a, wl.make_kernel(layer, vector_width=v,
                                              seed=123))
  # Nested across sparsities, same values where both keep a vector.
  k50 = wl.make_kernel(layer, sparsity=0.5, vector_width=v)
  k90 = wl.make_kernel(layer, sparsity=0.9, vector_width=v)
  k99 = wl.make_kernel(layer, sparsity=0.99, vector_width=v)
  assert np.count_nonzero(k90) == v * round(layer.size * 0.1 / v)
  assert np.all((k99 != 0) <= (k90 != 0)) and np.all((k90 != 0) <= (k50 != 0))
  np.testing.assert_array_equal(k99[k99 != 0], k50[k99 != 0])
  # The values are the unstructured kernel's draws at the same positions.
  dense = wl.make_kernel(layer, sparsity=0.0)
  np.testing.assert_array_equal(k50[k50 != 0], dense[k50 != 0])
  # Vectors spread over the whole kernel: every block and position is hit.
  hit = np.count_nonzero(_vectors(k50, v), axis=-1) > 0
  assert hit.any(axis=(0, 1, 2)).all() and hit.any(axis=3).mean() > 0.9


def test_vector_kernel_aligned_column_counts():
  """column_multiple=8: every block keeps a multiple of 8 positions (its
  count rounded to the nearest), nested across sparsities, with the plain
  kernel's values; the total stays within 4 vectors per block."""
  layer = wl.get_layer("resnet50/res3a_branch2b")
  v, m = 16, 8
  blocks = layer.out_channels // v
  previous = None
  for sp in (0.99, layer.sparsity, 0.5):
    k = wl.make_kernel(layer, sparsity=sp, vector_width=v, column_multiple=m)
    plain = wl.make_kernel(layer, sparsity=sp, vector_width=v)
    kept = np.count_nonzero(_vectors(k, v), axis=-1) == v
    assert set(np.unique(np.count_nonzero(_vectors(k, v), axis=-1))) <= {0, v}
    counts = kept.reshape(-1, blocks).sum(axis=0)
    assert np.all(counts % m == 0)
    assert abs(int(counts.sum()) * v - layer.nnz(sp, v)) <= m // 2 * blocks * v
    np.testing.assert_array_equal(k[k != 0], wl.make_kernel(
        layer, sparsity=0.0)[k != 0])
    assert not np.array_equal(k, plain)
    if previous is not None:
      assert np.all((previous != 0) <= (k != 0))
    previous = k
  np.testing.assert_array_equal(
      wl.make_kernel(layer, vector_width=v, column_multiple=1),
      wl.make_kernel(layer, vector_width=v))


def test_vector_kernel_bf16_keeps_every_weight():
  layer = wl.get_layer("googlenet/inception_3a/5x5")
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  k = wl.make_kernel(layer, sparsity=0.75, vector_width=16,
                     dtype=jnp.bfloat16)
  assert k.dtype == jnp.bfloat16
  assert np.count_nonzero(np.asarray(k, np.float32)) == layer.nnz(0.75, 16)


def test_vector_width_must_tile_the_output_channels():
  layer = wl.get_layer("googlenet/inception_4a/5x5")  # 48 outputs
  assert layer.out_channels == 48
  wl.make_kernel(layer, vector_width=16)
  with pytest.raises(ValueError, match="does not divide its 48 output"):
    wl.make_kernel(layer, vector_width=32)
  # Grouped: 2 groups of 24 outputs; a vector may not straddle two groups.
  grouped = dataclasses.replace(layer, groups=2, in_channels=32)
  with pytest.raises(ValueError, match="24 per feature group"):
    wl.make_kernel(grouped, vector_width=16)
  for bad in (0, -8, 2.5):
    with pytest.raises(ValueError, match="positive integer"):
      wl.make_kernel(layer, vector_width=bad)


def test_every_pruned_layer_takes_v16():
  """All 39 pruned layers (and caffenet/conv1) have output channels, per
  feature group, divisible by 8 and 16; 32 misses 2 GoogLeNet layers, 64
  misses 6."""
  layers = wl.pruned_layers()
  assert len(layers) == 39
  for v in (8, 16):
    for layer in wl.load_layers():
      assert layer.check_vector_width(v) == v
  misses = {v: [l.name for l in layers
                if l.out_channels % v or (l.out_channels // l.groups) % v]
            for v in (32, 64)}
  assert misses[32] == ["googlenet/inception_4a/3x3",
                        "googlenet/inception_4a/5x5"]
  assert len(misses[64]) == 6
