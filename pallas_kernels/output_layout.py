"""Where a kernel's output positions land when it writes NHWC directly.

The sparse kernels compute "wide" rows: output position q of channel k is
image q % N at wide row (q // N) // Wb, column (q // N) % Wb, for columns up
to the padded input width Wb (escort_jax.conv_geometry). Writing those into
an (N, Ho, Wo, K) array in the kernel saves the transpose pass that would
otherwise follow it; columns >= Wo and rows >= Ho are dropped.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class NhwcOutput:
  """The NHWC output of a kernel over wide positions.

  Attributes: batch N, out_h Ho, row_width Wb (wide rows), out_w Wo <= Wb.
  """

  batch: int
  out_h: int
  row_width: int
  out_w: int

  @property
  def out_len(self) -> int:
    """Wide positions per channel: Ho * Wb * N."""
    return self.out_h * self.row_width * self.batch

  @property
  def pixels(self) -> int:
    """N * Ho * Wo."""
    return self.batch * self.out_h * self.out_w

  def pixel_of(self, q: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Wide positions q -> (NHWC pixel index, whether q is a real output)."""
    n, t = q % self.batch, q // self.batch
    y, x = t // self.row_width, t % self.row_width
    return (n * self.out_h + y) * self.out_w + x, (x < self.out_w) & (
        y < self.out_h)


def spare_addresses(base: int, shape: tuple[int, int]) -> jax.Array:
  """Distinct addresses base, base + 1, ... for every element of a tile.

  The Pallas interpreter turns a masked store into a scatter of all lanes in
  which masked lanes rewrite what they read, so a masked lane that aliases a
  live one could undo its write. Interpreted kernels send masked lanes to a
  spare region after the output instead (compiled ones mask, and need none).
  """
  return (base + jnp.arange(shape[0], dtype=jnp.int32)[:, None] * shape[1]
          + jnp.arange(shape[1], dtype=jnp.int32)[None, :])
