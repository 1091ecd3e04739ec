"""The workload (escort_jax.workload) and the benchmark harness
(escort_jax.bench): perfetto-trace parsing on synthetic traces (so the GPU
route is tested on the CPU), the floor model, configs, a tiny CPU run's
results schema, --resume, and the report."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gzip
import json
from pathlib import Path
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import bench
from escort_jax import ops as ej_ops
from escort_jax import workload as wl
from escort_jax.structure import ALIGNED_COLUMNS

# --------------------------------------------------------------------------
# The workload.


def test_workload_counts():
  layers = wl.load_layers()
  assert len(layers) == 40
  assert len(wl.pruned_layers()) == 39
  assert [l.name for l in layers if not l.pruned] == ["caffenet/conv1"]
  assert wl.batch_sizes() == [1, 32]
  assert len({l.name for l in layers}) == 40
  # The 36 stride-1 ungrouped pruned layers of BENCHMARKING.md.
  assert len([l for l in wl.pruned_layers()
              if l.stride == 1 and l.groups == 1]) == 36


def test_make_kernel_exact_nnz_every_layer():
  for layer in wl.load_layers():
    k = wl.make_kernel(layer)
    assert k.shape == layer.kernel_shape
    assert k.dtype == np.float32
    assert np.count_nonzero(k) == round(layer.size * (1 - layer.sparsity))
    assert np.count_nonzero(k) == layer.nnz()


def test_make_kernel_deterministic_and_nested():
  layer = wl.get_layer("resnet50/res3a_branch2b")
  a, b = wl.make_kernel(layer), wl.make_kernel(layer)
  np.testing.assert_array_equal(a, b)
  other = wl.make_kernel(layer, seed=123)
  assert not np.array_equal(a, other)
  assert np.count_nonzero(other) == np.count_nonzero(a)
  # Another layer of the same shape gets another kernel (seed per layer).
  twin = wl.get_layer("resnet50/res3b_branch2b")
  assert twin.kernel_shape == layer.kernel_shape
  assert not np.array_equal(wl.make_kernel(twin, sparsity=layer.sparsity), a)
  # A sweep's kernels are nested and agree where both keep a weight.
  k50 = wl.make_kernel(layer, sparsity=0.5)
  k99 = wl.make_kernel(layer, sparsity=0.99)
  assert np.count_nonzero(k50) == round(layer.size * 0.5)
  assert np.count_nonzero(k99) == round(layer.size * 0.01)
  assert np.all((k99 != 0) <= (k50 != 0))
  np.testing.assert_array_equal(k99[k99 != 0], k50[k99 != 0])
  # Positions spread over the whole kernel: every output channel is hit.
  assert np.all(np.count_nonzero(k50.reshape(-1, 128), axis=0) > 0)


def test_make_kernel_dtypes_and_input():
  layer = wl.get_layer("googlenet/inception_3a/5x5")
  kb = wl.make_kernel(layer, dtype=jnp.bfloat16)
  assert kb.dtype == jnp.bfloat16
  assert np.count_nonzero(np.asarray(kb, np.float32)) == layer.nnz()
  x = wl.make_input(layer, 2, seed=1)
  assert x.shape == (2, 28, 28, 16) and x.dtype == jnp.float32
  np.testing.assert_array_equal(x, wl.make_input(layer, 2, seed=1))
  assert not np.array_equal(x, wl.make_input(layer, 2, seed=2))
  assert wl.make_input(layer, 1, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  conv = layer.conv_kwargs()
  assert conv == dict(window_strides=(1, 1), padding=((2, 2), (2, 2)),
                      feature_group_count=1)


def test_find_layers_and_scaling():
  names = [l.name for l in wl.find_layers(["resnet50/res3a_branch2b",
                                           "inception_3a"])]
  assert names == ["googlenet/inception_3a/3x3",
                   "googlenet/inception_3a/5x5", "resnet50/res3a_branch2b"]
  assert len(wl.find_layers(nets=["caffenet"])) == 5
  with pytest.raises(KeyError, match="no layer matches"):
    wl.find_layers(["nope"])
  conv1 = wl.get_layer("caffenet/conv1")
  assert conv1.out_hw == 55
  small = conv1.scaled(8)
  assert small.in_hw == 11 and small.out_hw == 1  # the kernel still fits
  assert wl.get_layer("resnet50/res5a_branch2b").scaled(8).in_hw == 7


# --------------------------------------------------------------------------
# Perfetto traces.


def _meta_process(pid, name):
  return {"ph": "M", "pid": pid, "name": "process_name",
          "args": {"name": name}}


def _meta_thread(pid, tid, name):
  return {"ph": "M", "pid": pid, "tid": tid, "name": "thread_name",
          "args": {"name": name}}


def _x(pid, tid, ts, dur, name="kernel"):
  return {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur,
          "name": name}


def _synthetic_trace():
  return {"displayTimeUnit": "ns", "traceEvents": [
      _meta_process(1, "/host:CPU"),
      _meta_process(2, "/device:GPU:0"),
      _meta_process(3, "/device:GPU:1"),
      _meta_process(4, "/device:GPU:10"),
      {"ph": "M", "pid": 2, "name": "process_sort_index",
       "args": {"sort_index": 2}},
      _meta_thread(2, 7, "Stream #7(Compute)"),
      _meta_thread(2, 8, "XLA Ops"),
      _meta_thread(1, 1, "python"),
      _x(2, 7, 10.0, 3.0, "pad"),
      _x(2, 7, 14.0, 4.5, "escort_kernel"),
      _x(2, 7, 20.0, 5.0, "escort_kernel"),
      _x(2, 8, 10.0, 100.0, "derived op line"),  # repeats the stream line
      _x(1, 1, 0.0, 1000.0, "host work"),
      _x(3, 1, 10.0, 50.0, "other gpu"),
      _x(4, 1, 10.0, 70.0, "gpu 10"),
      {"ph": "i", "pid": 2, "tid": 7, "ts": 12.0, "name": "instant"},
      {"ph": "X", "pid": 2, "tid": 7, "ts": 30.0, "name": "no dur"},
      {}]}


@pytest.mark.parametrize("form", ["gz", "json", "dict", "list"])
def test_parse_perfetto_trace(tmp_path, form):
  trace = _synthetic_trace()
  if form == "gz":
    src = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(src, "wt") as f:
      json.dump(trace, f)
  elif form == "json":
    src = tmp_path / "trace.json"
    src.write_text(json.dumps(trace))
  elif form == "dict":
    src = trace
  else:
    src = trace["traceEvents"]
  s = bench.parse_perfetto_trace(src)
  assert s.total_us == pytest.approx(12.5)
  assert s.num_events == 4
  assert s.processes == ["/device:GPU:0"]
  assert s.threads == ["Stream #7(Compute)"]
  assert s.kernels_us == {"pad": 3.0, "escort_kernel": 9.5, "no dur": 0.0}
  assert [e[0] for e in s.events] == [10.0, 14.0, 20.0, 30.0]
  assert bench.parse_perfetto_trace(src, "/device:GPU:1").total_us == 50.0
  assert bench.parse_perfetto_trace(src, "/device:GPU:10").total_us == 70.0
  assert bench.parse_perfetto_trace(src, "/device:GPU:2").num_events == 0


def test_trace_split():
  s = bench.parse_perfetto_trace({"traceEvents": [
      _meta_process(2, "/device:GPU:0"),
      _x(2, 1, 0.0, 3.0, "pad"), _x(2, 1, 5.0, 4.5, "escort"),
      _x(2, 1, 9.0, 1.0, "pad"), _x(2, 1, 12.0, 4.0, "escort")]})
  parts = s.split(2)
  assert [p.total_us for p in parts] == [7.5, 5.0]
  assert parts[0].kernels_us == {"pad": 3.0, "escort": 4.5}
  assert s.split(3) is None
  # The synthetic trace above: 4 events, but the halves differ.
  assert bench.parse_perfetto_trace(_synthetic_trace()).split(2) is None


def _install_fake_profiler(monkeypatch, kernels_per_call=2):
  """Replaces jax.profiler.trace by one that writes a synthetic perfetto
  trace: every call of the timed function launches `kernels_per_call`
  kernels, of (pass + 1) * 10 us in total in its pass over the inputs."""
  calls = []

  @contextlib.contextmanager
  def fake_trace(log_dir):
    start = len(calls)
    yield
    made = calls[start:]
    events = [_meta_process(9, "/host:CPU"), _meta_process(5,
                                                           "/device:GPU:0"),
              _meta_thread(5, 1, "Stream #1(Compute)")]
    ts = 0.0
    for n_in_trace, inputs_per_pass in enumerate(made):
      pass_index = n_in_trace // inputs_per_pass
      for k in range(kernels_per_call):
        dur = (pass_index + 1) * 10.0 / kernels_per_call
        events.append(_x(5, 1, ts, dur, f"k{k}"))
        ts += 100.0
    out = Path(log_dir) / "plugins" / "profile" / "run"
    out.mkdir(parents=True)
    with gzip.open(out / "perfetto_trace.json.gz", "wt") as f:
      json.dump({"traceEvents": events}, f)

  monkeypatch.setattr(bench, "_trace", fake_trace)
  return calls


@pytest.mark.parametrize("per_repeat", [False, True])
def test_device_time_us_gpu_route(monkeypatch, per_repeat):
  calls = _install_fake_profiler(monkeypatch)
  inputs = [jnp.ones(3) * i for i in range(4)]

  def fn(x):
    calls.append(len(inputs))
    return x + 1

  t = bench.device_time_us(fn, inputs, repeats=3, warmup=2,
                           timer=bench.TIMER_GPU,
                           trace_per_repeat=per_repeat)
  assert t.timer == bench.TIMER_GPU
  if per_repeat:  # every trace is its own first pass: 10 us each
    assert t.samples_us == pytest.approx([10.0, 10.0, 10.0])
  else:  # one trace, cut into three passes of 10, 20, 30 us per call
    assert t.samples_us == pytest.approx([10.0, 20.0, 30.0])
    assert t.median_us == pytest.approx(20.0)
    assert t.spread_us == pytest.approx(20.0)
    assert t.kernels_us == pytest.approx({"k0": 10.0, "k1": 10.0})
  assert len(calls) == 2 + 3 * 4  # warm-up, then each input once a repeat


def test_device_time_us_gpu_route_no_events(monkeypatch):
  @contextlib.contextmanager
  def empty_trace(log_dir):
    yield
    out = Path(log_dir) / "p"
    out.mkdir(parents=True)
    with gzip.open(out / "perfetto_trace.json.gz", "wt") as f:
      json.dump({"traceEvents": [_meta_process(1, "/host:CPU")]}, f)

  monkeypatch.setattr(bench, "_trace", empty_trace)
  with pytest.raises(RuntimeError, match="no device events"):
    bench.device_time_us(lambda x: x, [jnp.ones(2)], repeats=1,
                         timer=bench.TIMER_GPU)


def test_device_time_us_cpu():
  t = bench.device_time_us(lambda x: x * 2, [jnp.ones(4), jnp.zeros(4)],
                           repeats=3, timer=bench.TIMER_CPU)
  assert t.timer == bench.TIMER_CPU
  assert bench.default_timer() == (
      bench.TIMER_GPU if jax.default_backend() == "gpu" else bench.TIMER_CPU)
  assert len(t.samples_us) == 3 and t.median_us > 0
  assert t.spread_us >= 0


# --------------------------------------------------------------------------
# Floor, configs, names.


def test_floor_model_matches_benchmarking_example():
  """res3 3x3, 128->128 at 28x28, batch 32, density 0.1: ~11 us in fp32."""
  layer = wl.get_layer("resnet50/res3a_branch2b")
  nnz = round(layer.size * 0.1)
  fm = bench.floor_model(layer, 32, nnz, "float32")
  assert fm["useful_flops"] == 2 * nnz * 28 * 28 * 32
  assert fm["floor_us"] == pytest.approx(11.0, rel=0.02)
  assert fm["floor_us"] == max(fm["compute_us"], fm["memory_us"])
  expect_bytes = (32 * 28 * 28 * 128 * 4 * 2 + nnz * 8 + 129 * 4)
  assert fm["bytes"] == expect_bytes
  # bf16 halves the bytes, keeps the CUDA-core rate.
  fb = bench.floor_model(layer, 32, nnz, "bfloat16")
  assert fb["compute_us"] == pytest.approx(fm["compute_us"])
  assert fb["memory_us"] < fm["memory_us"]


def test_parse_config_and_labels():
  cfg, items = bench.parse_config("rows_per_program=8,block_q=256,num_warps=4")
  assert (cfg.rows_per_program, cfg.block_q, cfg.num_warps) == (8, 256, 4)
  assert bench.method_label("escort", items) == "escort[rpp=8,bq=256,nw=4]"
  cfg2, items2 = bench.parse_config("rpp=16, ns=2")
  assert cfg2.rows_per_program == 16 and cfg2.num_stages == 2
  if any(f.name == "q_major" for f in dataclasses.fields(cfg2)):
    cfg3, items3 = bench.parse_config("q_major=true,rpp=4")
    assert cfg3.q_major is True
    assert bench.method_label("escort", items3) == "escort[qm=1,rpp=4]"
    with pytest.raises(bench.UsageError):
      bench.parse_config("qm=2")
  specs = bench.method_specs(["escort", "auto", "dense"],
                             ["rpp=8,bq=256,nw=4", "rpp=4"])
  assert [s.label for s in specs] == [
      "escort[rpp=8,bq=256,nw=4]", "escort[rpp=4]",
      "auto[rpp=8,bq=256,nw=4]", "auto[rpp=4]", "dense"]
  for bad in ("foo=1", "rpp", "rpp=x", ""):
    with pytest.raises(bench.UsageError):
      bench.parse_config(bad)
  with pytest.raises(bench.UsageError):
    bench.method_specs(["fast"])
  assert bench.parse_dtype("bf16") == "bfloat16"
  with pytest.raises(bench.UsageError):
    bench.parse_dtype("int8")


def test_results_path_and_slug():
  assert bench.slugify("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
  p = bench.results_path()
  assert p.parent.name == "results" and p.parent.parent.name == "benchmarks"
  assert re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{4}-[a-z0-9-]+\.json", p.name)
  now = datetime.datetime(2026, 1, 2, 3, 4)
  q = bench.results_path("-networks", now)
  assert q.parent == p.parent
  assert re.fullmatch(r"2026-01-02T0304-[a-z0-9-]+-networks\.json", q.name)
  assert q.name == bench.results_path(now=now).stem + "-networks.json"


def test_results_header_and_write_json(tmp_path):
  head = bench.results_header(datetime.datetime(2026, 1, 2), timer="t",
                              rows=[])
  info = bench.device_info()
  assert head == {"device": info["device"],
                  "jax_version": info["jax_version"], "date": "2026-01-02",
                  "gpus": info["gpus"], "timer": "t", "rows": []}
  path = tmp_path / "sub" / "r.json"
  bench.write_json(path, {"rows": [1.5, float("nan")]})
  assert json.loads(path.read_text())["rows"][0] == 1.5
  assert not list(path.parent.glob("*.tmp"))


def test_rel_err():
  y = np.array([3.0, 4.0])
  assert bench.rel_err(y, y) == 0.0
  assert bench.rel_err(np.zeros(2), y) == pytest.approx(1.0)
  assert bench.rel_err(y, np.zeros(2)) == pytest.approx(5.0)  # ||y||
  assert bench.rel_err(jnp.asarray(y, jnp.bfloat16), y) == 0.0
  assert bench.rel_err([[1.0]], np.array([[2.0]], np.float32)) == 0.5


def test_layer_vector_widths_skips_what_does_not_fit():
  layers = [wl.get_layer("resnet50/res3a_branch2b"),  # 128 channels
            wl.get_layer("googlenet/inception_3a/5x5")]  # 32 channels
  skipped = []
  pairs = list(wl.layer_vector_widths(
      layers, [None, 64], on_skip=lambda l, v, e: skipped.append(
          (l.name, v, "does not divide" in str(e)))))
  assert pairs == [(layers[0], None), (layers[0], 64), (layers[1], None)]
  assert skipped == [("googlenet/inception_3a/5x5", 64, True)]
  assert bench.vector_text(16) == " V=16" and bench.vector_text(None) == ""


# --------------------------------------------------------------------------
# A tiny CPU run: schema, resume, report.

ROW_KEYS = {"net", "layer", "batch", "sparsity", "dtype", "method", "time_us",
            "baselines_us", "floor_us", "floor_fraction", "tflops",
            "spread_us", "speedups"}


def _tiny(tmp_path, **kwargs):
  args = dict(batches=[1], dtypes=["float32"], methods=["escort", "auto"],
              max_hw=6, num_inputs=2, repeats=1, show_progress=False,
              out=tmp_path / "r.json")
  args.update(kwargs)
  return bench.run_benchmark(
      [wl.get_layer("googlenet/inception_3a/5x5")], **args)


def test_tiny_run_schema_resume_report(tmp_path):
  results, path = _tiny(tmp_path)
  assert path == tmp_path / "r.json"
  on_disk = json.loads(path.read_text())
  assert on_disk == json.loads(json.dumps(results))
  for key in ("device", "jax_version", "date", "gpus", "rows"):
    assert key in on_disk
  assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", on_disk["date"])
  on_gpu = jax.default_backend() == "gpu"
  assert on_disk["timer"] == bench.default_timer()
  assert (on_disk["gpus"] > 0) == on_gpu
  rows = on_disk["rows"]
  assert [r["method"] for r in rows] == ["escort", "auto"]
  for r in rows:
    assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    assert r["net"] == "googlenet" and r["layer"] == "inception_3a/5x5"
    assert r["batch"] == 1 and r["dtype"] == "float32"
    assert r["sparsity"] == pytest.approx(0.845625, abs=1e-4)
    assert set(r["baselines_us"]) == set(bench.BASELINES)
    assert set(r["speedups"]) == set(bench.BASELINES)
    for b, t in r["baselines_us"].items():
      assert t > 0
      assert r["speedups"][b] == pytest.approx(t / r["time_us"])
    assert r["time_us"] > 0 and r["spread_us"] >= 0
    assert r["floor_fraction"] == pytest.approx(r["floor_us"] / r["time_us"])
    assert r["tflops"] > 0
    assert r["rel_err"] < 1e-5
    assert r["in_hw"] == 6 and r["timer"] == bench.default_timer()
    assert r["sweep"] is False and "error" not in r

  # --resume: the two rows are skipped, one new row is appended.
  results2, path2 = bench.run_benchmark(
      [wl.get_layer("googlenet/inception_3a/5x5")], batches=[1],
      dtypes=["float32"], methods=["escort", "dense"], max_hw=6,
      num_inputs=2, repeats=1, show_progress=False, resume=path,
      baselines=["lax_fp32_highest"])
  assert path2 == path
  rows2 = json.loads(path.read_text())["rows"]
  assert [r["method"] for r in rows2] == ["escort", "auto", "dense"]
  assert len(results2["runs"]) == 2
  assert rows2[:2] == rows

  # The report.
  paths = bench.write_report(path)
  md = paths["markdown"]
  assert md == tmp_path / "r.md" and md.exists()
  text = md.read_text()
  assert "Geometric means" in text and "inception_3a/5x5" in text
  assert "| pruned | 1 | float32 | escort | 1 |" in text
  assert [p.name for p in paths["plots"]] == ["r-layers.png"]
  assert all(p.exists() and p.stat().st_size > 1000 for p in paths["plots"])


def test_auto_fallback_rows_say_which_path_they_timed(tmp_path):
  """auto_fallback times the layer as dense_fallback leaves it: off the
  GPU "auto" is dense, so the pruned kernel held dense (no scatter of the
  values in the timed function), and the row says so."""
  results, _ = _tiny(tmp_path, methods=["auto_fallback", "auto"],
                     baselines=["lax_default"])
  fallback, auto = results["rows"]
  assert fallback["method"] == "auto_fallback" and "error" not in fallback
  assert fallback["chosen"] in ("dense", "escort")
  assert "chosen" not in auto
  # (On a GPU the dense path runs at default precision: TF32.)
  bound = 2e-3 if jax.default_backend() == "gpu" else 1e-5
  assert fallback["rel_err"] < bound and fallback["time_us"] > 0
  layer = wl.get_layer("googlenet/inception_3a/5x5")
  sk = bench.SparseKernel.from_dense(wl.make_kernel(layer))
  x = jnp.ones((1, 6, 6, layer.in_channels), jnp.float32)
  row = {}
  fn = bench._method_fn(bench.MethodSpec("auto_fallback", "auto_fallback"),
                        sk, layer.conv_kwargs(), x, row)
  if jax.default_backend() != "gpu":
    assert fallback["chosen"] == row["chosen"] == "dense"
    assert "scatter" not in str(jax.make_jaxpr(fn)(x))
    auto_fn = bench._method_fn(bench.MethodSpec("auto", "auto"), sk,
                               layer.conv_kwargs(), x, {})
    assert "scatter" in str(jax.make_jaxpr(auto_fn)(x))


def test_resume_refuses_another_device(tmp_path):
  f = tmp_path / "other.json"
  f.write_text(json.dumps({"device": "Some Other Accelerator 9000",
                           "rows": []}))
  with pytest.raises(bench.UsageError, match="same device"):
    _tiny(tmp_path, resume=f)


def test_sweep_rows_and_plot(tmp_path):
  results, path = bench.run_sweep(
      [wl.get_layer("googlenet/inception_3a/5x5")], sparsities=[0.5, 0.95],
      batches=[1], methods=["auto"], max_hw=5, num_inputs=1, repeats=1,
      baselines=["lax_fp32_highest", "bcoo"], show_progress=False,
      out=tmp_path / "sweep.json")
  rows = results["rows"]
  assert [r["target_sparsity"] for r in rows] == [0.5, 0.95]
  assert all(r["sweep"] for r in rows)
  assert rows[0]["nnz"] == round(wl.get_layer(
      "googlenet/inception_3a/5x5").size * 0.5)
  paths = bench.write_report(path, tmp_path / "rep")
  names = sorted(p.name for p in paths["plots"])
  assert names == ["sweep-sweep.png"]  # no published-sparsity rows
  assert "Sparsity sweep rows" in paths["markdown"].read_text()


def test_failed_row_is_recorded_and_retried(tmp_path, monkeypatch):
  real = bench.sparse_conv

  def broken(*args, **kwargs):
    raise RuntimeError("triton says no")

  monkeypatch.setattr(bench, "sparse_conv", broken)
  results, path = _tiny(tmp_path, methods=["escort"],
                        baselines=["lax_fp32_highest"])
  (row,) = results["rows"]
  assert "triton says no" in row["error"] and row["time_us"] is None
  bench.write_report(path)  # a failed row does not break the report
  monkeypatch.setattr(bench, "sparse_conv", real)
  results, _ = _tiny(tmp_path, methods=["escort"],
                     baselines=["lax_fp32_highest"], resume=path)
  (row,) = results["rows"]
  assert "error" not in row and row["time_us"] > 0


def test_device_time_us_real_profiler_on_host_process():
  """The real jax.profiler.trace -> perfetto_trace.json.gz -> parse route,
  summing the host process (a CPU has no device process)."""
  import jax  # pylint: disable=g-import-not-at-top
  f = jax.jit(lambda x: jnp.sin(x) @ x)
  xs = [jnp.full((64, 64), i, jnp.float32) for i in range(3)]
  for per_repeat in (False, True):
    t = bench.device_time_us(f, xs, repeats=2, timer=bench.TIMER_GPU,
                             device="/host:CPU",
                             trace_per_repeat=per_repeat)
    assert len(t.samples_us) == 2 and t.median_us > 0 and t.kernels_us
  if jax.default_backend() != "gpu":  # no GPU process in the trace
    with pytest.raises(RuntimeError, match="/host:CPU"):
      bench.device_time_us(f, xs, repeats=1, timer=bench.TIMER_GPU)


def test_trace_split_needs_identical_runs():
  s = bench.parse_perfetto_trace({"traceEvents": [
      _meta_process(2, "/device:GPU:0"),
      _x(2, 1, 0.0, 1.0, "a"), _x(2, 1, 1.0, 1.0, "b"),
      _x(2, 1, 2.0, 1.0, "b"), _x(2, 1, 3.0, 1.0, "a")]})
  assert s.split(2) is None
  assert [p.total_us for p in s.split(1)] == [4.0]


# --------------------------------------------------------------------------
# Vector-sparse rows (--vector-width).


def test_vector_configs_and_labels():
  cfg, items = bench.parse_config("bq=64,bk=32,ns=3", ej_ops.VectorConfig)
  assert cfg == ej_ops.VectorConfig(block_q=64, block_k=32, num_stages=3)
  assert bench.method_label("vector", items) == "vector[bq=64,bk=32,ns=3]"
  with pytest.raises(bench.UsageError, match="unknown VectorConfig field"):
    bench.parse_config("rpp=4", ej_ops.VectorConfig)
  with pytest.raises(bench.UsageError, match="unknown KernelConfig field"):
    bench.parse_config("bk=32")
  # A config goes to each method whose config class has all its fields.
  specs = bench.method_specs(["escort", "vector", "dense"],
                             ["rpp=8", "bk=64", "bq=64,nw=8"])
  assert [s.label for s in specs] == [
      "escort[rpp=8]", "escort[bq=64,nw=8]", "vector[bk=64]",
      "vector[bq=64,nw=8]", "dense"]
  by_label = {s.label: s for s in specs}
  assert by_label["vector[bk=64]"].config == ej_ops.VectorConfig(block_k=64)
  assert by_label["escort[bq=64,nw=8]"].config == ej_ops.KernelConfig(
      block_q=64, num_warps=8)
  # No config fits vector: it runs with its default.
  assert [s.label for s in bench.method_specs(["vector", "escort"],
                                              ["rpp=2"])] == [
      "vector", "escort[rpp=2]"]
  with pytest.raises(bench.UsageError, match="fits no method"):
    bench.method_specs(["escort", "vector"], ["speed=11"])
  with pytest.raises(bench.UsageError, match="unknown KernelConfig field"):
    bench.method_specs(["escort"], ["bk=64"])


def test_parse_vector_widths():
  assert bench.parse_vector_widths(None) == [None]
  assert bench.parse_vector_widths([]) == [None]
  assert bench.parse_vector_widths(["16", 8, "none", "0", 16]) == [
      16, 8, None]
  for bad in ("12", "x", 4):
    with pytest.raises(bench.UsageError, match="vector width"):
      bench.parse_vector_widths([bad])


def test_row_key_separates_vector_widths():
  row = {"net": "n", "layer": "l", "batch": 1, "sparsity": 0.9,
         "dtype": "bfloat16", "method": "escort", "in_hw": 8}
  old = bench.row_key(row)  # a row written before vector widths existed
  assert bench.row_key(dict(row, vector_width=None)) == old
  assert bench.row_key(dict(row, vector_width=16)) != old
  assert bench.row_key(dict(row, vector_width=16)) != bench.row_key(
      dict(row, vector_width=32))
  # Vector rows written before column_multiple existed kept exact counts.
  assert bench.row_key(dict(row, vector_width=16)) == bench.row_key(
      dict(row, vector_width=16, column_multiple=1))
  assert bench.row_key(dict(row, vector_width=16)) != bench.row_key(
      dict(row, vector_width=16, column_multiple=8))


def test_floor_model_vector_uses_tensor_cores():
  layer = wl.get_layer("resnet50/res3a_branch2b")
  nnz = layer.nnz(0.9, 16)
  plain = bench.floor_model(layer, 32, nnz, "bfloat16")
  vec = bench.floor_model(layer, 32, nnz, "bfloat16", 16)
  assert vec["compute_us"] == pytest.approx(
      plain["compute_us"] * bench.CUDA_CORE_RATE / 989e12)
  # One index per kept vector and per block of 16 channels, not per weight.
  assert plain["bytes"] - vec["bytes"] == (
      (nnz - nnz // 16) + (128 - 128 // 16)) * bench.INDEX_BYTES
  # fp32 stays on the CUDA-core rate; V < 8 is no vector kernel.
  assert bench.floor_model(layer, 32, nnz, "float32", 16)["compute_us"] == (
      pytest.approx(bench.floor_model(layer, 32, nnz,
                                      "float32")["compute_us"]))
  assert bench.floor_model(layer, 32, nnz, "bfloat16", 4) == plain


def test_tiny_vector_run_resume_and_report(tmp_path):
  """Unstructured and V=16 rows of one layer side by side; resume adds V=8
  rows without redoing any; the report keeps every V apart."""
  layer = wl.get_layer("googlenet/inception_3a/5x5")
  results, path = _tiny(tmp_path, methods=["vector", "escort"],
                        dtypes=["bfloat16"], vector_widths=[None, 16],
                        baselines=["lax_bf16"], max_hw=4)
  rows = results["rows"]
  assert [(r["method"], r["vector_width"]) for r in rows] == [
      ("escort", None), ("vector", 16), ("escort", 16)]
  for r in rows:
    assert "error" not in r, r.get("error")
    assert r["rel_err"] < 3e-2 and r["time_us"] > 0
  assert rows[0]["nnz"] == layer.nnz() and "column_multiple" not in rows[0]
  # Vector kernels keep a multiple of ALIGNED_COLUMNS positions per block.
  aligned = np.count_nonzero(wl.make_kernel(
      layer, vector_width=16, column_multiple=ALIGNED_COLUMNS))
  assert rows[1]["nnz"] == rows[2]["nnz"] == aligned
  assert rows[1]["column_multiple"] == ALIGNED_COLUMNS
  assert rows[1]["sparsity"] == pytest.approx(1 - aligned / layer.size)
  results2, _ = _tiny(tmp_path, methods=["vector", "escort"],
                      dtypes=["bfloat16"], vector_widths=[16, 8],
                      baselines=["lax_bf16"], max_hw=4, resume=path)
  rows2 = results2["rows"]
  assert rows2[:3] == rows
  assert [(r["method"], r["vector_width"]) for r in rows2[3:]] == [
      ("vector", 8), ("escort", 8)]
  with pytest.raises(bench.UsageError, match="column_multiple"):
    _tiny(tmp_path, methods=["vector"], dtypes=["bfloat16"],
          vector_widths=[16], baselines=["lax_bf16"], max_hw=4, resume=path,
          column_multiple=1)

  summary = bench.summarize(results2)
  pruned = [(s["method"], s["vector_width"]) for s in summary
            if s["subset"] == "pruned"]
  assert pruned == [("escort", None), ("escort", 8), ("escort", 16),
                    ("vector", 8), ("vector", 16)]
  assert all(s["layers"] == 1 and s["sparsity"] is None for s in summary)
  text = bench.write_report(path)["markdown"].read_text()
  assert "| subset | batch | dtype | method | V | layers |" in text
  assert "| pruned | 1 | bfloat16 | vector | 16 | 1 |" in text
  assert "| pruned | 1 | bfloat16 | escort | - | 1 |" in text
  assert "| pruned | 1 | bfloat16 | escort | 8 | 1 |" in text


def test_vector_framed_rows(tmp_path):
  """Method vector_framed: the layer's input framed outside the timed call,
  its error taken on the output out of its frame, a row per layer with the
  same baselines as vector's; unstructured layers get no such row."""
  layer = wl.get_layer("googlenet/inception_3a/5x5")
  results, _ = bench.run_benchmark(
      [layer], batches=[2], dtypes=["float32"],
      methods=["vector", "vector_framed"], vector_widths=[16], max_hw=5,
      num_inputs=1, repeats=1, baselines=["lax_fp32_highest"],
      show_progress=False, out=tmp_path / "f.json")
  rows = {r["method"]: r for r in results["rows"]}
  assert set(rows) == {"vector", "vector_framed"}
  framed = rows["vector_framed"]
  assert not framed.get("error"), framed.get("error")
  assert framed["rel_err"] < 1e-5
  assert framed["baselines_us"] == rows["vector"]["baselines_us"]
  with pytest.raises(bench.UsageError,
                     match="'vector_framed' needs vector-sparse"):
    bench.run_benchmark([layer], batches=[1], methods=["vector_framed"],
                        max_hw=4, show_progress=False,
                        out=tmp_path / "none.json")


