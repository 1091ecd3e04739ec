"""The escort-jax command line: the demo (one reduced CPU run, in a
subprocess), convert + inspect round trips on a tiny model (and on the
demo's ResNet-50), the bench harness on a tiny run, and exit statuses
(0 ok, 1 a check failed, 2 usage or input errors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import checkpoint, cli, demo, prune, report
from escort_jax import tune as tune_module
from escort_jax.nnx import SparseConv, _get_value, _set_value

REPO = Path(__file__).resolve().parent.parent
TINY = "tests.test_cli:TinyNet"


def _run_module(*args, timeout=300):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  return subprocess.run([sys.executable, "-m", "escort_jax", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


# --------------------------------------------------------------------------
# A tiny model for convert / inspect, importable as tests.test_cli:TinyNet.

_List = getattr(nnx, "List", list)


class TinyNet(nnx.Module):
  """A small CNN: a 3x3 stem with BatchNorm, a strided 3x3 conv named like a
  ResNet-50 layer (so the SkimCaffe profile prunes it), a grouped 1x1 conv
  without bias (in an nnx.List) and a linear head. Input (12, 12, 3)."""

  input_shape = (12, 12, 3)

  def __init__(self, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 16, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
    self.down = nnx.Conv(16, 32, (3, 3), strides=2,
                         padding=((1, 1), (1, 1)), rngs=rngs)
    self.down.caffe_name = "res2a_branch2b"
    self.blocks = _List([nnx.Conv(32, 32, (1, 1), feature_group_count=2,
                                  use_bias=False, rngs=rngs)])
    self.head = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.stem(x)))
    x = nnx.relu(self.down(x))
    for block in self.blocks:
      x = nnx.relu(block(x))
    return self.head(jnp.mean(x, axis=(-3, -2)))


def _tiny(seed=0):
  model = TinyNet(nnx.Rngs(seed))
  # Non-trivial BatchNorm statistics, so that a lost Variable shows.
  _set_value(model.bn.mean, jnp.linspace(-0.5, 0.5, 16))
  _set_value(model.bn.var, jnp.linspace(0.5, 2.0, 16))
  return model


def _forward(model, x):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model(x))


@pytest.fixture(scope="module")
def tiny_dense(tmp_path_factory):
  """(dense model, its msgpack checkpoint)."""
  model = _tiny()
  path = tmp_path_factory.mktemp("tiny") / "dense.msgpack"
  report.save_dense(path, model)
  return model, path


def _json_main(argv, capsys):
  code = cli.main(argv + ["--json"])
  captured = capsys.readouterr()
  return code, (json.loads(captured.out) if code == 0 else None), captured


# --------------------------------------------------------------------------
# demo: one reduced CPU run (about 30-60 s on 2 cores).


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("demo")
  plot, saved = tmp / "demo.png", tmp / "resnet50-sparse.msgpack"
  # On a GPU, a small run too (the full one, batch 32 at 224x224, takes
  # minutes); on a CPU the defaults are the reduced run.
  small = (["--batch", "2", "--input-shape", "64"]
           if jax.default_backend() == "gpu" else [])
  proc = _run_module("demo", "--json", "--plot", str(plot), "--save",
                     str(saved), *small)
  return proc, plot, saved


def test_demo_runs_checks_and_reports(demo_run):
  proc, plot, saved = demo_run
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout)
  assert result["ok"] is True and result["model"] == "resnet50"
  on_gpu = jax.default_backend() == "gpu"
  assert result["on_gpu"] is on_gpu and result["reduced"] is (not on_gpu)
  # The SkimCaffe profile prunes ResNet-50's 16 3x3 branch2b convs.
  names = [r["layer"] for r in result["layers"]]
  assert len(names) == 16 and names[0] == "res2a_branch2b"
  assert all(n.endswith("_branch2b") for n in names)
  for check in ("check", "check_escort"):
    assert result["network"][check]["ok"]
    assert result["network"][check]["rel_err"] <= demo.DEMO_TOLERANCE
  assert result["network"]["check"]["output_shape"] == [
      result["batch"], 1000]
  checked = [r for r in result["layers"] if r["check"] is not None]
  assert len(checked) == result["checked_layers"] == 16
  for r in result["layers"]:
    assert 0.8 < r["sparsity"] < 1 and r["nnz"] > 0
    assert r["choice"]["method"] in ("escort", "dense")
  for r in checked:
    assert r["check"]["ok"] and r["check"]["rel_err"] < demo.DEMO_TOLERANCE
  if not on_gpu:
    assert result["batch"] == 1 and result["input_shape"] == [64, 64, 3]
    assert all(r["choice"]["source"] == "backend" for r in result["layers"])
    view = [r["gpu_view"] for r in result["layers"]]
    assert all(v["speedup_kind"] in ("recorded", "predicted") for v in view)
    assert result["network"]["timings"][0]["sparse_wall_us"] > 0
    assert "Speed needs an NVIDIA GPU" in proc.stderr
  else:
    assert all(r["times"]["dense_us"] > 0 for r in result["layers"])
  # The human report goes to stderr next to the JSON.
  assert "res5c_branch2b" in proc.stderr
  assert "All checks passed" in proc.stderr
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert result["plot"] == str(plot) and result["saved"] == str(saved)


def test_inspect_the_demo_checkpoint(demo_run, capsys):
  _, _, saved = demo_run
  if not saved.exists():
    pytest.skip("the demo run failed")
  code, result, _ = _json_main(["inspect", str(saved), "--model",
                                "resnet50", "--assume-gpu"], capsys)
  assert code == 0
  assert result["assume_gpu"] == report.DEFAULT_GPU_SLUG
  assert result["batch"] == 32 and result["input_shape"] == [224, 224, 3]
  assert result["totals"]["layers"] == 16
  rows = {r["layer"]: r for r in result["layers"]}
  assert rows["res2a_branch2b"]["input_shape"] == [32, 56, 56, 64]
  assert rows["res5a_branch2b"]["input_shape"] == [32, 7, 7, 512]
  for r in rows.values():
    c = r["choice"]
    assert c["source"] in ("plan", "cost-model")
    assert c["escort_speedup"] > 0 and c["speedup"] >= 0.999 * min(
        1.0, c["escort_speedup"])
  t = result["totals"]
  assert t["escort_layers"] + t["dense_layers"] == 16
  assert t["speedup"] > 0


def test_inspect_demo_checkpoint_with_the_wrong_model(demo_run, capsys):
  _, _, saved = demo_run
  if not saved.exists():
    pytest.skip("the demo run failed")
  assert cli.main(["inspect", str(saved), "--model", "googlenet"]) == 2
  assert "does not fit --model googlenet" in capsys.readouterr().err


def test_demo_failed_check_exits_1(monkeypatch, capsys, tmp_path):
  """The exit status follows result["ok"] (a fake, fast run)."""
  layer = {"layer": "l", "kernel_shape": [3, 3, 4, 4],
           "input_shape": [1, 8, 8, 4], "sparsity": 0.9, "nnz": 14,
           "choice": None, "check": {"rel_err": 0.5, "ok": False},
           "gpu_view": None}
  fake = {"on_gpu": False, "input_shape": [8, 8, 3], "model": "resnet50",
          "device": "cpu", "jax_version": jax.__version__, "batch": 1,
          "layers": [layer], "tolerance": 1e-4, "precision": "highest",
          "network": {"check": {"rel_err": 0.0, "ok": True}, "timings": []},
          "gpu_view": {"batch": 32, "input_shape": [224, 224, 3]},
          "plot": None, "saved": None, "elapsed_s": 0.1, "ok": False}
  monkeypatch.setattr(demo, "run_demo", lambda **kw: fake)
  assert cli.main(["demo", "--no-plot"]) == 1
  assert "FAILED" in capsys.readouterr().out


# --------------------------------------------------------------------------
# convert + inspect on the tiny model.


def test_convert_sparsity_round_trip(tiny_dense, tmp_path, capsys):
  model, dense_path = tiny_dense
  out = tmp_path / "sparse.msgpack"
  code, result, captured = _json_main(
      ["convert", str(dense_path), str(out), "--model", TINY,
       "--sparsity", "80%"], capsys)
  assert code == 0, captured.err[-3000:]
  assert result["mode"] == "sparsity" and result["ok"]
  assert result["checks"] == {"kernels_kept_exactly": True,
                              "reads_back": True}
  rows = {r["path"]: r for r in result["layers"]}
  assert set(rows) == {"stem", "down", "blocks.0"}
  assert all(r["converted"] for r in rows.values())
  assert rows["down"]["layer"] == "res2a_branch2b"
  for r in rows.values():
    assert r["density_before"] == 1.0
    assert r["nnz"] == prune.num_kept(r["size"], 0.8)
  assert result["totals"]["converted"] == 3
  assert "SparseConv" in captured.err  # the table, on stderr with --json

  # The sparse checkpoint computes what the magnitude-pruned model does.
  pruned, _ = prune.prune_model(model, sparsity=0.8)
  loaded = checkpoint.load_sparse(out, lambda: TinyNet(nnx.Rngs(1)))
  assert isinstance(loaded.down, SparseConv)
  assert isinstance(loaded.blocks[0], SparseConv)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 12, 12, 3)),
                  jnp.float32)
  np.testing.assert_allclose(_forward(loaded, x), _forward(pruned, x),
                             rtol=1e-5, atol=1e-6)

  # inspect: every layer, on this backend and as on the packaged GPU.
  code, info, _ = _json_main(["inspect", str(out), "--model", TINY,
                              "--batch", "4"], capsys)
  assert code == 0
  assert [r["path"] for r in info["layers"]] == ["stem", "down", "blocks.0"]
  by = {r["path"]: r for r in info["layers"]}
  assert by["stem"]["input_shape"] == [4, 12, 12, 3]
  assert by["down"]["output_shape"] == [4, 6, 6, 32]
  assert by["blocks.0"]["groups"] == 2
  if jax.default_backend() != "gpu":
    assert all(r["choice"]["method"] == "dense" for r in info["layers"])
    assert all(r["choice"]["source"] == "backend" for r in info["layers"])
  code, info, _ = _json_main(["inspect", str(out), "--model", TINY,
                              "--input-shape", "24", "--assume-gpu",
                              "--dtype", "bfloat16"], capsys)
  assert code == 0 and info["dtype"] == "bfloat16"
  assert info["layers"][0]["input_shape"] == [32, 24, 24, 3]
  for r in info["layers"]:
    c = r["choice"]
    assert c["source"] == "cost-model" and c["speedup_kind"] == "predicted"
    assert c["escort_us"] > 0 and c["dense_us"] > 0
  # A GPU without a plan file: the cost model decides, and a note says so.
  code, info, _ = _json_main(["inspect", str(out), "--model", TINY,
                              "--device", "nvidia-a100-sxm4-80gb"], capsys)
  assert code == 0 and info["assume_gpu"] == "nvidia-a100-sxm4-80gb"
  assert "no plan file" in info["notes"][0]
  assert {r["choice"]["source"] for r in info["layers"]} == {"cost-model"}


def test_convert_profile_prunes_the_named_layers(tiny_dense, tmp_path,
                                                 capsys):
  _, dense_path = tiny_dense
  out = tmp_path / "sparse.msgpack"
  code, result, captured = _json_main(
      ["convert", str(dense_path), str(out), "--model", TINY, "--profile",
       "resnet50"], capsys)
  assert code == 0, captured.err[-3000:]
  rows = {r["path"]: r for r in result["layers"]}
  # Only "down" carries a name of the profile (res2a_branch2b: 88%).
  assert rows["down"]["converted"]
  assert rows["down"]["sparsity"] == pytest.approx(
      prune.SKIMCAFFE_PROFILES["resnet50"]["res2a_branch2b"], abs=1e-3)
  assert not rows["stem"]["converted"] and "density 1.00 > 0.5" in (
      rows["stem"]["note"])
  assert result["totals"]["converted"] == 1
  assert result["max_density"] == 0.5


def test_convert_keep_zeros_and_max_density(tmp_path, capsys):
  model = _tiny()
  k = np.asarray(_get_value(model.stem.kernel)).copy()
  k[np.abs(k) < np.quantile(np.abs(k), 0.7)] = 0  # 70% zeros
  _set_value(model.stem.kernel, jnp.asarray(k))
  dense_path = tmp_path / "dense.msgpack"
  report.save_dense(dense_path, model)
  out = tmp_path / "sparse.msgpack"
  code, result, _ = _json_main(["convert", str(dense_path), str(out),
                                "--model", TINY], capsys)
  assert code == 0 and result["mode"] == "keep-zeros"
  assert [r["path"] for r in result["layers"] if r["converted"]] == ["stem"]
  rows = {r["path"]: r for r in result["layers"]}
  assert rows["stem"]["nnz"] == np.count_nonzero(k)
  # A tighter --max-density converts nothing: exit 2, nothing written.
  out2 = tmp_path / "none.msgpack"
  assert cli.main(["convert", str(dense_path), str(out2), "--model", TINY,
                   "--max-density", "0.2"]) == 2
  err = capsys.readouterr().err
  assert "sparse enough" in err and "Nothing was written" in err
  assert not out2.exists()


def test_convert_console_script_subprocess(tiny_dense, tmp_path):
  """`python -m escort_jax convert` (the console script's code path)."""
  _, dense_path = tiny_dense
  out = tmp_path / "sparse.msgpack"
  proc = _run_module("convert", str(dense_path), str(out), "--model", TINY,
                     "--sparsity", "0.9", timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "3 of 3 convs converted" in proc.stdout
  assert out.exists()


def test_convert_orbax_checkpoint(tmp_path, capsys):
  ocp = pytest.importorskip("orbax.checkpoint")
  model = _tiny()
  ckpt = (tmp_path / "orbax").resolve()
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(ckpt, nnx.state(model))
  checkpointer.wait_until_finished()
  out = tmp_path / "sparse.msgpack"
  code, result, captured = _json_main(
      ["convert", str(ckpt), str(out), "--model", TINY, "--sparsity", "0.5"],
      capsys)
  assert code == 0, captured.err[-3000:]
  assert result["ok"] and result["totals"]["converted"] == 3
  loaded = checkpoint.load_sparse(out, lambda: TinyNet(nnx.Rngs(1)))
  np.testing.assert_array_equal(np.asarray(_get_value(loaded.bn.var)),
                                np.asarray(_get_value(model.bn.var)))


def test_convert_orbax_not_installed(tmp_path, monkeypatch, capsys):
  (tmp_path / "ckpt").mkdir()
  monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)
  assert cli.main(["convert", str(tmp_path / "ckpt"),
                   str(tmp_path / "o.msgpack"), "--model", TINY]) == 2
  assert "orbax-checkpoint is not installed" in capsys.readouterr().err


def test_convert_failed_readback_exits_1(tiny_dense, tmp_path, monkeypatch,
                                        capsys):
  _, dense_path = tiny_dense
  real = checkpoint.load_sparse

  def corrupted(path, arg, **kw):
    model = real(path, arg, **kw)
    _set_value(model.down.values, _get_value(model.down.values) + 1.0)
    return model

  monkeypatch.setattr(checkpoint, "load_sparse", corrupted)
  code = cli.main(["convert", str(dense_path), str(tmp_path / "s.msgpack"),
                   "--model", TINY, "--sparsity", "0.8"])
  assert code == 1
  assert "FAILED" in capsys.readouterr().out


def test_choose_path_uses_recorded_plans():
  """A workload layer that has a tuned H100 plan: the plan decides, with
  its recorded times."""
  from escort_jax import conv_geometry as cg
  from escort_jax import workload as wl
  from escort_jax.structure import SparseKernel
  layer = wl.get_layer("caffenet/conv2")
  sk = SparseKernel.from_dense(wl.make_kernel(layer))
  conv = layer.conv_kwargs()
  g = cg.make_geometry((32, layer.in_hw, layer.in_hw, layer.in_channels),
                       sk.structure, conv["window_strides"], conv["padding"],
                       (1, 1), conv["feature_group_count"])
  c = report.choose_path(sk.structure, g, "float32",
                         gpu_slug=report.DEFAULT_GPU_SLUG)
  assert c["source"] == "plan" and c["speedup_kind"] == "recorded"
  assert c["method"] in ("escort", "dense") and c["escort_us"] > 0
  c2 = report.choose_path(sk.structure, g, "float32", "highest",
                          gpu_slug=report.DEFAULT_GPU_SLUG)
  assert c2["source"] == "cost-model" and c2["speedup_kind"] == "predicted"


# --------------------------------------------------------------------------
# Input errors: exit status 2 with a message that says what is wrong.


def test_convert_input_errors(tiny_dense, tmp_path, capsys):
  model, dense_path = tiny_dense
  sparse_path = tmp_path / "sparse.msgpack"
  checkpoint.save_sparse(sparse_path, __import__(
      "escort_jax").sparsify(prune.prune_model(model, sparsity=0.9)[0]))
  junk = tmp_path / "junk.bin"
  junk.write_bytes(b"\xc1\x00not msgpack")
  out = str(tmp_path / "out.msgpack")
  cases = [
      (["convert", str(tmp_path / "missing.msgpack"), out, "--model", TINY],
       "no such file"),
      (["convert", str(dense_path), out, "--model", "resnet50"],
       "does not fit --model resnet50"),
      (["convert", str(sparse_path), out, "--model", TINY],
       "already an escort-jax sparse checkpoint"),
      (["convert", str(junk), out, "--model", TINY],
       "not a msgpack checkpoint"),
      (["convert", str(dense_path), str(tmp_path / "no" / "dir.msgpack"),
        "--model", TINY], "no such directory"),
      (["convert", str(dense_path), str(dense_path), "--model", TINY],
       "same file"),
      (["convert", str(dense_path), out, "--model", "vgg16"],
       "unknown model"),
      (["convert", str(dense_path), out, "--model", "no_such_mod:Net"],
       "cannot import"),
      (["convert", str(dense_path), out, "--model", "tests.test_cli:Nope"],
       "has no attribute"),
      (["convert", str(dense_path), out, "--model", TINY, "--profile",
        "googlenet"], "names none of this model's layers"),
      (["inspect", str(tmp_path / "missing.msgpack"), "--model", TINY],
       "no such file"),
      (["inspect", str(dense_path), "--model", TINY],
       "not an escort-jax sparse checkpoint"),
      (["inspect", str(junk), "--model", TINY],
       "not an escort-jax sparse checkpoint"),
      (["inspect", str(sparse_path), "--model", "caffenet"],
       "does not fit --model caffenet"),
      (["inspect", str(sparse_path), "--model", TINY, "--input-shape",
        "0,3"], "--input-shape"),
  ]
  for argv, message in cases:
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err
    assert message in err, (argv, err)
    assert "Traceback" not in err
  assert not Path(out).exists()


def test_demo_unwritable_plot_exits_2_at_once(tmp_path, capsys):
  assert cli.main(["demo", "--plot", str(tmp_path / "no" / "x.png")]) == 2
  assert "no such directory" in capsys.readouterr().err
  assert cli.main(["demo", "--input-shape", "64,64,1"]) == 2
  assert "3 input channels" in capsys.readouterr().err


def test_missing_params_are_named(tmp_path, capsys):
  """A checkpoint of only the nnx.Param state: the BatchNorm statistics are
  missing, and the error says so."""
  from flax import serialization
  path = tmp_path / "params.msgpack"
  state = nnx.state(_tiny(), nnx.Param)
  pure = (nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict")
          else state.to_pure_dict())
  path.write_bytes(serialization.msgpack_serialize(pure))
  assert cli.main(["convert", str(path), str(tmp_path / "o.msgpack"),
                   "--model", TINY]) == 2
  err = capsys.readouterr().err
  assert "bn/mean" in err and "not only the nnx.Param state" in err


# --------------------------------------------------------------------------
# argparse, help, bench.


def test_help_via_module():
  proc = _run_module("--help", timeout=60)
  assert proc.returncode == 0
  for word in ("demo", "convert", "inspect", "bench"):
    assert word in proc.stdout


@pytest.mark.parametrize("command,flag", [
    ("demo", "--plot"), ("convert", "--keep-zeros"),
    ("inspect", "--assume-gpu"), ("bench", "--resume")])
def test_subcommand_help(command, flag, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main([command, "--help"])
  assert e.value.code == 0
  assert flag in capsys.readouterr().out


@pytest.mark.parametrize("argv", [
    ["frobnicate"],
    ["demo", "--batch", "0"],
    ["demo", "--batch", "x"],
    ["demo", "--check-layers", "some"],
    ["demo", "--precision", "tf32"],
    ["convert", "in.msgpack"],
    ["convert", "a", "b", "--sparsity", "1.5"],
    ["convert", "a", "b", "--sparsity", "90"],
    ["convert", "a", "b", "--sparsity", "0.5", "--profile", "resnet50"],
    ["convert", "a", "b", "--profile", "vgg"],
    ["convert", "a", "b", "--max-density", "2"],
    ["inspect"],
    ["inspect", "c", "--batch", "0"],
    ["inspect", "c", "--dtype", "int8"],
    ["bench", "--max-hw", "-3"],
    ["bench", "--bogus"],
])
def test_argparse_errors_exit_2(argv, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 2
  assert "error" in capsys.readouterr().err


def test_no_command_exits_2(capsys):
  assert cli.main([]) == 2
  assert "demo" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["bench", "--layers", "no_such_layer"], "no layer matches"),
    (["bench", "--net", "vgg"], "unknown net"),
    (["bench", "--batch", "0"], "positive"),
    (["bench", "--sparsity", "1.5"], "sparsity"),
    (["bench", "--sparsity", "90"], "sparsity"),
    (["bench", "--dtype", "int8"], "unknown dtype"),
    (["bench", "--method", "fast"], "unknown method"),
    (["bench", "--config", "speed=11"], "unknown KernelConfig field"),
    (["bench", "--baselines", "cudnn"], "unknown baseline"),
    (["bench", "--resume", "/nonexistent/results.json"], "no such file"),
    (["bench", "--vector-width", "12"], "vector width"),
    (["bench", "--method", "vector"], "needs vector-sparse"),
    (["bench", "--config", "bk=64"], "unknown KernelConfig field"),
    (["bench", "--method", "escort", "vector", "--vector-width", "16",
      "--config", "speed=11"], "fits no method"),
    (["bench", "--layers", "inception_4a/5x5", "--vector-width", "32"],
     "does not divide"),
    (["bench", "--candidates", "vector"], "goes with --tune"),
    # --sharded runs whole pruned networks: unstructured kernels, their own
    # configs.
    (["bench", "--sharded", "--vector-width", "16"],
     "does not take --vector-width"),
    (["bench", "--sharded", "--config", "rpp=8"], "does not take --config"),
    (["bench", "--sharded", "--column-multiple", "8"],
     "does not take --column-multiple"),
    (["bench", "--sharded", "--method", "vector"],
     "needs vector-sparse kernels"),
    (["bench", "--sharded", "--method", "fast"], "unknown method"),
])
def test_bench_usage_errors_exit_2(argv, message, capsys, tmp_path):
  # Tiny settings, so that a check that wrongly passes cannot start a long
  # benchmark.
  tiny = ["--small", "--max-hw", "4", "--batch", "1", "--out",
          str(tmp_path / "x.json")]
  if "--batch" in argv:
    tiny = tiny[:3] + tiny[5:]
  assert cli.main(argv + tiny) == 2
  assert message in capsys.readouterr().err


