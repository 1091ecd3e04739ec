"""Data-parallel inference throughput: a pruned network with its batch
sharded over every local device through jax.sharding, against one device.

`escort-jax bench --sharded` runs it (issue 8). For 1 device and for all N
local devices it builds a 1-D mesh ("batch",) of Auto axes over the first
n devices, replicates the sparsified model's parameters over it, puts a batch
of n * batch_per_device images on it as NamedSharding(mesh, P("batch")),
jits inference with those shardings (the sparse layers split the batch
through escort_jax.sharding, the dense ones through XLA) and takes the
wall-clock median of blocking calls (bench_network.wall_us). The per-device
batch is fixed (weak scaling), so

    scaling_efficiency = throughput on N / (N * throughput on 1).

Every N-device output is checked against the one-device program run on each
device's share of the batch: `outputs_equal` (bitwise) and `max_rel_err`;
its row lists the cross-device operations of its compiled program
(`collectives`: none when every layer runs on the local images only).

The results file has the benchmark schema (escort_jax.bench: device,
jax_version, date, gpus, timer, rows), with "gpus": N (the devices used; on a
CPU, host devices, as "platform" says), "throughput_images_per_s" keyed by
device count ("1", "N"), "scaling_efficiency", and one row per device count
("layer": "whole_network").
"""

from __future__ import annotations

import datetime
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from escort_jax import bench
from escort_jax import bench_network
from escort_jax.convert import sparsify
from escort_jax.models import INPUT_SHAPES, build_model


def sharded_forward(model, devices, precision: str | None = None):
  """Jitted inference over a ("batch",) mesh of `devices`.

  Returns:
    (f, batch_sharding): f(x) runs the model with its parameters replicated
    on the mesh and x, and the output, sharded over the batch.
  """
  mesh = Mesh(np.asarray(devices), ("batch",), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("batch"))
  graphdef, state = nnx.split(model)
  state = jax.device_put(state, replicated)

  def forward(state, x):
    with jax.default_matmul_precision(precision):
      return nnx.merge(graphdef, state)(x)

  run = jax.jit(forward, in_shardings=(replicated, batch),
                out_shardings=batch)
  f = lambda x: run(state, x)  # pylint: disable=unnecessary-lambda-assignment
  f.collectives = lambda x: collectives(run, state, x)
  return f, batch


COLLECTIVES = ("all-gather", "all-to-all", "all-reduce", "reduce-scatter",
               "collective-permute")


def collectives(jitted, *args) -> list[str]:
  """The cross-device operations in the compiled program of jitted(*args):
  none for inference that is data parallel throughout."""
  text = jitted.lower(*args).compile().as_text()
  return sorted(op for op in COLLECTIVES if op in text)


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
  return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def run_sharded(net: str = "resnet50", batch_per_device: int = 128, *,
                in_hw: int | None = None, dtype=jnp.float32,
                method: str = "escort", precision: str = "default",
                calls: int = 20, seed: int = 0, devices=None,
                out=None) -> dict:
  """Times inference on one device and on all of `devices`.

  Args:
    net: "resnet50", "googlenet" or "caffenet", SkimCaffe-pruned with random
      weights; its layers at density <= bench_network.PRUNED_DENSITY become
      SparseConvs.
    batch_per_device: images per device.
    in_hw: input height and width (quick CPU runs); default ImageNet's.
    dtype: parameter and input dtype.
    method: the SparseConv method of the converted layers.
    precision: jax.default_matmul_precision of the run; "default" leaves it
      unset.
    calls: timed calls per device count.
    devices: the devices to shard over (default: all local devices).
    out: where to write the JSON; None: benchmarks/results/<date>-<device>
      -sharded.json; False: nowhere.

  Returns:
    The results dict (see the module docstring).
  """
  dtype = jnp.dtype(dtype)
  devices = list(devices if devices is not None else jax.local_devices())
  n_all = len(devices)
  model = build_model(net, pruned=True, seed=seed, param_dtype=dtype)
  sparse = sparsify(model, max_density=bench_network.PRUNED_DENSITY,
                    method=method)
  h, w, c = INPUT_SHAPES[net]
  if in_hw is not None:
    h = w = in_hw
  prec = None if precision == "default" else precision
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_all * batch_per_device, h, w, c)).astype(
      jnp.dtype(dtype))

  info = bench.device_info()
  results = {"device": info["device"], "platform": info["platform"],
             "jax_version": info["jax_version"],
             "date": datetime.date.today().isoformat(), "gpus": n_all,
             "timer": "wall_clock_median", "net": net,
             "batch_per_device": batch_per_device, "in_hw": h,
             "dtype": jnp.dtype(dtype).name, "method": method,
             "precision": precision, "throughput_images_per_s": {},
             "scaling_efficiency": None, "outputs_equal": None,
             "max_rel_err": None, "rows": []}
  one, _ = sharded_forward(sparse, devices[:1], prec)
  for n in sorted({1, n_all}):
    f, batch_sharding = (one, None) if n == 1 else sharded_forward(
        sparse, devices[:n], prec)
    xs = jax.device_put(x[:n * batch_per_device],
                        batch_sharding or NamedSharding(
                            Mesh(np.asarray(devices[:1]), ("batch",)),
                            P("batch")))
    wall = bench_network.wall_us(f, xs, calls)
    images_per_s = n * batch_per_device / (wall * 1e-6)
    y = jax.block_until_ready(f(xs))
    row = {"net": net, "layer": "whole_network",
           "batch": n * batch_per_device,
           "batch_per_device": batch_per_device, "devices": n,
           "dtype": jnp.dtype(dtype).name, "method": method,
           "precision": precision, "in_hw": h, "wall_us": wall,
           "images_per_s": images_per_s,
           "out_sharded": _sharded_over_batch(y)}
    if n > 1:
      # The one-device program on each device's share of the batch.
      want = np.concatenate([
          np.asarray(one(x[k * batch_per_device:(k + 1) * batch_per_device]))
          for k in range(n)])
      got = np.asarray(y)
      row["collectives"] = f.collectives(xs)
      row["outputs_equal"] = bool(np.array_equal(got, want))
      row["rel_err_vs_one_device"] = _rel_err(
          got.astype(np.float64), want.astype(np.float64))
      results["outputs_equal"] = row["outputs_equal"]
      results["max_rel_err"] = row["rel_err_vs_one_device"]
    results["rows"].append(row)
    results["throughput_images_per_s"][str(n)] = images_per_s
    print(f"{net} on {n} device(s), {batch_per_device} images each: "
          f"{wall / 1e3:.2f} ms per batch, {images_per_s:.1f} images/s",
          flush=True)
  t = results["throughput_images_per_s"]
  results["scaling_efficiency"] = t[str(n_all)] / (n_all * t["1"])
  if n_all == 1:
    results["outputs_equal"], results["max_rel_err"] = True, 0.0
  if out is not False:
    path = Path(out) if out else bench.default_results_path().with_name(
        bench.default_results_path().stem + "-sharded.json")
    bench._atomic_write_json(path, results)  # pylint: disable=protected-access
    results["path"] = str(path)
  return results


def _sharded_over_batch(y) -> bool:
  spec = getattr(getattr(y, "sharding", None), "spec", None)
  return bool(spec is not None and len(spec) and spec[0] == "batch")
