"""method="auto": plans, the cost model, and the tuner (on the CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import escort_jax as ej
from escort_jax import dispatch, ops, plans, tune
from escort_jax.conv_geometry import make_geometry


def _layer(seed, shape=(3, 3, 4, 6), density=0.3):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal(shape).astype(np.float32)
  k *= rng.random(shape) < density
  return ej.SparseKernel.from_dense(k)


def _primitives(fn, *args):
  return {e.primitive.name for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns
          } | {e.primitive.name for e in _sub_eqns(jax.make_jaxpr(fn)(*args))}


def _sub_eqns(closed):
  out = []
  for e in closed.jaxpr.eqns:
    for p in e.params.values():
      if hasattr(p, "jaxpr") and hasattr(p.jaxpr, "eqns"):
        out.extend(p.jaxpr.eqns)
        out.extend(_sub_eqns(p))
  return out


def test_auto_on_cpu_is_dense():
  sk = _layer(0)
  x = jnp.ones((1, 5, 5, 4)) + jnp.arange(4.0)
  prims = _primitives(lambda x: ej.sparse_conv(x, sk), x)
  assert "conv_general_dilated" in prims
  assert "pallas_call" not in prims


def test_auto_follows_a_recorded_plan(plan_dir, monkeypatch):
  monkeypatch.setattr(ops, "on_gpu", lambda: True)
  sk = _layer(1)
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 5, 5, 4)),
                  jnp.float32)
  g = make_geometry(x.shape, sk.structure, (1, 1), "SAME", (1, 1), 1)
  key = plans.plan_key(sk.structure.digest, g, jnp.float32, None)
  for method, prim in (("escort", "pallas_call"),
                       ("dense", "conv_general_dilated")):
    plans.record(key, {"method": method,
                       "config": {"rows_per_program": 2, "block_q": 32}},
                 slug=plans.device_slug())
    prims = _primitives(lambda x: ej.sparse_conv(x, sk), x)
    assert prim in prims, (method, prims)
  choice = dispatch.choose(sk.structure, g, jnp.float32, None, "escort",
                           None, True)
  assert choice.source == "plan"
  assert choice.config == ej.KernelConfig(rows_per_program=2, block_q=32)


def test_cost_model_prefers_dense_when_dense_and_escort_when_very_sparse():
  g = make_geometry((32, 28, 28, 128), _layer(2, (3, 3, 128, 128)).structure,
                    (1, 1), "SAME", (1, 1), 1)
  full = 3 * 3 * 128 * 128
  t_dense = dispatch.predicted_seconds(g, full, jnp.float32, "highest")
  assert t_dense["dense"] < t_dense["escort"]
  t_sparse = dispatch.predicted_seconds(g, full // 100, jnp.float32,
                                        "highest")
  assert t_sparse["escort"] < t_sparse["dense"]


@pytest.mark.parametrize("batch, precision, want", [
    # Measured on the H100 (benchmarks/results/2026-11-24T0755-*, T0545-*):
    # res5a_branch2b at its 97.8 % sparsity, float32 input.
    (1, "highest", "escort"),   # escort 12.0 us, cuDNN HIGHEST 136.7 us
    (1, None, "escort"),        # escort 12.0 us, TF32 20.4 us
    (32, "highest", "escort"),  # escort 46.8 us, cuDNN HIGHEST 354.6 us
    (32, None, "dense"),        # escort 46.8 us, TF32 39.7 us
])
def test_cost_model_on_a_measured_layer(batch, precision, want):
  """The latency terms: at batch 1 cuDNN's fp32 convolutions are far
  slower than their FLOPs suggest (the one-rate model picked dense here)."""
  sk = _layer(7, (3, 3, 512, 512), density=0.022)
  g = make_geometry((batch, 7, 7, 512), sk.structure, (1, 1), "SAME",
                    (1, 1), 1)
  t = dispatch.predicted_seconds(g, sk.nnz, jnp.float32, precision)
  assert min(t, key=t.get) == want, t


@pytest.mark.parametrize("dtype, precision, dense_us, want", [
    # caffenet conv4 (groups 2) at batch 1 on the H100 (benchmarks/results/
    # 2026-11-24T2200-*-b1-nonzero-lanes.json): escort 13.0 us (float32)
    # and 13.9 us (bf16) against TF32 cuDNN 87.6 us, fp32 HIGHEST 106.1 us,
    # bf16 cuDNN 25.2 us.
    (jnp.float32, None, 87.6, "escort"),
    (jnp.float32, "highest", 106.1, "escort"),
    (jnp.bfloat16, None, 25.2, None),
])
def test_cost_model_slows_grouped_dense_convolutions(dtype, precision,
                                                     dense_us, want):
  """Grouped (not depthwise) convolutions pay DENSE_GROUPED_FACTOR on the
  dense side: the prediction for caffenet conv4 at batch 1 lands within 2x
  of the measured cuDNN time (it was 2-8x too fast), and the model picks
  escort in float32 as measured, where it had picked TF32 cuDNN."""
  from escort_jax import workload as wl
  layer = wl.find_layers(["caffenet/conv4"])[0]
  sk = ej.SparseKernel.from_dense(wl.make_kernel(layer))
  conv = layer.conv_kwargs()
  g = make_geometry((1, 13, 13, 384), sk.structure, conv["window_strides"],
                    conv["padding"], (1, 1), conv["feature_group_count"])
  t = dispatch.predicted_seconds(g, sk.nnz, dtype, precision)
  assert 0.5 < t["dense"] * 1e6 / dense_us < 2.0, t
  if want is not None:
    assert min(t, key=t.get) == want, t
  key = (jnp.dtype(dtype).name, dispatch.precision_name(precision))
  rate, per_k, fixed = dispatch.DENSE_MODEL[key]
  k = 192 * 9
  assert t["dense"] == pytest.approx(dispatch.DENSE_GROUPED_FACTOR[key][0] * (
      g.flops / rate + k * per_k + fixed))
  # At batch 32 the batch-32 factor; log-linear between.
  g32 = make_geometry((32, 13, 13, 384), sk.structure, conv["window_strides"],
                      conv["padding"], (1, 1), conv["feature_group_count"])
  t32 = dispatch.predicted_seconds(g32, sk.nnz, dtype, precision)
  assert t32["dense"] == pytest.approx(dispatch.DENSE_GROUPED_FACTOR[key][1] *
                                       (g32.flops / rate + k * per_k + fixed))
  f1, f32 = dispatch.DENSE_GROUPED_FACTOR[key]
  assert dispatch.grouped_factor(key, 4) == pytest.approx(
      f1 ** 0.6 * f32 ** 0.4)
  assert dispatch.grouped_factor(key, 256) == pytest.approx(f32)
  # Depthwise (groups = channels) and ungrouped: no factor.
  for shape, groups in (((3, 3, 1, 64), 64), ((3, 3, 64, 64), 1)):
    other = _layer(12, shape, density=0.5)
    g2 = make_geometry((1, 13, 13, 64), other.structure, (1, 1), "SAME",
                       (1, 1), groups)
    t2 = dispatch.predicted_seconds(g2, other.nnz, dtype, precision)
    k2 = shape[2] * 9
    assert t2["dense"] == pytest.approx(g2.flops / rate + k2 * per_k + fixed)


def test_tune_records_a_plan_that_dispatch_finds(plan_dir):
  sk = _layer(3)
  entry = tune.tune_layer(
      (1, 6, 6, 4), sk, candidates=(ej.KernelConfig(2, 32, 4, 1, 1),),
      num_inputs=2, directory=plan_dir)
  assert entry["method"] in ("escort", "dense")
  g = make_geometry((1, 6, 6, 4), sk.structure, (1, 1), "SAME", (1, 1), 1)
  assert set(entry["times_us"]) == {"dense"} | {
      tune.config_label(c) for c in tune.layer_candidates(
          g, 4, (ej.KernelConfig(2, 32, 4, 1, 1),))}
  assert len(entry["times_us"]) == 3  # dense, the candidate, the default
  assert tune.config_label(ej.KernelConfig(2, 32, 4, 1, 1)).startswith(
      "rows_per_program=2,block_q=32,num_warps=4,num_stages=1,unroll=1")
  assert all(t > 0 for t in entry["times_us"].values())
  found = plans.lookup(plans.plan_key(sk.structure.digest, g, jnp.float32,
                                      None))
  assert found == entry


def test_auto_keeps_a_callers_config_only_for_the_path_it_fits(plan_dir):
  """method="auto" with a KernelConfig: kept when escort is chosen, dropped
  (never passed to the vector kernel) when the plan says vector."""
  import json
  from escort_jax.ops import KernelConfig, VectorConfig
  from escort_jax.prune import vector_mask
  from escort_jax.structure import SparseKernel
  rng = np.random.default_rng(0)
  k = rng.standard_normal((3, 3, 16, 32)).astype(np.float32)
  sk = SparseKernel.from_dense(np.where(vector_mask(k, 0.8, 16), k, 0))
  g = make_geometry((2, 8, 8, 16), sk.structure, (1, 1), "SAME", (1, 1), 1)
  key = plans.plan_key(sk.structure.digest, g, jnp.bfloat16, None)
  entry = {"method": "vector", "config_method": "vector",
           "config": {"block_q": 64, "block_k": 32, "num_warps": 4,
                      "num_stages": 2},
           "best_configs": {"escort": {"rows_per_program": 2},
                            "vector": {"block_q": 64, "block_k": 32,
                                       "num_warps": 4, "num_stages": 2}}}
  (plan_dir / "fake-gpu.json").write_text(json.dumps(
      {"device": "fake-gpu", "plans": {key: entry}}))
  mine = KernelConfig(rows_per_program=8)
  c = dispatch.choose(sk.structure, g, jnp.bfloat16, None, "auto", mine,
                      on_gpu=True, slug="fake-gpu")
  assert c.method == "vector" and c.config == VectorConfig(64, 32, 4, 2)
  # An explicit escort call on the same layer takes the plan's best escort
  # config, recorded although the plan went to vector.
  c = dispatch.choose(sk.structure, g, jnp.bfloat16, None, "escort", None,
                      on_gpu=True, slug="fake-gpu")
  assert c.config == KernelConfig(rows_per_program=2)
  # No plan: the cost model decides, and the caller's config survives only
  # if it fits the chosen path.
  c = dispatch.choose(sk.structure, g, jnp.float32, None, "auto", mine,
                      on_gpu=True, slug="fake-gpu")
  assert c.source == "cost-model"
  assert c.config == (mine if c.method == "escort" else None)


def test_default_config_takes_nonzeros_across_lanes_on_small_grids():
  """Under SMALL_GRID_PROGRAMS programs: one row per program, the NHWC store
  and K x BQ = NONZERO_LANES_TILE lanes on 4 warps, BQ by the positions of
  one image (so that a share of the batch gets the whole batch's config),
  except SEVEN_BY_SEVEN_TILE with the output blocks on the fastest grid axis
  at most SEVEN_BY_SEVEN_POSITIONS wide positions per image; large grids
  keep the batch-32 default."""
  c = ops.default_kernel_config(512, 63)   # res5 at batch 1: 512 programs
  assert (c.rows_per_program, c.nhwc_out, c.split, c.q_major) == (
      1, True, 1, True)
  assert (c.block_q, c.num_warps, c.nonzero_lanes) == (32, 2, 64)
  for out_len, batch, tile in ((224, 1, (128, 4, 16)), (77, 1, (128, 4, 16)),
                               (3248, 1, (256, 4, 8)),
                               (4 * 63, 4, (32, 2, 64)),
                               (8 * 77, 8, (128, 4, 16))):
    other = ops.default_kernel_config(16, out_len, 4, batch)
    assert (other.block_q, other.num_warps, other.nonzero_lanes) == tile
    assert other.q_major == (tile == ops.SEVEN_BY_SEVEN_TILE)
  # A 1x1 map (a fully connected layer): BQ the positions of one image,
  # rounded up to a power of two, and TINY_MAP_LANES nonzeros per step.
  for rows, out_len, batch, block_q in ((1000, 1, 1, 1), (4096, 1, 1, 1),
                                        (64, 3, 1, 4), (64, 9, 1, 16),
                                        (64, 2 * 3, 2, 4),
                                        (4096, 32, 32, 1)):
    tiny = ops.default_kernel_config(rows, out_len, 4, batch)
    assert (tiny.rows_per_program, tiny.nhwc_out) == (1, True)
    assert (tiny.block_q, tiny.nonzero_lanes) == (block_q,
                                                   ops.TINY_MAP_LANES)
  big = ops.default_kernel_config(256, 28 * 30 * 32)
  assert big == ops.DEFAULT_CONFIG and big.nonzero_lanes == 0
  # 2-byte inputs: 8 positions per thread on large grids only.
  assert ops.default_kernel_config(256, 28 * 30 * 32, 2) == ops.HALF_CONFIG
  assert ops.default_kernel_config(512, 63, 2) == c


def test_escort_model_follows_the_default_kernel():
  """Small grids (batch 1) are predicted with the nonzero-lanes model and a
  row's nonzeros divided by the default config's lanes; large grids with the
  per-nonzero model."""
  sk = _layer(3, (3, 3, 64, 64), density=0.1)
  for batch, table in ((1, dispatch.ESCORT_LANES_MODEL),
                       (32, dispatch.ESCORT_MODEL)):
    g = make_geometry((batch, 28, 28, 64), sk.structure, (1, 1), "SAME",
                      (1, 1), 1)
    lanes = ops.default_kernel_config(64, g.out_len, 4,
                                      g.batch).nonzero_lanes
    assert bool(lanes) == (batch == 1)
    params, (useful, _, steps) = dispatch.escort_terms(g, sk.nnz,
                                                       jnp.float32)
    rate, bandwidth, per_step, fixed = table["float32"]
    assert (params["rate"], params["per_step"]) == (rate, per_step)
    assert steps == sk.nnz / 64 / max(lanes, 1)
    assert useful == 2.0 * sk.nnz * 28 * 28 * batch
    t = dispatch.predicted_seconds(g, sk.nnz, jnp.float32, None)["escort"]
    np.testing.assert_allclose(
        t, useful / rate + dispatch.escort_terms(g, sk.nnz, jnp.float32)[1][1]
        / bandwidth + steps * per_step + fixed)
