"""SparseKernel / SparseStructure: construction, layouts, pytree, hashing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import SparseKernel, SparseStructure, sparse_conv
from tests.conftest import random_pruned_kernel


@pytest.mark.parametrize("layout,shape,sparsity", [
    ("HWIO", (3, 3, 4, 6), 0.5),
    ("OIHW", (6, 4, 3, 3), 0.5),
    ("HWIO", (2, 3, 5, 7), 0.9),
    ("OIHW", (7, 5, 1, 2), 0.0),
])
def test_from_dense_keeps_exactly_the_nonzeros(layout, shape, sparsity):
  rng = np.random.default_rng(101)
  kernel = random_pruned_kernel(rng, shape, sparsity)
  sk = SparseKernel.from_dense(kernel, layout=layout)
  nnz = int(np.count_nonzero(kernel))
  assert sk.nnz == nnz == round(kernel.size * (1 - sparsity))
  assert sk.shape == shape and sk.layout == layout
  assert sk.structure.shape == shape and sk.structure.layout == layout
  assert sk.density == pytest.approx(nnz / kernel.size)
  assert sk.sparsity == pytest.approx(1 - nnz / kernel.size)
  assert sk.dtype == jnp.float32
  assert sk.values.shape == (nnz,)
  # Each value sits at its recorded dense position.
  pos = sk.structure.dense_positions()
  np.testing.assert_array_equal(np.asarray(sk.values), kernel[pos])
  assert np.all(np.asarray(sk.values) != 0)
  # The positions are exactly the nonzeros (no duplicates, none missing).
  mask = np.zeros(shape, bool)
  mask[pos] = True
  np.testing.assert_array_equal(mask, kernel != 0)
  # todense round-trips exactly, in the kernel's own layout.
  dense = np.asarray(sk.todense())
  assert dense.shape == shape and dense.dtype == kernel.dtype
  np.testing.assert_array_equal(dense, kernel)


def test_hwio_and_oihw_describe_the_same_nonzeros():
  rng = np.random.default_rng(102)
  hwio = random_pruned_kernel(rng, (3, 2, 4, 5), 0.6)
  oihw = hwio.transpose(3, 2, 0, 1)
  a = SparseKernel.from_dense(hwio, "HWIO")
  b = SparseKernel.from_dense(oihw, "OIHW")
  # Same CSR content (rows = output channels, columns = (c, r, s)) ...
  assert a.structure.oirs == b.structure.oirs == (5, 4, 3, 2)
  np.testing.assert_array_equal(a.structure.indptr, b.structure.indptr)
  np.testing.assert_array_equal(a.structure.indices, b.structure.indices)
  np.testing.assert_array_equal(np.asarray(a.values), np.asarray(b.values))
  # ... but different layouts, so different structures.
  assert a.structure != b.structure
  np.testing.assert_array_equal(
      np.asarray(a.todense()).transpose(3, 2, 0, 1), np.asarray(b.todense()))
  # CSR rows are per output channel, with sorted columns.
  counts = np.count_nonzero(oihw.reshape(5, -1), axis=1)
  np.testing.assert_array_equal(np.diff(a.structure.indptr), counts)
  for k in range(5):
    cols = a.structure.indices[a.structure.indptr[k]:a.structure.indptr[k + 1]]
    assert np.all(np.diff(cols) > 0)


@pytest.mark.parametrize("layout", ["HWIO", "OIHW"])
@pytest.mark.parametrize("to", ["OHWI", "IOHW", "HWIO", "OIHW"])
def test_todense_in_another_layout(layout, to):
  """todense(layout) scatters into any permutation of OIHW: the recorded
  layout's kernel transposed, and its gradient is the values' positions."""
  rng = np.random.default_rng(103)
  hwio = random_pruned_kernel(rng, (3, 2, 4, 5), 0.6)
  kernel = hwio if layout == "HWIO" else hwio.transpose(3, 2, 0, 1)
  sk = SparseKernel.from_dense(kernel, layout)
  dense = np.asarray(sk.todense(to))
  np.testing.assert_array_equal(
      dense, kernel.transpose([layout.index(d) for d in to]))
  weights = jnp.asarray(rng.standard_normal(dense.shape), jnp.float32)
  grad = jax.grad(lambda v: (sk.with_values(v).todense(to) * weights).sum())(
      sk.values)
  pos = sk.structure.dense_positions()
  np.testing.assert_array_equal(
      np.asarray(grad),
      np.asarray(weights).transpose(
          [to.index(d) for d in layout])[pos])
  with pytest.raises(ValueError, match="a permutation of 'OIHW'"):
    sk.todense("OHW")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, np.float32])
def test_from_dense_keeps_dtype(dtype):
  rng = np.random.default_rng(103)
  kernel = random_pruned_kernel(rng, (3, 3, 2, 4), 0.5, dtype=dtype)
  sk = SparseKernel.from_dense(jnp.asarray(kernel))
  assert sk.dtype == jnp.dtype(dtype)
  assert sk.todense().dtype == jnp.dtype(dtype)
  np.testing.assert_array_equal(
      np.asarray(sk.todense()).astype(np.float32), kernel.astype(np.float32))


def test_structure_arrays_are_read_only():
  rng = np.random.default_rng(104)
  sk = SparseKernel.from_dense(random_pruned_kernel(rng, (3, 3, 2, 4), 0.5))
  with pytest.raises(ValueError):
    sk.structure.indices[0] = 1
  with pytest.raises(ValueError):
    sk.structure.indptr[1] = 0


def test_pytree_has_exactly_one_leaf_values():
  rng = np.random.default_rng(105)
  sk = SparseKernel.from_dense(random_pruned_kernel(rng, (3, 3, 3, 4), 0.7))
  leaves, treedef = jax.tree_util.tree_flatten(sk)
  assert len(leaves) == 1
  assert leaves[0] is sk.values
  assert leaves[0].shape == (sk.nnz,)
  rebuilt = jax.tree_util.tree_unflatten(treedef, [leaves[0] * 2])
  assert isinstance(rebuilt, SparseKernel)
  assert rebuilt.structure is sk.structure
  np.testing.assert_array_equal(np.asarray(rebuilt.values),
                                2 * np.asarray(sk.values))
  doubled = jax.tree_util.tree_map(lambda v: -v, sk)
  np.testing.assert_array_equal(np.asarray(doubled.todense()),
                                -np.asarray(sk.todense()))


def test_structure_hash_and_equality_by_content():
  rng = np.random.default_rng(106)
  kernel = random_pruned_kernel(rng, (3, 3, 4, 5), 0.5)
  other_values = np.where(kernel != 0, rng.standard_normal(kernel.shape) + 5,
                          0).astype(np.float32)
  a = SparseKernel.from_dense(kernel)
  b = SparseKernel.from_dense(other_values)
  assert a.structure is not b.structure
  assert a.structure == b.structure
  assert hash(a.structure) == hash(b.structure)
  assert a.structure.digest == b.structure.digest
  assert {a.structure: "x"}[b.structure] == "x"
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  # One position more or less: a different structure.
  changed = kernel.copy()
  idx = np.argwhere(kernel == 0)[0]
  changed[tuple(idx)] = 1.0
  c = SparseKernel.from_dense(changed)
  assert c.structure != a.structure
  assert c.structure.digest != a.structure.digest
  assert jax.tree_util.tree_structure(a) != jax.tree_util.tree_structure(c)
  # Same nonzero count, moved position: also different.
  moved = changed.copy()
  moved[tuple(np.argwhere(kernel != 0)[0])] = 0
  d = SparseKernel.from_dense(moved)
  assert d.nnz == a.nnz
  assert d.structure != a.structure
  # Same mask in another shape: different.
  e = SparseKernel.from_dense(kernel.reshape(3, 3, 5, 4))
  assert e.structure != a.structure
  assert (a.structure == "not a structure") is False


def test_jit_does_not_retrace_for_new_values_and_retraces_for_new_structure():
  rng = np.random.default_rng(107)
  kernel = random_pruned_kernel(rng, (3, 3, 2, 3), 0.5)
  traces = []

  @jax.jit
  def f(sk, x):
    traces.append(sk.structure)
    return sparse_conv(x, sk, method="dense") + sk.todense().sum()

  x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.float32)
  a = SparseKernel.from_dense(kernel)
  b = SparseKernel.from_dense(
      np.where(kernel != 0, kernel * 3 + 1, 0).astype(np.float32))
  ya = f(a, x)
  yb = f(b, x)
  assert len(traces) == 1, "equal structures with new values retraced"
  assert not np.allclose(np.asarray(ya), np.asarray(yb))
  f(a.with_values(a.values * -1), x)
  assert len(traces) == 1
  changed = kernel.copy()
  changed[tuple(np.argwhere(kernel == 0)[0])] = 2.0
  f(SparseKernel.from_dense(changed), x)
  assert len(traces) == 2, "a new structure did not retrace"
  # A rebuilt-but-equal structure hits the cache again.
  f(SparseKernel.from_dense(changed * 2), x)
  assert len(traces) == 2


def test_from_dense_on_a_tracer_raises_type_error():
  rng = np.random.default_rng(108)
  kernel = jnp.asarray(random_pruned_kernel(rng, (3, 3, 2, 2), 0.5))

  @jax.jit
  def f(k):
    return SparseKernel.from_dense(k).values

  with pytest.raises(TypeError, match="tracer"):
    f(kernel)
  with pytest.raises(TypeError, match="tracer"):
    jax.grad(lambda k: SparseKernel.from_dense(k).values.sum())(kernel)


def test_nan_in_kernel_is_kept():
  rng = np.random.default_rng(109)
  kernel = random_pruned_kernel(rng, (3, 3, 2, 4), 0.5)
  zero_pos = tuple(np.argwhere(kernel == 0)[3])
  kernel[zero_pos] = np.nan
  sk = SparseKernel.from_dense(kernel)
  assert sk.nnz == np.count_nonzero(kernel)  # NaN != 0 counts as nonzero
  assert int(np.isnan(np.asarray(sk.values)).sum()) == 1
  dense = np.asarray(sk.todense())
  assert np.isnan(dense[zero_pos])
  np.testing.assert_array_equal(dense, kernel)  # NaN == NaN here


def test_from_mask_keeps_explicit_zeros():
  rng = np.random.default_rng(110)
  kernel = random_pruned_kernel(rng, (2, 2, 3, 4), 0.5)
  mask = rng.random(kernel.shape) < 0.7
  sk = SparseKernel.from_mask(kernel, mask)
  assert sk.nnz == mask.sum()
  np.testing.assert_array_equal(np.asarray(sk.todense()),
                                np.where(mask, kernel, 0))


def test_structure_rejects_invalid_csr():
  with pytest.raises(ValueError, match="indptr"):
    SparseStructure((3, 3, 2, 2), "HWIO", [0, 1], [0])
  with pytest.raises(ValueError, match="column indices"):
    SparseStructure((3, 3, 2, 2), "HWIO", [0, 1, 1], [18])
  with pytest.raises(ValueError, match="layout"):
    SparseStructure((3, 3, 2, 2), "NHWC", [0, 0, 0], [])


# ---------------------------------------------------------------------------
# Vector selection with aligned block counts.


def test_select_vectors_plain_is_the_ranking_prefix():
  from escort_jax.structure import select_vectors
  ranking = np.random.default_rng(0).permutation(9 * 8)
  kept = select_vectors(ranking, 29, 8)
  np.testing.assert_array_equal(np.flatnonzero(kept), np.sort(ranking[:29]))


@pytest.mark.parametrize("m", [2, 4, 8])
def test_select_vectors_rounds_each_block(m):
  """Each block keeps its count among the first `keep` rounded to the
  nearest multiple of m (halves up), its best-ranked vectors, nested as
  `keep` grows."""
  from escort_jax.structure import select_vectors
  num_blocks, per_block = 8, 50
  ranking = np.random.default_rng(m).permutation(num_blocks * per_block)
  previous = np.zeros(ranking.size, bool)
  for keep in (0, 37, 120, 251, 400):
    kept = select_vectors(ranking, keep, num_blocks, m)
    counts = np.bincount(np.flatnonzero(kept) % num_blocks,
                         minlength=num_blocks)
    want = np.bincount(ranking[:keep] % num_blocks, minlength=num_blocks)
    want = np.minimum((want + m // 2) // m * m, per_block)
    np.testing.assert_array_equal(counts, want)
    assert np.all(counts[counts < per_block] % m == 0)
    for b in range(num_blocks):
      mine = ranking[ranking % num_blocks == b]
      np.testing.assert_array_equal(np.sort(np.flatnonzero(kept)[
          np.flatnonzero(kept) % num_blocks == b]), np.sort(mine[:counts[b]]))
    assert np.all(previous <= kept)
    previous = kept
  # All 50 vectors of each block: 50 for m = 2 (a multiple), 52 capped at 50
  # for m = 4, 48 for m = 8.
  assert kept.sum() == num_blocks * {2: 50, 4: 50, 8: 48}[m]


def test_select_vectors_checks():
  from escort_jax.structure import select_vectors
  with pytest.raises(ValueError, match="column_multiple must be >= 1"):
    select_vectors(np.arange(16), 4, 2, 0)
  with pytest.raises(ValueError, match="not a whole number of 3 blocks"):
    select_vectors(np.arange(16), 4, 3)
