"""The input layout pass on the GPU: XLA's fusion of
conv_geometry.to_flat_input against the Pallas kernel
pallas_kernels/flat_layout.py (stride-1 layers), CUPTI kernel time, outputs
checked equal.

  PYTHONPATH=. python benchmarks/flat_layout_sweep.py [--cases 32:bfloat16 ...]
      [--layers NAME ...] [--variants "warps,channel_block,batch_block;..."]
      [--out DIR]

A variant's empty fields keep the kernel's default launch ("8,," is the
default at 8 warps); variants whose slab (channels x images x padded width,
each a power of two) exceeds 32768 elements are skipped. Rows go to
OUT/flat_layout.json.
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
from pallas_kernels.flat_layout import MAX_SLAB, _pow2, flat_layout  # noqa: E402

NAMES = ("res2a_branch2b", "res3a_branch2b", "res4a_branch2b",
         "res5a_branch2b", "inception_3a/3x3", "inception_3b/5x5", "conv3")
VARIANTS = "8,,;4,,"
CASES = ("32:bfloat16", "32:float32", "1:float32")


def parse_variants(text):
  out = []
  for part in text.split(";"):
    warps, cb, nb = (int(v) if v else None for v in part.split(","))
    out.append((warps, cb, nb))
  return out


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cases", nargs="+", default=CASES,
                 help="batch:dtype pairs")
  p.add_argument("--layers", nargs="+", default=NAMES)
  p.add_argument("--variants", default=VARIANTS)
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args()
  variants = parse_variants(a.variants)
  rows = []
  for name in a.layers:
    layer = next(l for l in LAYERS if l["layer"] == name)
    c, o, k, pad = (layer["in_channels"], layer["out_channels"],
                    layer["kernel"], layer["padding"])
    st = SparseStructure.from_mask(np.ones((k, k, c, o), bool))
    for case in a.cases:
      batch, dtype = case.split(":")
      batch, dtype = int(batch), jnp.dtype(dtype)
      x = jnp.asarray(np.random.default_rng(0).standard_normal(
          (batch, layer["in_hw"], layer["in_hw"], c)), dtype)
      g = cg.make_geometry(x.shape, st, (1, 1), ((pad, pad), (pad, pad)),
                           (1, 1), 1)
      tail = -(-g.out_len // 128) * 128 + g.max_shift
      extra = -(-tail // g.plane_len)
      xla = jax.jit(lambda x, g=g, tail=tail: cg.to_flat_input(x, g, tail))
      want = np.asarray(xla(x))
      row = dict(layer=name, batch=batch, dtype=dtype.name,
                 bytes=int(x.nbytes + want.nbytes))
      row["xla_us"], _ = cupti_us(xla, x)
      row["variants"] = []
      wb = _pow2(g.plane_w)
      for warps, cb, nb in variants:
        if cb and (nb or _pow2(batch)) * cb * wb > MAX_SLAB:
          continue
        f = jax.jit(lambda x, g=g, extra=extra, warps=warps, cb=cb, nb=nb:
                    flat_layout(x, g.padding, extra, num_warps=warps,
                                channel_block=cb, batch_block=nb))
        got = np.asarray(f(x))
        ok = got.shape == want.shape and np.array_equal(got, want)
        us, _ = cupti_us(f, x)
        row["variants"].append(dict(num_warps=warps, channel_block=cb,
                                    batch_block=nb, us=us, equal=bool(ok)))
        print(f"{name:18s} b={batch:2d} {dtype.name:8s} warps={warps} "
              f"cb={cb} nb={nb}: {us:6.1f} us "
              f"{row['bytes'] / us / 1e6:.2f} TB/s equal={ok} (xla "
              f"{row['xla_us']:.1f} us)", flush=True)
      rows.append(row)
      write_results(os.path.join(a.out, "flat_layout.json"), rows)


if __name__ == "__main__":
  main()
