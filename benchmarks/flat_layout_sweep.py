"""The input layout pass on the GPU: XLA's fusion of
conv_geometry.to_flat_input against the Pallas kernel
pallas_kernels/flat_layout.py (stride-1 layers), CUPTI kernel time, outputs
checked equal.

  PYTHONPATH=. python benchmarks/flat_layout_sweep.py [--out DIR]

Rows go to OUT/flat_layout.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernel_sweep import LAYERS, cupti_us, write_results  # noqa: E402

from escort_jax import conv_geometry as cg  # noqa: E402
from escort_jax.structure import SparseStructure  # noqa: E402
from pallas_kernels.flat_layout import flat_layout  # noqa: E402

NAMES = ("res2a_branch2b", "res3a_branch2b", "res4a_branch2b",
         "res5a_branch2b", "inception_3a/3x3", "inception_3b/5x5", "conv3")
VARIANTS = ((8, None), (4, 16384), (8, 16384), (4, 8192), (8, 32768))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args()
  rows = []
  for name in NAMES:
    layer = next(l for l in LAYERS if l["layer"] == name)
    c, o, k, pad = (layer["in_channels"], layer["out_channels"],
                    layer["kernel"], layer["padding"])
    st = SparseStructure.from_mask(np.ones((k, k, c, o), bool))
    for batch, dtype in ((32, jnp.bfloat16), (32, jnp.float32),
                         (1, jnp.float32)):
      x = jnp.asarray(np.random.default_rng(0).standard_normal(
          (batch, layer["in_hw"], layer["in_hw"], c)), dtype)
      g = cg.make_geometry(x.shape, st, (1, 1), ((pad, pad), (pad, pad)),
                           (1, 1), 1)
      tail = -(-g.out_len // 128) * 128 + g.max_shift
      extra = -(-tail // g.plane_len)
      xla = jax.jit(lambda x, g=g, tail=tail: cg.to_flat_input(x, g, tail))
      want = np.asarray(xla(x))
      row = dict(layer=name, batch=batch, dtype=jnp.dtype(dtype).name,
                 bytes=int(x.nbytes + want.nbytes))
      row["xla_us"], _ = cupti_us(xla, x)
      row["variants"] = []
      for warps, slab in VARIANTS:
        f = jax.jit(lambda x, g=g, extra=extra, warps=warps, slab=slab:
                    flat_layout(x, g.padding, extra, num_warps=warps,
                                slab=slab))
        got = np.asarray(f(x))
        ok = got.shape == want.shape and np.array_equal(got, want)
        us, _ = cupti_us(f, x)
        row["variants"].append(dict(num_warps=warps, slab=slab, us=us,
                                    equal=bool(ok)))
      best = row["variants"][0]  # the default
      print(f"{name:18s} b={batch:2d} {row['dtype']:8s} xla "
            f"{row['xla_us']:6.1f} us | kernel {best['us']:6.1f} us "
            f"(default; best of all "
            f"{min(v['us'] for v in row['variants']):.1f}) "
            f"equal={all(v['equal'] for v in row['variants'])} "
            f"{row['bytes'] / best['us'] / 1e6:.2f} TB/s", flush=True)
      rows.append(row)
      write_results(os.path.join(a.out, "flat_layout.json"), rows)


if __name__ == "__main__":
  main()
