"""Screens vector-kernel configs on frames against each layer's planned
framed config, in the same run (CUPTI kernel time via
escort_jax.bench.device_time_us), on the workload's vector-sparse kernels at
batch 32 in bfloat16.

Each layer times its plan's framed config (dispatch.choose_framed: the
framed config, else the NHWC vector config, else the default) and every
--configs entry, on inputs already framed (as `bench --method
vector_framed`). With --record, a layer whose fastest config is not its
planned one gets its plan entry's framed config replaced (and the screened
times added) in $ESCORT_JAX_PLAN_DIR, so that a following `bench` run in
the same process environment uses it; configs that win should then join
escort_jax.tune.DEFAULT_VECTOR_CANDIDATES, so that `bench --tune` finds
them again.

  PYTHONPATH=. python benchmarks/framed_config_screen.py --vector-width 64 \
      --sparsity 0.9 --configs "128,64,4,3,1;256,32,8,4,0" --out FILE.json
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import bench, dispatch, frames, plans, tune
from escort_jax import workload as wl
from escort_jax.conv_geometry import make_geometry
from escort_jax.ops import VectorConfig
from escort_jax.structure import ALIGNED_COLUMNS, SparseKernel


def parse_configs(text: str) -> tuple[VectorConfig, ...]:
  """'bq,bk,nw,ns,pf;...' -> VectorConfigs."""
  return tuple(VectorConfig(*(int(v) for v in item.split(",")))
               for item in text.split(";") if item.strip())


def screen_layer(layer, vector_width, sparsity, configs, *, batch, dtype,
                 num_inputs, rng):
  """{config: median µs} of the planned config and `configs` on one layer,
  with the planned config and the plan key."""
  conv = layer.conv_kwargs()
  sk = SparseKernel.from_dense(wl.make_kernel(
      layer, sparsity=sparsity, vector_width=vector_width,
      column_multiple=ALIGNED_COLUMNS))
  skd = sk.with_values(jnp.asarray(sk.values, dtype))
  shape = layer.input_shape(batch)
  g = make_geometry(shape, sk.structure, conv["window_strides"],
                    conv["padding"], (1, 1), conv["feature_group_count"])
  frame = frames.tightest_frame(g)
  if frame is None:
    return None
  planned = dispatch.choose_framed(sk.structure, g, dtype, None, None).config
  planned = planned or VectorConfig()
  inputs = [frames.frame_data(jnp.asarray(rng.standard_normal(shape), dtype),
                              frame) for _ in range(num_inputs)]
  times = {}
  for cfg in dict.fromkeys((planned,) + tuple(configs)):
    f = bench.framed_layer(frame, cfg, **conv)
    try:
      times[cfg] = bench.device_time_us(lambda d: f(d, skd),
                                        inputs).median_us
    except Exception as e:  # pylint: disable=broad-except
      print(f"  {cfg} failed: {type(e).__name__}: {str(e)[:150]}")
  key = plans.plan_key(sk.structure.digest, g, dtype, None)
  return planned, times, key


def record_winner(key, planned, times) -> None:
  """Replaces the plan entry's framed config by the fastest of `times`."""
  best = min(times, key=times.get)
  entry = plans.lookup(key)
  if entry is None or best == planned:
    return
  entry = copy.deepcopy(entry)
  entry.setdefault("best_configs", {})["framed"] = dataclasses.asdict(best)
  for cfg, t in times.items():
    entry.setdefault("times_us", {})[tune.time_key("framed", cfg)] = t
  plans.record(key, entry)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--vector-width", type=int, default=64)
  p.add_argument("--sparsity", type=float, default=None,
                 help="default: each layer's SkimCaffe sparsity")
  p.add_argument("--configs", required=True,
                 help="'bq,bk,nw,ns,pf;...' (VectorConfig fields in order)")
  p.add_argument("--layers", nargs="*", default=None)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--inputs", type=int, default=3)
  p.add_argument("--seconds", type=float, default=float("inf"),
                 help="stop starting layers after this long")
  p.add_argument("--record", action="store_true")
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  configs = parse_configs(args.configs)
  deadline = time.time() + args.seconds
  rng = np.random.default_rng(0)
  rows = []
  for layer, v in wl.layer_vector_widths(wl.pruned_layers(),
                                         [args.vector_width],
                                         lambda *a: None):
    if args.layers and layer.name not in args.layers:
      continue
    if time.time() > deadline:
      print("time is up")
      break
    screened = screen_layer(layer, v, args.sparsity, configs,
                            batch=args.batch, dtype=jnp.bfloat16,
                            num_inputs=args.inputs, rng=rng)
    if screened is None:
      continue
    planned, times, key = screened
    best = min(times, key=times.get)
    print(f"{layer.name}: planned {times.get(planned, float('nan')):.2f} µs,"
          f" best {times[best]:.2f} µs {best}", flush=True)
    rows.append(dict(layer=layer.name, planned=dataclasses.asdict(planned),
                     best=dataclasses.asdict(best),
                     times_us={tune.config_label(c): t
                               for c, t in times.items()}))
    if args.record:
      record_winner(key, planned, times)
  with open(args.out, "w") as f:
    json.dump(dict(device=jax.devices()[0].device_kind,
                   jax_version=jax.__version__,
                   vector_width=args.vector_width, sparsity=args.sparsity,
                   batch=args.batch, rows=rows), f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