def test_bench_tiny_run_json(tmp_path, capsys):
  out = tmp_path / "bench.json"
  code = cli.main(["bench", "--small", "--layers", "inception_3a/5x5",
                   "--max-hw", "5", "--method", "escort", "--baselines",
                   "lax_fp32_highest,lax_bf16", "--config", "rpp=4,bq=64",
                   "--out", str(out), "--json"])
  captured = capsys.readouterr()
  assert code == 0, captured.err[-3000:]
  results = json.loads(captured.out)
  assert results == json.loads(out.read_text())
  (row,) = results["rows"]
  assert row["method"] == "escort[rpp=4,bq=64]"
  assert row["config"] == {"rows_per_program": 4, "block_q": 64}
  assert set(row["baselines_us"]) == {"lax_fp32_highest", "lax_bf16"}
  assert (tmp_path / "bench.md").exists()
  assert (tmp_path / "bench-layers.png").exists()


def test_bench_vector_rows_json(tmp_path, capsys):
  """Issue 5's workload, tiny: vector-sparse kernels (V=16) at 75%, bf16,
  against lax bf16, with the vector kernel, auto and a VectorConfig."""
  out = tmp_path / "vec.json"
  code = cli.main(["bench", "--small", "--layers", "inception_3a/5x5",
                   "--max-hw", "4", "--vector-width", "16", "--sparsity",
                   "75%", "--dtype", "bf16", "--method", "vector", "auto",
                   "--config", "bq=32,bk=16", "--baselines", "lax_bf16",
                   "--out", str(out), "--json"])
  captured = capsys.readouterr()
  assert code == 0, captured.err[-3000:]
  rows = json.loads(captured.out)["rows"]
  assert [(r["method"], r["vector_width"]) for r in rows] == [
      ("vector[bq=32,bk=16]", 16), ("auto", 16)]  # bk: no KernelConfig
  assert rows[0]["config"] == {"block_q": 32, "block_k": 16}
  assert all(r["target_sparsity"] == 0.75 and r["sweep"] for r in rows)
  from escort_jax.structure import ALIGNED_COLUMNS  # pylint: disable=g-import-not-at-top
  assert all(r["column_multiple"] == ALIGNED_COLUMNS for r in rows)
  assert "| all layers | 0.75 | 1 | bfloat16 | vector[bq=32,bk=16] | 16 |" in (
      (tmp_path / "vec.md").read_text())


