"""Whole-network kernel time with the escort layers' nonzero-lanes configs
changed by each of several overrides, in one run.

  PYTHONPATH=. python benchmarks/network_config_probe.py --net resnet50 \
      --batch 1 --precision default --variants "" split=2 --out DIR

Each variant is a comma-separated list of KernelConfig fields (short names
as `bench --config`) set on every nonzero-lanes config the sparse model's
layers get (plans or defaults); "" leaves them. Changes that interact with
the ops around a layer show here and not in a layer's own timing: a split
layer's elementwise sum of partial outputs fuses into the batch norm after
it, and unpadded planes' input transpose into the batch norm before it
("unpadded=1"). A "layout=onepad" or "layout=xla" entry instead replaces
the padded input layout (LAYOUTS). A variant given twice runs twice (its
names numbered), for the spread within one process.
Writes DIR/network_config_probe.json: for the dense model and each variant,
the total kernel time per forward and every kernel name's time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench, bench_network, ops
from escort_jax.bench import parse_config
from escort_jax.convert import dense_fallback

sys.path.insert(0, os.path.dirname(__file__))
from layout_fusion_probe import one_pad_layout  # pylint: disable=g-import-not-at-top,wrong-import-position


def one_pad_flat_input(x_nhwc, g, tail):
  """The input layout at stride 1 as XLA's fusion of one pad before one
  transpose (layout_fusion_probe.one_pad_layout), so that XLA can fuse it
  into the op before; otherwise ops.flat_input."""
  if g.strides != (1, 1) or min(min(p) for p in g.padding) < 0:
    return FLAT_INPUT(x_nhwc, g, tail)
  return one_pad_layout(x_nhwc, g, tail)


FLAT_INPUT = ops.flat_input
LAYOUTS = {"plans": FLAT_INPUT, "onepad": one_pad_flat_input,
           "xla": lambda x, g, tail: ops.cg.to_flat_input(x, g, tail)}


def overrides(variant: str) -> tuple[dict, str]:
  """The KernelConfig fields that a variant ("split=2,layout=onepad") sets,
  and its input layout (LAYOUTS; "layout=" is not a config field)."""
  parts = [p for p in variant.split(",") if p.strip()]
  layouts = [p.split("=", 1)[1] for p in parts if p.startswith("layout=")]
  rest = ",".join(p for p in parts if not p.startswith("layout="))
  layout = layouts[-1] if layouts else "plans"
  if not rest:
    return {}, layout
  parsed, pairs = parse_config(rest)
  return {name: getattr(parsed, name) for name, _ in pairs}, layout


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--net", default="resnet50")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--precision", default="default")
  ap.add_argument("--variants", nargs="+", default=["", "split=2"])
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
  runs = [("dense", dense, None)] + [
      ((v or "plans") + (f" #{i}" if a.variants.count(v) > 1 else ""),
       sparse, v) for i, v in enumerate(a.variants)]
  for name, model, variant in runs:
    changed = set()
    if variant is not None:
      fields, layout = overrides(variant)
      ops.flat_input = LAYOUTS[layout]

      def config(self, g, itemsize, fields=fields):
        cfg = chosen(self, g, itemsize)
        if isinstance(cfg, ops.KernelConfig) and cfg.nonzero_lanes:
          cfg = dataclasses.replace(cfg, **fields)
          changed.add((g, cfg))
        return cfg
      ops._SparseCall._forward_config = config
    # Inner jitted functions (SparseConv's call) keep their traces across
    # outer jits: without this every variant would reuse the first's trace.
    jax.clear_caches()
    try:
      f = bench_network.forward(model, a.precision)
      t = bench.device_time_us(f, xs)
    finally:
      ops._SparseCall._forward_config = chosen
      ops.flat_input = FLAT_INPUT
    kernels = dict(sorted(t.kernels_us.items(), key=lambda kv: -kv[1]))

    out["runs"][name] = {"total_us": t.median_us, "spread_us": t.spread_us,
                         "changed_configs": len(changed),
                         "kernels_us": kernels}
    print(f"{name}: {t.median_us:.1f} us (±{t.spread_us:.1f}), "
          f"{len(changed)} distinct configs changed", flush=True)
  with open(os.path.join(a.out, "network_config_probe.json"), "w") as fh:
    json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
