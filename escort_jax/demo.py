"""`escort-jax demo`: a SkimCaffe-pruned ResNet-50, made sparse, checked and
timed.

  1. build_model("resnet50", pruned=True, seed=0): Caffe's ResNet-50 with
     random weights, magnitude-pruned to the SkimCaffe per-layer profile;
  2. sparsify(model, max_density=0.5): the pruned convs (the 16 3x3
     branch2b convs) become SparseConv; the dense ones stay nnx.Conv;
  3. checks, at fp32 HIGHEST (norm-wise relative error <= 1e-4): the whole
     sparse model against the dense one, as converted (method="auto") and
     with every SparseConv forced onto the escort kernels, and
     sparse_conv(method="escort") against lax.conv on each layer's real
     input shape;
  4. times, on a GPU: each SparseConv layer (its method="auto" path, the
     escort kernel, dense lax.conv; device kernel time), and the whole
     network sparse against dense (device kernel time and wall clock) at
     fp32 HIGHEST and at the default precision;
  5. a per-layer speedup plot (PNG).

On a machine without a GPU it runs a reduced version in well under a
minute: batch 1 at 64x64, the escort kernels in the Pallas interpreter
(correctness only), a wall-clock time of the whole network instead of
per-layer timings, and, in place of speed, what an H100 would run for batch
32 at 224x224 (its tuned plans, else the cost model), labelled as not
measured here.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax import report

__all__ = ["DEMO_MODEL", "DEMO_TOLERANCE", "run_demo", "spread_indices"]

DEMO_MODEL = "resnet50"
DEMO_MAX_DENSITY = 0.5
# Norm-wise relative error bound against fp32 HIGHEST; accumulation-order
# differences are ~1e-7, a wrong kernel is O(1).
DEMO_TOLERANCE = 1e-4
GPU_BATCH, GPU_HW = 32, 224
CPU_BATCH, CPU_HW = 1, 64
CHECK_LAYERS_CPU = 4
# Distinct inputs per timing (device_time_us) and wall-clock calls.
LAYER_INPUTS, NETWORK_INPUTS, WALL_CALLS, WALL_ROUNDS = 10, 5, 10, 3


def spread_indices(n: int, count: int | None) -> list[int]:
  """`count` indices spread evenly over range(n), first and last included
  (all of them for count None or >= n)."""
  if count is None or count >= n:
    return list(range(n))
  if count <= 0:
    return []
  if count == 1:
    return [0]
  return sorted({int(round(i * (n - 1) / (count - 1))) for i in range(count)})


def _forward(model, precision: str | None):
  """A jitted forward pass at jax.default_matmul_precision(precision)."""
  from flax import nnx
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(x):
    ctx = (jax.default_matmul_precision(precision) if precision
           else contextlib.nullcontext())
    with ctx:
      return nnx.merge(graphdef, state)(x)
  return f


def _conv_kwargs(layer) -> dict[str, Any]:
  return dict(window_strides=layer.strides, padding=layer.padding,
              rhs_dilation=layer.kernel_dilation,
              feature_group_count=layer.feature_group_count)


def _bias(layer):
  from escort_jax.nnx import _get_value
  return _get_value(layer.bias) if layer.bias is not None else None


def check_layer(layer, x) -> float:
  """Relative error of sparse_conv(method="escort") against
  lax.conv_general_dilated of the dense kernel at HIGHEST precision, for
  one SparseConv on input x (NHWC)."""
  from escort_jax import bench
  from escort_jax.ops import sparse_conv
  sk, bias, conv = layer.sparse_kernel, _bias(layer), _conv_kwargs(layer)
  ref = lax.conv_general_dilated(
      x, sk.todense(), conv["window_strides"], conv["padding"],
      rhs_dilation=conv["rhs_dilation"],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=conv["feature_group_count"],
      precision=lax.Precision.HIGHEST)
  if bias is not None:
    ref = ref + bias
  escort = jax.jit(lambda v: sparse_conv(v, sk, bias=bias, method="escort",
                                         config=layer.config, **conv))
  y = escort(x)
  if y.shape != ref.shape:
    return float("inf")
  return bench.rel_err(y, ref)


def time_layer(layer, xs, precision: str | None) -> dict[str, float]:
  """Device kernel time (µs per call) of one SparseConv on inputs xs: its
  own method (usually "auto"), the escort kernel, and dense lax.conv of the
  densified kernel at the same precision (escort_jax.baselines)."""
  from escort_jax import baselines as bl
  from escort_jax import bench
  from escort_jax.ops import sparse_conv
  sk, bias, conv = layer.sparse_kernel, _bias(layer), _conv_kwargs(layer)
  prec = lax.Precision.HIGHEST if precision == "highest" else None

  def sparse(method):
    return jax.jit(lambda v: sparse_conv(v, sk, bias=bias, precision=prec,
                                         method=method, config=layer.config,
                                         **conv))
  fns = {"sparse_us": sparse(layer.method), "escort_us": sparse("escort"),
         "dense_us": bl.make_dense_conv(sk, bias=bias, precision=prec,
                                        **conv)}
  return {k: bench.device_time_us(f, xs, repeats=3).median_us
          for k, f in fns.items()}


def _network_check(y, y_dense) -> dict[str, Any]:
  from escort_jax import bench
  err = bench.rel_err(y, y_dense)
  return {"precision": "highest", "rel_err": err,
          "ok": bool(np.isfinite(err) and err <= DEMO_TOLERANCE
                     and y.shape == y_dense.shape),
          "output_shape": list(y.shape)}


def _network_timing(f_sparse, f_dense, xs, precision: str, on_gpu: bool
                    ) -> dict[str, Any]:
  from escort_jax import bench
  from escort_jax.bench_network import wall_us
  out: dict[str, Any] = {"precision": precision}
  if on_gpu:
    ts = bench.device_time_us(f_sparse, xs, repeats=3)
    td = bench.device_time_us(f_dense, xs, repeats=3)
    out.update(timer=ts.timer, sparse_us=ts.median_us, dense_us=td.median_us,
               speedup=td.median_us / ts.median_us)
  # Interleaved rounds, best median of each: a busy machine slows both
  # alike instead of whichever ran second.
  calls = WALL_CALLS if on_gpu else 3
  ws = wd = float("inf")
  for _ in range(WALL_ROUNDS):
    ws = min(ws, wall_us(f_sparse, xs[0], calls))
    wd = min(wd, wall_us(f_dense, xs[0], calls))
  out.update(sparse_wall_us=ws, dense_wall_us=wd, speedup_wall=wd / ws,
             wall_calls=calls * WALL_ROUNDS)
  return out


def run_demo(*, batch: int | None = None,
             input_shape: tuple[int, int, int] | None = None,
             precision: str = "highest", check_layers: int | None = -1,
             plot_path: str | None = "escort-demo.png",
             save_path: str | None = None, seed: int = 0,
             progress: Any = None) -> dict[str, Any]:
  """Runs the demo (see the module docstring); returns a JSON-able dict.

  Args:
    batch: default 32 on a GPU, 1 elsewhere.
    input_shape: (H, W, C); default 224x224x3 on a GPU, 64x64x3 elsewhere.
    precision: "highest" or "default": the precision of the per-layer
      timings (and of the H100 view off GPU). The correctness checks are
      always at HIGHEST; the whole network is timed at both on a GPU.
    check_layers: how many SparseConv layers to check in escort mode
      (spread over the network); None: all; -1: all on a GPU or at the
      reduced CPU size, else CHECK_LAYERS_CPU.
    plot_path: where to write the per-layer speedup PNG; None: no plot.
    save_path: also write the sparse model there (checkpoint.save_sparse).
    seed: the weights' and inputs' seed.
    progress: a report.NullProgress-like object (the CLI's rich one).

  Returns:
    "ok" (every check passed), "layers" (one dict per SparseConv: shapes,
    sparsity, nnz, "choice" (path and why, on this backend), "check",
    "times" (GPU), "gpu_view" (off GPU: what an H100 would run)),
    "network" (the end-to-end check and timings), and the run's settings.
  """
  from escort_jax import bench
  from escort_jax.convert import sparsify
  from escort_jax.models import build_model

  progress = progress or report.NullProgress()
  t_start = time.perf_counter()
  info = bench.device_info()
  on_gpu = jax.default_backend() == "gpu"
  batch = batch or (GPU_BATCH if on_gpu else CPU_BATCH)
  if input_shape is None:
    hw = GPU_HW if on_gpu else CPU_HW
    input_shape = (hw, hw, 3)
  if check_layers == -1:  # all, unless the interpreter would be slow
    check_layers = (None if on_gpu or max(input_shape[:2]) <= CPU_HW
                    else CHECK_LAYERS_CPU)
  precision = precision.lower()
  prec_arg = "highest" if precision == "highest" else None
  out: dict[str, Any] = {
      "command": "demo", "model": DEMO_MODEL,
      "profile": f"SkimCaffe {DEMO_MODEL}", "seed": seed,
      "max_density": DEMO_MAX_DENSITY, "device": info["device"],
      "backend": info["backend"], "jax_version": info["jax_version"],
      "on_gpu": on_gpu, "reduced": not on_gpu, "batch": batch,
      "input_shape": list(input_shape), "tolerance": DEMO_TOLERANCE,
      "precision": precision, "timer": bench.TIMER_GPU if on_gpu else None,
      "layer_inputs": LAYER_INPUTS if on_gpu else None}

  with progress.step(f"building {DEMO_MODEL} (SkimCaffe-pruned, random "
                     f"weights, seed {seed})"):
    model = build_model(DEMO_MODEL, pruned=True, seed=seed)
  with progress.step(f"converting layers of density <= {DEMO_MAX_DENSITY} "
                     "to SparseConv"):
    sparse = sparsify(model, max_density=DEMO_MAX_DENSITY)
    by_path = dict(report.sparse_layers(sparse))
    rows = report.layer_rows(sparse, batch, input_shape, precision=prec_arg)
    layers = [by_path[r["path"]] for r in rows]
  out["num_sparse_layers"] = len(layers)
  rng = np.random.default_rng(seed)

  # The whole network: sparse against dense, at fp32 HIGHEST.
  x_shape = (batch, *input_shape)
  n_inputs = NETWORK_INPUTS if on_gpu else 1
  xs = [jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        for _ in range(n_inputs)]
  with progress.step("checking the whole sparse network against the dense "
                     f"one (fp32 HIGHEST, batch {batch}, "
                     f"{input_shape[0]}x{input_shape[1]})"):
    f_sparse, f_dense = _forward(sparse, "highest"), _forward(model,
                                                              "highest")
    y_dense = f_dense(xs[0])
    check = _network_check(f_sparse(xs[0]), y_dense)
  # The same with every SparseConv forced onto the escort kernels (on a CPU
  # method="auto" runs dense, so only this exercises the kernels there).
  where = "compiled" if on_gpu else "Pallas interpreter"
  with progress.step("checking the whole network with every sparse layer on "
                     f"the escort kernels ({where})"):
    escort_model = sparsify(model, max_density=DEMO_MAX_DENSITY,
                            method="escort")
    check_escort = _network_check(_forward(escort_model, "highest")(xs[0]),
                                  y_dense)
    del escort_model
  net_ok = check["ok"] and check_escort["ok"]
  out["network"] = {"check": check, "check_escort": check_escort,
                    "timings": []}

  # Per layer: escort against lax.conv on the layer's real input shape.
  chosen = spread_indices(len(layers), check_layers)
  for row in rows:
    row["check"] = None
  for i in progress.track(chosen, f"checking the escort kernels ({where})",
                          total=len(chosen)):
    layer, row = layers[i], rows[i]
    if row["input_shape"] is None:
      continue
    x = jnp.asarray(rng.standard_normal(row["input_shape"]), jnp.float32)
    e = check_layer(layer, x)
    row["check"] = {"rel_err": e, "ok": bool(np.isfinite(e) and
                                             e <= DEMO_TOLERANCE)}
  out["checked_layers"] = sum(r["check"] is not None for r in rows)

  if on_gpu:
    for i in progress.track(range(len(layers)), "timing each sparse layer "
                            f"against dense lax.conv ({precision})",
                            total=len(layers)):
      layer, row = layers[i], rows[i]
      if row["input_shape"] is None:
        continue
      lxs = [jnp.asarray(rng.standard_normal(row["input_shape"]),
                         jnp.float32) for _ in range(LAYER_INPUTS)]
      t = time_layer(layer, lxs, prec_arg)
      t["speedup"] = t["dense_us"] / t["sparse_us"]
      t["escort_speedup"] = t["dense_us"] / t["escort_us"]
      row["times"] = t
    for p in ("highest", "default"):
      with progress.step(f"timing the whole network ({p} precision)"):
        if p != "highest":
          f_sparse, f_dense = _forward(sparse, None), _forward(model, None)
        out["network"]["timings"].append(
            _network_timing(f_sparse, f_dense, xs, p, True))
  else:
    with progress.step("wall-clock timing of the whole network (CPU)"):
      out["network"]["timings"].append(
          _network_timing(f_sparse, f_dense, xs, "highest", False))
    # What a GPU would run for the real workload: recorded plans, else the
    # cost model. Nothing is measured here.
    view = report.layer_rows(sparse, GPU_BATCH, (GPU_HW, GPU_HW, 3),
                             precision=prec_arg,
                             gpu_slug=report.DEFAULT_GPU_SLUG)
    view = {v["path"]: v["choice"] for v in view}
    for row in rows:
      row["gpu_view"] = view.get(row["path"])
    out["gpu_view"] = {"device": report.DEFAULT_GPU_SLUG,
                       "batch": GPU_BATCH,
                       "input_shape": [GPU_HW, GPU_HW, 3],
                       "precision": precision, "measured": False}

  out["layers"] = rows
  layer_ok = all(r["check"]["ok"] for r in rows if r["check"] is not None)
  out["ok"] = bool(net_ok and layer_ok)

  out["plot"] = None
  if plot_path:
    with progress.step(f"plotting per-layer speedups to {plot_path}"):
      out["plot"] = str(_plot(out, plot_path))
  out["saved"] = None
  if save_path:
    from escort_jax.checkpoint import save_sparse
    with progress.step(f"saving the sparse model to {save_path}"):
      save_sparse(save_path, sparse)
    out["saved"] = str(save_path)
  out["elapsed_s"] = round(time.perf_counter() - t_start, 1)
  return out


def _plot(result: dict[str, Any], path: str):
  rows = result["layers"]
  labels = [r["layer"] for r in rows]
  if result["on_gpu"]:
    series = {
        "method='auto' (the chosen path)": [
            r.get("times", {}).get("speedup") for r in rows],
        "escort kernel": [r.get("times", {}).get("escort_speedup")
                          for r in rows]}
    title = (f"escort-jax demo: {result['model']} sparse layers on "
             f"{result['device']}, batch {result['batch']}, "
             f"{result['input_shape'][0]}x{result['input_shape'][1]}, "
             f"{result['precision']} precision")
    note = ("Measured: device kernel time per call, dense lax.conv time / "
            "sparse time; > 1x is faster than dense.")
  else:
    view = result["gpu_view"]
    kinds = {r["gpu_view"]["speedup_kind"] for r in rows if r.get("gpu_view")}
    series = {"escort kernel vs dense lax.conv": [
        (r.get("gpu_view") or {}).get("escort_speedup") for r in rows]}
    title = (f"NOT MEASURED: {' / '.join(sorted(kinds))} speedups on "
             f"{view['device']}, batch {view['batch']}, "
             f"{view['input_shape'][0]}x{view['input_shape'][1]}, "
             f"{result['precision']} precision ({result['model']} sparse "
             "layers)")
    note = (f"No GPU here ({result['device']}): these are the tuned plans' "
            "recorded times or the cost model's predictions, not "
            "measurements. Run 'escort-jax demo' on an NVIDIA GPU to measure.")
  return report.plot_speedups(labels, series, path, title=title, note=note)
