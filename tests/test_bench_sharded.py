"""`escort-jax bench --sharded` (escort_jax.bench_sharded) on 4 fake CPU
devices: pruned ResNet-50 at 32x32, one image per device, escort layers.

XLA_FLAGS=--xla_force_host_platform_device_count must be set before JAX
initialises, so the command runs in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from escort_jax import cli
from tests.conftest import REPO, fake_devices_env

NUM_DEVICES = 4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  out = tmp_path_factory.mktemp("sharded") / "sharded.json"
  proc = subprocess.run(
      [sys.executable, "-m", "escort_jax", "bench", "--sharded",
       "--network", "resnet50", "--batch", "1", "--max-hw", "32",
       "--repeats", "2", "--out", str(out)],
      env=fake_devices_env(NUM_DEVICES), cwd=str(REPO), capture_output=True,
      text=True, timeout=600)
  assert proc.returncode == 0, (
      f"bench --sharded failed (rc {proc.returncode}):\n"
      f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
  return json.loads(out.read_text())


def test_results_have_the_schema_of_the_benchmarks(results):
  for key in ("device", "jax_version", "date", "gpus", "rows"):
    assert key in results, key
  assert results["gpus"] == NUM_DEVICES
  assert results["platform"] == "cpu"
  assert results["net"] == "resnet50" and results["method"] == "escort"
  assert results["batch_per_device"] == 1 and results["in_hw"] == 32


def test_throughput_and_scaling_efficiency(results):
  t = results["throughput_images_per_s"]
  assert set(t) == {"1", str(NUM_DEVICES)}
  assert all(v > 0 for v in t.values())
  assert results["scaling_efficiency"] == pytest.approx(
      t[str(NUM_DEVICES)] / (NUM_DEVICES * t["1"]))
  rows = {r["devices"]: r for r in results["rows"]}
  assert set(rows) == {1, NUM_DEVICES}
  for n, row in rows.items():
    assert row["layer"] == "whole_network"
    assert row["batch"] == n * row["batch_per_device"]
    assert row["images_per_s"] == pytest.approx(t[str(n)])
    assert row["images_per_s"] == pytest.approx(
        row["batch"] / (row["wall_us"] * 1e-6))


def test_sharded_outputs_equal_single_device_outputs(results):
  assert results["outputs_equal"] is True
  assert results["max_rel_err"] == 0.0
  row = [r for r in results["rows"] if r["devices"] == NUM_DEVICES][0]
  assert row["outputs_equal"] and row["rel_err_vs_one_device"] == 0.0


def test_inference_is_data_parallel(results):
  """The output stays sharded over the batch and the compiled program moves
  no data between devices: every layer, sparse ones included, runs on each
  device's own images."""
  row = [r for r in results["rows"] if r["devices"] == NUM_DEVICES][0]
  assert row["out_sharded"], row
  assert row["collectives"] == [], row


@pytest.mark.parametrize("extra", [
    ["--network", "resnet50", "googlenet"],
    ["--batch", "1", "2"],
    ["--network", "vgg"],
    ["--dtype", "int8"],
])
def test_bad_sharded_arguments_are_usage_errors(extra, capsys):
  assert cli.main(["bench", "--sharded", *extra]) == cli.EXIT_USAGE
  assert "escort-jax bench: error" in capsys.readouterr().err
