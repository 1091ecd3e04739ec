"""Fits the escort path's cost model (escort_jax.dispatch.escort_terms) to
benchmark rows, and reports its error and the choices it would make.

    python benchmarks/fit_cost_model.py ROWS.json [...] [--small-grid]

Each row of the given results files (method "escort", timed with the
default config: no plans, e.g. ESCORT_JAX_PLAN_DIR set to an empty folder)
becomes one equation time = useful / rate + bytes / bandwidth + steps x
per_step + fixed; the four parameters are fitted per dtype by least squares
of the relative error. --small-grid keeps the rows whose default config is
the nonzero-lanes kernel (ESCORT_LANES_MODEL), otherwise the others
(ESCORT_MODEL). Prints the parameters, the median error, and how often the
model would pick the slower of escort and the dense baseline timed beside
each row.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import sys

import numpy as np
import scipy.optimize

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from escort_jax import conv_geometry as cg  # noqa: E402
from escort_jax import dispatch  # noqa: E402
from escort_jax import workload as wl  # noqa: E402
from escort_jax.ops import default_kernel_config  # noqa: E402
from escort_jax.structure import SparseKernel  # noqa: E402

# The dense baseline of each dtype's rows.
DENSE_BASELINE = {"float32": "lax_default", "bfloat16": "lax_bf16"}


def _features(row):
  layer = wl.find_layers([f"{row['net']}/{row['layer']}"])[0]
  sk = SparseKernel.from_dense(wl.make_kernel(layer))
  conv = layer.conv_kwargs()
  g = cg.make_geometry(
      (row["batch"], layer.in_hw, layer.in_hw, layer.in_channels),
      sk.structure, conv["window_strides"], conv["padding"], (1, 1),
      conv.get("feature_group_count", 1))
  return g, dispatch.escort_terms(g, row["nnz"], row["dtype"])[1]


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("results", nargs="+")
  ap.add_argument("--small-grid", action="store_true")
  args = ap.parse_args(argv)
  by_dtype = collections.defaultdict(list)
  for path in args.results:
    for row in json.loads(pathlib.Path(path).read_text())["rows"]:
      if row.get("method") != "escort" or not row.get("time_us"):
        continue
      g, feats = _features(row)
      small = bool(default_kernel_config(g.out_channels, g.out_len, 4,
                                         g.batch).nonzero_lanes)
      if small == args.small_grid:
        by_dtype[row["dtype"]].append((row, g, feats))
  for dtype, items in sorted(by_dtype.items()):
    t = np.array([r["time_us"] * 1e-6 for r, _, _ in items])
    a = np.array([[u, b, s, 1.0] for _, _, (u, b, s) in items])
    # Non-negative: at batch 1 FLOPs and layout bytes nearly coincide, and
    # a free fit trades one against the other with opposite signs.
    coef, _ = scipy.optimize.nnls(a / t[:, None], np.ones_like(t))
    pred = a @ coef
    err = np.abs(pred - t) / t
    inv_rate, inv_bw, per_step, fixed = coef
    rate = 1 / inv_rate if inv_rate else float("inf")
    bandwidth = 1 / inv_bw if inv_bw else float("inf")
    print(f"{dtype}: {len(items)} rows; rate {rate:.3g} FLOP/s, "
          f"bandwidth {bandwidth:.3g} B/s, per step {per_step:.3g} s, "
          f"fixed {fixed:.3g} s; median error {np.median(err):.1%}")
    name = DENSE_BASELINE.get(dtype, "lax_default")
    wrong, loss = 0, []
    for (row, _, _), p, ti in zip(items, pred, t):
      dense = row["baselines_us"].get(name)
      if not dense:
        continue
      dense *= 1e-6
      pick_escort = p < dense  # the model's dense time is not refitted here
      if pick_escort != (ti < dense):
        wrong += 1
        loss.append(max(ti, dense) / min(ti, dense))
    print(f"  vs {name} (measured dense times): {wrong} wrong choices"
          + (f", geomean loss {np.exp(np.mean(np.log(loss))):.3f}x"
             if loss else ""))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
