"""Dense 1x1 convolutions (fully connected layers on a 1x1 map, and the
1x1 layers of ResNet-50) as lax.conv against the same product as a matmul.

  PYTHONPATH=. python benchmarks/pointwise_dense_probe.py --out DIR

The op's dense path and DenseConv run a pruned fully connected layer
(SparseLinear) as a 1x1 convolution with an OHWI kernel. For each shape,
batch, and (dtype, precision), jitted functions of (x, kernel), the kernel
an argument as a model's parameter:
  conv  lax.conv_general_dilated, NHWC x OHWI (what they run now)
  dot   lax.dot_general of x (N*H*W, C) with the OHWI kernel as (K, C)
Writes DIR/pointwise_dense_probe.json: device time and kernel names.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench

# (H, W, C, K): the SkimCaffe fc layers on a 1x1 map, then ResNet-50 1x1s.
SHAPES = [(1, 1, 9216, 4096), (1, 1, 4096, 4096), (1, 1, 4096, 1000),
          (1, 1, 2048, 1000), (1, 1, 1024, 1000), (14, 14, 1024, 256),
          (7, 7, 2048, 512), (56, 56, 64, 256)]
BATCHES = (1, 32)
MODES = (("float32", "default"), ("float32", "highest"),
         ("bfloat16", "default"))


def conv(x, kernel_ohwi, precision):
  return lax.conv_general_dilated(
      x, kernel_ohwi, (1, 1), "VALID",
      dimension_numbers=("NHWC", "OHWI", "NHWC"), precision=precision)


def dot(x, kernel_ohwi, precision):
  k = kernel_ohwi.reshape(kernel_ohwi.shape[0], -1)
  y = lax.dot_general(x.reshape(-1, x.shape[-1]), k, (((1,), (1,)), ((), ())),
                      precision=precision)
  return y.reshape(x.shape[:-1] + (k.shape[0],))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  out = {"device": jax.devices()[0].device_kind,
         "jax_version": jax.__version__, "rows": []}
  for h, w, c, k in SHAPES:
    for batch in BATCHES:
      for dtype, precision in MODES:
        prec = (lax.Precision.HIGHEST if precision == "highest" else None)
        inputs = [(jnp.asarray(rng.standard_normal((batch, h, w, c)), dtype),
                   jnp.asarray(rng.standard_normal((k, 1, 1, c)) / c ** 0.5,
                               dtype)) for _ in range(3)]
        results = {}
        for name, fn in (("conv", conv), ("dot", dot)):
          f = jax.jit(lambda x, kk, fn=fn: fn(x, kk, prec))
          results[name] = np.asarray(f(*inputs[0]).astype(jnp.float32))
          t = bench.device_time_us(f, inputs)
          row = {"shape": [batch, h, w, c, k], "dtype": dtype,
                 "precision": precision, "variant": name,
                 "time_us": t.median_us, "spread_us": t.spread_us,
                 "kernels_us": t.kernels_us}
          out["rows"].append(row)
        err = float(np.max(np.abs(results["conv"] - results["dot"])) /
                    (np.max(np.abs(results["conv"])) + 1e-30))
        conv_t, dot_t = (r["time_us"] for r in out["rows"][-2:])
        out["rows"][-1]["rel_diff_to_conv"] = err
        print(f"b{batch} {h}x{w}x{c}->{k} {dtype} {precision}: conv "
              f"{conv_t:7.1f} us, dot {dot_t:7.1f} us ({conv_t / dot_t:.2f}x)"
              f"  rel diff {err:.1e}", flush=True)
  with open(os.path.join(a.out, "pointwise_dense_probe.json"), "w") as fh:
    json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
