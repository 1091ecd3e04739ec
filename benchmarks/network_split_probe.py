"""Whole-network kernel time with the escort layers' nonzero-lanes configs
split into S parts (KernelConfig.split), one run for every S.

  PYTHONPATH=. python benchmarks/network_split_probe.py --net resnet50 \
      --batch 1 --precision default --splits 1 2 3 4 --out DIR

A split layer writes S float32 partial outputs and sums them with
elementwise adds, which XLA can fuse into the ops after the layer (a batch
norm and ReLU in these networks), so a split that loses alone (its sum is
a pass of its own there) may win inside the network. Writes
DIR/network_split_probe.json: for the dense model and each S, the total
kernel time per forward and every kernel name's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench, bench_network, ops
from escort_jax.convert import dense_fallback


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--net", default="resnet50")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--precision", default="default")
  ap.add_argument("--splits", type=int, nargs="+", default=[1, 2, 3, 4])
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  a = ap.parse_args()
  dense, sparse = bench_network.build_networks(a.net)
  h, w, c = bench_network.input_hwc(a.net)
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal((a.batch, h, w, c)), jnp.float32)
        for _ in range(5)]
  with jax.default_matmul_precision(bench_network.precision_arg(
      a.precision)):
    sparse = dense_fallback(sparse, xs[0])
  chosen = ops._SparseCall._forward_config
  out = {"net": a.net, "batch": a.batch, "precision": a.precision,
         "device": jax.devices()[0].device_kind,
         "jax_version": jax.__version__, "runs": {}}
  runs = [("dense", dense, None)] + [(f"split{s}", sparse, s)
                                     for s in a.splits]
  for name, model, split in runs:
    split_layers = set()
    if split is not None:
      def config(self, g, itemsize, split=split):
        cfg = chosen(self, g, itemsize)
        if isinstance(cfg, ops.KernelConfig) and cfg.nonzero_lanes:
          cfg = dataclasses.replace(cfg, split=split)
          split_layers.add((g, cfg))
        return cfg
      ops._SparseCall._forward_config = config
    # Inner jitted functions (SparseConv's call) keep their traces across
    # outer jits: without this every S would reuse the first S's trace.
    jax.clear_caches()
    try:
      f = bench_network.forward(model, a.precision)
      t = bench.device_time_us(f, xs)
    finally:
      ops._SparseCall._forward_config = chosen
    kernels = dict(sorted(t.kernels_us.items(), key=lambda kv: -kv[1]))

    out["runs"][name] = {"total_us": t.median_us, "spread_us": t.spread_us,
                         "split_layers": len(split_layers),
                         "kernels_us": kernels}
    print(f"{name}: {t.median_us:.1f} us (±{t.spread_us:.1f}), "
          f"{len(split_layers)} layers split", flush=True)
  with open(os.path.join(a.out, "network_split_probe.json"), "w") as fh:
    json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
