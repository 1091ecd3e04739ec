"""pallas_kernels/static_tables.py: one packed int32 constant per kernel,
which XLA's algebraic simplifier leaves a constant."""

from __future__ import annotations

import numpy as np
import pytest

from pallas_kernels.static_tables import ALIGN, pack_tables, rewritten_by_xla


def test_rewritten_by_xla_knows_both_rewrites():
  assert rewritten_by_xla(np.array([7, 7, 7]))  # broadcast
  assert rewritten_by_xla(np.array([0, 1, 2, 3]))  # iota
  assert rewritten_by_xla(np.array([0, 960, 1920]))  # multiply of an iota
  assert rewritten_by_xla(np.array([5]))
  assert not rewritten_by_xla(np.array([1, 2, 3]))  # iota + 1 stays
  assert not rewritten_by_xla(np.array([0, 960, 1921]))


@pytest.mark.parametrize("tables", [
    # Every block keeps the same columns: steps and counts all equal, starts
    # a strided iota (what the vector rows of T1928 had).
    ([2, 2], [0, 960], [30, 30], np.arange(64).reshape(2, 32)),
    ([3], [0], [40], np.full(48, 5)),
    ([0, 0], [0, 0], [0, 0], np.zeros((2, 16))),
    ([],),
    (np.arange(16),),
    (np.full(32, 4),),
])
def test_packed_tables_round_trip_and_are_not_rewritten(tables):
  packed, starts = pack_tables(*tables)
  assert packed.dtype == np.int32 and packed.ndim == 1
  assert not rewritten_by_xla(packed)
  assert len(starts) == len(tables)
  for table, start in zip(tables, starts):
    flat = np.asarray(table).reshape(-1)
    assert start % ALIGN == 0
    np.testing.assert_array_equal(packed[start:start + flat.size], flat)
  # Tables do not overlap.
  ends = [s + np.asarray(t).size for s, t in zip(starts, tables)]
  assert all(e <= s for e, s in zip(ends, starts[1:]))


def test_pack_tables_refuses_values_beyond_int32():
  with pytest.raises(OverflowError, match="int32"):
    pack_tables(np.array([0, 2**31], np.int64))
