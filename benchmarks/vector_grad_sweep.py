"""The vector path's weight gradient on the GPU: the tensor-core kernel
(pallas_kernels/vector_weight_grad.py) against the sampled dense-dense
product it replaced, and the whole backward against lax bf16's.

  PYTHONPATH=. python benchmarks/vector_grad_sweep.py [--layers NAME ...]
      [--batch 32] [--v 16] [--variants "bq,splits;..."] [--out DIR]

Per layer (the workload's V-vector-sparse kernel at its published sparsity,
bf16 inputs, N(0, 1) cotangent): both weight-gradient kernels on the same
operands, checked against each other, then CUPTI kernel times (as
benchmarks/kernel_sweep.py); then jax.grad of a sum-of-squares loss
through sparse_conv(method="vector") and through lax.conv bf16, with respect
to the values (the kernel) and the input, whole backward programs.
splits 0 in a variant means the default. Rows go to OUT/vector_grad.json.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from kernel_sweep import (LAYERS, cupti_us, make_case,  # noqa: E402
                          write_results)

import escort_jax as ej  # noqa: E402
from escort_jax import conv_geometry as cg  # noqa: E402
from escort_jax import ops  # noqa: E402
from pallas_kernels.sampled_dense_dense import sampled_dense_dense  # noqa
from pallas_kernels.vector_weight_grad import vector_weight_grad  # noqa

DN = ("NHWC", "HWIO", "NHWC")


def run_layer(name, batch, v, variants):
  layer = next(l for l in LAYERS if l["layer"] == name)
  x, w, args = make_case(layer, batch, jnp.bfloat16, vector_width=v)
  sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
  sk = sk.with_values(sk.values.astype(jnp.bfloat16))
  g = cg.make_geometry(x.shape, sk.structure, args["window_strides"],
                       args["padding"], 1, args.get("feature_group_count", 1))
  vplan = ops.vector_plan(sk.structure, g)
  eplan = ops.escort_plan(sk.structure, g)
  x_flat = cg.to_flat_input(x, g, max(vplan.x_tail, eplan.x_tail))
  dy = jax.random.normal(jax.random.key(1), (g.out_channels, g.out_len),
                         jnp.bfloat16)
  kw = dict(valid_period=g.valid_period, valid_len=g.valid_len)
  row = dict(layer=name, batch=batch, v=v, nnz=int(sk.nnz),
             out_len=g.out_len, blocks=vplan.blocks.num_blocks,
             padded_cols=vplan.blocks.padded_cols)
  sddmm = jax.jit(lambda dy, xf: sampled_dense_dense(
      dy, xf, eplan.problem.rows, eplan.problem.offsets, **kw))
  want = np.asarray(sddmm(dy, x_flat))
  row["sddmm_us"], _ = cupti_us(sddmm, dy, x_flat)
  row["variants"] = []
  for bq, splits in variants:
    f = jax.jit(lambda dy, xf: vector_weight_grad(
        dy, xf, vplan.blocks, block_q=bq, splits=splits or None, **kw))
    got = np.asarray(f(dy, x_flat))
    err = float(np.abs(got - want).max() / np.abs(want).max())
    us, spread = cupti_us(f, dy, x_flat)
    row["variants"].append(dict(block_q=bq, splits=splits, us=us,
                                spread=spread, rel_err=err))
    print(f"{name} bq={bq} splits={splits or 'default'}: vector dW {us:.1f} "
          f"us (err {err:.1e}) | sddmm {row['sddmm_us']:.1f} us", flush=True)

  def loss_sparse(values, x):
    y = ej.sparse_conv(x, sk.with_values(values), method="vector", **args)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))

  def loss_dense(kernel, x):
    y = lax.conv_general_dilated(x, kernel, dimension_numbers=DN, **args)
    return jnp.sum(jnp.square(y.astype(jnp.float32)))
  grad_sparse = jax.jit(jax.grad(loss_sparse, argnums=(0, 1)))
  grad_dense = jax.jit(jax.grad(loss_dense, argnums=(0, 1)))
  row["grad_vector_us"], _ = cupti_us(grad_sparse, sk.values, x)
  row["grad_lax_bf16_us"], _ = cupti_us(grad_dense, w.astype(jnp.bfloat16), x)
  print(f"{name}: forward+backward vector {row['grad_vector_us']:.1f} us, "
        f"lax bf16 {row['grad_lax_bf16_us']:.1f} us", flush=True)
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--layers", nargs="+",
                 default=["res3a_branch2b", "res2a_branch2b",
                          "res4a_branch2b", "res5a_branch2b",
                          "inception_3a/3x3", "conv2"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--v", type=int, default=16)
  p.add_argument("--variants", default="128,0;64,0;128,1")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  a = p.parse_args()
  variants = [tuple(int(t) for t in part.split(","))
              for part in a.variants.split(";")]
  os.makedirs(a.out, exist_ok=True)
  rows = []
  for name in a.layers:
    rows.append(run_layer(name, a.batch, a.v, variants))
    write_results(os.path.join(a.out, "vector_grad.json"), rows)


if __name__ == "__main__":
  main()
