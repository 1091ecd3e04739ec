"""Hardware counters of the escort and vector kernels, read by Nsight Compute.

  PYTHONPATH=. python benchmarks/ncu_profile.py --list
  PYTHONPATH=. ncu --kernel-name regex:escort_ --csv --page raw \
      --metrics <see METRICS> python benchmarks/ncu_profile.py CASE...
  PYTHONPATH=. python benchmarks/ncu_profile.py --summarize [--json F] CSV...

Each CASE runs one jitted call of one workload layer once (compile, then one
timed launch for ncu to replay). A case is
`method:layer:batch:dtype[:sparsity[:V[:config]]]`, for example
`escort:res3a_branch2b:32:float32` or
`vector:res3a_branch2b:32:bfloat16:0.9:64`; `config` is a KernelConfig's or
VectorConfig's fields joined by commas, as in benchmarks/kernel_sweep.py.
benchmarks/ncu_run.sh runs the standard set and writes the table that
benchmarks/NOTES.md quotes.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

import escort_jax as ej
from escort_jax.ops import KernelConfig, VectorConfig

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from kernel_sweep import LAYERS, make_case, parse_config  # noqa: E402

# The counters the table needs: time, where the bytes came from, how busy
# each level was, and how many instructions each useful FMA cost.
METRICS = ",".join([
    "gpu__time_duration.sum",
    "l1tex__t_bytes.sum",
    "l1tex__t_sector_hit_rate.pct",
    "l1tex__throughput.avg.pct_of_peak_sustained_active",
    "l1tex__data_pipe_lsu_wavefronts.sum",
    "lts__t_bytes.sum",
    "lts__t_sector_hit_rate.pct",
    "lts__throughput.avg.pct_of_peak_sustained_elapsed",
    "dram__bytes.sum",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed",
    "smsp__issue_active.avg.pct_of_peak_sustained_active",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
    "smsp__inst_executed.sum",
    "smsp__sass_thread_inst_executed_op_ffma_pred_on.sum",
    "smsp__sass_inst_executed_op_global_ld.sum",
    "smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio",
    "smsp__average_warp_latency_issue_stalled_lg_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_mio_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_wait.ratio",
    "smsp__average_warp_latency_issue_stalled_barrier.ratio",
    "smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio",
    "smsp__average_warp_latency_issue_stalled_not_selected.ratio",
    "smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio",
    "launch__registers_per_thread",
    "launch__grid_size",
])


def parse_case(text: str):
  parts = text.split(":")
  method, layer, batch, dtype = parts[:4]
  sparsity = float(parts[4]) if len(parts) > 4 and parts[4] else None
  v = int(parts[5]) if len(parts) > 5 and parts[5] else None
  config = None
  if len(parts) > 6 and parts[6]:
    config = parse_config(VectorConfig if method == "vector" else KernelConfig,
                          parts[6])
  return method, layer, int(batch), jnp.dtype(dtype), sparsity, v, config


def run_case(text: str):
  method, name, batch, dtype, sparsity, v, config = parse_case(text)
  layer = next(l for l in LAYERS if l["layer"] == name)
  x, w, args = make_case(layer, batch, dtype, sparsity=sparsity,
                         vector_width=v)
  sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
  sk = sk.with_values(sk.values.astype(dtype))
  f = jax.jit(lambda x, sk: ej.sparse_conv(x, sk, method=method,
                                           config=config, **args))
  f(x, sk).block_until_ready()
  # Marks the launch ncu should read: the one after compilation.
  print(f"device {jax.devices()[0].device_kind}", flush=True)
  print(f"case {text} nnz={sk.nnz}", flush=True)
  f(x, sk).block_until_ready()


def summarize(paths, json_out=None):
  """Prints one line per (case, kernel): the last launch in each ncu raw
  CSV; with json_out, writes those launches' metrics there too."""
  import csv
  import json
  records, devices = [], set()
  for path in paths:
    # ncu_run.sh keeps the profiled process's output beside each CSV.
    if os.path.exists(path + ".stdout"):
      with open(path + ".stdout") as fh:
        devices.update(l[len("device "):].strip() for l in fh
                       if l.startswith("device "))
    with open(path) as fh:
      lines = [l for l in fh if l.startswith('"')]
    rows = list(csv.reader(lines))
    if len(rows) < 3:
      print(path, "no kernels")
      continue
    head, rows = rows[0], rows[2:]
    last = {}
    for r in rows:
      last[r[head.index("Kernel Name")]] = dict(zip(head, r))
    for kname, r in last.items():
      records.append(dict(case=path.rsplit("/", 1)[-1], kernel=kname,
                          grid=r.get("Grid Size"), block=r.get("Block Size"),
                          metrics={m: r[m] for m in METRICS.split(",")
                                   if m in r}))

      def g(m, r=r):
        try:
          return float(r[m].replace(",", ""))
        except (KeyError, ValueError):
          return float("nan")
      t = g("gpu__time_duration.sum")  # ns
      ffma = g("smsp__sass_thread_inst_executed_op_ffma_pred_on.sum")
      inst = g("smsp__inst_executed.sum")
      print(f"{path.rsplit('/', 1)[-1]:28s} {kname[:28]:28s} "
            f"{t / 1e3:8.1f}us "
            f"L1 {g('l1tex__t_bytes.sum') / t:6.1f}GB/s "
            f"hit {g('l1tex__t_sector_hit_rate.pct'):5.1f}% "
            f"thr {g('l1tex__throughput.avg.pct_of_peak_sustained_active'):5.1f}% | "
            f"L2 {g('lts__t_bytes.sum') / t:6.1f}GB/s "
            f"hit {g('lts__t_sector_hit_rate.pct'):5.1f}% "
            f"thr {g('lts__throughput.avg.pct_of_peak_sustained_elapsed'):5.1f}% | "
            f"dram {g('dram__bytes.sum') / t:6.1f}GB/s | "
            f"issue {g('smsp__issue_active.avg.pct_of_peak_sustained_active'):5.1f}% "
            f"occ {g('sm__warps_active.avg.pct_of_peak_sustained_active'):5.1f}% "
            f"regs {g('launch__registers_per_thread'):4.0f} "
            f"grid {g('launch__grid_size'):7.0f} "
            f"warp-inst/32FFMA {inst / max(ffma / 32, 1):5.2f} | stalls "
            f"lsb {g('smsp__average_warp_latency_issue_stalled_long_scoreboard.ratio'):5.1f} "
            f"lgt {g('smsp__average_warp_latency_issue_stalled_lg_throttle.ratio'):5.1f} "
            f"mio {g('smsp__average_warp_latency_issue_stalled_mio_throttle.ratio'):5.1f} "
            f"wait {g('smsp__average_warp_latency_issue_stalled_wait.ratio'):5.1f} "
            f"bar {g('smsp__average_warp_latency_issue_stalled_barrier.ratio'):5.1f} "
            f"math {g('smsp__average_warp_latency_issue_stalled_math_pipe_throttle.ratio'):5.1f} "
            f"nsel {g('smsp__average_warp_latency_issue_stalled_not_selected.ratio'):5.1f} "
            f"ssb {g('smsp__average_warp_latency_issue_stalled_short_scoreboard.ratio'):5.1f}",
            flush=True)
  if json_out:
    with open(json_out, "w") as fh:
      json.dump(dict(device=", ".join(sorted(devices)) or "unknown",
                     tool="ncu", records=records), fh, indent=1)


def main(argv):
  if argv == ["--list"]:
    print(METRICS)
    return 0
  if argv and argv[0] == "--summarize":
    json_out = None
    if len(argv) > 2 and argv[1] == "--json":
      json_out, argv = argv[2], argv[2:]
    summarize(argv[1:], json_out)
    return 0
  for text in argv:
    run_case(text)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
