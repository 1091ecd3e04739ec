"""A kernel's static int32 tables as one constant of the executable.

The sparse kernels read their structure from small int32 tables (offsets,
steps per block, where each block starts) that are numpy arrays at trace
time and constants in the compiled program. XLA's algebraic simplifier
rewrites a 1-D integer constant whose elements are all equal into a
broadcast, and one of the form stride * iota into a multiply of an iota. A
custom call's operands must be in memory, so either rewrite then runs as its
own fusion kernel before every call: about 0.9 µs each on an H100, on rows
of 5-10 µs (the vector rows of benchmarks/results/*T1926* and *T1928*, where
every block kept the same number of columns). One concatenation of a
kernel's tables, broken where it would itself match, stays a constant.

Layout: every table starts at a multiple of ALIGN elements of the packed
array (64 bytes), so that vector loads of it stay as aligned as they were
from separate arrays.
"""

from __future__ import annotations

import numpy as np

ALIGN = 16


def rewritten_by_xla(table: np.ndarray) -> bool:
  """Whether XLA's algebraic simplifier would replace this 1-D integer
  constant by a computation: all elements equal, or stride * iota."""
  if table.size <= 1 or np.all(table == table[0]):
    return True
  return bool(np.all(table == np.arange(table.size) * table[1]))


def pack_tables(*tables: np.ndarray) -> tuple[np.ndarray, tuple[int, ...]]:
  """Concatenates int32 tables into one array.

  Args:
    tables: integer arrays of any shape, each flattened (C order).

  Returns:
    (packed, starts): the (length,) int32 array, and where each table begins
    in it (multiples of ALIGN). The elements between tables and after the
    last are padding that no kernel reads.

  Raises:
    OverflowError: if a value does not fit in int32.
  """
  parts, starts, length = [], [], 0
  for table in tables:
    flat = np.asarray(table).reshape(-1)
    if flat.size and (flat.min() < np.iinfo(np.int32).min
                      or flat.max() > np.iinfo(np.int32).max):
      raise OverflowError(f"a static table holds {flat.min()}..{flat.max()}, "
                          "beyond int32")
    gap = -length % ALIGN
    parts += [np.zeros(gap, np.int32), flat.astype(np.int32)]
    starts.append(length + gap)
    length += gap + flat.size
  packed = np.concatenate(parts) if parts else np.zeros(0, np.int32)
  while rewritten_by_xla(packed):
    # All equal (or empty): a different last value; stride * iota: a repeat.
    if packed.size and np.any(packed != packed[0]):
      packed = np.append(packed, packed[-1])
    else:
      packed = np.append(packed, (packed[-1] + 1) if packed.size else 0)
  return packed.astype(np.int32), tuple(starts)
