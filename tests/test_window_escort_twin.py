"""The shared-memory-window escort probe's schedule, on the CPU.

benchmarks/window_escort_probe.py is a Mosaic GPU kernel, which has no CPU
interpreter; its numpy twin runs the kernel's exact loop over the packed
schedule (windows, chunks, per-row entry ranges). `--twin` checks the twin
against the escort reference and lax.conv at HIGHEST in float64 on five
layers (stride 4, two feature groups, 5x5 with a partial last row group)
and exits non-zero on any mismatch.
"""

from __future__ import annotations

from pathlib import Path
import subprocess
import sys
import os

REPO = Path(__file__).resolve().parents[1]


def test_window_probe_twin_matches_lax():
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
  r = subprocess.run(
      [sys.executable, "benchmarks/window_escort_probe.py", "--twin"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
  lines = [l for l in r.stdout.splitlines() if l.startswith("twin ")]
  assert len(lines) == 5, r.stdout
