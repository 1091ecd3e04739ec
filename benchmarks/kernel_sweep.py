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
from escort_jax.ops import KernelConfig

LAYERS = json.load(open(os.path.join(os.path.dirname(ej.__file__),
                                     "layers.json")))["layers"]
TIMED = ["res2a_branch2b", "res3a_branch2b", "res4a_branch2b",
         "res5a_branch2b", "inception_3a/3x3", "inception_3b/5x5", "conv2",
         "conv3"]


def make_case(layer, batch, dtype, seed=0, sparsity=None):
  rng = np.random.default_rng(seed)
  k, c, o, g = layer["kernel"], layer["in_channels"], layer["out_channels"], \
      layer["groups"]
  sp = layer["sparsity"] if sparsity is None else sparsity
  shape = (k, k, c // g, o)
  size = int(np.prod(shape))
  keep = int(round(size * (1 - sp)))
  w = np.zeros(size, np.float32)
  idx = rng.choice(size, keep, replace=False)
  w[idx] = rng.standard_normal(keep)
  w = w.reshape(shape)
  x = rng.standard_normal((batch, layer["in_hw"], layer["in_hw"], c))
  x = jnp.asarray(x, dtype)
  w = jnp.asarray(w, dtype)
  p = layer["padding"]
  args = dict(window_strides=(layer["stride"],) * 2, padding=((p, p), (p, p)),
              feature_group_count=g)
  return x, w, args


def rel_err(y, ref):
  y = np.asarray(y, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(y - ref) / max(np.linalg.norm(ref), 1e-30))


def check_all(out):
  rows = []
  for layer in LAYERS:
    for dtype in (jnp.float32, jnp.bfloat16):
      sp = layer["sparsity"] or 0.9
      x, w, args = make_case(layer, 2, dtype, sparsity=sp)
      sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
      sk = sk.with_values(sk.values.astype(dtype))
      t = time.time()
      y = jax.jit(lambda x, sk: ej.sparse_conv(x, sk, method="escort",
                                               **args))(x, sk)
      y.block_until_ready()
      dt = time.time() - t
      ref = lax.conv_general_dilated(
          x.astype(jnp.float32), w.astype(jnp.float32),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
          precision=lax.Precision.HIGHEST, **args)
      e = rel_err(y, ref)
      rows.append(dict(net=layer["net"], layer=layer["layer"],
                       dtype=jnp.dtype(dtype).name, err=e, compile_s=dt))
      print(f"check {layer['net']:9s} {layer['layer']:18s} "
            f"{jnp.dtype(dtype).name:8s} err={e:.2e} ({dt:.1f}s)", flush=True)
  json.dump(rows, open(os.path.join(out, "check.json"), "w"), indent=1)
  for dt in ("float32", "bfloat16"):
    print(dt, "max err", max(r["err"] for r in rows if r["dtype"] == dt))


def cupti_us(f, *args, iterations=20, repeats=3):
  from jax.experimental.mosaic.gpu import profiler
  f(*args)
  meas = profiler.measure(f, iterations=iterations)
  samples = []
  for _ in range(repeats):
    _, times = meas(*args)
    samples.append(statistics.median(times) * 1e3)
  return statistics.median(samples), max(samples) - min(samples)


def breakdown(configs, batch):
  """Per-kernel CUPTI times of one call: how much the layout passes cost."""
  from jax.experimental.mosaic.gpu import profiler
  for name in ("res3a_branch2b", "res5a_branch2b"):
    layer = next(l for l in LAYERS if l["layer"] == name)
    x, w, args = make_case(layer, batch, jnp.float32)
    sk = ej.SparseKernel.from_dense(np.asarray(w))
    for cfg in configs[:2]:
      f = jax.jit(lambda x, sk, cfg=cfg: ej.sparse_conv(
          x, sk, method="escort", config=cfg, **args))
      f(x, sk)
      _, per_kernel = profiler.measure(f, aggregate=False)(x, sk)
      print("breakdown", name, cfg)
      for kname, ms in per_kernel:
        print(f"   {ms * 1e3:8.1f} us  {kname[:90]}")


def time_configs(out, configs, batch):
  rows = []
  for name in TIMED:
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
    nnz = sk.nnz
    ho = (layer["in_hw"] + 2 * layer["padding"] - layer["kernel"]) // \
        layer["stride"] + 1
    useful = 2 * nnz * ho * ho * batch
    floor_us = useful / 67e12 * 1e6
    for dtype in (jnp.float32, jnp.bfloat16):
      for cfg in configs:
        if dtype == jnp.bfloat16 and cfg not in configs[:3]:
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
        json.dump(rows, open(os.path.join(out, "timing.json"), "w"), indent=1)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--check", action="store_true")
  ap.add_argument("--time", action="store_true")
  ap.add_argument("--breakdown", action="store_true")
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--configs", default="8,256,4,1;4,256,4,1;16,256,4,1")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  a = ap.parse_args()
  print(jax.devices(), jax.__version__, flush=True)
  if a.check:
    check_all(a.out)
  configs = [KernelConfig(*map(int, c.split(",")))
             for c in a.configs.split(";")]
  if a.breakdown:
    breakdown(configs, a.batch)
  if a.time:
    configs = [KernelConfig(*map(int, c.split(",")))
               for c in a.configs.split(";")]
    time_configs(a.out, configs, a.batch)


if __name__ == "__main__":
  sys.exit(main())