def test_bench_column_multiple(tmp_path, capsys):
  """--column-multiple 1 keeps the exact rounded count of vectors; 0 is a
  usage error."""
  from escort_jax import workload as wl  # pylint: disable=g-import-not-at-top
  args = ["bench", "--small", "--layers", "inception_3a/5x5", "--max-hw",
          "4", "--vector-width", "16", "--sparsity", "0.8", "--dtype",
          "bf16", "--method", "vector", "--baselines", "lax_bf16",
          "--no-report", "--json"]
  code = cli.main(args + ["--column-multiple", "1", "--out",
                          str(tmp_path / "a.json")])
  captured = capsys.readouterr()
  assert code == 0, captured.err[-3000:]
  (row,) = json.loads(captured.out)["rows"]
  assert row["column_multiple"] == 1
  assert row["nnz"] == wl.get_layer("googlenet/inception_3a/5x5").nnz(0.8, 16)
  with pytest.raises(SystemExit) as e:
    cli.main(args + ["--column-multiple", "0"])
  assert e.value.code == cli.EXIT_USAGE


def test_bench_tune_vector(tmp_path, capsys, monkeypatch):
  """`bench --tune --vector-width 16` tunes the vector-sparse kernel, so the
  vector kernel's candidates are timed too (one candidate each, here)."""
  from escort_jax import tune  # pylint: disable=g-import-not-at-top
  from escort_jax.ops import KernelConfig, VectorConfig
  monkeypatch.setitem(tune.CANDIDATE_SETS, "all", (
      (KernelConfig(2, 32, 4, 1, 1),), (VectorConfig(32, 16, 4, 2),)))
  code = cli.main(["bench", "--tune", "--small", "--layers",
                   "inception_3a/5x5", "--max-hw", "4", "--vector-width",
                   "none", "16", "--sparsity", "0.9", "--dtype", "bf16",
                   "--plan-dir", str(tmp_path), "--json"])
  captured = capsys.readouterr()
  assert code == 0, captured.err[-3000:]
  plain, vec = json.loads(captured.out)
  assert plain["requested_vector_width"] is None
  assert plain["vector_width"] == 1 and plain["config_method"] == "escort"
  assert not any(k.startswith("vector:") for k in plain["times_us"])
  assert vec["requested_vector_width"] == 16 and vec["vector_width"] == 16
  assert vec["sparsity"] == 0.9 and vec["in_hw"] == 4
  assert tune.time_key("vector", VectorConfig(32, 16, 4, 2)) in (
      vec["times_us"])
  assert vec["method"] in ("escort", "vector", "dense")
  assert "V=16 sp=0.9 b=1 bfloat16" in captured.err
  assert (tmp_path / "cpu.json").exists()


