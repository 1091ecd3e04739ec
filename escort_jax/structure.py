"""The static sparse structure of a pruned convolution kernel, and SparseKernel.

A `SparseKernel` is a pytree with one array leaf, `.values` (nnz,), and a
static `SparseStructure` as its aux data. The structure says where the
nonzeros sit: one CSR row per output channel, whose column index encodes the
kernel position (c, r, s) as (c * R + r) * S + s, with c the input channel
within the channel's group, r the row and s the column of the window. It also
records the kernel's shape and layout ("HWIO" or "OIHW").

The structure is hashable and compares by content, so jit keeps one
executable per layer and input shape and retraces only when the structure
changes. Nothing in it depends on the input size: the offsets into the
padded input are derived at trace time (escort_jax.conv_geometry).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.vector_sparse_conv import (VECTOR_WIDTHS, unshared_block,
                                               vector_width_of)

LAYOUTS = ("HWIO", "OIHW")

# Vector blocks that keep a multiple of this many positions start every row
# of their weight tiles 16 bytes apart in the CSR values, and the vector
# kernel then loads its weights 8 at a time (VectorBlocks.value_alignment):
# 1.09x on 8 workload layers at V = 16 (benchmarks/NOTES.md, seventh
# session).
ALIGNED_COLUMNS = 8


def _check_permutation(layout: str) -> str:
  """A dense kernel layout: any permutation of "OIHW"."""
  if not isinstance(layout, str) or sorted(layout) != sorted("OIHW"):
    raise ValueError(f"a kernel layout is a permutation of 'OIHW', got "
                     f"{layout!r}")
  return layout


def _readonly(a: np.ndarray) -> np.ndarray:
  a = np.ascontiguousarray(a)
  a.setflags(write=False)
  return a


class SparseStructure:
  """Where the nonzeros of a 2-D convolution kernel sit. Immutable, hashable.

  Attributes:
    shape: the kernel's shape in `layout` order.
    layout: "HWIO" or "OIHW".
    indptr: (out_channels + 1,) int64 CSR row pointers.
    indices: (nnz,) int32 column indices (c * R + r) * S + s, sorted per row.
  """

  __slots__ = ("shape", "layout", "indptr", "indices", "_hash", "_digest",
               "_vector_width")

  def __init__(self, shape, layout: str, indptr, indices):
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    shape = tuple(int(d) for d in shape)
    if len(shape) != 4:
      raise ValueError(
          f"a 2-D convolution kernel has rank 4, got shape {shape}")
    self.shape = shape
    self.layout = layout
    self.indptr = _readonly(np.asarray(indptr, np.int64))
    self.indices = _readonly(np.asarray(indices, np.int32))
    o, i, r, s = self.oirs
    if self.indptr.shape != (o + 1,) or self.indptr[0] != 0 or (
        self.indptr[-1] != self.indices.shape[0]) or np.any(
            np.diff(self.indptr) < 0):
      raise ValueError("indptr is not a valid CSR row pointer for "
                       f"{o} output channels and {self.indices.shape[0]} "
                       "nonzeros")
    if self.indices.size and (self.indices.min() < 0 or
                              self.indices.max() >= i * r * s):
      raise ValueError(f"column indices must lie in [0, {i * r * s})")
    h = hashlib.sha1()
    h.update(repr((self.shape, self.layout)).encode())
    h.update(self.indptr.tobytes())
    h.update(self.indices.tobytes())
    self._digest = h.hexdigest()
    self._hash = hash(self._digest)
    self._vector_width = None

  @property
  def oirs(self) -> tuple[int, int, int, int]:
    """(out_channels, in_channels per group, kernel rows, kernel columns)."""
    if self.layout == "HWIO":
      r, s, i, o = self.shape
    else:
      o, i, r, s = self.shape
    return o, i, r, s

  @property
  def nnz(self) -> int:
    """The number of kept weights."""
    return int(self.indices.shape[0])

  @property
  def size(self) -> int:
    """The number of entries of the dense kernel."""
    return int(np.prod(self.shape))

  @property
  def digest(self) -> str:
    """A stable hex digest of the structure, for on-disk caches."""
    return self._digest

  def vector_width(self) -> int:
    """The largest V in (64, 32, 16, 8) such that every block of V consecutive
    output channels keeps the same (c, r, s) positions, else 1.

    Such a kernel is *vector-sparse* and can run on tensor cores
    (sparse_conv(..., method="vector")). With feature groups, a block must
    also lie within one group; sparse_conv checks that on the call.
    """
    if self._vector_width is None:
      k = np.repeat(np.arange(self.oirs[0]), np.diff(self.indptr))
      self._vector_width = vector_width_of(k, self.indices, self.oirs[0])
    return self._vector_width

  def coordinates(self) -> tuple[np.ndarray, ...]:
    """(k, c, r, s) of each nonzero, in CSR order; each (nnz,) int64."""
    o, _, r, s = self.oirs
    k = np.repeat(np.arange(o), np.diff(self.indptr))
    col = self.indices.astype(np.int64)
    return k, col // (r * s), (col // s) % r, col % s

  def dense_positions(self) -> tuple[np.ndarray, ...]:
    """Index arrays of the nonzeros into a kernel of `shape` and `layout`."""
    k, c, r, s = self.coordinates()
    return (r, s, c, k) if self.layout == "HWIO" else (k, c, r, s)

  def __eq__(self, other: Any) -> bool:
    if not isinstance(other, SparseStructure):
      return NotImplemented
    return self is other or (
        self._hash == other._hash and self.shape == other.shape
        and self.layout == other.layout
        and np.array_equal(self.indptr, other.indptr)
        and np.array_equal(self.indices, other.indices))

  def __hash__(self) -> int:
    return self._hash

  def __repr__(self) -> str:
    return (f"SparseStructure(shape={self.shape}, layout={self.layout!r}, "
            f"nnz={self.nnz}, digest={self._digest[:12]})")

  @classmethod
  def from_mask(cls, mask: np.ndarray, layout: str = "HWIO"
                ) -> SparseStructure:
    """Builds the structure of the True entries of a boolean kernel mask."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 4:
      raise ValueError(
          f"a 2-D convolution kernel has rank 4, got shape {mask.shape}")
    if layout not in LAYOUTS:
      raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    oirs = mask if layout == "OIHW" else mask.transpose(3, 2, 0, 1)
    o = oirs.shape[0]
    flat = oirs.reshape(o, -1)
    rows, cols = np.nonzero(flat)
    indptr = np.zeros(o + 1, np.int64)
    indptr[1:] = np.cumsum(np.bincount(rows, minlength=o))
    return cls(mask.shape, layout, indptr, cols)


