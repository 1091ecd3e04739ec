"""The tuner on vector-sparse layers: the vector kernel's candidates are
timed beside the escort kernel's and dense, and the plan it records says
which kernel its config belongs to (on the CPU)."""

import dataclasses

import chex
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

import escort_jax as ej
from escort_jax import bench, convert, dispatch, ops, plans, tune
from escort_jax.nnx import SparseConv
from escort_jax.conv_geometry import make_geometry
from escort_jax.ops import KernelConfig, VectorConfig
from tests.conftest import random_vector_kernel

X_SHAPE = (1, 6, 6, 4)
ESCORT = (KernelConfig(2, 32, 4, 1, 1), KernelConfig(4, 32, 4, 1, 1))
VECTOR = (VectorConfig(32, 16, 4, 2), VectorConfig(16, 16, 4, 2))


def _vector_kernel(seed=0, shape=(3, 3, 4, 16), v=8, sparsity=0.6):
  return ej.SparseKernel.from_dense(random_vector_kernel(
      np.random.default_rng(seed), shape, sparsity, v), vector_width=v)


def _unstructured_kernel(seed=0, shape=(3, 3, 4, 16)):
  rng = np.random.default_rng(seed)
  k = rng.standard_normal(shape).astype(np.float32)
  return ej.SparseKernel.from_dense(k * (rng.random(shape) < 0.4))


# What the layer's own default config (tune.layer_candidates: timed after
# the escort candidates) takes in the fake timings: it never wins there.
SLOW_DEFAULT = 999.0


def _fake_times(monkeypatch, times):
  """device_time_us returns `times` in call order (dense, escort
  candidates, the layer's default config, vector candidates) without
  running anything (the real route is test_real_timing_of_a_vector_layer's)."""
  queue = list(times)

  def fake(fn, inputs, **kwargs):
    del fn, inputs, kwargs
    return bench.Timing(median_us=queue.pop(0), spread_us=0.0,
                        samples_us=[], timer=bench.TIMER_CPU)

  monkeypatch.setattr(bench, "device_time_us", fake)
  return queue


def _key(sk, dtype=jnp.float32):
  g = make_geometry(X_SHAPE, sk.structure, (1, 1), "SAME", (1, 1), 1)
  return g, plans.plan_key(sk.structure.digest, g, dtype, None)


def test_default_vector_candidates():
  assert len(tune.DEFAULT_VECTOR_CANDIDATES) >= 3
  for c in tune.DEFAULT_VECTOR_CANDIDATES:
    assert isinstance(c, VectorConfig)
    assert c.block_q >= 16 and c.block_q & (c.block_q - 1) == 0
    assert c.block_k % 16 == 0
  assert VectorConfig() in tune.DEFAULT_VECTOR_CANDIDATES
  assert tune.time_key("vector", VectorConfig(64, 32, 4, 2)) == (
      "vector:block_q=64,block_k=32,num_warps=4,num_stages=2,prefetch=0")
  assert tune.time_key("escort", ESCORT[0]) == tune.config_label(ESCORT[0])


