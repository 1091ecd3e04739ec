"""The escort-jax command line: `python -m escort_jax demo --json`, `bench`
on a tiny CPU run, help, and exit status 2 on usage errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import pytest

from escort_jax import cli

REPO = Path(__file__).resolve().parent.parent


def _run_module(*args, timeout=170):
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  return subprocess.run([sys.executable, "-m", "escort_jax", *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_demo_json_subprocess():
  """The main job: four real layers checked; exits 0 with JSON on stdout."""
  proc = _run_module("demo", "--json")
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout)
  assert result["ok"] is True
  names = [e["layer"] for e in result["layers"]]
  assert names == [n for n, _ in cli.DEMO_LAYERS]
  by_name = {e["layer"]: e for e in result["layers"]}
  assert by_name["caffenet/conv2"]["groups"] == 2
  assert by_name["caffenet/conv1"]["stride"] == 4
  assert by_name["caffenet/conv1"]["sparsity"] == pytest.approx(0.9, abs=1e-3)
  for e in result["layers"]:
    assert e["ok"] and e["rel_err"] < cli.DEMO_TOLERANCE
    assert e["rel_err_bias_relu"] < cli.DEMO_TOLERANCE
  if not result["timed"]:
    assert result["backend"] != "gpu"


def test_demo_human_output_in_process(capsys, monkeypatch):
  """The table, the verdict, and the plain CPU caveat (one small layer: the
  subprocess test above checks all four)."""
  monkeypatch.setattr(cli, "DEMO_LAYERS", (("googlenet/inception_3a/5x5",
                                            None),))
  assert cli.main(["demo", "--max-hw", "8"]) == 0
  err = capsys.readouterr()
  text = err.out + err.err
  assert "All checks passed" in text
  assert "googlenet/inception_3a/5x5" in text
  if jax.default_backend() != "gpu":
    assert "Speed needs an NVIDIA GPU" in text


def test_bench_help():
  with pytest.raises(SystemExit) as e:
    cli.main(["bench", "--help"])
  assert e.value.code == 0


def test_help_via_module():
  proc = _run_module("bench", "--help", timeout=60)
  assert proc.returncode == 0
  assert "--resume" in proc.stdout and "--config" in proc.stdout


@pytest.mark.parametrize("argv", [
    ["frobnicate"],
    ["demo", "--batch", "0"],
    ["demo", "--batch", "x"],
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
