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

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from escort_jax import bench
from escort_jax import bench_network
from escort_jax.models import INPUT_SHAPES
from escort_jax.ops import METHODS


def sharded_forward(model, devices, precision: str | None = None):
  """Jitted inference over a ("batch",) mesh of `devices`.

  Args:
    precision: jax.default_matmul_precision of the forward pass ("default"
      or None leaves it unset).

  Returns:
    (f, batch_sharding): f(x) runs the model with its parameters replicated
    on the mesh and x, and the output, sharded over the batch.
  """
  mesh = Mesh(np.asarray(devices), ("batch",), axis_types=(AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("batch"))
  forward, state = bench_network.apply_fn(model, precision)
  state = jax.device_put(state, replicated)
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


def check_method(method: str) -> None:
  """Raises bench.UsageError for a method the pruned networks cannot run:
  unknown, or "vector" (their SkimCaffe-pruned kernels are unstructured, not
  vector-sparse)."""
  if method not in METHODS:
    raise bench.UsageError(f"unknown method {method!r}; expected one of "
                           f"{', '.join(METHODS)}")
  if method == "vector":
    raise bench.UsageError(
        "method 'vector' needs vector-sparse kernels, and the pruned "
        "networks' kernels are unstructured: use escort, auto or dense")


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

  Raises:
    bench.UsageError: an unknown net, or a method the pruned networks
      cannot run (check_method).
  """
  if net not in INPUT_SHAPES:
    raise bench.UsageError(f"unknown network {net!r}; expected one of "
                           f"{', '.join(INPUT_SHAPES)}")
  check_method(method)
  dtype = jnp.dtype(dtype)
  devices = list(devices if devices is not None else jax.local_devices())
  n_all = len(devices)
  _, sparse = bench_network.build_networks(net, dtype=dtype, seed=seed,
                                           method=method)
  h, w, c = bench_network.input_hwc(net, in_hw)
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n_all * batch_per_device, h, w, c)).astype(
      jnp.dtype(dtype))

  info = bench.device_info()
  results = bench.results_header(
      platform=info["platform"], gpus=n_all, timer="wall_clock_median")
  results.update({
      "net": net, "batch_per_device": batch_per_device, "in_hw": h,
      "dtype": jnp.dtype(dtype).name, "method": method,
      "precision": precision, "throughput_images_per_s": {},
      "scaling_efficiency": None, "outputs_equal": None,
      "max_rel_err": None, "rows": []})
  one, one_sharding = sharded_forward(sparse, devices[:1], precision)
  for n in sorted({1, n_all}):
    f, batch_sharding = (one, one_sharding) if n == 1 else sharded_forward(
        sparse, devices[:n], precision)
    xs = jax.device_put(x[:n * batch_per_device], batch_sharding)
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
      row["rel_err_vs_one_device"] = bench.rel_err(got, want)
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
    path = Path(out) if out else bench.results_path("-sharded")
    bench.write_json(path, results)
    results["path"] = str(path)
  return results


def _sharded_over_batch(y) -> bool:
  spec = getattr(getattr(y, "sharding", None), "spec", None)
  return bool(spec is not None and len(spec) and spec[0] == "batch")
