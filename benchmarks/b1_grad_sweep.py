"""The backward pass at batch 1 on workload layers: the whole escort
backward (values and input gradients) beside dense lax.conv's, and its
input-gradient kernel both ways: the nonzero-lanes kernel on the transposed
problem in CSR form (what ops runs on small grids) and the escort kernel
with the forward config's launch (what it ran before).

  PYTHONPATH=. python benchmarks/b1_grad_sweep.py --layers res3a_branch2b \
      --dtype float32 bfloat16 --out DIR

Device kernel time as escort_jax.bench; writes DIR/b1_grad_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import escort_jax as ej
from escort_jax import bench, ops
from escort_jax import workload as wl
from pallas_kernels.direct_sparse_conv import direct_sparse_conv
from pallas_kernels.nonzero_lanes_conv import nonzero_lanes_conv


def grad_fn(conv):
  def loss(w, x, ct):
    return jnp.sum(ct.astype(jnp.float32) * conv(w, x).astype(jnp.float32))
  return jax.jit(jax.grad(loss, (0, 1)))


def escort_plan_of(sk, x, kw):
  """(geometry, EscortPlan) of sparse_conv(x, sk, method="escort", **kw)
  with no caller config, as its backward pass builds them."""
  spec = ops.make_spec(
      x, sk, kw["window_strides"], kw["padding"], rhs_dilation=(1, 1),
      feature_group_count=kw["feature_group_count"], dimension_numbers=None,
      bias=None, activation=None, method="escort", lhs_dilation=None,
      preferred_element_type=None)
  g = spec.geometry
  config = ops.default_kernel_config(g.out_channels, g.out_len,
                                     x.dtype.itemsize, g.batch)
  return g, ops.escort_plan(sk.structure, g, config)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--layers", nargs="+", default=["res3a_branch2b"])
  ap.add_argument("--dtype", nargs="+", default=["float32"])
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  a = ap.parse_args()
  rows = []
  for layer in wl.find_layers(a.layers, pool=wl.pruned_layers()):
    kw = layer.conv_kwargs()
    for dtype in map(jnp.dtype, a.dtype):
      kernel = wl.make_kernel(layer)
      sk = ej.SparseKernel.from_dense(kernel)
      sk = sk.with_values(sk.values.astype(dtype))
      rng = np.random.default_rng(0)
      xs = [wl.make_input(layer, 1, seed=i, dtype=dtype) for i in range(3)]
      y = ej.sparse_conv(xs[0], sk, method="escort", **kw)
      ct = jnp.asarray(rng.standard_normal(y.shape), dtype)
      row = {"layer": layer.name, "dtype": dtype.name, "batch": 1}
      f = grad_fn(lambda v, x: ej.sparse_conv(
          x, sk.with_values(v), method="escort", **kw))
      t = bench.device_time_us(f, [(sk.values, x, ct) for x in xs])
      row["backward_us"] = t.median_us
      row["backward_kernels_us"] = dict(list(t.kernels_us.items())[:8])
      prec = lax.Precision.DEFAULT if dtype == jnp.float32 else None
      f = grad_fn(lambda w, x: lax.conv_general_dilated(
          x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=prec,
          **kw))
      row["lax_backward_us"] = bench.device_time_us(
          f, [(jnp.asarray(kernel, dtype), x, ct) for x in xs]).median_us
      # The input gradient alone, both kernels, on the op's own plan.
      g, plan = escort_plan_of(sk, xs[0], kw)
      dy_len = (g.out_channels + -(-plan.dy_tail // plan.dy_row_len)) * (
          plan.dy_row_len)
      dys = [jnp.asarray(rng.standard_normal(dy_len), dtype) for _ in xs]
      escort = jax.jit(lambda dy, v: direct_sparse_conv(
          dy, plan.transposed.gather_values(v), plan.transposed,
          out_len=g.plane_len, interpret=not ops.on_gpu(),
          **ops._launch(plan.config)))
      tc = ops.transposed_lanes_config(plan, dtype.itemsize)
      lanes = jax.jit(lambda dy, v: nonzero_lanes_conv(
          dy, jnp.take(v, plan.transposed_order), plan.transposed_rows,
          out_len=g.plane_len, lanes=tc.nonzero_lanes, block_q=tc.block_q,
          num_warps=tc.num_warps, num_stages=tc.num_stages,
          interpret=not ops.on_gpu()))
      for name, fn in (("dx_escort_us", escort), ("dx_nonzero_lanes_us",
                                                   lanes)):
        row[name] = bench.device_time_us(
            fn, [(dy, sk.values) for dy in dys]).median_us
      diff = np.abs(np.asarray(escort(dys[0], sk.values), np.float32) -
                    np.asarray(lanes(dys[0], sk.values), np.float32))
      row["dx_rel_diff"] = float(diff.max() / max(np.abs(np.asarray(
          escort(dys[0], sk.values), np.float32)).max(), 1e-30))
      rows.append(row)
      print(f"{layer.name} {dtype.name}: backward {row['backward_us']:.1f} "
            f"us (lax {row['lax_backward_us']:.1f}); input-gradient kernel "
            f"escort {row['dx_escort_us']:.1f}, nonzero-lanes "
            f"{row['dx_nonzero_lanes_us']:.1f} us; rel diff "
            f"{row['dx_rel_diff']:.1e}", flush=True)
  out = {"device": jax.devices()[0].device_kind,
         "jax_version": jax.__version__, "rows": rows}
  with open(os.path.join(a.out, "b1_grad_sweep.json"), "w") as fh:
    json.dump(out, fh, indent=1)


if __name__ == "__main__":
  main()
