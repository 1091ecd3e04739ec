"""Compile cost of the escort path, per workload layer.

For every layer of escort_jax/layers.json (at batch 32 by default) this
  1. converts the pruned kernel: SparseKernel.from_dense (convert_s);
  2. builds the static plan, the packed numpy metadata of the forward and
     input-gradient kernels: escort_jax.ops.escort_plan (plan_s);
  3. traces and lowers jax.jit(sparse_conv(..., method="escort")) (lower_s);
  4. compiles it (compile_s): Triton on NVIDIA GPUs, the Pallas interpreter's
     XLA program elsewhere;
and prints per-layer seconds and the maximum, and writes a JSON file.

  PYTHONPATH=. python benchmarks/compile_cost.py --out $OUT/compile.json
  PYTHONPATH=. python benchmarks/compile_cost.py --out /tmp/c.json \\
      --max-hw 9 --layers res2a_branch2b conv2        # quick CPU smoke run

Options: --batch (32), --dtype (float32), --max-hw N caps the image size
(Layer.scaled; channels, kernel, stride and groups unchanged), --layers
selects layers by name or substring, --grad also compiles the backward pass
(jit(grad) with respect to the values and the input), --run executes the
compiled forward once and records its error against lax.conv (HIGHEST).

Nothing is cached across layers (each layer has its own structure, so each
compile is a fresh one); a persistent compilation cache, if configured,
would hide compile time, so its directory is recorded in the JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench, dispatch, ops, workload
from escort_jax.conv_geometry import make_geometry
from escort_jax.structure import SparseKernel


def _now() -> float:
  return time.perf_counter()


def measure_layer(layer: workload.Layer, batch: int, dtype, *, grad: bool,
                  run: bool) -> dict:
  """Times convert, plan, lower and compile for one layer."""
  row: dict = dict(layer=layer.name, batch=batch, in_hw=layer.in_hw,
                   in_channels=layer.in_channels,
                   out_channels=layer.out_channels, kernel=layer.kernel,
                   stride=layer.stride, groups=layer.groups,
                   sparsity=layer.sparsity)
  kernel = workload.make_kernel(layer, dtype=dtype)
  t = _now()
  sk = SparseKernel.from_dense(kernel)
  jax.block_until_ready(sk.values)
  row["convert_s"] = _now() - t
  row["nnz"] = sk.nnz

  conv_kw = layer.conv_kwargs()
  x_shape = layer.input_shape(batch)
  geometry = make_geometry(x_shape, sk.structure, conv_kw["window_strides"],
                           conv_kw["padding"], (1, 1),
                           conv_kw["feature_group_count"])
  # The config sparse_conv will use (a tuned plan for this device, if any).
  choice = dispatch.choose(sk.structure, geometry, jnp.dtype(dtype), None,
                           "escort", None, ops.on_gpu())
  config = choice.config or ops.DEFAULT_CONFIG
  row["config_source"] = choice.source
  t = _now()
  plan = ops.escort_plan(sk.structure, geometry, config)
  row["plan_s"] = _now() - t
  row["plan_groups"] = [plan.forward.num_groups, plan.transposed.num_groups]

  def forward(x, sk):
    return sparse_conv_escort(x, sk, conv_kw)

  x_abstract = jax.ShapeDtypeStruct(x_shape, jnp.dtype(dtype))
  t = _now()
  lowered = jax.jit(forward).lower(x_abstract, sk)
  row["lower_s"] = _now() - t
  t = _now()
  compiled = lowered.compile()
  row["compile_s"] = _now() - t
  row["total_s"] = (row["convert_s"] + row["plan_s"] + row["lower_s"] +
                    row["compile_s"])

  if grad:
    def loss(values, x):
      return jnp.sum(forward(x, sk.with_values(values)).astype(jnp.float32))
    t = _now()
    lowered_g = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(sk.values,
                                                              x_abstract)
    row["grad_lower_s"] = _now() - t
    t = _now()
    lowered_g.compile()
    row["grad_compile_s"] = _now() - t

  if run:
    x = workload.make_input(layer, batch, dtype=dtype)
    t = _now()
    y = jax.block_until_ready(compiled(x, sk))
    row["first_run_s"] = _now() - t
    ref = lax.conv_general_dilated(
        x.astype(jnp.float32), jnp.asarray(kernel, jnp.float32),
        conv_kw["window_strides"], conv_kw["padding"],
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=conv_kw["feature_group_count"],
        precision=lax.Precision.HIGHEST)
    row["rel_err"] = bench.rel_err(y, ref)
    row["finite"] = bool(np.all(np.isfinite(np.asarray(y, np.float64))))
  return row


def sparse_conv_escort(x, sk, conv_kw):
  return ops.sparse_conv(x, sk, method="escort", **conv_kw)


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", required=True, help="where to write the JSON")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--dtype", default="float32",
                 choices=["float32", "bfloat16", "float16"])
  p.add_argument("--max-hw", type=int, default=None,
                 help="cap the input height/width (quick CPU runs)")
  p.add_argument("--layers", nargs="*", default=None,
                 help="layer names or substrings (default: all 40)")
  p.add_argument("--grad", action="store_true",
                 help="also lower and compile the backward pass")
  p.add_argument("--run", action="store_true",
                 help="run the compiled forward once and check it")
  args = p.parse_args(argv)

  layers = workload.find_layers(args.layers)
  dtype = jnp.dtype(args.dtype)
  device = jax.devices()[0]
  result: dict = dict(
      script="benchmarks/compile_cost.py", argv=sys.argv[1:] if argv is None
      else list(argv),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      backend=jax.default_backend(), device_kind=device.device_kind,
      jax_version=jax.__version__, python=platform.python_version(),
      interpret=not ops.on_gpu(), batch=args.batch, dtype=args.dtype,
      max_hw=args.max_hw,
      compilation_cache_dir=jax.config.jax_compilation_cache_dir,
      layers=[])
  print(f"# compile cost on {result['backend']} ({result['device_kind']}), "
        f"jax {jax.__version__}, batch {args.batch}, {args.dtype}"
        + (f", max_hw {args.max_hw}" if args.max_hw else ""), flush=True)
  header = (f"{'layer':34s} {'hw':>4s} {'nnz':>8s} {'convert':>8s} "
            f"{'plan':>7s} {'lower':>7s} {'compile':>8s} {'total':>7s}")
  if args.grad:
    header += f" {'g_lower':>8s} {'g_compile':>9s}"
  print(header, flush=True)
  t_all = _now()
  for layer in layers:
    scaled = layer.scaled(args.max_hw)
    row = measure_layer(scaled, args.batch, dtype, grad=args.grad,
                        run=args.run)
    result["layers"].append(row)
    line = (f"{layer.name:34s} {scaled.in_hw:4d} {row['nnz']:8d} "
            f"{row['convert_s']:8.3f} {row['plan_s']:7.3f} "
            f"{row['lower_s']:7.3f} {row['compile_s']:8.3f} "
            f"{row['total_s']:7.3f}")
    if args.grad:
      line += f" {row['grad_lower_s']:8.3f} {row['grad_compile_s']:9.3f}"
    if args.run:
      line += f"  err {row['rel_err']:.1e}"
    print(line, flush=True)
    # Free the executables of this layer before the next one.
    jax.clear_caches()
  worst = max(result["layers"], key=lambda r: r["total_s"])
  result["max_total_s"] = worst["total_s"]
  result["max_layer"] = worst["layer"]
  result["max_compile_s"] = max(r["compile_s"] for r in result["layers"])
  result["sum_total_s"] = sum(r["total_s"] for r in result["layers"])
  result["wall_s"] = _now() - t_all
  print(f"max per layer: {result['max_total_s']:.3f} s ({worst['layer']}); "
        f"max compile {result['max_compile_s']:.3f} s; "
        f"sum {result['sum_total_s']:.1f} s over {len(layers)} layers",
        flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}", flush=True)
  return result


if __name__ == "__main__":
  main()