def test_vector_rows_at_one_sparsity(tmp_path):
  """Every layer at 90%: sweep rows, a geometric mean per V at 0.9, the
  layers plot (one sparsity) and no sweep plot; a layer that V does not
  fit is skipped."""
  layers = [wl.get_layer("googlenet/inception_3a/5x5"),
            wl.get_layer("googlenet/inception_4a/5x5")]  # 48 outputs
  results, path = bench.run_benchmark(
      layers, batches=[1], dtypes=["bfloat16"], methods=["vector"],
      sparsities=[0.9], vector_widths=[32], column_multiple=1, max_hw=4,
      num_inputs=1, repeats=1, baselines=["lax_bf16"], show_progress=False,
      out=tmp_path / "v.json")
  (row,) = results["rows"]
  assert row["layer"] == "inception_3a/5x5" and row["vector_width"] == 32
  assert row["sweep"] is True and row["target_sparsity"] == 0.9
  assert row["nnz"] == layers[0].nnz(0.9, 32)  # column_multiple=1: exact
  assert row["column_multiple"] == 1
  (s,) = bench.summarize(results)
  assert (s["subset"], s["sparsity"], s["method"], s["vector_width"]) == (
      "all layers", 0.9, "vector", 32)
  paths = bench.write_report(path)
  assert [p.name for p in paths["plots"]] == ["v-layers.png"]
  text = paths["markdown"].read_text()
  assert "| all layers | 0.9 | 1 | bfloat16 | vector | 32 | 1 |" in text
  with pytest.raises(bench.UsageError, match="does not divide"):
    bench.run_benchmark(layers[1:], batches=[1], methods=["vector"],
                        vector_widths=[32], max_hw=4, show_progress=False,
                        out=tmp_path / "none.json")
  with pytest.raises(bench.UsageError, match="needs vector-sparse"):
    bench.run_benchmark(layers[:1], batches=[1], methods=["escort", "vector"],
                        max_hw=4, show_progress=False,
                        out=tmp_path / "none.json")


