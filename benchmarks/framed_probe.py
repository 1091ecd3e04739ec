"""The vector kernel on frames against the same kernel on the NHWC path's
flat input, kernel time alone (CUPTI via escort_jax.bench.device_time_us).

Both variants run the layer's tuned (or default) VectorConfig on the same
vector-sparse kernel and input; the input's layout pass is made outside the
timed call for both, so the difference is the kernel's own: the framed
output (contiguous along positions, zero margins and planes written) against
the NHWC store, and the frame's packing.

  PYTHONPATH=. python benchmarks/framed_probe.py --vector-width 64 \
      --sparsity 0.9 0.75 --layers res2a res4a res5a --out FILE.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import SparseKernel, bench, dispatch, frames
from escort_jax import conv_geometry as cg
from escort_jax import ops
from escort_jax import workload as wl
from escort_jax.structure import ALIGNED_COLUMNS
from pallas_kernels.vector_sparse_conv import vector_sparse_conv


def _variants(sk, layer, batch, dtype, module_paths):
  conv = layer.conv_kwargs()
  shape = (batch, layer.in_hw, layer.in_hw, layer.in_channels)
  g = cg.make_geometry(shape, sk.structure, conv["window_strides"],
                       conv["padding"], (1, 1), conv["feature_group_count"])
  choice = dispatch.choose(sk.structure, g, jnp.dtype(dtype), None, "vector",
                           None, True)
  config = choice.config or ops._default_vector_config_of(sk.structure, g)
  launch = dict(ops._vector_launch(config), interpret=not ops.on_gpu())
  values = sk.values.astype(dtype)
  plan = ops.vector_plan(sk.structure, g, config)
  frame = frames.frame_of(shape, conv["padding"])
  fplan = ops.framed_vector_plan(sk.structure, g, frame, config)
  out = {
      "nhwc": (
          lambda x: ops.flat_input(x, g, plan.x_tail),
          jax.jit(lambda xf: vector_sparse_conv(
              xf, values, plan.blocks, out_len=g.out_len,
              nhwc=g.nhwc_output(), **launch))),
      "framed": (
          lambda x: frames.frame_data(x, frame).reshape(-1),
          jax.jit(lambda xf: vector_sparse_conv(
              xf, values, fplan.blocks, out_len=fplan.out_len,
              framed=fplan.output, **launch))),
  }
  # Other versions of the kernel module (files), for A/B runs.
  for path in module_paths:
    spec = importlib.util.spec_from_file_location(f"variant_{len(out)}",
                                                  path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # for its dataclasses
    spec.loader.exec_module(mod)
    rows, offsets = frames.framed_offsets(sk.structure, g, frame)
    blocks = mod.pack_vector_blocks(rows, offsets, g.out_channels,
                                    fplan.blocks.vector_width,
                                    config.block_k, zeros_offset=0)
    out[f"framed@{path}"] = (
        lambda x: frames.frame_data(x, frame).reshape(-1),
        jax.jit(lambda xf, mod=mod, blocks=blocks: mod.vector_sparse_conv(
            xf, values, blocks, out_len=fplan.out_len, framed=fplan.output,
            **launch)))
  return config, out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--layers", nargs="*", default=None)
  p.add_argument("--vector-width", type=int, default=64)
  p.add_argument("--sparsity", type=float, nargs="+", default=[0.9])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--inputs", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--modules", nargs="*", default=[],
                 help="other vector_sparse_conv.py files to time framed")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  layers = wl.pruned_layers()
  if args.layers:
    layers = [l for l in layers if any(n in l.name for n in args.layers)]
  rows = []
  dtype = jnp.bfloat16
  for layer in layers:
    if (layer.out_channels // layer.groups) % args.vector_width:
      continue
    for sp in args.sparsity:
      # The bench's structure (its column multiple), so the plans apply.
      w = wl.make_kernel(layer, sparsity=sp, vector_width=args.vector_width,
                         column_multiple=ALIGNED_COLUMNS)
      sk = SparseKernel.from_dense(np.asarray(jnp.asarray(w, dtype)))
      xs = [wl.make_input(layer, args.batch, seed=i).astype(dtype)
            for i in range(args.inputs)]
      config, variants = _variants(sk, layer, args.batch, dtype,
                                   args.modules)
      row = {"layer": layer.name, "sparsity": sp,
             "vector_width": args.vector_width, "batch": args.batch,
             "config": str(config), "us": {}, "kernels_us": {}}
      for name, (prepare, fn) in variants.items():
        inputs = [jax.block_until_ready(prepare(x)) for x in xs]
        t = bench.device_time_us(fn, inputs, repeats=args.repeats)
        row["us"][name] = t.median_us
        row["kernels_us"][name] = t.kernels_us
      print(layer.name, sp, {k: round(v, 2) for k, v in row["us"].items()},
            flush=True)
      rows.append(row)
  info = bench.device_info()
  with open(args.out, "w") as f:
    json.dump({"device": info["device"], "jax_version": info["jax_version"],
               "rows": rows}, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
