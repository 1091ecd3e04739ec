"""Static metadata of a sparse row problem, packed for the direct sparse kernels.

A sparse row problem is a list of nonzeros, each with a destination row, a
source offset and the index of its value in the caller's value vector:

    y[row_j, q] += values[source_j] * x_flat[offset_j + q]

The kernels give each program ``rows_per_program`` rows at once. Rows are
sorted by length (longest first) and cut into groups, so rows of similar
length share a program and little work is padding. Within a group the entries
are laid out step-major ("ELL"): step t of the group holds the t-th nonzero of
each of its rows, so one vector load fetches the metadata of a whole step.
Padding entries carry offset -1, which the kernel masks out: a pruned weight
is a structural zero and never multiplies the input (so a NaN in the input
does not travel through it).

The packing is numpy and runs once per (structure, input shape), at trace
time; the arrays become compile-time constants of the jitted program.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

PADDING_OFFSET = -1


@dataclasses.dataclass(frozen=True, eq=False)
class RowGroups:
  """ELL packing of a sparse row problem.

  Attributes:
    num_rows: rows of the output.
    rows_per_program: rows that one program computes (a power of two).
    step_multiple: every group's step count is a multiple of it, so that a
      kernel can unroll its loop by that much.
    group_rows: (num_groups * rows_per_program,) int32; the output row of each
      lane, or -1 for a lane past the last row.
    group_start: (num_groups,) int32; where each group's entries begin.
    group_steps: (num_groups,) int32; how many steps each group runs.
    offsets: (num_entries,) int32; source offset per entry in units of
      `offset_unit`, -1 for padding.
    zeros_offset: None, or where the caller guarantees a run of zeros at
      least as long as the kernel's padded output rows. Padding entries
      then read those zeros, so the kernel needs no masks (and Triton can
      vectorise its loads); otherwise they carry offset -1 and are masked.
    offset_unit: every source offset is a multiple of it. The kernel
      multiplies by this static number, which tells Triton that the loads are
      aligned (e.g. to the batch size) and lets it issue vector loads.
    sources: (num_entries,) int32; index into the value vector, -1 for padding.
    lane_start, lane_len: (num_groups * rows_per_program,) int32, or None.
      When the caller gives the nonzeros grouped by row (CSR order), the
      t-th entry of a lane is value lane_start + t for t < lane_len, so a
      kernel can read the values in that order with no gather
      (lane_len 0 for lanes past the last row).
  """

  num_rows: int
  rows_per_program: int
  step_multiple: int
  group_rows: np.ndarray
  group_start: np.ndarray
  group_steps: np.ndarray
  offsets: np.ndarray
  zeros_offset: int | None
  offset_unit: int
  sources: np.ndarray
  lane_start: np.ndarray | None = None
  lane_len: np.ndarray | None = None

  @property
  def num_groups(self) -> int:
    """The number of row groups (programs along the row axis)."""
    return int(self.group_start.shape[0])

  @property
  def padded_entries(self) -> int:
    """Entries in the ELL arrays, padding included."""
    return int(self.offsets.shape[0])

  @property
  def max_offset(self) -> int:
    """The largest source offset, in elements."""
    return int(self.offsets.max(initial=0)) * self.offset_unit

  def gather_values(self, values: jax.Array) -> jax.Array:
    """Lays `values` (nnz,) out as the kernel reads them: (padded_entries,).

    Padding entries get 0, so that they stay inert even for a non-finite
    value elsewhere in the row.
    """
    if values.shape[0] == 0:
      return jnp.zeros(self.sources.shape, values.dtype)
    gathered = jnp.take(values, np.maximum(self.sources, 0))
    return jnp.where(self.sources >= 0, gathered,
                     jnp.zeros((), gathered.dtype))


def pack_row_groups(rows: np.ndarray, offsets: np.ndarray, num_rows: int,
                    rows_per_program: int, step_multiple: int = 1,
                    zeros_offset: int | None = None) -> RowGroups:
  """Packs nonzeros given in any order into ELL row groups.

  Args:
    rows: (nnz,) destination row of each nonzero, in [0, num_rows).
    offsets: (nnz,) non-negative source offset of each nonzero.
    num_rows: number of output rows.
    rows_per_program: rows per program; a power of two.
    step_multiple: round each group's steps up to a multiple of this.
    zeros_offset: see RowGroups.zeros_offset.

  Returns:
    The packing. Entry `sources` refers to positions in `rows`/`offsets`.
  """
  if rows_per_program <= 0 or rows_per_program & (rows_per_program - 1):
    raise ValueError(
        f"rows_per_program must be a power of two, got {rows_per_program}")
  rows = np.asarray(rows, np.int64)
  offsets = np.asarray(offsets, np.int64)
  if rows.shape != offsets.shape or rows.ndim != 1:
    raise ValueError("rows and offsets must be 1-D arrays of one length")
  if offsets.size and offsets.min() < 0:
    raise ValueError("offsets must be non-negative")
  if offsets.size and offsets.max() >= np.iinfo(np.int32).max:
    raise OverflowError(
        f"a source offset ({int(offsets.max())}) does not fit in int32; the "
        "input is too large for the int32-indexed kernels: split the batch")
  bk = rows_per_program
  lengths = np.bincount(rows, minlength=num_rows) if rows.size else np.zeros(
      num_rows, np.int64)
  # Longest rows first, so the rows of one group have similar lengths; ties
  # keep row order, which keeps neighbouring channels together.
  order = np.argsort(-lengths, kind="stable")
  num_groups = max(1, -(-num_rows // bk))
  group_rows = np.full(num_groups * bk, -1, np.int32)
  group_rows[:num_rows] = order
  group_steps = np.zeros(num_groups, np.int32)
  for g in range(num_groups):
    members = order[g * bk:(g + 1) * bk]
    longest = lengths[members].max() if members.size else 0
    group_steps[g] = -(-longest // step_multiple) * step_multiple
  group_start = np.zeros(num_groups, np.int32)
  group_start[1:] = np.cumsum(group_steps[:-1].astype(np.int64) * bk)
  every_offset = offsets if zeros_offset is None else np.append(
      offsets, zeros_offset)
  unit = int(np.gcd.reduce(every_offset)) if every_offset.size else 1
  unit = unit or 1
  padding = PADDING_OFFSET if zeros_offset is None else zeros_offset // unit
  total = int(group_steps.astype(np.int64).sum()) * bk
  # At least one vector of entries, so that no kernel operand is empty.
  ell_offsets = np.full(max(total, bk), padding, np.int32)
  ell_sources = np.full(max(total, bk), -1, np.int32)

  # Rank of each nonzero within its row, in the caller's order.
  by_row = np.argsort(rows, kind="stable")
  row_starts = np.zeros(num_rows + 1, np.int64)
  row_starts[1:] = np.cumsum(lengths)
  rank = np.empty(rows.size, np.int64)
  rank[by_row] = np.arange(rows.size) - row_starts[rows[by_row]]
  lane_of_row = np.empty(num_rows, np.int64)
  lane_of_row[order] = np.arange(num_rows)
  group = lane_of_row[rows] // bk
  lane = lane_of_row[rows] % bk
  slot = group_start[group].astype(np.int64) + rank * bk + lane
  ell_offsets[slot] = offsets // unit
  ell_sources[slot] = np.arange(rows.size)
  if step_multiple <= 0:
    raise ValueError(f"step_multiple must be positive, got {step_multiple}")
  lane_start = lane_len = None
  if np.all(np.diff(rows) >= 0):
    live = group_rows >= 0
    lane_start = np.where(live, row_starts[np.maximum(group_rows, 0)],
                          0).astype(np.int32)
    lane_len = np.where(live, lengths[np.maximum(group_rows, 0)],
                        0).astype(np.int32)
  return RowGroups(num_rows=num_rows, rows_per_program=bk,
                   step_multiple=step_multiple,
                   group_rows=group_rows, group_start=group_start,
                   group_steps=group_steps, offsets=ell_offsets,
                   zeros_offset=zeros_offset, offset_unit=unit,
                   sources=ell_sources, lane_start=lane_start,
                   lane_len=lane_len)
