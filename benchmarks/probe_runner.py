"""What the kernel probes share: each (layer, variant) runs in a child
process of its own, since a bad copy or launch can kill the process, and
reports one JSON row on a line starting with "ROW "; the parent collects
the rows (a crash or timeout becomes a row too) and rewrites the results
file after each one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from typing import Any, Callable, Sequence

import jax

ROW_PREFIX = "ROW "


def child(variant: str, layer: str, run: Callable[[], dict]) -> None:
  """In the child: run() and print its row; an exception is a row too
  (the probe's point is what fails)."""
  row: dict[str, Any] = dict(variant=variant, layer=layer)
  try:
    row = run()
  except Exception as e:  # recorded, not raised
    row.update(status="error", error=f"{type(e).__name__}: {e}"[:3000],
               trace=traceback.format_exc()[-4000:])
    print(row["error"][:1500], flush=True)
  print(ROW_PREFIX + json.dumps(row), flush=True)


def run_children(script: str, layers: Sequence[str],
                 variants: Sequence[str], child_args: Sequence[str],
                 out_path: str, timeout: int = 240,
                 **meta: Any) -> list[dict]:
  """In the parent: `script --child --variant V --layers L *child_args` for
  every (layer, variant), rows written to out_path (with the device, the
  jax version and `meta`) after each."""
  os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
  rows = []
  for layer in layers:
    for variant in variants:
      cmd = [sys.executable, script, "--child", "--variant", variant,
             "--layers", layer, *child_args]
      try:
        r = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=timeout)
        out = r.stdout + r.stderr
      except subprocess.TimeoutExpired as e:
        out, r = f"timeout: {e}", None
      found = [l for l in out.splitlines() if l.startswith(ROW_PREFIX)]
      row = json.loads(found[-1][len(ROW_PREFIX):]) if found else dict(
          variant=variant, layer=layer, status="crashed",
          rc=None if r is None else r.returncode, tail=out[-3000:])
      rows.append(row)
      print(variant, layer, row.get("status"), row.get("error", "")[:600],
            row.get("tail", "")[-1500:], flush=True)
      with open(out_path, "w") as f:
        json.dump(dict(jax_version=jax.__version__,
                       device=str(jax.devices()[0].device_kind), **meta,
                       rows=rows), f, indent=1)
  return rows
