"""Whole-network benchmark: jitted inference of a pruned model, sparse
(escort_jax.sparsify) against the same dense model at the same precision.

Each row reports the device kernel time of one forward pass
(bench.device_time_us, every kernel counted) as `time_us` and
`baselines_us`, plus the wall-clock median over many calls
(`wall_us`, `dense_wall_us`), with "layer": "whole_network". Rows go into a
results file of the benchmark schema (escort_jax.bench).
"""

from __future__ import annotations

from pathlib import Path
import statistics
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from escort_jax import bench
from escort_jax.bench import AUTO_FALLBACK
from escort_jax.convert import dense_fallback, sparsify
from escort_jax.models import INPUT_SHAPES, build_model
from escort_jax.nnx import SparseConv

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


def precision_arg(precision: str | None) -> str | None:
  """A precision name of the CLI and results ("highest", "default", ...) as
  jax.default_matmul_precision takes it: "default" (or None) is None, which
  leaves the default (TF32 convolutions on Hopper)."""
  return None if precision in (None, "default") else precision


def build_networks(name: str, *, dtype=jnp.float32, seed: int = 0,
                   method: str = "auto"):
  """(dense, sparse): the SkimCaffe-pruned `name` ("caffenet", "googlenet"
  or "resnet50", random weights) and its copy with the pruned layers
  (density <= PRUNED_DENSITY) as SparseConvs of `method`: the convolutions,
  and the fully connected layers as SparseLinears."""
  # dtype as well as param_dtype: nnx.BatchNorm keeps its running
  # statistics in float32, so with dtype=None a bfloat16 ResNet-50 computed
  # in float32 after its first batch norm.
  model = build_model(name, pruned=True, seed=seed, dtype=dtype,
                      param_dtype=dtype)
  return model, sparsify(model, max_density=PRUNED_DENSITY, method=method,
                         linear=True)


def input_hwc(name: str, in_hw: int | None = None) -> tuple[int, int, int]:
  """(H, W, C) of a net's input: ImageNet's, or in_hw x in_hw."""
  h, w, c = INPUT_SHAPES[name]
  return (h, w, c) if in_hw is None else (in_hw, in_hw, c)


def apply_fn(model, precision: str | None):
  """(apply, state): apply(state, x) runs `model` (nnx.split into its
  graphdef and state) on x under jax.default_matmul_precision(precision)
  ("default" or None: unset); jit it as you need."""
  graphdef, state = nnx.split(model)
  prec = precision_arg(precision)

  def apply(state, x):
    with jax.default_matmul_precision(prec):
      return nnx.merge(graphdef, state)(x)
  return apply, state


def forward(model, precision: str | None):
  """Jitted inference x -> model(x) at `precision` (as apply_fn). The
  parameters are arguments of the compiled program, as under nnx.jit, not
  constants that XLA could fold (a sparse layer's dense kernel, say).

  They are passed as the flat list of the state's leaves, flattened once:
  flattening an nnx.State on every call cost 0.3 ms (dense ResNet-50) to
  0.5 ms (sparse) of host time per call on the CPU, which the wall clock
  would then count, and which says nothing about either model."""
  apply, state = apply_fn(model, precision)
  leaves, treedef = jax.tree.flatten(state)
  jitted = jax.jit(lambda leaves, x: apply(
      jax.tree.unflatten(treedef, leaves), x))
  return lambda x: jitted(leaves, x)


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
    method: the SparseConv method of the converted layers, or
      "auto_fallback": "auto" with each layer's path settled first for
      this batch, dtype and precision (escort_jax.convert.dense_fallback),
      so that the layers that run dense hold their dense kernel instead of
      densifying it per call. The row's "sparse_layers" counts the layers
      left sparse.
  """
  fallback = method == AUTO_FALLBACK
  if fallback:
    method = "auto"
  model, sparse = build_networks(name, dtype=dtype, seed=seed,
                                 method=method)
  h, w, c = input_hwc(name, in_hw)
  rng = np.random.default_rng(seed)
  inputs = [jnp.asarray(rng.standard_normal((batch, h, w, c)), dtype)
            for _ in range(num_inputs)]
  rows = []
  for precision in precisions:
    run = sparse
    if fallback:
      with jax.default_matmul_precision(precision_arg(precision)):
        run = dense_fallback(sparse, inputs[0])
    sparse_layers = sum(isinstance(n, SparseConv)
                        for _, n in nnx.iter_graph(run))
    f_dense, f_sparse = forward(model, precision), forward(run, precision)
    err = bench.rel_err(f_sparse(inputs[0]), f_dense(inputs[0]))
    t_sparse = bench.device_time_us(f_sparse, inputs)
    t_dense = bench.device_time_us(f_dense, inputs)
    wall_sparse = wall_us(f_sparse, inputs[0], calls)
    wall_dense = wall_us(f_dense, inputs[0], calls)
    dtype_name = jnp.dtype(dtype).name
    baseline = ("lax_default" if dtype_name == "float32" and
                precision != "highest" else
                bench.SAME_DTYPE_BASELINE.get(dtype_name, f"lax_{dtype_name}"))
    rows.append({
        "net": name, "layer": "whole_network", "batch": batch,
        "sparsity": None, "dtype": jnp.dtype(dtype).name,
        "method": AUTO_FALLBACK if fallback else method,
        "precision": precision,
        "sparse_layers": sparse_layers,
        "time_us": t_sparse.median_us, "spread_us": t_sparse.spread_us,
        "baselines_us": {baseline: t_dense.median_us},
        "speedup_kernel_time": t_dense.median_us / t_sparse.median_us,
        "wall_us": wall_sparse, "dense_wall_us": wall_dense,
        "speedup_wall": wall_dense / wall_sparse,
        "rel_err_vs_dense": err, "in_hw": h, "timer": t_sparse.timer,
    })
  return rows


def run(nets: Sequence[str], batches: Sequence[int], out=None,
        methods: Sequence[str] = ("auto",), dtypes: Sequence = (jnp.float32,),
        **kwargs) -> dict:
  """Runs every (net, batch, dtype, method) and writes one results file.
  float32 networks are timed at fp32 HIGHEST and at default precision;
  2-byte ones at default precision only (their convolutions take 2-byte
  operands at either)."""
  results = bench.results_header(rows=[])
  path = Path(out) if out else bench.results_path("-networks")
  for name in nets:
    for batch in batches:
      for row in (r for dtype in dtypes for m in methods
                  for r in run_network(
                      name, batch, method=m, dtype=dtype,
                      precisions=(("default",)
                                  if jnp.dtype(dtype).itemsize <= 2 else
                                  ("highest", "default")), **kwargs)):
        results["rows"].append(row)
        print(f"{name} b={batch} {row['dtype']} {row['method']} "
              f"{row['precision']}: sparse "
              f"{row['time_us']:.0f} us vs dense "
              f"{list(row['baselines_us'].values())[0]:.0f} us kernel time "
              f"({row['speedup_kernel_time']:.2f}x); wall "
              f"{row['wall_us']:.0f} vs {row['dense_wall_us']:.0f} us "
              f"({row['speedup_wall']:.2f}x); err {row['rel_err_vs_dense']:.1e}",
              flush=True)
        bench.write_json(path, results)
  return results
