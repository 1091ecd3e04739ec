"""Host-side cost of converting a layer: memory over repeated conversions,
and the time to convert and plan every workload layer at batch 32; plus a
smoke run of benchmarks/compile_cost.py (the GPU compile times are measured
with that script on the device).

Nothing here compiles a kernel except the smoke run (3 small layers).
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
import subprocess
import sys
import time
import tracemalloc

import jax
import numpy as np
import pytest

from escort_jax import SparseKernel, conv_geometry, ops, workload
from escort_jax.conv_geometry import make_geometry

REPO = Path(__file__).resolve().parents[1]
MB = 2**20
BATCH = 32
SHAPE = (3, 3, 256, 256)  # a workload-size kernel (res4-like), HWIO
SPARSITY = 0.97
X_SHAPE = (BATCH, 14, 14, 256)


def _rss_bytes() -> int:
  """The current resident set size (Linux), else the peak (getrusage)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _clear_plan_caches():
  ops.escort_plan.cache_clear()
  conv_geometry.stretched_problem.cache_clear()


def _kernel(seed: int) -> np.ndarray:
  rng = np.random.default_rng([1101, seed])
  size = int(np.prod(SHAPE))
  keep = int(round(size * (1 - SPARSITY)))
  flat = np.zeros(size, np.float32)
  flat[rng.choice(size, keep, replace=False)] = rng.standard_normal(
      keep).astype(np.float32) + 3.0  # never zero
  return flat.reshape(SHAPE)


def _convert_and_plan(kernel: np.ndarray):
  sk = SparseKernel.from_dense(kernel)
  g = make_geometry(X_SHAPE, sk.structure, (1, 1), "SAME", (1, 1), 1)
  plan = ops.escort_plan(sk.structure, g)
  jax.block_until_ready(sk.values)
  return sk, plan


def _growth(step, iterations: int = 100, warmup: int = 5):
  """(tracemalloc growth, RSS growth) in bytes over `iterations` calls of
  step(i), after `warmup` calls."""
  for i in range(warmup):
    step(i)
  gc.collect()
  tracemalloc.start()
  try:
    base_traced, _ = tracemalloc.get_traced_memory()
    base_rss = _rss_bytes()
    for i in range(warmup, warmup + iterations):
      step(i)
    gc.collect()
    traced, _ = tracemalloc.get_traced_memory()
    rss = _rss_bytes()
  finally:
    tracemalloc.stop()
  return traced - base_traced, rss - base_rss


@pytest.mark.parametrize("distinct", [False, True],
                         ids=["same_kernel", "distinct_kernels"])
def test_memory_does_not_grow_over_100_conversions(distinct, capsys):
  """100 conversions + plans of a 3x3x256x256 kernel at 97 % sparsity, with
  the plan caches cleared every time, so that each builds afresh: nothing
  may keep the old kernels, structures or plans alive."""
  kernels = [_kernel(0)] if not distinct else None
  sk0, plan0 = _convert_and_plan(_kernel(0))
  assert sk0.nnz == round(np.prod(SHAPE) * (1 - SPARSITY))
  plan_bytes = sum(a.nbytes for a in (
      plan0.problem.rows, plan0.problem.offsets, plan0.problem.planes,
      plan0.problem.shifts, plan0.forward.offsets, plan0.forward.sources,
      plan0.transposed.offsets, plan0.transposed.sources))
  del sk0, plan0

  def step(i):
    _clear_plan_caches()
    kernel = _kernel(i) if distinct else kernels[0]
    _convert_and_plan(kernel)

  traced, rss = _growth(step)
  with capsys.disabled():
    print(f"\n100 conversions ({'distinct' if distinct else 'same'} "
          f"kernel): traced {traced / MB:+.2f} MB, RSS {rss / MB:+.1f} MB "
          f"(one plan holds {plan_bytes / MB:.2f} MB)")
  # 100 leaked plans would be 100 * plan_bytes (~80 MB) and 100 leaked
  # dense kernels 225 MB.
  assert plan_bytes * 100 > 50 * MB
  assert traced < 10 * MB, f"traced memory grew by {traced / MB:.1f} MB"
  assert rss < 50 * MB, f"RSS grew by {rss / MB:.1f} MB"


