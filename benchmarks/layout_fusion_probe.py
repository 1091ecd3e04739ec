"""What an escort layer's input layout costs after a batch norm + ReLU, at
batch 1: XLA's fusion alone, against it followed by each layout.

  PYTHONPATH=. python benchmarks/layout_fusion_probe.py --out DIR

For each input shape (ResNet-50's 3x3 layers), jitted functions of
(x, scale, shift) as a model runs them, the parameters as arguments:
  bn_relu        relu(x * scale + shift), NHWC: what the dense model runs
  bn_relu_chwn   the same, transposed to (C, H, W, N): what a kernel that
                 reads unpadded planes (with masks) would need; XLA can fuse
                 the transpose into the batch norm's kernel
  bn_relu_kernel the same NHWC, then the Pallas layout kernel (padded
                 planes and a zero tail): the escort layers now
  bn_relu_xla    the same, then conv_geometry.to_flat_input as XLA's fusion
  bn_relu_onepad the same, then the layout as one pad (rows, columns and the
                 tail as extra channels) before one transpose, so that the
                 pad is in the transpose's prologue
  kernel_alone, xla_alone, onepad_alone: the layouts with no op before
Each variant runs in float32 and bfloat16, at batch 1 and 32.
Writes DIR/layout_fusion_probe.json: device time and kernel names of each.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench
from escort_jax import conv_geometry as cg
from escort_jax.structure import SparseStructure
from pallas_kernels.flat_layout import flat_layout

SHAPES = [(1, 56, 56, 64), (1, 28, 28, 128), (1, 14, 14, 256),
          (1, 7, 7, 512), (32, 28, 28, 128), (32, 14, 14, 256)]
DTYPES = (jnp.float32, jnp.bfloat16)


def one_pad_layout(x, g, tail):
  """to_flat_input at stride 1 as one pad (the tail as zero channels)
  before one transpose."""
  (pt, pb), (pl_, pr) = g.padding
  extra = -(-tail // g.plane_len)
  x = jax.lax.pad(x, jnp.zeros((), x.dtype),
                  ((0, 0, 0), (pt, pb, 0), (pl_, pr, 0), (0, extra, 0)))
  return jnp.transpose(x, (3, 1, 2, 0)).reshape(-1)


def _geometry(shape):
  c = shape[-1]
  structure = SparseStructure.from_mask(np.ones((3, 3, c, c), bool), "HWIO")
  return cg.make_geometry(shape, structure, (1, 1), "SAME", (1, 1), 1)


def variants(shape):
  g = _geometry(shape)
  tail = g.max_shift + g.plane_len

  def bn_relu(x, scale, shift):
    return jax.nn.relu(x * scale + shift)
  return {
      "bn_relu": bn_relu,
      "bn_relu_chwn": lambda x, a, b: jnp.transpose(bn_relu(x, a, b),
                                                    (3, 1, 2, 0)),
      "bn_relu_kernel": lambda x, a, b: flat_layout(
          bn_relu(x, a, b), g.padding, -(-tail // g.plane_len)),
      "bn_relu_xla": lambda x, a, b: cg.to_flat_input(bn_relu(x, a, b), g,
                                                      tail),
      "bn_relu_onepad": lambda x, a, b: one_pad_layout(bn_relu(x, a, b), g,
                                                       tail),
      "kernel_alone": lambda x, a, b: flat_layout(
          x, g.padding, -(-tail // g.plane_len)),
      "xla_alone": lambda x, a, b: cg.to_flat_input(x, g, tail),
      "onepad_alone": lambda x, a, b: one_pad_layout(x, g, tail),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  out = {"device": jax.devices()[0].device_kind,
         "jax_version": jax.__version__, "rows": []}
  for shape in SHAPES:
    c = shape[-1]
    for dtype in DTYPES:
      inputs = [(jnp.asarray(rng.standard_normal(shape), dtype),
                 jnp.asarray(rng.random(c) + 0.5, dtype),
                 jnp.asarray(rng.standard_normal(c), dtype))
                for _ in range(5)]
      want = None
      for name, fn in variants(shape).items():
        f = jax.jit(fn)
        same = None
        if name.startswith("bn_relu_") and name != "bn_relu_chwn":
          got = np.asarray(f(*inputs[0]).astype(jnp.float32))
          if want is None:
            want = got
          # Every padded layout must equal the others, bit for bit.
          same = bool(np.array_equal(got, want))
        t = bench.device_time_us(f, inputs)
        out["rows"].append({"shape": shape, "dtype": jnp.dtype(dtype).name,
                            "variant": name, "time_us": t.median_us,
                            "spread_us": t.spread_us, "same_bits": same,
                            "kernels_us": t.kernels_us})
        print(f"{str(shape):18s} {jnp.dtype(dtype).name:8s} {name:15s} "
              f"{t.median_us:6.2f} us  same={same} "
              f"{len(t.kernels_us)} kernel(s): {sorted(t.kernels_us)}",
              flush=True)
  with open(os.path.join(a.out, "layout_fusion_probe.json"), "w") as fh:
    json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