@pytest.mark.parametrize("name", sorted(tune_module.CANDIDATE_SETS))
def test_bench_tune_candidates(name, tmp_path, capsys, monkeypatch):
  """`bench --tune --candidates NAME` times tune.CANDIDATE_SETS[NAME]; with
  "vector", the escort kernel only at its default config."""
  from escort_jax import tune  # pylint: disable=g-import-not-at-top
  from escort_jax.ops import KernelConfig
  calls = []

  def fake(*args, candidates, vector_candidates, **kwargs):
    del args, kwargs
    calls.append((tuple(candidates), tuple(vector_candidates)))
    return {"method": "dense", "config": {}, "config_method": "escort",
            "best_configs": {}, "vector_width": 16,
            "times_us": {"dense": 1.0, "rows_per_program=4": 2.0}}

  monkeypatch.setattr(tune, "tune_layer", fake)
  code = cli.main(["bench", "--tune", "--candidates", name, "--layers",
                   "res3a_branch2b", "--vector-width", "16", "--batch", "32",
                   "--dtype", "bf16", "--plan-dir", str(tmp_path)])
  err = capsys.readouterr().err
  assert code == 0, err[-3000:]
  assert calls == [tune.CANDIDATE_SETS[name]]
  if name == "vector":
    assert calls[0][0] == (KernelConfig(),)
    assert calls[0][1] == tune.DEFAULT_VECTOR_CANDIDATES
  assert "escort 2.0 us, dense 1.0 us" in err


