"""Per-kernel device time of one pruned network's forward, sparse against
dense (which kernels the sparse layers add or remove inside the network).

  PYTHONPATH=. python benchmarks/network_profile.py --net resnet50 \
      --batch 1 --precision highest [--dtype bfloat16] [--hlo] --out DIR

Writes DIR/network_profile.json: for each model the total kernel time per
call and every kernel name's time (escort_jax.bench.device_time_us). With
--hlo it also writes DIR/{dense,sparse}.hlo.txt, the optimized HLO of each
forward, to read which instruction a kernel name (a fusion, a transpose)
comes from.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench, bench_network
from escort_jax.convert import dense_fallback


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--net", default="resnet50")
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--precision", default="highest")
  ap.add_argument("--out", default=os.environ.get("OUT", "."))
  ap.add_argument("--hlo", action="store_true")
  ap.add_argument("--dtype", default="float32")
  a = ap.parse_args()
  dtype = jnp.dtype(a.dtype)
  dense, sparse = bench_network.build_networks(a.net, dtype=dtype)
  h, w, c = bench_network.input_hwc(a.net)
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.standard_normal((a.batch, h, w, c)), dtype)
        for _ in range(3)]
  with jax.default_matmul_precision(bench_network.precision_arg(
      a.precision)):
    sparse = dense_fallback(sparse, xs[0])
  out = {}
  for name, model in (("dense", dense), ("sparse", sparse)):
    f = bench_network.forward(model, a.precision)
    if a.hlo:
      apply, state = bench_network.apply_fn(model, a.precision)
      text = jax.jit(apply).lower(state, xs[0]).compile().as_text()
      with open(os.path.join(a.out, f"{name}.hlo.txt"), "w") as fh:
        fh.write(text)
    t = bench.device_time_us(f, xs, keep_traces=None)
    kernels = dict(sorted(t.kernels_us.items(), key=lambda kv: -kv[1]))
    out[name] = {"total_us": t.median_us, "kernels_us": kernels}
    print(name, round(t.median_us, 1), flush=True)
    for k, v in list(kernels.items())[:25]:
      print(f"  {v:8.1f}  {k[:100]}")
  json.dump(out, open(os.path.join(a.out, "network_profile.json"), "w"),
            indent=1)


if __name__ == "__main__":
  main()
