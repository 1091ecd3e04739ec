"""The `escort-jax` command line (also `python -m escort_jax`).

  escort-jax demo [--batch N] [--json]
      Converts four workload layers to SparseKernels, checks
      sparse_conv(method="escort") against lax.conv at HIGHEST precision and,
      on a GPU, times escort against dense lax.conv.
  escort-jax bench [--layers ...] [--batch ...] [--dtype ...] [--sweep] ...
      The benchmark harness (escort_jax.bench): writes the results JSON and
      its Markdown/PNG report under benchmarks/results/.

Exit status: 0 ok; 1 a correctness check failed (or a benchmark row
failed); 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

# The demo's layers: a ResNet-50 3x3, a GoogLeNet 5x5, a grouped CaffeNet
# layer, and a strided one (caffenet conv1 is dense in the workload, so it is
# pruned to 90% here). (name, sparsity override)
DEMO_LAYERS = (
    ("resnet50/res3a_branch2b", None),
    ("googlenet/inception_3a/5x5", None),
    ("caffenet/conv2", None),
    ("caffenet/conv1", 0.9),
)
# Norm-wise relative error bound against fp32 HIGHEST; accumulation order
# differences are ~1e-7, a wrong kernel is O(1).
DEMO_TOLERANCE = 1e-4


class _Parser(argparse.ArgumentParser):
  """argparse that exits with EXIT_USAGE and a hint on errors."""

  def error(self, message):
    self.print_usage(sys.stderr)
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n"
              f"(run '{self.prog} --help' for the options)\n")


def _positive_int(text: str) -> int:
  try:
    v = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got "
                                     f"{text!r}") from None
  if v <= 0:
    raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
  return v


def _sparsity(text: str) -> float:
  """A fraction of zero weights: "0.9", or a percentage "90%"."""
  raw = text.strip()
  percent = raw.endswith("%")
  try:
    v = float(raw[:-1] if percent else raw)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected a sparsity such as 0.9 or 90%, got {text!r}") from None
  if percent:
    v /= 100.0
  if not 0.0 <= v < 1.0:
    raise argparse.ArgumentTypeError(
        f"a sparsity (fraction of zero weights) must lie in [0, 1), got "
        f"{text!r}; write 0.9 or 90%")
  return v


def _split_list(values: Sequence[str] | None) -> list[str] | None:
  """["a,b", "c"] -> ["a", "b", "c"]."""
  if values is None:
    return None
  out = []
  for v in values:
    out += [p.strip() for p in v.split(",") if p.strip()]
  return out


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="escort-jax",
      description="Direct sparse convolution (Escort) for pruned CNNs in "
      "JAX: a correctness demo and the benchmark harness.",
      epilog="Exit status: 0 ok, 1 a check failed, 2 usage error.")
  sub = parser.add_subparsers(dest="command", metavar="{demo,bench}",
                              parser_class=_Parser)

  demo = sub.add_parser(
      "demo", help="check escort against lax.conv on four real layers",
      description="Converts four workload layers (ResNet-50 3x3, GoogLeNet "
      "5x5, grouped CaffeNet conv2, strided CaffeNet conv1 at 90%% "
      "sparsity) to SparseKernels, checks sparse_conv(method='escort') "
      "against lax.conv_general_dilated at HIGHEST precision, and on a GPU "
      "times escort against dense lax.conv.")
  demo.add_argument("--batch", type=_positive_int, default=None,
                    help="batch size (default: 1 on the CPU, 32 on a GPU)")
  demo.add_argument("--json", action="store_true",
                    help="print machine-readable JSON on stdout")
  demo.add_argument("--max-hw", type=_positive_int, default=None,
                    help="cap the input size (channels and kernels stay "
                    "real); default: the real size")

  bench = sub.add_parser(
      "bench", help="benchmark sparse_conv against the dense and BCOO "
      "baselines",
      description="Times sparse_conv and the baselines (lax fp32 HIGHEST, "
      "lax default/TF32, lax bf16, BCOO) by device kernel time on workload "
      "layers, writes benchmarks/results/<date>T<time>-<gpu>.json after "
      "every row, and a Markdown report with plots at the end.")
  bench.add_argument("--net", nargs="+", metavar="NET",
                     help="only these nets (caffenet, googlenet, resnet50)")
  bench.add_argument("--layers", nargs="+", metavar="NAME",
                     help="'net/layer' names or substrings (comma or space "
                     "separated); default: the 39 pruned layers")
  bench.add_argument("--batch", nargs="+", metavar="N",
                     help="batch sizes (default: 1 32)")
  bench.add_argument("--dtype", nargs="+", metavar="DTYPE",
                     help="dtypes of the sparse op's inputs: float32, "
                     "bfloat16 (default: float32)")
  bench.add_argument("--sparsity", nargs="+", metavar="S",
                     help="override each layer's sparsity (a sweep): 0.9 or "
                     "90%%")
  bench.add_argument("--sweep", action="store_true",
                     help="sparsity sweep 50..99%% (default layers: resnet50 "
                     "res3a_branch2b, res4a_branch2b, googlenet "
                     "inception_3a/3x3)")
  bench.add_argument("--method", nargs="+", metavar="METHOD",
                     help="sparse_conv methods: escort, auto, dense "
                     "(default: escort)")
  bench.add_argument("--config", action="append", metavar="K=V,...",
                     help="KernelConfig, e.g. rows_per_program=8,block_q=256,"
                     "num_warps=4 (short: rpp, bq, nw, ns, u, gpp, qm); "
                     "repeat to sweep configs; method label "
                     "escort[rpp=8,bq=256,nw=4]")
  bench.add_argument("--baselines", nargs="+", metavar="NAME",
                     help="baselines to time (default: lax_fp32_highest "
                     "lax_default lax_bf16 bcoo; also bcoo_cusparse)")
  bench.add_argument("--out", metavar="FILE",
                     help="results JSON (default: benchmarks/results/"
                     "<YYYY-MM-DD>T<HHMM>-<gpu>.json)")
  bench.add_argument("--resume", metavar="FILE",
                     help="skip the rows FILE already has and append to it")
  bench.add_argument("--max-hw", type=_positive_int, metavar="N",
                     help="cap every input's height/width at N (quick CPU "
                     "runs; channels and kernels stay real)")
  bench.add_argument("--small", action="store_true",
                     help="a quick smoke run: --max-hw 8, batch 1, 2 inputs, "
                     "1 repeat unless given")
  bench.add_argument("--inputs", type=_positive_int, metavar="N",
                     help="distinct input batches per timing (default 10 on "
                     "a GPU)")
  bench.add_argument("--repeats", type=_positive_int, metavar="N",
                     help="timings per figure, median reported (default 5 "
                     "on a GPU)")
  bench.add_argument("--trace-per-repeat", action="store_true",
                     help="one profiler trace per repeat (default: one "
                     "trace per figure, cut into repeats by event count)")
  bench.add_argument("--no-report", action="store_true",
                     help="skip the Markdown/PNG report")
  bench.add_argument("--json", action="store_true",
                     help="print the results JSON on stdout")
  bench.add_argument("--tune", action="store_true",
                     help="instead of benchmarking, tune the selected layers:"
                     " time kernel configs and dense lax.conv, and record "
                     "each layer's winner as its plan (method='auto' uses "
                     "it)")
  bench.add_argument("--network", nargs="+", metavar="NET",
                     help="whole-network rows instead: jitted inference of "
                     "the SkimCaffe-pruned NET (caffenet, googlenet, "
                     "resnet50), sparse against dense, at fp32 HIGHEST and "
                     "default precision")
  bench.add_argument("--plan-dir", metavar="DIR",
                     help="with --tune: where to write plans (default: "
                     "$ESCORT_JAX_PLAN_DIR, else the package's plans/)")
  return parser


# --------------------------------------------------------------------------
# demo


def run_demo(batch: int | None = None, max_hw: int | None = None,
             console=None) -> dict[str, Any]:
  """Checks escort on DEMO_LAYERS; returns a JSON-able summary."""
  import jax
  from jax import lax
  import jax.numpy as jnp
  import numpy as np

  from escort_jax import SparseKernel, sparse_conv
  from escort_jax import baselines as bl
  from escort_jax import bench
  from escort_jax import workload as wl

  on_gpu = jax.default_backend() == "gpu"
  batch = batch or (32 if on_gpu else 1)
  info = bench.device_info()
  out: dict[str, Any] = {
      "device": info["device"], "backend": info["backend"],
      "jax_version": info["jax_version"], "batch": batch,
      "tolerance": DEMO_TOLERANCE, "timed": on_gpu,
      "timer": bench.TIMER_GPU if on_gpu else None, "layers": []}
  for name, sp in DEMO_LAYERS:
    layer = wl.get_layer(name)
    small = layer.scaled(max_hw)
    conv = small.conv_kwargs()
    t0 = time.perf_counter()
    dense = wl.make_kernel(layer, sparsity=sp)
    sk = SparseKernel.from_dense(dense)
    x = wl.make_input(small, batch, seed=0)
    bias = jnp.asarray(np.random.default_rng(0).standard_normal(
        layer.out_channels), jnp.float32)
    ref = lax.conv_general_dilated(
        x, jnp.asarray(dense), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST, **conv)
    escort = jax.jit(lambda x, sk, bias=None, act=None: sparse_conv(
        x, sk, method="escort", bias=bias, activation=act, **conv),
                     static_argnames=("act",))
    y = escort(x, sk)
    err = bench.rel_err(y, ref)
    # The fused epilogue too: bias and relu inside the kernel.
    y2 = escort(x, sk, bias, act="relu")
    err_fused = bench.rel_err(y2, jnp.maximum(ref + bias, 0))
    ok = bool(np.isfinite(err) and np.isfinite(err_fused)
              and err <= DEMO_TOLERANCE and err_fused <= DEMO_TOLERANCE
              and y.shape == ref.shape)
    entry: dict[str, Any] = {
        "layer": name, "sparsity": round(sk.sparsity, 6), "nnz": sk.nnz,
        "kernel_shape": list(layer.kernel_shape),
        "input_shape": list(x.shape), "output_shape": list(y.shape),
        "stride": layer.stride, "padding": layer.padding,
        "groups": layer.groups, "rel_err": err, "rel_err_bias_relu":
        err_fused, "ok": ok, "check_s": round(time.perf_counter() - t0, 2)}
    if on_gpu:
      xs = [wl.make_input(small, batch, seed=i) for i in range(10)]
      xs_bf16 = [v.astype(jnp.bfloat16) for v in xs]
      f_escort = lambda v: escort(v, sk)
      highest = bl.make_dense_conv(sk, precision=lax.Precision.HIGHEST,
                                   **conv)
      bf16 = bl.make_dense_conv(
          sk.with_values(sk.values.astype(jnp.bfloat16)), **conv)
      t_e = bench.device_time_us(f_escort, xs, repeats=3).median_us
      t_h = bench.device_time_us(highest, xs, repeats=3).median_us
      t_b = bench.device_time_us(bf16, xs_bf16, repeats=3).median_us
      fm = bench.floor_model(small, batch, sk.nnz, "float32")
      entry.update({"escort_us": t_e, "lax_fp32_highest_us": t_h,
                    "lax_bf16_us": t_b, "speedup_vs_fp32_highest": t_h / t_e,
                    "speedup_vs_bf16": t_b / t_e, "floor_us": fm["floor_us"],
                    "floor_fraction": fm["floor_us"] / t_e})
    out["layers"].append(entry)
    if console is not None:
      console.print(f"  {name}: rel err {err:.1e} / {err_fused:.1e} "
                    f"({'ok' if ok else 'FAILED'})")
  out["ok"] = all(e["ok"] for e in out["layers"])
  return out


def _print_demo(result: dict, console) -> None:
  from rich.table import Table
  timed = result["timed"]
  table = Table(title=f"escort-jax demo — {result['device']} (jax "
                f"{result['jax_version']}), batch {result['batch']}")
  for col in ("layer", "kernel (HWIO)", "input (NHWC)", "stride/groups",
              "sparsity", "nnz", "rel err", "bias+relu err", "check"):
    table.add_column(col, justify="left" if col == "layer" else "right",
                     no_wrap=col == "layer")
  if timed:
    for col in ("escort µs", "lax fp32 HIGHEST µs", "lax bf16 µs",
                "vs HIGHEST", "vs bf16", "floor %"):
      table.add_column(col, justify="right")
  for e in result["layers"]:
    cells = [e["layer"], "×".join(map(str, e["kernel_shape"])),
             "×".join(map(str, e["input_shape"])),
             f"{e['stride']}/{e['groups']}", f"{e['sparsity']:.1%}",
             str(e["nnz"]), f"{e['rel_err']:.1e}",
             f"{e['rel_err_bias_relu']:.1e}",
             "[green]pass[/]" if e["ok"] else "[red]FAIL[/]"]
    if timed:
      cells += [f"{e['escort_us']:.1f}", f"{e['lax_fp32_highest_us']:.1f}",
                f"{e['lax_bf16_us']:.1f}",
                f"{e['speedup_vs_fp32_highest']:.2f}x",
                f"{e['speedup_vs_bf16']:.2f}x",
                f"{e['floor_fraction']:.1%}"]
    table.add_row(*cells)
  console.print(table)
  console.print(f"Check: sparse_conv(method='escort') against "
                f"lax.conv_general_dilated at HIGHEST precision, norm-wise "
                f"relative error <= {result['tolerance']:.0e}.")
  if not timed:
    console.print(
        "[yellow]No GPU here: escort ran in the Pallas interpreter, which "
        "checks correctness only. Speed needs an NVIDIA GPU (run "
        "'escort-jax demo' or 'escort-jax bench' there).[/]")
  else:
    console.print(f"Times: device kernel time per call ({result['timer']}), "
                  "median of 3 traces over 10 inputs.")
  if result["ok"]:
    console.print("[bold green]All checks passed.[/]")
  else:
    bad = [e["layer"] for e in result["layers"] if not e["ok"]]
    console.print(f"[bold red]Check FAILED on {', '.join(bad)}.[/]")


def _console(stderr: bool):
  """A rich Console; wide when writing to a file or pipe (logs), so tables
  are not cut to 80 columns."""
  from rich.console import Console
  console = Console(stderr=stderr)
  if not console.is_terminal and console.width < 160:
    console = Console(stderr=stderr, width=160)
  return console


def _cmd_demo(args) -> int:
  console = _console(stderr=args.json)
  if not args.json:
    console.print("[bold]escort-jax demo[/]: checking four workload layers "
                  "...")
  result = run_demo(batch=args.batch, max_hw=args.max_hw,
                    console=None if args.json else console)
  if args.json:
    print(json.dumps(result, indent=1))
  else:
    _print_demo(result, console)
  return EXIT_OK if result["ok"] else EXIT_CHECK_FAILED


# --------------------------------------------------------------------------
# bench


def _cmd_bench(args) -> int:
  from escort_jax import bench
  from escort_jax import workload as wl

  def usage(msg: str) -> int:
    print(f"escort-jax bench: error: {msg}", file=sys.stderr)
    return EXIT_USAGE

  try:
    batches = [_positive_int(b) for b in _split_list(args.batch) or []]
    sparsities = [_sparsity(s) for s in _split_list(args.sparsity) or []]
  except argparse.ArgumentTypeError as e:
    return usage(str(e))
  selectors = _split_list(args.layers)
  nets = _split_list(args.net)
  try:
    if args.sweep:
      pool = wl.load_layers()
      layers = wl.find_layers(selectors or list(bench.SWEEP_LAYERS),
                              nets=nets, pool=pool)
      sparsities = sparsities or list(bench.SWEEP_SPARSITIES)
    elif selectors:
      # Named layers come from all 40 (caffenet/conv1 included).
      layers = wl.find_layers(selectors, nets=nets)
    else:
      layers = wl.find_layers(None, nets=nets, pool=wl.pruned_layers())
  except KeyError as e:
    return usage(e.args[0] if e.args else str(e))
  if not layers:
    return usage("no layers selected")
  max_hw, inputs, repeats = args.max_hw, args.inputs, args.repeats
  if args.small:
    max_hw = max_hw or 8
    batches = batches or [1]
    inputs = inputs or 2
    repeats = repeats or 1
  console = _console(stderr=True)
  if args.network:
    from escort_jax import bench_network
    results = bench_network.run(_split_list(args.network),
                                batches or wl.batch_sizes(), out=args.out,
                                in_hw=max_hw, num_inputs=inputs or 5)
    if args.json:
      print(json.dumps(results, indent=1))
    return EXIT_OK
  if args.tune:
    return _tune(layers, batches or wl.batch_sizes(),
                 _split_list(args.dtype) or ["float32"], args, console)
  try:
    results, path = bench.run_benchmark(
        layers, batches=batches or wl.batch_sizes(),
        dtypes=_split_list(args.dtype) or ["float32"],
        methods=_split_list(args.method) or ["escort"],
        configs=args.config,
        sparsities=sparsities or None,
        baselines=_split_list(args.baselines) or list(bench.BASELINES),
        out=args.out, resume=args.resume, max_hw=max_hw,
        num_inputs=inputs, repeats=repeats,
        trace_per_repeat=args.trace_per_repeat, console=console,
        report=not args.no_report)
  except bench.UsageError as e:
    return usage(str(e))
  except FileNotFoundError as e:
    return usage(f"{e.filename or e}: no such file")
  except json.JSONDecodeError as e:
    return usage(f"{args.resume} is not valid JSON ({e})")
  if args.json:
    print(json.dumps(results, indent=1))
  failed = [r for r in results["rows"] if r.get("error")]
  if failed:
    console.print(f"[red]{len(failed)} rows failed; see 'error' in {path}[/]")
    return EXIT_CHECK_FAILED
  return EXIT_OK


def _tune(layers, batches, dtypes, args, console) -> int:
  """`bench --tune`: records a plan per (layer, batch, dtype)."""
  import pathlib
  from escort_jax import tune
  from escort_jax.structure import SparseKernel
  directory = pathlib.Path(args.plan_dir) if args.plan_dir else None
  report = []
  for layer in layers:
    sk = SparseKernel.from_dense(_workload_kernel(layer))
    conv = layer.conv_kwargs()
    for batch in batches:
      for dtype in dtypes:
        entry = tune.tune_layer(
            (batch, layer.in_hw, layer.in_hw, layer.in_channels), sk,
            conv["window_strides"], conv["padding"],
            feature_group_count=conv["feature_group_count"],
            dtype=dtype, num_inputs=args.inputs or 10, directory=directory)
        times = entry["times_us"]
        best = min((t for k, t in times.items() if k != "dense"),
                   default=float("nan"))
        console.print(f"{layer.name} b={batch} {dtype}: {entry['method']} "
                      f"(escort {best:.1f} us, dense {times['dense']:.1f} us)")
        report.append(dict(layer=layer.name, batch=batch, dtype=dtype,
                           **entry))
  if args.json:
    print(json.dumps(report, indent=1))
  return EXIT_OK


def _workload_kernel(layer):
  from escort_jax import workload as wl
  return wl.make_kernel(layer)


def main(argv: Sequence[str] | None = None) -> int:
  """The console script: `escort-jax` / `python -m escort_jax`."""
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
  try:
    if args.command == "demo":
      return _cmd_demo(args)
    return _cmd_bench(args)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