@pytest.mark.parametrize("flag, want", [(None, None),
                                        ("default", None),
                                        ("highest", "highest")])
def test_bench_tune_precision(flag, want, tmp_path, capsys, monkeypatch):
  """`bench --tune --precision highest` tunes against fp32 HIGHEST dense
  and keys the plans by it; without --tune the flag is refused."""
  from escort_jax import tune  # pylint: disable=g-import-not-at-top
  seen = []

  def fake(*args, precision, **kwargs):
    del args, kwargs
    seen.append(precision)
    return {"method": "dense", "config": {}, "config_method": "escort",
            "best_configs": {}, "times_us": {"dense": 1.0}}

  monkeypatch.setattr(tune, "tune_layer", fake)
  extra = [] if flag is None else ["--precision", flag]
  code = cli.main(["bench", "--tune", "--layers", "res3a_branch2b",
                   "--batch", "1", "--dtype", "f32", "--plan-dir",
                   str(tmp_path)] + extra)
  assert code == 0, capsys.readouterr().err[-3000:]
  assert seen == [want]
  if flag == "highest":
    assert cli.main(["bench", "--precision", "highest", "--layers",
                     "res3a_branch2b"]) == cli.EXIT_USAGE
    assert "--precision goes with --tune" in capsys.readouterr().err