def test_vector_wins_and_dispatch_follows(plan_dir, monkeypatch):
  sk = _vector_kernel()
  # dense, escort x 2, the default, vector x 2, then vector x 2 on a frame.
  queue = _fake_times(monkeypatch,
                      [100.0, 50.0, 40.0, SLOW_DEFAULT, 30.0, 10.0, 7.0,
                       9.0])
  entry = tune.tune_layer(X_SHAPE, sk, candidates=ESCORT,
                          vector_candidates=VECTOR, num_inputs=1,
                          directory=plan_dir)
  assert not queue  # every candidate was timed
  assert entry["method"] == "vector" and entry["config_method"] == "vector"
  assert entry["vector_width"] == 8
  assert entry["config"] == {"block_q": 16, "block_k": 16, "num_warps": 4,
                             "num_stages": 2, "prefetch": 0}
  assert entry["best_configs"]["escort"]["rows_per_program"] == 4
  g, _ = _key(sk)
  assert set(entry["times_us"]) == {"dense"} | {
      tune.time_key("escort", c)
      for c in tune.layer_candidates(g, 4, ESCORT)} | {
          tune.time_key(m, c) for c in VECTOR for m in ("vector", "framed")}
  assert plans.config_from_entry(entry) == VECTOR[1]
  # On a frame another config won: it is recorded apart, never as the
  # layer's method (a frame's time leaves out the input's layout pass).
  assert plans.config_from_entry(entry, "framed") == VECTOR[0]
  # The best config of the kernel that lost is kept too (best_configs).
  assert plans.config_from_entry(entry, "escort") == ESCORT[1]
  g, key = _key(sk)
  assert plans.lookup(key) == entry
  # method="auto" on a GPU follows the plan: the vector kernel, its config.
  choice = dispatch.choose(sk.structure, g, jnp.float32, None, "auto", None,
                           True)
  assert (choice.method, choice.config, choice.source) == (
      "vector", VECTOR[1], "plan")
  choice = dispatch.choose(sk.structure, g, jnp.float32, None, "vector",
                           None, True)
  assert (choice.config, choice.source) == (VECTOR[1], "plan")
  # A call on a frame takes the config tuned on frames, the caller's first.
  choice = dispatch.choose_framed(sk.structure, g, jnp.float32, None, None)
  assert (choice.method, choice.config, choice.source) == (
      "vector", VECTOR[0], "plan")
  assert dispatch.choose_framed(sk.structure, g, jnp.float32, None,
                                VECTOR[1]).config == VECTOR[1]
  x = jnp.asarray(np.random.default_rng(3).standard_normal(X_SHAPE),
                  jnp.float32)
  with dispatch.recording() as log:
    y = ej.sparse_conv(ej.to_frame(x, 1), sk, method="vector")
  assert [(c.config, c.source) for c in log] == [(VECTOR[0], "plan")]
  chex.assert_trees_all_close(
      ej.from_frame(y), ops.sparse_conv(x, sk, method="dense",
                                        precision=jax.lax.Precision.HIGHEST),
      rtol=1e-4, atol=1e-4)


def test_dense_wins_config_of_the_faster_sparse_kernel(plan_dir,
                                                       monkeypatch):
  sk = _vector_kernel(seed=1)
  _fake_times(monkeypatch, [1.0, 20.0, 30.0, SLOW_DEFAULT, 40.0, 50.0,
                            60.0, 50.0])
  entry = tune.tune_layer(X_SHAPE, sk, candidates=ESCORT,
                          vector_candidates=VECTOR, num_inputs=1,
                          directory=plan_dir)
  assert entry["method"] == "dense" and entry["config_method"] == "escort"
  assert plans.config_from_entry(entry, "escort") == ESCORT[0]
  assert plans.config_from_entry(entry, "vector") == VECTOR[0]
  assert entry["best_configs"]["vector"] == {
      "block_q": 32, "block_k": 16, "num_warps": 4, "num_stages": 2,
      "prefetch": 0}
  assert plans.config_from_entry(entry, "framed") == VECTOR[1]


def test_a_layer_that_reads_no_frame_times_no_framed_candidate(
    plan_dir, monkeypatch):
  """A strided layer cannot read a frame: its vector candidates are timed
  on NHWC only, and a framed call would fall back to its vector config."""
  sk = _vector_kernel(seed=4)
  queue = _fake_times(monkeypatch, [100.0, 50.0, 40.0, SLOW_DEFAULT, 30.0,
                                    10.0, 1.0])
  entry = tune.tune_layer((1, 14, 14, 4), sk, (2, 2), candidates=ESCORT,
                          vector_candidates=VECTOR, num_inputs=1,
                          directory=plan_dir)
  assert queue == [1.0]
  assert "framed" not in entry["best_configs"]
  assert not any(k.startswith(tune.FRAMED_PREFIX) for k in entry["times_us"])
  assert plans.config_from_entry(entry, "framed") is None


def test_a_framed_call_without_a_framed_plan_takes_the_vector_config(
    plan_dir):
  """Plans tuned before frames existed have no "framed" config: a call on a
  frame then runs the layer's NHWC vector config, else the default."""
  sk = _vector_kernel(seed=5)
  g, key = _key(sk)
  assert dispatch.choose_framed(sk.structure, g, jnp.float32, None,
                                None).source == "default"
  plans.record(key, {"method": "vector", "config_method": "vector",
                     "config": dataclasses.asdict(VECTOR[1])},
               directory=plan_dir)
  choice = dispatch.choose_framed(sk.structure, g, jnp.float32, None, None)
  assert (choice.config, choice.source) == (VECTOR[1], "plan")