def test_network_rows_with_dense_fallback():
  """bench --network's auto_fallback: the pruned ResNet-50 converted with
  dense_fallback (on the CPU every pruned layer goes back to a dense one,
  so it computes exactly the dense model), against "auto", which keeps its
  17 SparseConvs (the 16 pruned 3x3 layers and fc1000's, a SparseLinear)."""
  from escort_jax import bench_network
  rows = {m: bench_network.run_network(
      "resnet50", 1, precisions=("default",), num_inputs=1, calls=2,
      in_hw=32, method=m)[0] for m in ("auto", "auto_fallback")}
  assert rows["auto"]["method"] == "auto"
  assert rows["auto"]["sparse_layers"] == 17
  fb = rows["auto_fallback"]
  assert fb["method"] == "auto_fallback" and fb["layer"] == "whole_network"
  if jax.default_backend() == "gpu":  # per layer, as the plans say
    assert 0 <= fb["sparse_layers"] <= 17
  else:
    assert fb["sparse_layers"] == 0
    # The convolutions are the dense model's own; fc1000 runs as a 1x1
    # convolution rather than a matmul: the same sums in another order.
    assert fb["rel_err_vs_dense"] < 1e-6
  assert fb["time_us"] > 0 and fb["baselines_us"]["lax_default"] > 0