def test_bench_tune_network(tmp_path, capsys, monkeypatch):
  """`bench --tune --network resnet50` tunes the 17 sparse layers of the
  network that `bench --network` runs, with the shapes they get there, under
  the precision asked for."""
  from escort_jax import tune  # pylint: disable=g-import-not-at-top
  seen = []

  def fake(x_shape, sk, window_strides, padding, **kwargs):
    seen.append((tuple(x_shape), sk.shape, window_strides, kwargs["dtype"],
                 jax.config.jax_default_matmul_precision))
    return {"method": "escort", "config": {}, "config_method": "escort",
            "best_configs": {}, "times_us": {"dense": 2.0, "x": 1.0}}

  monkeypatch.setattr(tune, "tune_layer", fake)
  code = cli.main(["bench", "--tune", "--network", "resnet50", "--max-hw",
                   "32", "--batch", "2", "--precision", "highest",
                   "--plan-dir", str(tmp_path), "--json"])
  captured = capsys.readouterr()
  assert code == 0, captured.err[-3000:]
  # The pruned 3x3 layers and fc1000 (a SparseLinear: a 1x1 SparseConv on a
  # 1x1 map), once each.
  assert len(seen) == 17
  fc = [s for s in seen if s[1] == (1, 1, 2048, 1000)]
  assert [s[0] for s in fc] == [(2, 1, 1, 2048)]
  convs = [s for s in seen if s[1] != (1, 1, 2048, 1000)]
  # res2a: 32 -> 16 (stem, stride 2) -> 8 (max pool); res5c: 1.
  assert convs[0][:2] == ((2, 8, 8, 64), (3, 3, 64, 64))
  assert convs[-1][:2] == ((2, 1, 1, 512), (3, 3, 512, 512))
  assert {s[3] for s in seen} == {jnp.dtype(jnp.float32)}
  assert {s[4] for s in seen} == {"highest"}
  report = json.loads(captured.out)
  layers = [r["layer"] for r in report]
  assert "fc1000.conv" in layers
  assert [l for l in layers if l != "fc1000.conv"][:2] == ["res2a.branch2b",
                                                           "res2b.branch2b"]
  assert "resnet50 b=2 float32 res2a.branch2b (2, 8, 8, 64): escort" in (
      captured.err)
  # --layers keeps the layers whose path contains one of the names.
  seen.clear()
  code = cli.main(["bench", "--tune", "--network", "resnet50", "--max-hw",
                   "32", "--batch", "2", "--layers", "fc,res5c",
                   "--plan-dir", str(tmp_path)])
  assert code == 0, capsys.readouterr().err[-3000:]
  assert sorted(s[1] for s in seen) == [(1, 1, 2048, 1000), (3, 3, 512, 512)]


