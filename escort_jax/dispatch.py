"""Which path runs a sparse_conv call: method="auto" and its cost model.

Order of authority:
  1. an explicit method ("escort", "vector" or "dense") and config from the
     caller;
  2. a tuned plan for (structure, geometry, dtype, precision) on this device
     (escort_jax.plans, written by escort_jax.tune);
  3. the cost model below.

The cost model is fitted to H100 measurements of 2026-11-24 (below): a
time per path of a throughput term and latency terms, so that it holds at
batch 1, where a layer is a few microseconds of serial work, as at batch
32. The vector kernel's model (tensor cores) is fitted to the H100 rows of
benchmarks/results/*vector16*. On other backends "auto" is always "dense":
XLA's CPU convolution is far faster than the Pallas interpreter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import jax
import jax.numpy as jnp

from escort_jax import plans
from escort_jax.conv_geometry import (ConvGeometry,
                                      structure_vector_width)
from pallas_kernels.vector_sparse_conv import MIN_DOT, MIN_VECTOR_WIDTH

# Both models below are least-squares fits (relative error) to the 156 escort
# rows of the 39 pruned layers at batch 1 (benchmarks/results/
# 2026-11-24T0755-*-b1-retuned.json) and batch 32 (2026-11-24T0545-*.json)
# and to the dense baselines timed beside them; fitted on two networks,
# they predict the third with a median error of 8-16 %.
#
# Dense lax.conv (cuDNN): flops / rate + k * per_k + fixed, where k is the
# reduction length (input channels per group x kernel height x width): a
# small grid runs each output tile's k-long product serially. Median error
# 7-11 % (the one-rate model it replaces, 52-65 %: at batch 1 it made fp32
# HIGHEST cuDNN 10-20x too fast, and picked dense on 27 of 39 layers where
# escort was faster).
DENSE_MODEL = {  # (dtype, precision): (FLOP/s, s per k, s)
    ("float32", "highest"): (53.8e12, 24.9e-9, 7.5e-6),
    ("float32", None): (310e12, 2.27e-9, 6.4e-6),
    ("bfloat16", None): (585e12, 1.09e-9, 6.5e-6),
    ("float16", None): (585e12, 1.09e-9, 6.5e-6),
}
# Grouped convolutions (1 < groups < input channels) ran slower than the
# model above predicts, by these factors at batch 1 and at batch 32: the
# geometric means of measured over predicted on caffenet conv2, conv4 and
# conv5 (groups 2; benchmarks/results/*T2200*-b1-nonzero-lanes.json,
# *T1705*, *T1929*), where the ungrouped layers' ratios have geometric means
# of 1.00-1.09; at batch 32 fp32 HIGHEST the three ratios straddle 1
# (0.7-2.2), so no factor there. Between the two batches the factor is
# interpolated in log(batch). Without it the model picked TF32 cuDNN for
# CaffeNet's conv4 and conv5 at batch 1 (88 µs measured, 11 predicted) over
# escort (13 µs).
# Depthwise convolutions (groups = channels) were not measured: no factor.
DENSE_GROUPED_FACTOR = {  # (dtype, precision): (batch 1, batch 32)
    ("float32", "highest"): (1.87, 1.0),
    ("float32", None): (7.37, 3.31),
    ("bfloat16", None): (2.93, 2.68),
    ("float16", None): (2.93, 2.68),
}


def grouped_factor(key: tuple[str, str | None], batch: int) -> float:
  """DENSE_GROUPED_FACTOR[key] at this batch (log-linear in the batch
  between 1 and 32, constant outside)."""
  at_1, at_32 = DENSE_GROUPED_FACTOR[key]
  t = min(max(math.log(max(batch, 1)) / math.log(32), 0.0), 1.0)
  return math.exp((1 - t) * math.log(at_1) + t * math.log(at_32))


# Escort path (input pass, kernel, output): useful FLOPs / rate + the
# layout passes' bytes / bandwidth + the longest serial loop (nonzeros per
# output channel) x latency + fixed. Median error 9 % (float32), 5 %
# (bfloat16).
ESCORT_MODEL = {  # dtype: (FLOP/s, bytes/s, s per row nonzero, s)
    "float32": (7.46e12, 1.60e12, 75e-9, 3.6e-6),
    "bfloat16": (7.78e12, 1.47e12, 81e-9, 4.1e-6),
    "float16": (7.78e12, 1.47e12, 81e-9, 4.1e-6),
}
# The same terms for small grids, where the default config is the
# nonzero-lanes kernel (steps: a row's nonzeros / lanes), fitted with
# non-negative least squares of the relative error to the 38 small-grid
# layers at batch 1 run with no plans (benchmarks/fit_cost_model.py): on
# benchmarks/results/2026-11-24T2217-*-b1-defaults-nonzero-lanes.json the
# median error was 3.8 % (float32) and 4.1 % (bfloat16), where the model
# above had 48 % and 47 % and picked the slower of escort and dense on 11
# and 17 of the 38. Refitted after the 7x7 tile (ops.SEVEN_BY_SEVEN_TILE) to
# the rows of benchmarks/results/2026-11-25T1102-*-default-tiles-main.json,
# with *-wide.json's rows for the five 7x7 layers: median error 3.0 % and
# 3.2 % (the fit above had 3.3 % and 4.8 % there); against the measured
# dense times it picks the slower path on 1 of 38 float32 layers (was 2)
# and none in bfloat16. The layout bytes get no weight of their own: at
# batch 1 they track the FLOPs, and the fit put them into the rate and the
# fixed term.
ESCORT_LANES_MODEL = {  # dtype: (FLOP/s, bytes/s, s per step, s)
    "float32": (3.30e12, math.inf, 232e-9, 3.72e-6),
    "bfloat16": (2.83e12, math.inf, 262e-9, 3.68e-6),
    "float16": (2.83e12, math.inf, 262e-9, 3.68e-6),
}
# The vector path's time, input pass included, fitted to the 117 bf16 rows
# of benchmarks/results/2026-11-24T0455-*-vector16-*.json (39 layers at 3
# sparsities, batch 32, V=16; median error 5.5 %): useful FLOPs at 85 TFLOP/s
# + input and output bytes at 1.78 TB/s + 6.4 µs. float32 (full-precision
# products): 9.6 TFLOP/s, the median over the 39 float32 rows of
# benchmarks/results/2026-11-24T0730-*-vector16-f32.json with the same bytes
# and fixed terms (median error 6.6 %; the guess of 8 had 14 %).
VECTOR_FLOPS = {"float32": 9.6e12, "bfloat16": 85e12, "float16": 85e12}
VECTOR_BYTES_PER_S = 1.78e12
VECTOR_FIXED_S = 6.4e-6


@dataclasses.dataclass(frozen=True)
class Choice:
  method: str  # "escort", "vector" or "dense"
  config: object | None  # KernelConfig (escort) or VectorConfig (vector)
  source: str  # "caller", "plan", "cost-model" or "default"


_RECORDERS: list[list[Choice]] = []


@contextlib.contextmanager
def recording() -> Iterator[list[Choice]]:
  """Collects, in call order, the Choice of every sparse_conv traced or run
  inside the block (escort_jax.convert.dense_fallback asks which layers run
  dense)."""
  log: list[Choice] = []
  _RECORDERS.append(log)
  try:
    yield log
  finally:
    _RECORDERS.pop()


def record(choice: Choice) -> Choice:
  """Passes `choice` to the innermost active recording(), if any."""
  if _RECORDERS:
    _RECORDERS[-1].append(choice)
  return choice


def precision_name(precision) -> str | None:
  """"highest" for full fp32 (explicitly, or by jax.default_matmul_precision),
  else the precision's name, or None for the default."""
  if precision is None:
    default = jax.config.jax_default_matmul_precision
    return "highest" if default in ("highest", "float32") else None
  name = getattr(precision, "name", str(precision)).lower()
  return "highest" if "highest" in name or "float32" in name else name


