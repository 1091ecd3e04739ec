"""The examples run end to end (as scripts, in subprocesses) with small
settings, and print what they promise.

On a 2-core CPU: digits --quick about 17 s, ResNet-50 at 32x32 about 16 s
(auto) and 20 s (escort, Pallas interpreter).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"


def run_example(script: str, *args: str, timeout: float = 600) -> str:
  """Runs examples/<script> with this interpreter; returns its stdout after
  asserting exit code 0."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep)
                     if p])
  proc = subprocess.run(
      [sys.executable, str(EXAMPLES / script), *args], cwd=REPO, env=env,
      capture_output=True, text=True, timeout=timeout, check=False)
  assert proc.returncode == 0, (
      f"{script} {' '.join(args)} exited with {proc.returncode}\n"
      f"--- stdout ---\n{proc.stdout[-4000:]}\n"
      f"--- stderr ---\n{proc.stderr[-4000:]}")
  return proc.stdout


def table_value(out: str, row: str) -> list[float]:
  """The last column of every table line that starts with `row`."""
  return [float(m.group(1)) for m in re.finditer(
      rf"^{re.escape(row)}.*?\s([0-9.]+)\s*$", out, re.MULTILINE)]


def test_prune_finetune_digits():
  pytest.importorskip("sklearn", reason="the digits example needs "
                      "scikit-learn (the examples extra)")
  out = run_example("prune_finetune_digits.py", "--quick")

  # Four checks (magnitude / vector x auto / escort), all on the whole
  # test set, all identical.
  checks = re.findall(r"identical predictions: (True|False) \((\d+)/(\d+)",
                      out)
  assert len(checks) == 4, out
  assert all(ok == "True" and a == b == "450" for ok, a, b in checks), out
  assert "all identical predictions: True" in out
  assert "output-channel vector: True" in out

  dense = float(re.search(r"^dense accuracy: ([0-9.]+)$", out,
                          re.MULTILINE).group(1))
  assert dense > 0.9, out
  finetuned = table_value(out, "  + fine-tuned (mask fixed)")
  assert len(finetuned) == 2 and min(finetuned) > 0.8, out
  # Pruning keeps 10 % of the conv weights, fine-tuning keeps the mask.
  for line in out.splitlines():
    if line.startswith(("pruned 90%", "  + fine-tuned", "sparse (")):
      assert re.search(r"\s0\.900\s", line), line
  # The sparse models score what the dense-pruned ones do.
  assert table_value(out, "sparse (magnitude), auto") == [finetuned[0]]
  assert table_value(out, "sparse (vector V=8), auto") == [finetuned[1]]
  assert table_value(out, "sparse (vector V=8), escort") == [finetuned[1]]


@pytest.mark.parametrize("method", ["auto", "escort"])
def test_resnet50_layer_swap(method):
  out = run_example("resnet50_layer_swap.py", "--size", "32", "--batch", "1",
                    "--calls", "2", "--method", method)
  m = re.search(r"converted (\d+) of (\d+) convolutions", out)
  assert m, out
  # SkimCaffe's ResNet-50 prunes the 16 3x3 branch2b convs.
  assert (int(m.group(1)), int(m.group(2))) == (16, 53), out
  err = float(re.search(r"relative error of the logits ([0-9.e+-]+)",
                        out).group(1))
  assert err < 1e-4, out
  assert "top-1 agreement 1.000" in out
  assert "sparse model matches dense: True" in out
  assert re.search(r"res5c\.branch2b\s+res5c_branch2b\s+3x3x512x512\s+0\.9",
                   out), out
