"""Pruned fully connected layers at batch 1 as 1x1 sparse convolutions on a
1x1 map, against the dense matmul: does the escort path pay for them?

  PYTHONPATH=. python benchmarks/sparse_linear_probe.py --out DIR

For the SkimCaffe-pruned FC layers (caffenet fc6, fc7, fc8, googlenet
loss3/classifier, resnet50 fc1000, at their published sparsities, random
uniform masks), times in float32 at default precision and in bfloat16:
  dense      x @ W + b (the kernel as an argument, as a Flax model runs it)
  escort     sparse_conv(x[:, None, None, :], ...) with each --configs entry
             (nonzero-lanes tiles; bench --config syntax)
Writes DIR/sparse_linear_probe.json.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import SparseKernel, bench, sparse_conv
from escort_jax.bench import parse_config

FC_LAYERS = [  # (name, in, out, sparsity): the SkimCaffe README's
    ("caffenet/fc6", 9216, 4096, 0.903),
    ("caffenet/fc7", 4096, 4096, 0.844),
    ("caffenet/fc8", 4096, 1000, 0.738),
    ("googlenet/loss3_classifier", 1024, 1000, 0.907),
    ("resnet50/fc1000", 2048, 1000, 0.915),
]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--configs", nargs="+", default=[
      "rpp=1,bq=1,nw=4,nzl=128,nhwc_out=1",
      "rpp=1,bq=1,nw=8,nzl=256,nhwc_out=1",
      "rpp=1,bq=16,nw=4,nzl=32,nhwc_out=1"])
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  a = ap.parse_args()
  rng = np.random.default_rng(0)
  rows = []
  for name, n_in, n_out, sparsity in FC_LAYERS:
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    w *= rng.random((n_in, n_out)) >= sparsity
    b = rng.standard_normal(n_out).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16):
      xs = [jnp.asarray(rng.standard_normal((1, n_in)), dtype)
            for _ in range(5)]
      wd, bd = jnp.asarray(w, dtype), jnp.asarray(b, dtype)
      sk = SparseKernel.from_dense(w.reshape(1, 1, n_in, n_out))
      sk = sk.with_values(sk.values.astype(dtype))
      dense = jax.jit(lambda x, w, b: x @ w + b)
      t = bench.device_time_us(lambda x: dense(x, wd, bd), xs)
      ref = dense(xs[0], wd, bd).astype(jnp.float32)
      row = {"layer": name, "dtype": jnp.dtype(dtype).name,
             "sparsity": sparsity, "nnz": sk.nnz, "dense_us": t.median_us,
             "escort_us": {}}
      for text in a.configs:
        cfg = parse_config(text)[0]
        op = jax.jit(lambda x, sk, cfg=cfg: sparse_conv(
            x[:, None, None, :], sk, (1, 1), "VALID", bias=bd,
            method="escort", config=cfg)[:, 0, 0, :])
        try:
          te = bench.device_time_us(lambda x: op(x, sk), xs)
          err = float(jnp.linalg.norm(op(xs[0], sk).astype(jnp.float32) - ref)
                      / jnp.linalg.norm(ref))
          row["escort_us"][text] = {"time_us": te.median_us, "rel_err": err}
        except Exception as e:  # pylint: disable=broad-except
          row["escort_us"][text] = {"error": f"{type(e).__name__}: {e}"[:200]}
      rows.append(row)
      best = min((v["time_us"] for v in row["escort_us"].values()
                  if "time_us" in v), default=float("nan"))
      print(f"{name:28s} {row['dtype']:9s} nnz {sk.nnz:8d} dense "
            f"{t.median_us:7.2f} us  best escort {best:7.2f} us  "
            + "  ".join(f"{k.split(',nhwc')[0]}: "
                        f"{v.get('time_us', float('nan')):.2f}"
                        for k, v in row["escort_us"].items()), flush=True)
  with open(os.path.join(a.out, "sparse_linear_probe.json"), "w") as fh:
    json.dump({"device": jax.devices()[0].device_kind,
               "jax_version": jax.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
  main()
