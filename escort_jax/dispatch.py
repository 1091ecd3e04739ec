"""Which path runs a sparse_conv call: method="auto" and its cost model.

Order of authority:
  1. an explicit method ("escort", "vector" or "dense") and config from the
     caller;
  2. a tuned plan for (structure, geometry, dtype, precision) on this device
     (escort_jax.plans, written by escort_jax.tune);
  3. the cost model below.

The cost model is fitted to H100 measurements of 2026-11-24
(benchmarks/results/*tile-sweep*): the escort kernels sustain about 4.5
TFLOP/s of useful work, dense cuDNN about 42 (fp32 HIGHEST), 130 (TF32) and
400 (bf16) TFLOP/s. The vector kernel's model (tensor cores) is fitted to
the H100 rows of benchmarks/results/*vector16*. On other backends "auto" is
always "dense": XLA's CPU convolution is far faster than the Pallas
interpreter.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp

from escort_jax import plans
from escort_jax.conv_geometry import (ConvGeometry,
                                      structure_vector_width)
from pallas_kernels.vector_sparse_conv import MIN_DOT, MIN_VECTOR_WIDTH

# Useful FLOP/s of each path, by input dtype (escort) or dtype and precision
# (dense), and the fixed cost of the layout passes of the escort path.
ESCORT_FLOPS = {"float32": 4.5e12, "bfloat16": 5.0e12, "float16": 5.0e12}
DENSE_FLOPS = {("float32", "highest"): 42e12, ("float32", None): 130e12,
               ("bfloat16", None): 400e12, ("float16", None): 400e12}
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
LAYOUT_BYTES_PER_S = 1.5e12  # the escort path: a pass in, one out
LAUNCH_S = 3e-6


@dataclasses.dataclass(frozen=True)
class Choice:
  method: str  # "escort", "vector" or "dense"
  config: object | None  # KernelConfig (escort) or VectorConfig (vector)
  source: str  # "caller", "plan" or "cost-model"


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


def predicted_seconds(geometry: ConvGeometry, nnz: int, dtype,
                      precision, vector_width: int = 1) -> dict[str, float]:
  """Cost-model times of the escort, dense and (for vector-sparse
  structures, vector_width >= MIN_VECTOR_WIDTH) vector paths, in seconds."""
  g = geometry
  name = jnp.dtype(dtype).name
  useful = 2.0 * nnz * g.out_h * g.out_w * g.batch
  itemsize = jnp.dtype(dtype).itemsize
  layout_bytes = 2 * itemsize * (g.batch * g.in_h * g.in_w * g.in_channels +
                                 g.batch * g.out_h * g.out_w * g.out_channels)
  layout = layout_bytes / LAYOUT_BYTES_PER_S + 2 * LAUNCH_S
  times = {"escort": useful / ESCORT_FLOPS.get(name, 4.5e12) + layout}
  if vector_width >= MIN_VECTOR_WIDTH:
    # Widths below the product's minimum width still pay for all of it.
    waste = max(1.0, MIN_DOT / vector_width)
    times["vector"] = (useful * waste / VECTOR_FLOPS.get(name, 8e12) +
                       layout_bytes / 2 / VECTOR_BYTES_PER_S + VECTOR_FIXED_S)
  dense_rate = DENSE_FLOPS.get((name, precision_name(precision)),
                               DENSE_FLOPS.get((name, None), 42e12))
  times["dense"] = g.flops / dense_rate + LAUNCH_S
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
  key = plans.plan_key(structure.digest, geometry, dtype,
                       precision_name(precision))
  if method != "auto":
    if method in ("escort", "vector") and config is None:
      entry = plans.lookup(key, slug)
      if entry is not None and entry.get("config"):
        cfg = plans.config_from_entry(entry, method)
        if cfg is not None:
          return Choice(method, cfg, "plan")
    return Choice(method, config, "caller")
  if not on_gpu:
    return Choice("dense", None, "cost-model")
  entry = plans.lookup(key, slug)
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


def _fitting(config, method: str):
  """`config` if it belongs to `method`'s kernel, else None."""
  cls = plans.config_class(method)
  return config if cls is not None and isinstance(config, cls) else None