def test_network_rows_in_bfloat16():
  """A bfloat16 network is timed at default precision against the dense
  model in bfloat16 (lax_bf16), and its row says so."""
  from escort_jax import bench_network
  (row,) = bench_network.run_network(
      "resnet50", 1, precisions=("default",), dtype=jnp.bfloat16,
      num_inputs=1, calls=2, in_hw=32, method="auto")
  assert row["dtype"] == "bfloat16" and row["precision"] == "default"
  assert list(row["baselines_us"]) == ["lax_bf16"]
  assert row["baselines_us"]["lax_bf16"] > 0 and row["time_us"] > 0
  # bf16 outputs of the same network, sparse against dense.
  assert row["rel_err_vs_dense"] < 0.05


def test_networks_compute_in_their_dtype():
  """The benchmark's bfloat16 ResNet-50, dense and sparse, computes in
  bfloat16 to its output (its batch norms' float32 statistics had promoted
  it to float32 after the first one)."""
  from escort_jax import bench_network
  x = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.bfloat16)
  for model in bench_network.build_networks("resnet50", dtype=jnp.bfloat16):
    apply, state = bench_network.apply_fn(model, None)
    assert jax.eval_shape(apply, state, x).dtype == jnp.bfloat16


def test_network_run_times_each_dtype_at_its_precisions(tmp_path,
                                                        monkeypatch):
  """bench_network.run: float32 at fp32 HIGHEST and default precision,
  2-byte dtypes at default precision only; one results file."""
  from escort_jax import bench_network
  calls = []

  def fake_run_network(name, batch, *, method, dtype, precisions, **kw):
    calls.append((name, batch, method, jnp.dtype(dtype).name, precisions))
    return [{"net": name, "batch": batch, "method": method,
             "dtype": jnp.dtype(dtype).name, "precision": p,
             "time_us": 1.0, "baselines_us": {"x": 2.0},
             "speedup_kernel_time": 2.0, "wall_us": 1.0,
             "dense_wall_us": 2.0, "speedup_wall": 2.0,
             "rel_err_vs_dense": 0.0} for p in precisions]
  monkeypatch.setattr(bench_network, "run_network", fake_run_network)
  out = tmp_path / "nets.json"
  results = bench_network.run(["resnet50"], [1], out=out,
                              methods=["auto_fallback"],
                              dtypes=[jnp.float32, jnp.bfloat16])
  assert calls == [
      ("resnet50", 1, "auto_fallback", "float32", ("highest", "default")),
      ("resnet50", 1, "auto_fallback", "bfloat16", ("default",))]
  assert len(results["rows"]) == 3
  assert json.loads(out.read_text())["rows"] == results["rows"]