def test_unstructured_layer_times_no_vector_kernel(plan_dir, monkeypatch):
  sk = _unstructured_kernel()
  queue = _fake_times(monkeypatch, [100.0, 50.0, 40.0, SLOW_DEFAULT, 1.0])
  entry = tune.tune_layer(X_SHAPE, sk, candidates=ESCORT,
                          vector_candidates=VECTOR, num_inputs=1,
                          directory=plan_dir)
  assert queue == [1.0]  # no vector candidate was timed
  assert entry["vector_width"] == 1
  assert entry["method"] == "escort" and entry["config_method"] == "escort"
  assert "vector" not in entry["best_configs"]
  assert plans.config_from_entry(entry) == ESCORT[1]


def test_real_timing_of_a_vector_layer(plan_dir):
  """No fakes: every candidate runs (Pallas interpreter) and is timed."""
  sk = _vector_kernel(seed=2, v=16)
  entry = tune.tune_layer(X_SHAPE, sk, candidates=ESCORT[:1],
                          vector_candidates=VECTOR[:1], num_inputs=2,
                          directory=plan_dir)
  assert entry["vector_width"] == 16
  assert all(t > 0 for t in entry["times_us"].values())
  assert tune.time_key("vector", VECTOR[0]) in entry["times_us"]
  assert entry["config_method"] in ("escort", "vector")
  cfg = plans.config_from_entry(entry, entry["config_method"])
  assert cfg in (ESCORT[0], VECTOR[0])
  # The plan's method and config run through sparse_conv as recorded.
  x = jnp.asarray(np.random.default_rng(0).standard_normal(X_SHAPE),
                  jnp.float32)
  y = ej.sparse_conv(x, sk, method=entry["config_method"], config=cfg)
  ref = ops.sparse_conv(x, sk, method="dense",
                        precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


def test_best_times():
  """The fastest recorded time per kernel; NaN for a kernel with none."""
  entry = {"times_us": {
      "dense": 30.0, tune.time_key("escort", ESCORT[0]): 20.0,
      tune.time_key("escort", ESCORT[1]): 25.0,
      tune.time_key("vector", VECTOR[0]): float("nan"),  # failed
      tune.time_key("vector", VECTOR[1]): 12.0,
      tune.time_key("framed", VECTOR[1]): 9.0}}
  assert tune.best_times(entry) == {"escort": 20.0, "vector": 12.0,
                                    "dense": 30.0, "framed": 9.0}
  plain = tune.best_times({"times_us": {"dense": 5.0,
                                        tune.config_label(ESCORT[0]): 7.0}})
  assert plain["escort"] == 7.0 and plain["dense"] == 5.0
  assert np.isnan(plain["vector"])
  assert all(np.isnan(t) for t in tune.best_times({}).values())


def test_candidate_sets():
  assert tune.CANDIDATE_SETS["all"] == (tune.DEFAULT_CANDIDATES,
                                        tune.DEFAULT_VECTOR_CANDIDATES)
  assert tune.CANDIDATE_SETS["vector"] == ((KernelConfig(),),
                                           tune.DEFAULT_VECTOR_CANDIDATES)
  assert tune.CANDIDATE_SETS["escort"] == (tune.DEFAULT_CANDIDATES, ())
  assert tune.CANDIDATE_SETS["layer"] == ((), ())
  small, vector = tune.CANDIDATE_SETS["small-grid"]
  assert small and vector == () and set(small) < set(tune.DEFAULT_CANDIDATES)
  assert all(c.rows_per_program == 1 for c in small)


class _TwoLayers(nnx.Module):
  """A 3x3 escort layer called twice (one shape), then a strided one."""

  def __init__(self, rngs):
    self.a = SparseConv(4, 4, (3, 3), sparsity=0.6, method="escort",
                        rngs=rngs)
    self.b = SparseConv(4, 8, (3, 3), strides=2, padding="VALID",
                        sparsity=0.7, method="escort", rngs=rngs)

  def __call__(self, x):
    return self.b(self.a(self.a(x)))


def _probe_sources(model, x, precision=None):
  with jax.default_matmul_precision(precision):
    calls = convert.probe_calls(model, x)
  return {path: [(ch.source, ch.config) for c in cs for ch in c.choices]
          for path, cs in calls.items()}


def test_tune_model_plans_are_the_ones_its_calls_look_up(plan_dir,
                                                         monkeypatch):
  model = _TwoLayers(nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((2, 9, 9, 4), jnp.float32)
  # Per tuned (layer, shape): dense, then the candidates; the second wins.
  queue = _fake_times(monkeypatch, [100.0, 50.0, 20.0, SLOW_DEFAULT] * 2)
  seen = []
  result = tune.tune_model(model, x, precision="highest", candidates=ESCORT,
                           num_inputs=1, directory=plan_dir,
                           on_layer=lambda *a: seen.append(a[:2]),
                           in_context=False)
  assert not queue  # layer a was tuned once, for its one input shape
  assert seen == [("a", (2, 9, 9, 4)), ("b", (2, 9, 9, 4))]
  assert set(result) == {"a", "b"}
  assert all(len(v) == 1 and v[0]["method"] == "escort"
             for v in result.values())
  # Run as tuned (HIGHEST), every call finds its plan and the winning
  # config; at the default precision the keys differ and none is found.
  assert _probe_sources(model, x, "highest") == {
      "a": [("plan", ESCORT[1])] * 2, "b": [("plan", ESCORT[1])]}
  assert _probe_sources(model, x) == {"a": [("caller", None)] * 2,
                                      "b": [("caller", None)]}


def test_tune_model_keeps_an_enclosing_precision(plan_dir, monkeypatch):
  model = _TwoLayers(nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((1, 9, 9, 4), jnp.float32)
  _fake_times(monkeypatch, [100.0, 50.0, 20.0, SLOW_DEFAULT] * 2)
  with jax.default_matmul_precision("highest"):
    tune.tune_model(model, x, candidates=ESCORT, num_inputs=1,
                    directory=plan_dir, in_context=False)
  assert _probe_sources(model, x, "highest") == {
      "a": [("plan", ESCORT[1])] * 2, "b": [("plan", ESCORT[1])]}


def test_tune_model_tunes_in_the_dtype_the_layer_computes_in(plan_dir,
                                                              monkeypatch):
  # bfloat16 params and a float32 input: the layer promotes to float32.
  model = nnx.Sequential(SparseConv(4, 4, (3, 3), sparsity=0.5,
                                    method="escort",
                                    param_dtype=jnp.bfloat16,
                                    rngs=nnx.Rngs(1)))
  x = jax.ShapeDtypeStruct((1, 7, 7, 4), jnp.float32)
  _fake_times(monkeypatch, [100.0, 50.0, 20.0, SLOW_DEFAULT])
  (entry,), = tune.tune_model(model, x, candidates=ESCORT, num_inputs=1,
                              directory=plan_dir,
                              in_context=False).values()
  g = make_geometry((1, 7, 7, 4), model.layers[0].structure, (1, 1),
                    "SAME", (1, 1), 1)
  key = plans.plan_key(model.layers[0].structure.digest, g, jnp.float32,
                       None)
  assert plans.lookup(key) == entry


def test_layer_candidates_add_the_layers_default():
  """The layer's own default config joins the candidates (a plan is never
  slower than no plan); on a tiny map also its K x warps variants."""
  sk = _unstructured_kernel()
  g, _ = _key(sk)
  default = ops.default_kernel_config(g.out_channels, g.out_len, 4, g.batch)
  assert tune.layer_candidates(g, 4, ESCORT) == ESCORT + (default,)
  # Already a candidate: not twice.
  assert tune.layer_candidates(g, 4, ESCORT + (default,)) == (
      ESCORT + (default,))
  # A fully connected layer: a 1x1 map.
  fc = ej.SparseKernel.from_dense(
      np.where(np.random.default_rng(0).random((1, 1, 64, 32)) < 0.2, 1.0,
               0.0).astype(np.float32))
  for batch in (1, 4):
    gf = make_geometry((batch, 1, 1, 64), fc.structure, (1, 1), "VALID",
                       (1, 1), 1)
    got = tune.layer_candidates(gf, 4, ESCORT)
    tiny = ops.default_kernel_config(gf.out_channels, gf.out_len, 4, batch)
    # Tiles per image (one position), whatever the batch.
    assert tiny.nonzero_lanes and tiny.block_q == 1
    assert got[:len(ESCORT) + 1] == ESCORT + (tiny,)
    variants = got[len(ESCORT) + 1:]
    assert {(c.nonzero_lanes, c.num_warps) for c in variants} == {
        (k, w) for k in tune.TINY_MAP_LANES_CHOICES
        for w in tune.TINY_MAP_WARPS_CHOICES
        if 32 * w <= k} - {(tiny.nonzero_lanes, tiny.num_warps)}
    # Only K and the warps change; every variant is a valid config.
    assert all(dataclasses.replace(c, nonzero_lanes=tiny.nonzero_lanes,
                                   num_warps=tiny.num_warps) == tiny
               for c in variants)


def test_tune_model_layers_filter(plan_dir, monkeypatch):
  model = _TwoLayers(nnx.Rngs(0))
  x = jax.ShapeDtypeStruct((1, 9, 9, 4), jnp.float32)
  queue = _fake_times(monkeypatch, [100.0, 50.0, 20.0, SLOW_DEFAULT])
  result = tune.tune_model(model, x, candidates=ESCORT, num_inputs=1,
                           directory=plan_dir, layers=["b"],
                           in_context=False)
  assert not queue and set(result) == {"b"}
  assert tune.tune_model(model, x, candidates=ESCORT, num_inputs=1,
                         directory=plan_dir, layers=["nothing"]) == {}


def test_tune_in_context(plan_dir, monkeypatch):
  """in_context (tune_model's default): every candidate and dense are
  timed on relu(x * scale + shift), their output scaled and shifted, with
  per-channel parameters, and the nonzero-lanes candidates also with
  unpadded planes where the layer reads them (padding, stride 1); the plan
  says how it was timed."""
  model = _TwoLayers(nnx.Rngs(0))
  g = make_geometry((1, 9, 9, 4), model.a.structure, (1, 1), "SAME", (1, 1),
                    1)
  want = tune.layer_candidates(g, 4, ESCORT, unpadded=True)
  assert not any(c.unpadded for c in tune.layer_candidates(g, 4, ESCORT))
  padded = [c for c in want if not c.unpadded]
  assert len(padded) < len(want)
  timed = []

  def fake(fn, inputs, **kwargs):
    del fn, kwargs
    x, scale, shift, out_scale, out_shift = inputs[0]
    chex.assert_shape([scale, shift], (1, 1, 1, x.shape[-1]))
    chex.assert_shape([out_scale, out_shift], (1, 1, 1, 4))
    timed.append(x.shape)
    # Dense and the padded candidates come first; the unpadded ones win.
    return bench.Timing(median_us=10.0 if len(timed) > 1 + len(padded)
                        else 50.0, spread_us=0.0, samples_us=[],
                        timer=bench.TIMER_CPU)

  monkeypatch.setattr(bench, "device_time_us", fake)
  x = jax.ShapeDtypeStruct((1, 9, 9, 4), jnp.float32)
  result = tune.tune_model(model, x, candidates=ESCORT, num_inputs=2,
                           directory=plan_dir, layers=["a"])
  (entry,), = result.values()
  assert len(timed) == 1 + len(want)
  assert entry["timed_between"] == "elementwise ops"
  assert entry["config"]["unpadded"] is True
  # Unpadded, each candidate storing NHWC and rows.
  assert {(c.nhwc_out, c.unpadded) for c in want if c.unpadded} == {
      (True, True), (False, True)}
  # b is strided: no unpadded planes.
  gb = make_geometry((1, 9, 9, 4), model.b.structure, (2, 2), "VALID",
                     (1, 1), 1)
  assert not any(c.unpadded for c in tune.layer_candidates(
      gb, 4, ESCORT, unpadded=True))


def test_real_timing_in_context(plan_dir):
  """No fakes: the candidates, unpadded ones included, run after the
  elementwise op (Pallas interpreter); the recorded config computes the
  layer."""
  sk = _unstructured_kernel(seed=3)
  entry = tune.tune_layer(X_SHAPE, sk, candidates=ESCORT[:1], num_inputs=1,
                          directory=plan_dir, in_context=True)
  assert entry["timed_between"] == "elementwise ops"
  assert any("unpadded=True" in k for k in entry["times_us"])
  assert all(t > 0 for t in entry["times_us"].values())
  cfg = plans.config_from_entry(entry, "escort")
  x = jnp.asarray(np.random.default_rng(1).standard_normal(X_SHAPE),
                  jnp.float32)
  y = ej.sparse_conv(x, sk, method="escort", config=cfg)
  ref = ops.sparse_conv(x, sk, method="dense",
                        precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