def escort_terms(geometry: ConvGeometry, nnz: int, dtype
                 ) -> tuple[dict[str, float], tuple[float, float, float]]:
  """The escort path's model for the default config of this geometry:
  (parameters, (useful, layout_bytes, steps)), where the time is
  useful / rate + layout_bytes / bandwidth + steps x per_step + fixed:
  useful FLOPs, the layout passes' bytes, and a program's serial steps (a
  row's nonzeros, divided by the lanes that take them at once on small
  grids)."""
  from escort_jax.ops import default_kernel_config  # ops imports us
  g = geometry
  name = jnp.dtype(dtype).name
  itemsize = jnp.dtype(dtype).itemsize
  useful = 2.0 * nnz * g.out_h * g.out_w * g.batch
  layout_bytes = 2 * itemsize * (g.batch * g.in_h * g.in_w * g.in_channels +
                                 g.batch * g.out_h * g.out_w * g.out_channels)
  lanes = default_kernel_config(g.out_channels, g.out_len, itemsize,
                                g.batch).nonzero_lanes
  steps = nnz / g.out_channels / max(lanes, 1)
  table = ESCORT_LANES_MODEL if lanes else ESCORT_MODEL
  rate, bandwidth, per_step, fixed = table.get(name, table["float32"])
  return (dict(rate=rate, bandwidth=bandwidth, per_step=per_step,
               fixed=fixed), (useful, layout_bytes, steps))


