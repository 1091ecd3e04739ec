"""Whole-network benchmark: jitted inference of a pruned model, sparse
(escort_jax.sparsify) against the same dense model at the same precision.

Each row reports the device kernel time of one forward pass
(bench.device_time_us, every kernel counted) as `time_us` and
`baselines_us`, plus the wall-clock median over many calls
(`wall_us`, `dense_wall_us`), with "layer": "whole_network". Rows go into a
results file of the benchmark schema (escort_jax.bench).
"""

from __future__ import annotations

import datetime
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from escort_jax import bench
from escort_jax.convert import sparsify
from escort_jax.models import INPUT_SHAPES, build_model

# Convert only the layers that the profile pruned: dense layers run faster as
# dense convolutions, and the SkimCaffe profile leaves them at density 1.
PRUNED_DENSITY = 0.5


def wall_us(fn, x, calls: int = 50) -> float:
  """Median wall-clock time of one blocking call, microseconds."""
  jax.block_until_ready(fn(x))
  samples = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    samples.append((time.perf_counter() - t0) * 1e6)
  return statistics.median(samples)


def _forward(model, precision):
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(x):
    with jax.default_matmul_precision(precision):
      return nnx.merge(graphdef, state)(x)
  return f


def run_network(name: str, batch: int, *, precisions: Sequence[str] = (
    "highest", "default"), dtype=jnp.float32, num_inputs: int = 5,
                calls: int = 50, seed: int = 0, in_hw: int | None = None,
                method: str = "auto") -> list[dict]:
  """Rows for one net and batch, one per precision.

  Args:
    name: "caffenet", "googlenet" or "resnet50" (SkimCaffe-pruned, random
      weights).
    precisions: jax.default_matmul_precision values; "default" leaves it
      unset (TF32 convolutions on Hopper).
    in_hw: input size override (quick CPU runs); default ImageNet's.
    method: the SparseConv method of the converted layers.
  """
  model = build_model(name, pruned=True, seed=seed, param_dtype=dtype)
  sparse = sparsify(model, max_density=PRUNED_DENSITY, method=method)
  h, w, c = INPUT_SHAPES[name]
  if in_hw is not None:
    h = w = in_hw
  rng = np.random.default_rng(seed)
  inputs = [jnp.asarray(rng.standard_normal((batch, h, w, c)), dtype)
            for _ in range(num_inputs)]
  rows = []
  for precision in precisions:
    prec = None if precision == "default" else precision
    f_dense, f_sparse = _forward(model, prec), _forward(sparse, prec)
    y_dense = np.asarray(f_dense(inputs[0]), np.float64)
    y_sparse = np.asarray(f_sparse(inputs[0]), np.float64)
    err = float(np.linalg.norm(y_sparse - y_dense) /
                max(np.linalg.norm(y_dense), 1e-30))
    t_sparse = bench.device_time_us(f_sparse, inputs)
    t_dense = bench.device_time_us(f_dense, inputs)
    wall_sparse = wall_us(f_sparse, inputs[0], calls)
    wall_dense = wall_us(f_dense, inputs[0], calls)
    baseline = ("lax_fp32_highest" if precision == "highest" else
                "lax_default")
    rows.append({
        "net": name, "layer": "whole_network", "batch": batch,
        "sparsity": None, "dtype": jnp.dtype(dtype).name,
        "method": method, "precision": precision,
        "time_us": t_sparse.median_us, "spread_us": t_sparse.spread_us,
        "baselines_us": {baseline: t_dense.median_us},
        "speedup_kernel_time": t_dense.median_us / t_sparse.median_us,
        "wall_us": wall_sparse, "dense_wall_us": wall_dense,
        "speedup_wall": wall_dense / wall_sparse,
        "rel_err_vs_dense": err, "in_hw": h, "timer": t_sparse.timer,
    })
  return rows


def run(nets: Sequence[str], batches: Sequence[int], out=None,
        **kwargs) -> dict:
  """Runs every (net, batch) and writes one results file."""
  info = bench.device_info()
  results = {"device": info["device"], "jax_version": info["jax_version"],
             "date": datetime.date.today().isoformat(), "gpus": info["gpus"],
             "timer": info["timer"], "rows": []}
  path = bench.Path(out) if out else bench.default_results_path().with_name(
      bench.default_results_path().stem + "-networks.json")
  for name in nets:
    for batch in batches:
      for row in run_network(name, batch, **kwargs):
        results["rows"].append(row)
        print(f"{name} b={batch} {row['precision']}: sparse "
              f"{row['time_us']:.0f} us vs dense "
              f"{list(row['baselines_us'].values())[0]:.0f} us kernel time "
              f"({row['speedup_kernel_time']:.2f}x); wall "
              f"{row['wall_us']:.0f} vs {row['dense_wall_us']:.0f} us "
              f"({row['speedup_wall']:.2f}x); err {row['rel_err_vs_dense']:.1e}",
              flush=True)
        bench._atomic_write_json(path, results)  # pylint: disable=protected-access
  return results
