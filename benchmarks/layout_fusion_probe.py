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
          (1, 7, 7, 512)]


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
    inputs = [(jnp.asarray(rng.standard_normal(shape), jnp.float32),
               jnp.asarray(rng.random(c) + 0.5, jnp.float32),
               jnp.asarray(rng.standard_normal(c), jnp.float32))
              for _ in range(5)]
    for name, fn in variants(shape).items():
      t = bench.device_time_us(jax.jit(fn), inputs)
      out["rows"].append({"shape": shape, "variant": name,
                          "time_us": t.median_us, "spread_us": t.spread_us,
                          "kernels_us": t.kernels_us})
      print(f"{str(shape):18s} {name:15s} {t.median_us:6.2f} us  "
            f"{len(t.kernels_us)} kernel(s): {sorted(t.kernels_us)}",
            flush=True)
  with open(os.path.join(a.out, "layout_fusion_probe.json"), "w") as fh:
    json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