def select_vectors(ranking, keep: int, num_blocks: int,
                   column_multiple: int = 1) -> np.ndarray:
  """Which V-vectors of a kernel to keep, each block keeping a multiple of
  `column_multiple` of them.

  Args:
    ranking: (num_vectors,) the index of every vector, most wanted first.
      Vector i belongs to block i % num_blocks (the HWIO order with the
      output channels innermost: i = position * num_blocks + block).
    keep: the target count: without rounding, the first `keep` of
      `ranking` are kept.
    num_blocks: output-channel blocks (output channels // V).
    column_multiple: m >= 1. Each block's count among the first `keep` is
      rounded to the nearest multiple of m (halves up; at most the block's
      size), and the block keeps that many of its most wanted vectors. The
      total can differ from `keep` by up to m / 2 per block; m = 1 keeps
      exactly the first `keep`.

  Returns:
    (num_vectors,) bool, True = kept.

  Raises:
    ValueError: if the vectors are not a whole number of blocks, or m < 1.
  """
  ranking = np.asarray(ranking, np.int64)
  n, m = ranking.size, int(column_multiple)
  if m < 1:
    raise ValueError(f"column_multiple must be >= 1, got {column_multiple!r}")
  if num_blocks < 1 or n % num_blocks:
    raise ValueError(f"{n} vectors are not a whole number of {num_blocks} "
                     "blocks")
  keep = min(max(int(keep), 0), n)
  block = ranking % num_blocks
  counts = np.bincount(block[:keep], minlength=num_blocks)
  counts = np.minimum((counts + m // 2) // m * m, n // num_blocks)
  # Each vector's place among its block's vectors, in ranking order.
  order = np.argsort(block, kind="stable")
  first = np.searchsorted(block[order], np.arange(num_blocks))
  place = np.empty(n, np.int64)
  place[order] = np.arange(n) - first[block[order]]
  kept = np.zeros(n, bool)
  kept[ranking[place < counts[block]]] = True
  return kept


def _check_vector_width(structure: SparseStructure, vector_width) -> None:
  if vector_width is None:
    return
  if vector_width not in VECTOR_WIDTHS:
    raise ValueError(f"vector_width must be one of {VECTOR_WIDTHS}, got "
                     f"{vector_width!r}")
  o = structure.oirs[0]
  if o % vector_width:
    raise ValueError(f"vector_width={vector_width} does not divide the "
                     f"kernel's {o} output channels")
  k = np.repeat(np.arange(o), np.diff(structure.indptr))
  bad = unshared_block(k, structure.indices, o, vector_width)
  if bad is not None:
    block, row = bad
    first = block * vector_width
    what = (f"output channel {first + row} keeps other positions than "
            f"channel {first} of its block" if row >= 0 else
            f"output channels {first}..{first + vector_width - 1} keep "
            "different numbers of weights")
    raise ValueError(
        f"the kernel is not vector-sparse with vector_width={vector_width}: "
        f"{what} (prune with escort_jax.prune.vector_mask)")


@jax.tree_util.register_pytree_node_class
class SparseKernel:
  """A pruned 2-D convolution kernel: kept values plus static structure.

  Attributes:
    values: (nnz,) the kept weights, in CSR order of `structure`.
    structure: the static SparseStructure.
  """

  __slots__ = ("values", "structure")

  def __init__(self, values, structure: SparseStructure):
    if not isinstance(structure, SparseStructure):
      raise TypeError("structure must be a SparseStructure, got "
                      f"{type(structure).__name__}")
    self.values = values
    self.structure = structure

  @classmethod
  def from_dense(cls, kernel, layout: str = "HWIO",
                 vector_width: int | None = None) -> SparseKernel:
    """Keeps exactly the nonzero entries of a concrete kernel.

    Args:
      kernel: a concrete array of rank 4 in `layout` (not a tracer: the
        structure is static, so call this outside jit).
      layout: "HWIO" (Flax's, the default) or "OIHW".
      vector_width: if given, require vector sparsity of that width (blocks
        of V consecutive output channels keep the same positions) and raise
        a ValueError naming the first mismatch otherwise.
    """
    if isinstance(kernel, jax.core.Tracer):
      raise TypeError(
          "SparseKernel.from_dense needs a concrete kernel, got a tracer: "
          "the sparsity structure is static, so build the SparseKernel "
          "outside jit/grad/vmap and pass it in")
    dense = np.asarray(kernel)
    if not np.issubdtype(dense.dtype, np.floating) and dense.dtype != (
        jnp.bfloat16):
      raise TypeError(f"kernel must be floating point, got {dense.dtype}")
    # NaN is not zero, so it is kept: a kept NaN must stay visible.
    structure = SparseStructure.from_mask(dense != 0, layout)
    _check_vector_width(structure, vector_width)
    values = dense[structure.dense_positions()]
    return cls(jnp.asarray(values, dtype=dense.dtype), structure)

  @classmethod
  def from_mask(cls, kernel, mask, layout: str = "HWIO",
                vector_width: int | None = None) -> SparseKernel:
    """Keeps the entries of `kernel` where `mask` is True (zeros included).

    vector_width: as in from_dense.
    """
    if isinstance(mask, jax.core.Tracer):
      raise TypeError("the mask must be concrete: the structure is static")
    mask = np.asarray(mask, bool)
    if tuple(mask.shape) != tuple(np.shape(kernel)):
      raise ValueError(f"mask shape {mask.shape} does not match kernel "
                       f"shape {np.shape(kernel)}")
    structure = SparseStructure.from_mask(mask, layout)
    _check_vector_width(structure, vector_width)
    values = jnp.asarray(kernel)[structure.dense_positions()]
    return cls(values, structure)

  def todense(self, layout: str | None = None) -> jax.Array:
    """The kernel, zeros at the pruned positions, in `layout`: its recorded
    one (None) or any permutation of "OIHW" ("OHWI" is how
    escort_jax.nnx.DenseConv holds it), scattered there directly.

    Differentiable with respect to `values`.
    """
    order = [self.layout.index(d) for d in _check_permutation(
        layout or self.layout)]
    positions = self.structure.dense_positions()
    shape = tuple(self.shape[i] for i in order)
    # A scatter of the nnz values: its index constant is nnz-sized, where a
    # gather would bake a dense-sized one into every compiled program.
    flat = np.ravel_multi_index(tuple(positions[i] for i in order),
                                shape).astype(np.int32)
    dense = jnp.zeros(self.structure.size, self.values.dtype)
    dense = dense.at[flat].set(self.values, unique_indices=True,
                               indices_are_sorted=False)
    return dense.reshape(shape)

  def with_values(self, values) -> SparseKernel:
    """The same structure with other values (nnz,)."""
    return SparseKernel(values, self.structure)

  @property
  def nnz(self) -> int:
    return self.structure.nnz

  @property
  def density(self) -> float:
    """The fraction of kept weights."""
    return self.structure.nnz / max(1, self.structure.size)

  @property
  def sparsity(self) -> float:
    """The fraction of pruned (zero) weights."""
    return 1.0 - self.density

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """The kernel's shape in its layout."""
    return self.structure.shape

  @property
  def layout(self) -> str:
    """"HWIO" or "OIHW"."""
    return self.structure.layout

  @property
  def dtype(self):
    """The dtype of the values."""
    return self.values.dtype

  def tree_flatten(self):
    """Pytree protocol: the values are the only leaf; the structure is aux data.
    """
    return (self.values,), self.structure

  @classmethod
  def tree_unflatten(cls, structure, children):
    """
    Pytree protocol: rebuilds without validation (leaves may be placeholders).
    """
    obj = object.__new__(cls)
    obj.values, = children
    obj.structure = structure
    return obj

  def __repr__(self) -> str:
    dtype = getattr(self.values, "dtype", None)
    return (f"SparseKernel(shape={self.shape}, layout={self.layout!r}, "
            f"nnz={self.nnz}, density={self.density:.4f}, dtype={dtype})")
