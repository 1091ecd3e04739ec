"""Vector-kernel development sweep on the GPU: correctness on every workload
layer, then CUPTI kernel times of tile configs against lax.conv bf16.

  PYTHONPATH=. python benchmarks/vector_sweep.py [--check] [--time]
      [--layers NAME ...] [--sparsity published|0.9|0.75 ...] [--v 16]
      [--configs "bq,bk,nw,ns;..."] [--column-multiple M [--unaligned]]
      [--breakdown] [--out DIR]

Kernels are the workload's vector-sparse ones (escort_jax.workload.make_kernel
with vector_width=V): round(size * (1 - sparsity) / V) whole V-vectors at
uniformly random (r, s, c, block) positions, each block's count rounded to a
multiple of --column-multiple (default structure.ALIGNED_COLUMNS, as the
benchmark; --unaligned keeps the kernel from relying on it, the control);
cases, checks and breakdowns are
benchmarks/kernel_sweep.py's. Times use the CUPTI route of
benchmarks/kernel_sweep.py (same method for both sides of a ratio); rows are
appended to OUT/vector_time.json as they finish, and rows already there are
skipped (resumable). Recorded benchmark results come from escort_jax.bench.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernel_sweep import (LAYERS, TIMED, breakdown, check_all,  # noqa: E402
                          cupti_us, make_case, parse_config, workload_layer)

import escort_jax as ej  # noqa: E402
from escort_jax.ops import VectorConfig  # noqa: E402
from escort_jax.structure import ALIGNED_COLUMNS  # noqa: E402
from pallas_kernels.vector_sparse_conv import VectorBlocks  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def parse_configs(text):
  return [parse_config(VectorConfig, part) for part in text.split(";")]


def sparsity_of(layer, name):
  """The sparsity a --sparsity value names: "published" is the layer's (90%
  for a dense layer), else the number."""
  return (layer["sparsity"] or 0.9) if name == "published" else float(name)


def time_layers(out, names, sparsities, v, configs, batch,
                column_multiple=ALIGNED_COLUMNS, align=True):
  path = os.path.join(out, "vector_time.json")
  rows = json.load(open(path)) if os.path.exists(path) else []
  variant = f"m{column_multiple}" + ("" if align else "-unaligned")
  done = {(r["layer"], r["sparsity_name"], r.get("variant", "m1"),
           VectorConfig(**r["config"])) for r in rows}
  for name in names:
    layer = next(l for l in LAYERS if l["layer"] == name and l["sparsity"])
    for sp_name in sparsities:
      sp = sparsity_of(layer, sp_name)
      x, w, args = make_case(layer, batch, jnp.bfloat16, sparsity=sp,
                             vector_width=v, column_multiple=column_multiple)
      base = None
      sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
      sk = sk.with_values(sk.values.astype(jnp.bfloat16))
      for cfg in configs:
        key = (name, sp_name, variant, cfg)
        if key in done:
          continue
        if base is None:
          f = jax.jit(lambda x, w: lax.conv_general_dilated(
              x, w, dimension_numbers=DN, **args))
          base = cupti_us(f, x, w)[0]
        f = jax.jit(lambda x, sk, cfg=cfg: ej.sparse_conv(
            x, sk, method="vector", config=cfg, **args))
        try:
          t, spread = cupti_us(f, x, sk)
        except Exception as e:  # a config the compiler rejects
          print("FAILED", name, cfg, repr(e)[:300], flush=True)
          continue
        ho = workload_layer(layer).out_hw
        useful = 2 * sk.nnz * ho * ho * batch
        row = dict(layer=name, net=layer["net"], batch=batch, v=v,
                   sparsity_name=sp_name, sparsity=1 - sk.nnz / w.size,
                   variant=variant,
                   config=cfg.__dict__, time_us=t, spread_us=spread,
                   lax_bf16_us=base, speedup=base / t,
                   tflops=useful / t / 1e6)
        rows.append(row)
        print(f"{name:18s} sp={sp_name:9s} {variant} {cfg} {t:8.1f}us "
              f"bf16={base:7.1f}us x{base / t:5.2f} "
              f"{useful / t / 1e6:6.1f} TFLOP/s", flush=True)
        json.dump(rows, open(path, "w"), indent=1)
  # Geomean per (sparsity, config), over layers with a row.
  for sp_name in sparsities:
    for cfg in configs:
      sel = [r["speedup"] for r in rows if r["sparsity_name"] == sp_name
             and r.get("variant", "m1") == variant
             and VectorConfig(**r["config"]) == cfg]
      if sel:
        print(f"geomean sp={sp_name} {variant} {cfg}: "
              f"x{np.exp(np.mean(np.log(sel))):.2f} over {len(sel)} layers")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--check", action="store_true")
  p.add_argument("--time", action="store_true")
  p.add_argument("--breakdown", action="store_true")
  p.add_argument("--layers", nargs="+", default=TIMED)
  p.add_argument("--all-layers", action="store_true")
  p.add_argument("--sparsity", nargs="+", default=["published"])
  p.add_argument("--v", type=int, default=16)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--configs", default="128,32,4,2")
  p.add_argument("--column-multiple", type=int, default=ALIGNED_COLUMNS,
                 help="each block keeps a multiple of this many positions "
                 "(workload.make_kernel)")
  p.add_argument("--unaligned", action="store_true",
                 help="do not promise Triton the weight rows' alignment "
                 "(the control for --column-multiple)")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args()
  configs = parse_configs(a.configs)
  print(jax.devices(), jax.__version__, flush=True)
  if a.check:
    check_all(a.out, vector_width=a.v)
  if a.breakdown:
    breakdown(configs[:1], a.batch, ("res3a_branch2b", "inception_3a/3x3"),
              dtype=jnp.bfloat16, method="vector", vector_width=a.v,
              sparsity=0.9)
  if a.time:
    names = a.layers
    if a.all_layers:
      names = [l["layer"] for l in LAYERS if l["sparsity"]]
    if a.unaligned:
      VectorBlocks.value_alignment = property(lambda self: 1)
    time_layers(a.out, names, a.sparsity, a.v, configs, a.batch,
                a.column_multiple, not a.unaligned)


if __name__ == "__main__":
  main()