def test_spread_indices():
  assert demo.spread_indices(16, 4) == [0, 5, 10, 15]
  assert demo.spread_indices(3, None) == [0, 1, 2]
  assert demo.spread_indices(3, 10) == [0, 1, 2]
  assert demo.spread_indices(5, 1) == [0]


def test_bench_network_takes_dtypes(tmp_path, monkeypatch):
  """`bench --network NET --dtype ...` times the network in each dtype."""
  from escort_jax import bench_network
  seen = {}

  def fake_run(nets, batches, **kw):
    seen.update(nets=nets, batches=batches, **kw)
    return {"rows": []}
  monkeypatch.setattr(bench_network, "run", fake_run)
  code = cli.main(["bench", "--network", "resnet50", "--batch", "1",
                   "--dtype", "float32", "bfloat16", "--method",
                   "auto_fallback", "--out", str(tmp_path / "n.json")])
  assert code == 0
  assert seen["nets"] == ["resnet50"] and seen["batches"] == [1]
  assert [jnp.dtype(d) for d in seen["dtypes"]] == [jnp.dtype("float32"),
                                                    jnp.dtype("bfloat16")]
  assert seen["methods"] == ["auto_fallback"]
  assert cli.main(["bench", "--network", "resnet50", "--dtype", "int8"]) != 0
