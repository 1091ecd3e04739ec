"""escort_jax.report.choose_path (what `escort-jax inspect` shows) on
vector-sparse layers: the vector path's plans and cost-model times, and the
speedup of whichever sparse path is chosen (CPU, as on an assumed GPU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import dispatch, plans, report, tune
from escort_jax.conv_geometry import make_geometry
from escort_jax.ops import KernelConfig, VectorConfig, structure_vector_width
from escort_jax.prune import vector_mask
from escort_jax.structure import SparseKernel

SLUG = "test-gpu"
X_SHAPE = (8, 16, 16, 32)


def _layer(v=16, sparsity=0.9, seed=0):
  """(structure, geometry) of a vector-sparse (v) 3x3 conv, 32 -> 64."""
  k = np.random.default_rng(seed).standard_normal((3, 3, 32, 64)).astype(
      np.float32)
  if v:
    k = k * vector_mask(k, sparsity, v)
  else:
    k = k * (np.random.default_rng(seed + 1).random(k.shape) > sparsity)
  sk = SparseKernel.from_dense(k)
  g = make_geometry(X_SHAPE, sk.structure, (1, 1), "SAME", (1, 1), 1)
  return sk.structure, g


def _record(structure, g, times, method, config_method="vector"):
  key = plans.plan_key(structure.digest, g, jnp.float32, None)
  plans.record(key, {"method": method, "config": {},
                     "config_method": config_method, "times_us": times,
                     "device": "Test GPU", "date": "2026-01-01"},
               slug=SLUG)


def test_recorded_vector_plan(plan_dir):
  del plan_dir
  structure, g = _layer()
  _record(structure, g, {
      "dense": 100.0, tune.time_key("escort", KernelConfig()): 80.0,
      tune.time_key("escort", KernelConfig(2, 32, 4, 1, 1)): 60.0,
      tune.time_key("vector", VectorConfig()): 25.0,
      tune.time_key("vector", VectorConfig(32, 16, 4, 2)): float("nan")},
          "vector")
  c = report.choose_path(structure, g, "float32", gpu_slug=SLUG)
  assert (c["method"], c["source"], c["speedup_kind"]) == (
      "vector", "plan", "recorded")
  assert c["vector_width"] == 16
  # Vector times are the vector path's, not the escort kernel's.
  assert (c["escort_us"], c["vector_us"], c["dense_us"]) == (60.0, 25.0,
                                                             100.0)
  assert c["escort_speedup"] == pytest.approx(100 / 60)
  assert c["vector_speedup"] == pytest.approx(4.0)
  assert c["speedup"] == pytest.approx(4.0)  # of the chosen path
  assert "vector 25.0 µs" in c["reason"] and "escort 60.0 µs" in c["reason"]


def test_recorded_dense_and_escort_plans(plan_dir):
  del plan_dir
  structure, g = _layer(seed=3)
  _record(structure, g, {"dense": 10.0, "rows_per_program=4": 20.0},
          "dense", "escort")
  c = report.choose_path(structure, g, "float32", gpu_slug=SLUG)
  assert c["method"] == "dense" and c["speedup"] == 1.0
  assert c["vector_us"] is None and c["vector_speedup"] is None
  structure, g = _layer(v=0, seed=4)
  _record(structure, g, {"dense": 30.0, "rows_per_program=4": 20.0},
          "escort", "escort")
  c = report.choose_path(structure, g, "float32", gpu_slug=SLUG)
  assert c["method"] == "escort" and c["speedup"] == pytest.approx(1.5)
  assert c["vector_width"] == 1


def test_cost_model_weighs_the_vector_path(plan_dir):
  """No plan: the cost model's times, the vector path's included, with the
  structure's vector width passed to dispatch."""
  del plan_dir
  structure, g = _layer(seed=5)
  v = structure_vector_width(structure, g)
  assert v == 16
  c = report.choose_path(structure, g, "bfloat16", gpu_slug=SLUG)
  t = dispatch.predicted_seconds(g, structure.nnz, jnp.bfloat16, None, v)
  assert c["source"] == "cost-model" and c["speedup_kind"] == "predicted"
  assert c["method"] == min(t, key=t.get)
  for path in ("escort", "vector", "dense"):
    assert c[f"{path}_us"] == pytest.approx(t[path] * 1e6)
  assert c["speedup"] == pytest.approx(t["dense"] / t[c["method"]])
  # A caller's method="vector": the speedup is the vector path's.
  c = report.choose_path(structure, g, "bfloat16", method="vector",
                         gpu_slug=SLUG)
  assert c["method"] == "vector"
  assert c["speedup"] == pytest.approx(t["dense"] / t["vector"])
  # Unstructured: no vector time.
  structure, g = _layer(v=0, seed=6)
  c = report.choose_path(structure, g, "bfloat16", gpu_slug=SLUG)
  assert c["vector_width"] == 1 and c["vector_us"] is None
  assert c["method"] in ("escort", "dense")


def test_off_gpu():
  """On the CPU, without an assumed GPU: the caller's method, no times."""
  if jax.default_backend() == "gpu":
    pytest.skip("decides as on this GPU")
  structure, g = _layer(seed=7)
  c = report.choose_path(structure, g, "float32", method="vector")
  assert (c["method"], c["source"]) == ("vector", "caller")
  assert c["speedup"] is None and c["vector_us"] is None
  assert c["vector_width"] == 1