def predicted_seconds(geometry: ConvGeometry, nnz: int, dtype,
                      precision, vector_width: int = 1) -> dict[str, float]:
  """Cost-model times of the escort, dense and (for vector-sparse
  structures, vector_width >= MIN_VECTOR_WIDTH) vector paths, in seconds."""
  g = geometry
  name = jnp.dtype(dtype).name
  p, (useful, layout_bytes, steps) = escort_terms(g, nnz, dtype)
  times = {"escort": (useful / p["rate"] + layout_bytes / p["bandwidth"] +
                      steps * p["per_step"] + p["fixed"])}
  if vector_width >= MIN_VECTOR_WIDTH:
    # Widths below the product's minimum width still pay for all of it.
    waste = max(1.0, MIN_DOT / vector_width)
    times["vector"] = (useful * waste / VECTOR_FLOPS.get(name, 8e12) +
                       layout_bytes / 2 / VECTOR_BYTES_PER_S + VECTOR_FIXED_S)
  key = (name, precision_name(precision))
  if key not in DENSE_MODEL:
    key = (name, None) if (name, None) in DENSE_MODEL else (
        "float32", "highest")
  rate, per_k, fixed = DENSE_MODEL[key]
  k = g.in_channels // g.groups * g.kernel_h * g.kernel_w
  times["dense"] = g.flops / rate + k * per_k + fixed
  if 1 < g.groups < g.in_channels:
    times["dense"] *= grouped_factor(key, g.batch)
  return times


def choose(structure, geometry: ConvGeometry, dtype, precision, method: str,
           config, on_gpu: bool, slug: str | None = None,
           vector_width: int | None = None) -> Choice:
  """Resolves method="auto" and a missing config (see module docstring).

  `slug` names the GPU whose plans to consult (plans.device_slug(); default:
  this process's device), so a CPU can say what a GPU would run.
  `vector_width` is the structure's V on this geometry (1: not vector-sparse;
  None: found from the structure); the cost model considers the vector path
  only when it is MIN_VECTOR_WIDTH or more. A caller's config is kept for
  whichever sparse path is chosen if it is that path's config class.
  """
  if method != "auto":
    if method in ("escort", "vector") and config is None:
      entry = _plan_entry(structure, geometry, dtype, precision, slug)
      if entry is not None and entry.get("config"):
        cfg = plans.config_from_entry(entry, method)
        if cfg is not None:
          return Choice(method, cfg, "plan")
    return Choice(method, config, "caller")
  if not on_gpu:
    return Choice("dense", None, "cost-model")
  entry = _plan_entry(structure, geometry, dtype, precision, slug)
  if entry is not None:
    chosen = entry["method"]
    cfg = _fitting(config, chosen)
    if cfg is None and entry.get("config"):
      cfg = plans.config_from_entry(entry, chosen)
    return Choice(chosen, cfg, "plan")
  if vector_width is None:
    vector_width = structure_vector_width(structure, geometry)
  t = predicted_seconds(geometry, structure.nnz, dtype, precision,
                        vector_width)
  best = min(t, key=t.get)
  return Choice(best, _fitting(config, best), "cost-model")


def choose_framed(structure, geometry: ConvGeometry, dtype, precision,
                  config, slug: str | None = None) -> Choice:
  """The vector config of a call on a frame (escort_jax.frames): the
  caller's; else the plan's config tuned on frames (tune_layer's "framed"),
  else its NHWC vector config (the same kernel with another output store);
  else None, the structure's default. The method is always "vector"."""
  if config is not None:
    return Choice("vector", config, "caller")
  entry = _plan_entry(structure, geometry, dtype, precision, slug)
  if entry is not None:
    for method in ("framed", "vector"):
      cfg = plans.config_from_entry(entry, method)
      if cfg is not None:
        return Choice("vector", cfg, "plan")
  return Choice("vector", None, "default")


def _plan_entry(structure, geometry, dtype, precision, slug):
  """The recorded plan of this call on GPU `slug`, or None."""
  return plans.lookup(plans.plan_key(structure.digest, geometry, dtype,
                                     precision_name(precision)), slug)


def _fitting(config, method: str):
  """`config` if it belongs to `method`'s kernel, else None."""
  cls = plans.config_class(method)
  return config if cls is not None and isinstance(config, cls) else None
