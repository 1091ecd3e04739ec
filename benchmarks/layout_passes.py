"""What the layout passes around the sparse kernels cost on the GPU (CUPTI,
per kernel): the input to the flat stretched layout, and the wide output back
to NHWC, for a few workload layers at batch 32.

  PYTHONPATH=. python benchmarks/layout_passes.py

`before` is the three-pass to_flat_input of 2026-11-24 (pad, transpose, pad
the tail), kept here only as the baseline of this comparison.
"""

from __future__ import annotations

import os
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernel_sweep import LAYERS  # noqa: E402

import escort_jax as ej  # noqa: E402
from escort_jax import conv_geometry as cg  # noqa: E402


def before(x_nhwc, g, tail):
  sh, sw = g.strides
  (pt, pb), (pl_, pr) = g.padding
  pb += g.plane_h * sh - g.padded_h
  pr += g.plane_w * sw - g.padded_w
  x = lax.pad(x_nhwc, jnp.zeros((), x_nhwc.dtype),
              ((0, 0, 0), (pt, pb, 0), (pl_, pr, 0), (0, 0, 0)))
  x = x.reshape(g.batch, g.plane_h, sh, g.plane_w, sw, g.in_channels)
  x = x.transpose(5, 2, 4, 1, 3, 0)
  return jnp.pad(x.reshape(-1), (0, tail))


def per_kernel_us(f, *args):
  from jax.experimental.mosaic.gpu import profiler
  f(*args)
  _, per_kernel = profiler.measure(f, aggregate=False)(*args)
  return [(name[:60], ms * 1e3) for name, ms in per_kernel]


def main():
  print(jax.devices(), jax.__version__)
  for name in ("res3a_branch2b", "res2a_branch2b", "inception_3a/3x3",
               "conv1"):
    layer = next(l for l in LAYERS if l["layer"] == name)
    c, o = layer["in_channels"], layer["out_channels"]
    x = jnp.asarray(np.random.default_rng(0).standard_normal(
        (32, layer["in_hw"], layer["in_hw"], c)), jnp.bfloat16)
    k = layer["kernel"]
    st = ej.structure.SparseStructure.from_mask(np.ones((k, k, c, o), bool))
    p = layer["padding"]
    g = cg.make_geometry(x.shape, st, (layer["stride"],) * 2,
                         ((p, p), (p, p)), (1, 1), 1)
    tail = -(-g.out_len // 128) * 128 + g.max_shift
    for label, fn in (("before", before), ("now", cg.to_flat_input)):
      f = jax.jit(lambda x, fn=fn: fn(x, g, tail))
      want = np.asarray(jax.jit(lambda x: before(x, g, tail))(x))
      got = np.asarray(f(x))
      assert got.shape[0] >= want.shape[0]
      assert np.array_equal(got[:want.shape[0]], want)
      assert not np.any(got[want.shape[0]:].astype(np.float32))
      parts = per_kernel_us(f, x)
      print(f"{name:18s} to_flat_input {label:6s} "
            f"{sum(t for _, t in parts):6.1f} us  {parts}")
    y = jnp.ones((o, g.out_len), jnp.bfloat16)
    parts = per_kernel_us(jax.jit(lambda y: cg.from_wide_output(y, g)), y)
    print(f"{name:18s} from_wide_output     "
          f"{sum(t for _, t in parts):6.1f} us  {parts}")


if __name__ == "__main__":
  main()
