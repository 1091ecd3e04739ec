"""Kernel-development sweep on the GPU: correctness on every workload layer,
then CUPTI kernel times of several tile configs against lax.conv.

  PYTHONPATH=. python benchmarks/kernel_sweep.py [--check] [--time] [--out DIR]

The CUPTI route (jax.experimental.mosaic.gpu.profiler.measure) reruns the
same inputs, so data under the 50 MB L2 stays warm; every side of a ratio here
is timed the same way. Recorded benchmark results come from escort_jax.bench.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

import escort_jax as ej
from escort_jax import workload as wl
from escort_jax.bench import rel_err
from escort_jax.ops import KernelConfig
from escort_jax.structure import ALIGNED_COLUMNS

LAYERS = json.load(open(os.path.join(os.path.dirname(ej.__file__),
                                     "layers.json")))["layers"]
TIMED = ["res2a_branch2b", "res3a_branch2b", "res4a_branch2b",
         "res5a_branch2b", "inception_3a/3x3", "inception_3b/5x5", "conv2",
         "conv3"]


def workload_layer(layer) -> wl.Layer:
  """The escort_jax.workload Layer of a LAYERS entry (or a Layer)."""
  if isinstance(layer, wl.Layer):
    return layer
  return wl.get_layer(f"{layer['net']}/{layer['layer']}")


def make_case(layer, batch, dtype, seed=0, sparsity=None, vector_width=None,
              column_multiple=ALIGNED_COLUMNS):
  """(x, w, conv kwargs) of a workload layer (a LAYERS entry): the
  workload's kernel (workload.make_kernel, the layer's fixed seed;
  vector-sparse with vector_width V, each block keeping a multiple of
  column_multiple positions, as the benchmark's) in `dtype`, an N(0, 1)
  input batch of `seed`, and its window_strides, padding and
  feature_group_count."""
  l = workload_layer(layer)
  w = wl.make_kernel(l, sparsity, dtype=dtype, vector_width=vector_width,
                     column_multiple=column_multiple)
  x = wl.make_input(l, batch, seed=seed, dtype=dtype)
  return x, jnp.asarray(w), l.conv_kwargs()


def write_results(path, rows):
  """Writes {"jax_version", "device", "rows"} as JSON to path."""
  with open(path, "w") as fh:
    json.dump(dict(jax_version=jax.__version__,
                   device=str(jax.devices()[0].device_kind), rows=rows),
              fh, indent=1)


def parse_config(cls, text):
  """A KernelConfig or VectorConfig from its fields' values in order, joined
  by commas (0/1 for booleans; trailing fields keep their defaults)."""
  types = [type(getattr(cls(), k)) for k in cls().__dict__]
  return cls(*(t(int(v)) for t, v in zip(types, text.split(","))))


def check_all(out, vector_width=None):
  """Every workload layer (at its published sparsity, 90% if dense) in
  float32 and bfloat16 against lax.conv at HIGHEST: the escort kernel, or
  with vector_width V the vector kernel on V-vector-sparse kernels (layers
  V does not fit are skipped). Writes OUT/check.json
  (vector_check_v<V>.json)."""
  method = "escort" if vector_width is None else "vector"
  rows = []
  for l, v in wl.layer_vector_widths(
      [workload_layer(layer) for layer in LAYERS], [vector_width]):
    for dtype in (jnp.float32, jnp.bfloat16):
      x, w, args = make_case(l, 2, dtype, sparsity=l.sparsity or 0.9,
                             vector_width=v)
      sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
      sk = sk.with_values(sk.values.astype(dtype))
      t = time.time()
      y = jax.jit(lambda x, sk: ej.sparse_conv(x, sk, method=method,
                                               **args))(x, sk)
      y.block_until_ready()
      dt = time.time() - t
      ref = lax.conv_general_dilated(
          x.astype(jnp.float32), w.astype(jnp.float32),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=lax.Precision.HIGHEST, **args)
      e = rel_err(y, ref)
      rows.append(dict(net=l.net, layer=l.layer, v=v,
                       dtype=jnp.dtype(dtype).name, err=e, compile_s=dt))
      print(f"check {l.net:9s} {l.layer:18s} "
            f"{jnp.dtype(dtype).name:8s} err={e:.2e} ({dt:.1f}s)", flush=True)
  name = ("check.json" if vector_width is None else
          f"vector_check_v{vector_width}.json")
  json.dump(rows, open(os.path.join(out, name), "w"), indent=1)
  for dt in ("float32", "bfloat16"):
    errs = [r["err"] for r in rows if r["dtype"] == dt]
    print(dt, "max err", max(errs), "layers", len(errs))


def cupti_us(f, *args, iterations=20, repeats=3):
  from jax.experimental.mosaic.gpu import profiler
  f(*args)
  meas = profiler.measure(f, iterations=iterations)
  samples = []
  for _ in range(repeats):
    _, times = meas(*args)
    samples.append(statistics.median(times) * 1e3)
  return statistics.median(samples), max(samples) - min(samples)


def print_breakdown(title, f, *args):
  """Prints the per-kernel CUPTI times of one call f(*args)."""
  from jax.experimental.mosaic.gpu import profiler
  f(*args)
  _, per_kernel = profiler.measure(f, aggregate=False)(*args)
  print("breakdown", title)
  for kname, ms in per_kernel:
    print(f"   {ms * 1e3:8.1f} us  {kname[:90]}")


def breakdown(configs, batch, names=("res3a_branch2b", "res5a_branch2b"),
              dtype=jnp.float32, method="escort", vector_width=None,
              sparsity=None):
  """Per-kernel CUPTI times of one call: how much the layout passes cost."""
  for name in names:
    layer = next(l for l in LAYERS if l["layer"] == name)
    x, w, args = make_case(layer, batch, dtype, sparsity=sparsity,
                           vector_width=vector_width)
    sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
    sk = sk.with_values(sk.values.astype(dtype))
    for cfg in configs:
      f = jax.jit(lambda x, sk, cfg=cfg: ej.sparse_conv(
          x, sk, method=method, config=cfg, **args))
      print_breakdown(f"{name} {cfg}", f, x, sk)


def time_configs(out, configs, batch, names=TIMED, dtypes=("float32",
                                                         "bfloat16"),
                 bf16_configs=3, variant=""):
  rows = []
  for name in names:
    layer = next(l for l in LAYERS if l["layer"] == name)
    x32, w32, args = make_case(layer, batch, jnp.float32)
    sk = ej.SparseKernel.from_dense(np.asarray(w32))
    dn = ("NHWC", "HWIO", "NHWC")
    base = {}
    for label, dtype, prec in (("lax_fp32_highest", jnp.float32, "highest"),
                               ("lax_default", jnp.float32, None),
                               ("lax_bf16", jnp.bfloat16, None)):
      f = jax.jit(lambda x, w, prec=prec: lax.conv_general_dilated(
          x, w, dimension_numbers=dn, precision=prec, **args))
      base[label] = cupti_us(f, x32.astype(dtype), w32.astype(dtype))[0]
    ho = workload_layer(layer).out_hw
    useful = 2 * sk.nnz * ho * ho * batch
    floor_us = useful / 67e12 * 1e6
    for dtype in (jnp.dtype(d) for d in dtypes):
      for cfg in configs:
        if dtype == jnp.bfloat16 and cfg not in configs[:bf16_configs]:
          continue
        skd = sk.with_values(sk.values.astype(dtype))
        f = jax.jit(lambda x, sk, cfg=cfg: ej.sparse_conv(
            x, sk, method="escort", config=cfg, **args))
        try:
          t, spread = cupti_us(f, x32.astype(dtype), skd)
        except Exception as e:  # a config the compiler rejects
          print("FAILED", name, cfg, repr(e)[:300], flush=True)
          continue
        row = dict(layer=name, batch=batch, dtype=jnp.dtype(dtype).name,
                   variant=variant,
                   config=cfg.__dict__, time_us=t, spread_us=spread,
                   floor_us=floor_us, baselines_us=base,
                   tflops=useful / t / 1e6)
        rows.append(row)
        cfg_text = ",".join(str(int(v)) for v in cfg.__dict__.values())
        print(f"{name:18s} {jnp.dtype(dtype).name:8s} {cfg_text:16s} "
              f"{t:8.1f}us  fp32H {base['lax_fp32_highest']/t:5.2f}x  "
              f"tf32 {base['lax_default']/t:5.2f}x  bf16 "
              f"{base['lax_bf16']/t:5.2f}x  floor {floor_us/t:5.1%} "
              f"{useful/t/1e6:6.1f} TF/s", flush=True)
        json.dump(rows, open(os.path.join(out, f"timing{variant}.json"), "w"),
                  indent=1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--time", action="store_true")
  ap.add_argument("--breakdown", action="store_true")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--configs", default="8,256,4,1;4,256,4,1;16,256,4,1")
  ap.add_argument("--layers", nargs="+", default=TIMED)
  ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
  ap.add_argument("--bf16-configs", type=int, default=3,
                  help="bfloat16 runs only the first this many configs")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--unfused", action="store_true",
                  help="the escort kernel's multiply-adds as a multiply and "
                  "an add (before the sixth session), for A/B timings")
  ap.add_argument("--unpacked", action="store_true",
                  help="fused multiply-adds, but bfloat16 inputs converted by "
                  "Triton rather than unpacked in the asm")
  a = ap.parse_args()
  if a.unfused or a.unpacked:
    from pallas_kernels import direct_sparse_conv as dsc
    original = dsc.multiply_add
    dsc.multiply_add = lambda x, y, z, fused, packed_bf16=False: original(
        x, y, z, fused=fused and not a.unfused, packed_bf16=False)
  print(jax.devices(), jax.__version__, flush=True)
  if a.check:
    check_all(a.out)
  configs = [parse_config(KernelConfig, c) for c in a.configs.split(";")]
  if a.breakdown:
    breakdown(configs, a.batch, names=a.layers)
  if a.time:
    time_configs(a.out, configs, a.batch, a.layers, a.dtypes,
                 a.bf16_configs,
                 "-unfused" if a.unfused else "-unpacked" if a.unpacked
                 else "")


if __name__ == "__main__":
  sys.exit(main())
