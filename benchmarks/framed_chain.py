"""A chain of consecutive sparse layers, timed whole: CaffeNet conv3 ->
ReLU -> conv4 -> ReLU -> conv5 -> ReLU (13x13 maps, 3x3 'SAME', groups 2
for conv4/5), the three pruned layers of the network with no pooling
between them, at batch 32 in bfloat16 on vector-sparse kernels.

Variants, each one jitted function from the NHWC input to the NHWC output
(device kernel time, CUPTI via escort_jax.bench.device_time_us):
  dense    lax.conv bf16 (NHWC/HWIO) of the pruned kernels, bias, ReLU;
  dense_barrier  the same with an optimization barrier after each
           convolution, so that XLA does not fuse the bias and ReLU into it;
  vector   sparse_conv(method="vector") per layer, NHWC between layers (a
           layout pass before each layer);
  framed   to_frame once, the three layers frame to frame, from_frame once.

  PYTHONPATH=. python benchmarks/framed_chain.py --vector-width 64 \
      --sparsity 0.9 0.75 --out FILE.json
"""

from __future__ import annotations

import argparse
import functools
import json
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax import SparseKernel, bench, frames, sparse_conv
from escort_jax import workload as wl
from escort_jax.structure import ALIGNED_COLUMNS

CHAIN = ("caffenet/conv3", "caffenet/conv4", "caffenet/conv5")


def _layers():
  by_name = {l.name: l for l in wl.pruned_layers()}
  return [by_name[n] for n in CHAIN]


def chain_fns(layers, kernels, biases):
  """{variant: (f, weights)}: f(x_nhwc, weights, biases) -> y_nhwc over the
  chain, jitted, with its weights (dense kernels or SparseKernels) passed as
  arguments as a model passes its parameters (as compile-time constants,
  cuDNN's grouped bf16 convolutions took a 60x slower engine)."""
  sks = [SparseKernel.from_dense(k) for k in kernels]
  convs = [l.conv_kwargs() for l in layers]

  def dense(x, kernels, biases, barrier=False):
    for k, b, conv in zip(kernels, biases, convs):
      x = lax.conv_general_dilated(
          x, k, conv["window_strides"], conv["padding"],
          feature_group_count=conv["feature_group_count"],
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      if barrier:
        x = lax.optimization_barrier(x)
      x = jax.nn.relu(x + b)
    return x

  def vector(x, sks, biases):
    for sk, b, conv in zip(sks, biases, convs):
      x = sparse_conv(x, sk, bias=b, activation="relu", method="vector",
                      **conv)
    return x

  def framed(x, sks, biases):
    xf = frames.to_frame(x, 1)
    for sk, b, conv in zip(sks, biases, convs):
      xf = sparse_conv(xf, sk, bias=b, activation="relu", method="vector",
                       **conv)
    return frames.from_frame(xf)

  dense_kernels = [jnp.asarray(k) for k in kernels]
  # XLA fuses the bias and ReLU into cuDNN's convolution, which took a
  # generic engine for the grouped bf16 layers (T1322: 1.6 ms);
  # dense_barrier keeps them apart, as the per-layer baselines run.
  return {"dense": (jax.jit(dense), dense_kernels),
          "dense_barrier": (jax.jit(functools.partial(dense, barrier=True)),
                            dense_kernels),
          "vector": (jax.jit(vector), sks), "framed": (jax.jit(framed), sks)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--vector-width", type=int, default=64)
  p.add_argument("--sparsity", type=float, nargs="*", default=None,
                 help="every layer's sparsity (default: the published)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--inputs", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  dtype = jnp.bfloat16
  layers = _layers()
  rows = []
  for sp in (args.sparsity or [None]):
    kernels = [np.asarray(jnp.asarray(wl.make_kernel(
        l, sparsity=sp, vector_width=args.vector_width,
        column_multiple=ALIGNED_COLUMNS), dtype)) for l in layers]
    rng = np.random.default_rng(0)
    biases = [jnp.asarray(rng.standard_normal(l.out_channels), dtype)
              for l in layers]
    xs = [wl.make_input(layers[0], args.batch, seed=i).astype(dtype)
          for i in range(args.inputs)]
    fns = chain_fns(layers, kernels, biases)
    f, w = fns["dense"]
    ref = f(xs[0], w, biases).astype(jnp.float32)
    row = {"sparsity": sp if sp is not None else "published",
           "vector_width": args.vector_width, "batch": args.batch,
           "us": {}, "kernels_us": {}, "rel_err": {}}
    for name, (fn, w) in fns.items():
      t = bench.device_time_us(fn, [(x, w, biases) for x in xs],
                               repeats=args.repeats)
      row["us"][name] = t.median_us
      row["kernels_us"][name] = t.kernels_us
      y = fn(xs[0], w, biases).astype(jnp.float32)
      row["rel_err"][name] = float(jnp.linalg.norm(y - ref)
                                   / jnp.linalg.norm(ref))
    print(row["sparsity"], {k: round(v, 2) for k, v in row["us"].items()},
          {k: f"{v:.1e}" for k, v in row["rel_err"].items()}, flush=True)
    rows.append(row)
  info = bench.device_info()
  with open(args.out, "w") as f:
    json.dump({"device": info["device"], "jax_version": info["jax_version"],
               "chain": CHAIN, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  sys.exit(main())