def test_plan_cache_hits_do_not_grow_memory():
  """Without clearing: converting the same kernel again hits the plan cache
  (the structure compares by content) and allocates nothing lasting."""
  _clear_plan_caches()
  kernel = _kernel(0)
  _, plan = _convert_and_plan(kernel)

  def step(i):
    _, p = _convert_and_plan(kernel)
    assert p is plan

  traced, rss = _growth(step)
  assert ops.escort_plan.cache_info().currsize == 1
  assert traced < 5 * MB and rss < 50 * MB, (traced / MB, rss / MB)
  _clear_plan_caches()


def test_convert_and_plan_every_workload_layer_at_batch_32(capsys):
  """SparseKernel.from_dense + escort_plan (the numpy metadata of the
  forward and input-gradient kernels), cold, for all 40 layers."""
  _clear_plan_caches()
  rows = []
  for layer in workload.load_layers():
    kernel = workload.make_kernel(layer)
    t = time.perf_counter()
    sk = SparseKernel.from_dense(kernel)
    jax.block_until_ready(sk.values)
    t_convert = time.perf_counter() - t
    kw = layer.conv_kwargs()
    g = make_geometry(layer.input_shape(BATCH), sk.structure,
                      kw["window_strides"], kw["padding"], (1, 1),
                      kw["feature_group_count"])
    t = time.perf_counter()
    plan = ops.escort_plan(sk.structure, g)
    t_plan = time.perf_counter() - t
    # The plan is complete: every nonzero appears once in each packing.
    assert np.sum(plan.forward.sources >= 0) == sk.nnz
    assert np.sum(plan.transposed.sources >= 0) == sk.nnz
    rows.append((layer.name, sk.nnz, t_convert, t_plan))
  _clear_plan_caches()
  assert len(rows) == 40
  worst = max(rows, key=lambda r: r[2] + r[3])
  total = sum(r[2] + r[3] for r in rows)
  with capsys.disabled():
    print(f"\nconvert + plan, 40 layers at batch {BATCH}: total "
          f"{total:.2f} s, max {worst[2] + worst[3]:.3f} s ({worst[0]}: "
          f"convert {worst[2]:.3f} s, plan {worst[3]:.3f} s)")
  for name, nnz, t_convert, t_plan in rows:
    assert t_convert + t_plan < 2.0, (name, nnz, t_convert, t_plan)
  assert total < 20.0


def test_compile_cost_script_smoke(tmp_path):
  """benchmarks/compile_cost.py on 3 layers, images capped at 9x9, with the
  backward pass and one checked run."""
  out = tmp_path / "compile.json"
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  layers = ["caffenet/conv2", "googlenet/inception_3a/5x5",
            "resnet50/res3a_branch2b"]
  proc = subprocess.run(
      [sys.executable, "benchmarks/compile_cost.py", "--out", str(out),
       "--max-hw", "9", "--batch", "2", "--grad", "--run", "--layers",
       *layers], cwd=str(REPO), env=env, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  result = json.loads(out.read_text())
  assert result["backend"] == jax.default_backend()
  assert result["batch"] == 2 and result["max_hw"] == 9
  names = [r["layer"] for r in result["layers"]]
  assert sorted(names) == sorted(layers)
  for r in result["layers"]:
    assert r["in_hw"] <= 9, r
    for key in ("convert_s", "plan_s", "lower_s", "compile_s",
                "grad_lower_s", "grad_compile_s", "first_run_s"):
      assert r[key] > 0, (key, r)
    assert r["total_s"] == pytest.approx(
        r["convert_s"] + r["plan_s"] + r["lower_s"] + r["compile_s"])
    assert r["finite"] and r["rel_err"] < 1e-5, r
    assert r["nnz"] == workload.get_layer(r["layer"]).nnz()
  assert result["max_total_s"] == max(r["total_s"] for r in result["layers"])
  assert result["max_layer"] in names
  # The per-layer lines and the max are printed.
  assert "max per layer:" in proc.stdout
  for name in layers:
    assert name in proc.stdout
