"""The `escort-jax` command line (also `python -m escort_jax`).

  escort-jax demo [--plot PATH] [--json] ...
      The main job, no arguments needed: builds the SkimCaffe-pruned
      ResNet-50, converts its pruned layers to SparseConv, checks the sparse
      model and the escort kernels against dense convolution at fp32
      HIGHEST, times sparse against dense on a GPU (per layer and end to
      end), prints a per-layer table and writes a speedup plot
      (./escort-demo.png). Without a GPU: a reduced run (batch 1, 64x64)
      that checks correctness and says what a GPU would run.
  escort-jax convert IN OUT [--model NET] [--sparsity S | --profile NET |
                    --keep-zeros] [--max-density D]
      Loads a dense Flax NNX checkpoint (msgpack state dict, or an orbax
      directory), prunes it, converts it with sparsify and writes a sparse
      checkpoint (escort_jax.checkpoint.save_sparse).
  escort-jax inspect CKPT [--model NET] [--batch N] [--input-shape S]
                    [--assume-gpu [--device SLUG]]
      Per converted layer: sparsity, nnz, the path sparse_conv would take
      (tuned plan or cost model) and its recorded or predicted speedup.
  escort-jax bench ...
      The benchmark harness (escort_jax.bench).

Every subcommand takes --json (the result as JSON on stdout; progress and
tables then go to stderr). --model is a net of escort_jax.models
(resnet50, googlenet, caffenet) or an import path "package.module:factory"
of your own NNX model.

Exit status: 0 ok; 1 a check failed (or a benchmark row failed); 2 a usage
or input error (bad option, missing or unreadable file, a checkpoint that
does not fit the model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from typing import Sequence

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2

BUILTIN_MODELS = ("resnet50", "googlenet", "caffenet")
PRECISIONS = ("highest", "default")
DTYPES = ("float32", "bfloat16", "float16")


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


def _fraction(text: str, what: str, example: str, *,
              one_allowed: bool) -> float:
  """Parses "0.9" or "90%" as a fraction in [0, 1) (or [0, 1])."""
  raw = text.strip()
  percent = raw.endswith("%")
  try:
    v = float(raw[:-1] if percent else raw)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f"expected a {what} such as {example}, got {text!r}") from None
  if percent:
    v /= 100.0
  in_range = 0.0 <= v <= 1.0 if one_allowed else 0.0 <= v < 1.0
  if not in_range or math.isnan(v):
    interval = "[0, 1]" if one_allowed else "[0, 1)"
    raise argparse.ArgumentTypeError(
        f"a {what} must lie in {interval}, got {text!r}; write {example}")
  return v


def _sparsity(text: str) -> float:
  """A fraction of zero weights: "0.9", or a percentage "90%"."""
  return _fraction(text, "sparsity (fraction of zero weights)", "0.9 or 90%",
                   one_allowed=False)


def _density(text: str) -> float:
  """A fraction of nonzero weights in [0, 1] ("0.5" or "50%")."""
  return _fraction(text, "density (fraction of nonzero weights)",
                   "0.5 or 50%", one_allowed=True)


def _check_layers(text: str) -> int | None:
  """"all" -> None, else a positive count."""
  if text.strip().lower() == "all":
    return None
  return _positive_int(text)


def _split_list(values: Sequence[str] | None) -> list[str] | None:
  """["a,b", "c"] -> ["a", "b", "c"]."""
  if values is None:
    return None
  out = []
  for v in values:
    out += [p.strip() for p in v.split(",") if p.strip()]
  return out


_MODEL_HELP = ("the architecture: resnet50, googlenet, caffenet (escort_jax."
               "models), or 'package.module:factory' naming your NNX Module "
               "class or a function returning the model (default: "
               "resnet50)")


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser of every subcommand."""
  parser = _Parser(
      prog="escort-jax",
      description="Direct sparse convolution (Escort) for pruned CNNs in "
      "JAX: the demo, checkpoint conversion and inspection, and the "
      "benchmark harness.",
      epilog="Exit status: 0 ok, 1 a check failed, 2 usage or input error.")
  sub = parser.add_subparsers(dest="command",
                              metavar="{demo,convert,inspect,bench}",
                              parser_class=_Parser)

  demo = sub.add_parser(
      "demo", help="the main job: a pruned ResNet-50 made sparse, checked "
      "and timed",
      description="Builds Caffe's ResNet-50 with random weights pruned to "
      "the SkimCaffe profile, converts its pruned layers (density <= 0.5) "
      "to SparseConv, checks the sparse network against the dense one and "
      "the escort kernels against lax.conv at fp32 HIGHEST (relative error "
      "<= 1e-4), and on a GPU times each sparse layer and the whole network "
      "against dense (device kernel time and wall clock; batch 32 at "
      "224x224). Prints a per-layer table and writes a speedup plot. "
      "Without a GPU it runs a reduced check (batch 1 at 64x64, the escort "
      "kernels in the Pallas interpreter) in under a minute, and shows "
      "what an H100 would run instead of speed: speed needs a GPU.")
  demo.add_argument("--batch", type=_positive_int, default=None,
                    help="batch size (default: 32 on a GPU, 1 elsewhere)")
  demo.add_argument("--input-shape", metavar="N|H,W",
                    help="input height and width (default: 224 on a GPU, "
                    "64 elsewhere)")
  demo.add_argument("--precision", choices=PRECISIONS, default="highest",
                    help="precision of the per-layer timings (default: "
                    "highest = fp32; the checks are always at highest, the "
                    "whole network is timed at both)")
  demo.add_argument("--check-layers", type=_check_layers, default=-1,
                    metavar="N|all",
                    help="how many sparse layers to check one by one in "
                    "escort mode (default: all; 4 on a CPU above 64x64)")
  demo.add_argument("--plot", metavar="PATH", default="escort-demo.png",
                    help="where to write the per-layer speedup plot "
                    "(default: ./escort-demo.png)")
  demo.add_argument("--no-plot", action="store_true",
                    help="write no plot")
  demo.add_argument("--save", metavar="PATH",
                    help="also write the sparse model as a checkpoint "
                    "(look at it with 'escort-jax inspect PATH')")
  demo.add_argument("--seed", type=int, default=0,
                    help="seed of the random weights and inputs (default 0)")
  demo.add_argument("--json", action="store_true",
                    help="print the result as JSON on stdout (the table "
                    "goes to stderr)")

  convert = sub.add_parser(
      "convert", help="prune a dense checkpoint and write a sparse one",
      description="Loads a Flax NNX checkpoint of a dense model (a msgpack "
      "file of the state dict, e.g. flax.serialization.to_bytes(nnx."
      "to_pure_dict(nnx.state(model))), or an orbax checkpoint directory), "
      "prunes it, converts its sparse convolutions to SparseConv "
      "(escort_jax.sparsify) and writes a sparse checkpoint (escort_jax.save_sparse; load it with "
      "escort_jax.load_sparse). Checks that every converted layer keeps "
      "exactly the pruned kernel and that OUT reads back.")
  convert.add_argument("input", metavar="IN",
                       help="the dense checkpoint (msgpack file or orbax "
                       "directory)")
  convert.add_argument("output", metavar="OUT",
                       help="the sparse checkpoint to write (msgpack)")
  convert.add_argument("--model", default="resnet50", help=_MODEL_HELP)
  how = convert.add_mutually_exclusive_group()
  how.add_argument("--sparsity", type=_sparsity, metavar="S",
                   help="magnitude-prune every conv to this fraction of "
                   "zeros (0.9 or 90%%), each layer on its own, and convert "
                   "them all")
  how.add_argument("--profile", metavar="NET", choices=BUILTIN_MODELS,
                   help="prune to SkimCaffe's published per-layer sparsities "
                   "of NET (resnet50, googlenet, caffenet; layers named as "
                   "in Caffe)")
  how.add_argument("--keep-zeros", action="store_true",
                   help="do not prune: convert the convs that are already "
                   "sparse (the default)")
  convert.add_argument("--max-density", type=_density, metavar="D",
                       help="convert only convs with at most this fraction "
                       "of nonzeros (default 0.5; with --sparsity, every "
                       "pruned conv)")
  convert.add_argument("--json", action="store_true",
                       help="print the result as JSON on stdout")

  inspect_ = sub.add_parser(
      "inspect", help="show a sparse checkpoint's layers and the kernel "
      "each would run",
      description="Loads a sparse checkpoint (escort-jax convert, "
      "escort_jax.save_sparse) and shows each converted layer's sparsity, "
      "nnz, input shape, the path sparse_conv would take for it (escort, "
      "vector for vector-sparse kernels, or dense; from a tuned plan or the "
      "cost model) and its recorded or predicted speedup over dense "
      "lax.conv. Nothing is timed.")
  inspect_.add_argument("checkpoint", metavar="CKPT",
                        help="the sparse checkpoint")
  inspect_.add_argument("--model", default="resnet50", help=_MODEL_HELP)
  inspect_.add_argument("--batch", type=_positive_int, default=32,
                        help="batch size (default 32)")
  inspect_.add_argument("--input-shape", metavar="N|H,W|H,W,C",
                        help="the model input (default: the model's, e.g. "
                        "224,224,3 for resnet50)")
  inspect_.add_argument("--dtype", choices=DTYPES, default="float32",
                        help="compute dtype (default float32)")
  inspect_.add_argument("--precision", choices=PRECISIONS, default="default",
                        help="matmul precision of the dense path (default: "
                        "default, i.e. TF32 on Hopper; plans are recorded "
                        "at it)")
  inspect_.add_argument("--assume-gpu", action="store_true",
                        help="decide as on a GPU (its tuned plans, else the "
                        "cost model) instead of on the current backend")
  inspect_.add_argument("--device", metavar="SLUG",
                        help="with --assume-gpu (implied): the GPU whose "
                        "plan file to use, as escort_jax/plans/<SLUG>.json "
                        "names it (default: nvidia-h100-80gb-hbm3, the "
                        "packaged plans)")
  inspect_.add_argument("--json", action="store_true",
                        help="print the result as JSON on stdout")

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
                     "separated); default: the 39 pruned layers. With --tune "
                     "--network: only the layers whose path contains one")
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
                     help="sparse_conv methods: escort, auto, vector, dense "
                     "(default: escort); vector (the tensor-core kernel) "
                     "needs --vector-width; auto_fallback is the layer as "
                     "escort_jax.convert.dense_fallback leaves it (dense "
                     "kernel held, no per-call densification, where auto "
                     "picks dense)")
  bench.add_argument("--vector-width", nargs="+", metavar="V",
                     help="vector-sparse kernels: each layer keeps whole "
                     "vectors of V consecutive output channels (8, 16, 32, "
                     "64; 'none' adds the unstructured kernels); every "
                     "method runs on them, rows record vector_width; layers "
                     "whose output channels V does not divide are skipped "
                     "(default: unstructured only)")
  bench.add_argument("--column-multiple", type=_positive_int, metavar="M",
                     help="with --vector-width: each block of V output "
                     "channels keeps a multiple of M positions, its own "
                     "count rounded to the nearest (default: "
                     "escort_jax.structure.ALIGNED_COLUMNS, which the vector "
                     "kernel loads fastest; 1 keeps the exact rounded "
                     "count)")
  bench.add_argument("--config", action="append", metavar="K=V,...",
                     help="a KernelConfig for escort/auto, e.g. "
                     "rows_per_program=8,block_q=256,num_warps=4 (short: "
                     "rpp, bq, nw, ns, u, gpp, qm), or a VectorConfig for "
                     "vector, e.g. block_q=64,block_k=32 (short: bq, bk, nw, "
                     "ns); a config applies to each method whose config has "
                     "all its fields; repeat to sweep configs; method label "
                     "escort[rpp=8,bq=256,nw=4], vector[bq=64,bk=32]")
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
                     "resnet50), sparse against dense, in each --dtype: "
                     "float32 at fp32 HIGHEST and default precision, "
                     "bfloat16 against the dense model in bfloat16; with "
                     "--tune, tune that network's "
                     "own sparse layers instead (their structures are not "
                     "the per-layer workload's)")
  bench.add_argument("--precision", choices=PRECISIONS, default="default",
                     help="with --tune: the precision of the dense "
                     "alternative and of the plans' keys (highest: plans "
                     "for jax.default_matmul_precision('highest') or "
                     "precision=HIGHEST calls)")
  bench.add_argument("--candidates",
                     choices=("all", "vector", "escort", "escort-large",
                              "small-grid", "layer"),
                     default="all",
                     help="with --tune: which kernel configs to time "
                     "(escort_jax.tune.CANDIDATE_SETS): all (default) every "
                     "escort candidate and, on vector-sparse layers, every "
                     "vector one (also on a frame, where the layer can read "
                     "one); vector the vector candidates against the "
                     "escort kernel at its default config only; escort the "
                     "escort candidates only; escort-large those for large "
                     "grids (batch 32) only; small-grid those for small "
                     "grids (batch 1) only; layer only each layer's own "
                     "default tile and, on tiny maps (fully connected "
                     "layers), its variants. Every set includes the "
                     "layer's default")
  bench.add_argument("--plan-dir", metavar="DIR",
                     help="with --tune: where to write plans (default: "
                     "$ESCORT_JAX_PLAN_DIR, else the package's plans/)")
  bench.add_argument("--sharded", action="store_true",
                     help="data-parallel throughput instead: inference of "
                     "the pruned --network NET (default resnet50) with its "
                     "batch sharded over every local device through "
                     "jax.sharding, against one device; --batch is per "
                     "device (default 128), --max-hw the image size, "
                     "--repeats the timed calls (default 20), --method the "
                     "sparse layers' method (default escort); the JSON has "
                     "gpus, throughput_images_per_s and scaling_efficiency")
  return parser



# --------------------------------------------------------------------------
# Output helpers.


def _console(stderr: bool):
  """A rich Console; wide when writing to a file or pipe (logs), so tables
  are not cut to 80 columns."""
  from rich.console import Console
  # soft_wrap: long lines are not broken by rich (a terminal wraps them;
  # logs keep them whole, so they can be grepped).
  console = Console(stderr=stderr, soft_wrap=True)
  if not console.is_terminal and console.width < 160:
    console = Console(stderr=stderr, width=160, soft_wrap=True)
  return console


class RichProgress:
  """report.NullProgress's interface on a rich console: a spinner per step
  and a bar per loop on a terminal, one line per step and loop in logs."""

  def __init__(self, console):
    self.console = console
    self.live = console.is_terminal

  @contextlib.contextmanager
  def step(self, description: str):
    """Runs the body with a spinner; prints a ✓ line with its time."""
    t0 = time.perf_counter()
    if self.live:
      with self.console.status(f"{description} ..."):
        yield
    else:
      self.console.print(f"  {description} ...", highlight=False)
      yield
    self.console.print(f"[green]✓[/] {description} "
                       f"[dim]({time.perf_counter() - t0:.1f} s)[/]",
                       highlight=False)

  def track(self, iterable, description: str, total: int | None = None):
    """Iterates with a progress bar; prints a ✓ line at the end."""
    t0 = time.perf_counter()
    items = list(iterable)
    total = len(items) if total is None else total
    if self.live:
      from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                                 SpinnerColumn, TextColumn, TimeElapsedColumn)
      with Progress(SpinnerColumn(), TextColumn("{task.description}"),
                    BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=self.console, transient=True) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
          yield item
          bar.advance(task)
    else:
      self.console.print(f"  {description} ({total}) ...", highlight=False)
      yield from items
    self.console.print(f"[green]✓[/] {description} ({total}) "
                       f"[dim]({time.perf_counter() - t0:.1f} s)[/]",
                       highlight=False)

  def note(self, text: str) -> None:
    """Prints a line."""
    self.console.print(text, highlight=False)


def _shape(s) -> str:
  return "×".join(map(str, s)) if s else "—"


def _us(t) -> str:
  if t is None:
    return "—"
  return f"{t / 1000:.2f} ms" if t >= 1000 else f"{t:.1f} µs"


def _x(v) -> str:
  return "—" if v is None else f"{v:.2f}x"


def _speed_style(v) -> str:
  if v is None:
    return "—"
  color = "green" if v > 1.05 else "red" if v < 0.95 else "white"
  return f"[{color}]{v:.2f}x[/]"


def _path_text(choice) -> str:
  if choice is None:
    return "[dim]not reached[/]"
  color = {"escort": "cyan", "vector": "magenta"}.get(choice["method"],
                                                     "white")
  source = {"plan": "plan", "cost-model": "cost model", "caller": "set",
            "backend": choice.get("device", "").upper() or "backend"}.get(
                choice["source"], choice["source"])
  return f"[{color}]{choice['method']}[/] [dim]({source})[/]"


def _print_json(result: dict) -> None:
  print(json.dumps(result, indent=1, default=_json_default))


def _json_default(o):
  import numpy as np
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def _check_writable(flag: str, path: str) -> None:
  """Fails early (before a long run) if `path` cannot be written."""
  import os
  from pathlib import Path
  from escort_jax.report import InputError
  p = Path(path)
  if p.is_dir():
    raise InputError(f"{flag} {path}: is a directory")
  parent = p.resolve().parent
  if not parent.is_dir():
    raise InputError(f"{flag} {path}: no such directory {parent}")
  if not os.access(parent, os.W_OK):
    raise InputError(f"{flag} {path}: cannot write to {parent}")


def _input_error(command: str, message: str) -> int:
  print(f"escort-jax {command}: error: {message}", file=sys.stderr)
  return EXIT_USAGE


# --------------------------------------------------------------------------
# demo


def _print_demo(result: dict, console) -> None:
  from rich.table import Table
  on_gpu = result["on_gpu"]
  h, w, _ = result["input_shape"]
  title = (f"escort-jax demo — {result['model']} (SkimCaffe-pruned, random "
           f"weights), {result['device']}, jax {result['jax_version']}, "
           f"batch {result['batch']}, {h}x{w}")
  if not on_gpu:
    title += " — reduced CPU run"
  table = Table(title=title, title_justify="left")
  cols = ["layer", "kernel (HWIO)", "input (NHWC)", "sparsity", "nnz",
          "path here", "escort check"]
  if on_gpu:
    cols += ["auto", "escort", "dense", "speedup", "escort speedup"]
  else:
    view = result["gpu_view"]
    cols += [f"path on H100, b{view['batch']} "
             f"{view['input_shape'][0]}²", "H100 escort vs dense"]
  for col in cols:
    table.add_column(col, justify="left" if col in ("layer", "path here")
                     or col.startswith("path") else "right",
                     no_wrap=col == "layer")
  for r in result["layers"]:
    chk = r.get("check")
    if chk is None:
      check = "[dim]—[/]"
    else:
      check = (f"{chk['rel_err']:.1e} "
               f"{'[green]✓[/]' if chk['ok'] else '[red]FAIL[/]'}")
    cells = [r["layer"], _shape(r["kernel_shape"]), _shape(r["input_shape"]),
             f"{r['sparsity']:.1%}", str(r["nnz"]), _path_text(r["choice"]),
             check]
    if on_gpu:
      t = r.get("times") or {}
      cells += [_us(t.get("sparse_us")), _us(t.get("escort_us")),
                _us(t.get("dense_us")), _speed_style(t.get("speedup")),
                _speed_style(t.get("escort_speedup"))]
    else:
      v = r.get("gpu_view")
      cells += [_path_text(v), "—" if not v or v["escort_speedup"] is None
                else f"{v['escort_speedup']:.2f}x [dim]{v['speedup_kind']}[/]"]
    table.add_row(*cells)
  console.print(table)

  net = result["network"]
  chk = net["check"]
  tol = result["tolerance"]
  mark = lambda ok: "[green]✓[/]" if ok else "[red]FAILED[/]"  # noqa: E731
  here = "" if on_gpu else " (method='auto' runs dense on the CPU)"
  console.print(
      f"Whole network, sparse model as converted{here} vs dense model at "
      f"fp32 HIGHEST: relative error {chk['rel_err']:.1e} (bound "
      f"{tol:.0e}) {mark(chk['ok'])}", highlight=False)
  esc = net.get("check_escort")
  if esc:
    where = "compiled" if on_gpu else "in the Pallas interpreter"
    console.print(
        f"Whole network with every sparse layer on the escort kernels "
        f"({where}) vs dense: relative error {esc['rel_err']:.1e} "
        f"{mark(esc['ok'])}", highlight=False)
  checked = [r for r in result["layers"] if r.get("check")]
  if checked:
    worst = max(r["check"]["rel_err"] for r in checked)
    where = "compiled" if on_gpu else "in the Pallas interpreter"
    ok = all(r["check"]["ok"] for r in checked)
    console.print(
        f"Escort kernels ({where}) against lax.conv at HIGHEST on "
        f"{len(checked)} of {len(result['layers'])} sparse layers, each on "
        f"its input shape (random inputs): worst relative error "
        f"{worst:.1e} {mark(ok)}", highlight=False)
  for t in net["timings"]:
    if on_gpu:
      console.print(
          f"[bold]End to end ({t['precision']} precision): sparse "
          f"{_us(t['sparse_us'])} vs dense {_us(t['dense_us'])} device "
          f"kernel time → {_speed_style(t['speedup'])}[/]; wall clock "
          f"{_us(t['sparse_wall_us'])} vs {_us(t['dense_wall_us'])} → "
          f"{_speed_style(t['speedup_wall'])}", highlight=False)
    else:
      console.print(
          f"CPU wall clock per forward pass ({t['precision']}): sparse model "
          f"{_us(t['sparse_wall_us'])}, dense model "
          f"{_us(t['dense_wall_us'])}. Not a speed result: method='auto' "
          "runs both as XLA dense convolutions on the CPU.", highlight=False)
  if on_gpu:
    console.print(
        f"Per-layer times: device kernel time per call ({result['timer']}), "
        f"median of 3 traces over {result.get('layer_inputs', 10)} inputs, "
        f"{result['precision']} "
        "precision; speedup = dense lax.conv time / sparse time. 'auto' is "
        "the path the model runs (see 'path here'); 'escort' forces the "
        "escort kernel.", highlight=False)
  else:
    view = result["gpu_view"]
    console.print(
        "[yellow]No GPU here: the escort kernels ran in the Pallas "
        "interpreter, which checks correctness only, and method='auto' runs "
        "dense convolutions. Speed needs an NVIDIA GPU: run 'escort-jax "
        "demo' there. The H100 columns are NOT measured: they are the "
        "tuned plans' recorded times where a plan exists, else the cost "
        f"model's prediction, for batch {view['batch']} at "
        f"{view['input_shape'][0]}x{view['input_shape'][1]}.[/]",
        highlight=False)
  if result.get("plot"):
    console.print(f"Plot: {result['plot']}", highlight=False)
  if result.get("saved"):
    console.print(f"Sparse model saved to {result['saved']} (escort-jax "
                  f"inspect {result['saved']} --model {result['model']})",
                  highlight=False)
  console.print(f"[dim]The demo took {result['elapsed_s']:.0f} s.[/]")
  if result["ok"]:
    console.print("[bold green]All checks passed.[/]")
  else:
    console.print("[bold red]A check FAILED (see above).[/]")


def _cmd_demo(args) -> int:
  from escort_jax import demo, report
  console = _console(stderr=args.json)
  try:
    shape = None
    if args.input_shape:
      shape = report.parse_input_shape(args.input_shape, (0, 0, 3))
      if shape[2] != 3:
        raise report.InputError(f"--input-shape {args.input_shape!r}: "
                                "ResNet-50 takes 3 input channels")
    for flag, path in (("--plot", None if args.no_plot else args.plot),
                       ("--save", args.save)):
      if path:
        _check_writable(flag, path)
  except report.InputError as e:
    return _input_error("demo", str(e))
  console.print("[bold]escort-jax demo[/]: SkimCaffe-pruned ResNet-50, "
                "sparse vs dense", highlight=False)
  result = demo.run_demo(
      batch=args.batch, input_shape=shape, precision=args.precision,
      check_layers=args.check_layers,
      plot_path=None if args.no_plot else args.plot, save_path=args.save,
      seed=args.seed, progress=RichProgress(console))
  _print_demo(result, console)
  if args.json:
    _print_json(result)
  return EXIT_OK if result["ok"] else EXIT_CHECK_FAILED


# --------------------------------------------------------------------------
# convert


def _print_convert(result: dict, console) -> None:
  from rich.table import Table
  if result["mode"] == "sparsity":
    mode = f"magnitude-pruned to {result['sparsity']:.1%} per conv"
  elif result["mode"] == "profile":
    mode = f"pruned to the SkimCaffe {result['profile']} profile"
  else:
    mode = "existing zeros kept (no pruning)"
  table = Table(title=f"escort-jax convert — {result['input']} → "
                f"{result['output']} ({result['model']}; {mode})",
                title_justify="left")
  for col in ("layer", "path", "kernel (HWIO)", "density before",
              "sparsity", "nnz", "result"):
    table.add_column(col, justify="left" if col in ("layer", "path",
                                                    "result") else "right")
  for r in result["layers"]:
    res = ("[cyan]SparseConv[/]" if r["converted"] else
           f"[dim]{r['note']}[/]")
    if r["converted"] and not r.get("kernel_kept_exactly", True):
      res = "[red]SparseConv, kernel differs![/]"
    table.add_row(r["layer"], r["path"] if r["path"] != r["layer"] else "",
                  _shape(r["kernel_shape"]), f"{r['density_before']:.1%}",
                  f"{r['sparsity']:.1%}", str(r["nnz"]), res)
  console.print(table)
  t = result["totals"]
  console.print(
      f"{t['converted']} of {t['convs']} convs converted: "
      f"{t['converted_nnz']:,} of {t['converted_weights']:,} weights kept "
      f"({t['converted_sparsity']:.1%} sparse); all convs "
      f"{t['conv_sparsity']:.1%} sparse. Wrote {result['output']} "
      f"({t['output_bytes'] / 2**20:.1f} MiB).", highlight=False)
  if result["pruned_linear_layers"]:
    console.print(f"Linear layers pruned (they stay dense nnx.Linear with "
                  f"zeros): {', '.join(result['pruned_linear_layers'])}",
                  highlight=False)
  c = result["checks"]
  ok = lambda b: "[green]✓[/]" if b else "[red]FAILED[/]"  # noqa: E731
  console.print(f"Checks: every SparseConv keeps exactly the pruned kernel "
                f"{ok(c['kernels_kept_exactly'])}; {result['output']} reads "
                f"back identically {ok(c['reads_back'])}", highlight=False)
  console.print(f"Next: escort-jax inspect {result['output']} --model "
                f"{result['model']}", highlight=False)


def _cmd_convert(args) -> int:
  from escort_jax import report
  console = _console(stderr=args.json)
  try:
    spec = report.resolve_model(args.model)
    result = report.convert_checkpoint(
        args.input, args.output, spec, sparsity=args.sparsity,
        profile=args.profile, max_density=args.max_density,
        progress=RichProgress(console))
  except report.InputError as e:
    return _input_error("convert", str(e))
  _print_convert(result, console)
  if args.json:
    _print_json(result)
  return EXIT_OK if result["ok"] else EXIT_CHECK_FAILED


# --------------------------------------------------------------------------
# inspect


def _print_inspect(result: dict, console) -> None:
  from rich.table import Table
  where = (f"as on {result['assume_gpu']} (assumed)" if result["assume_gpu"]
           else f"on this {result['backend'].upper()}")
  table = Table(
      title=f"escort-jax inspect — {result['checkpoint']} "
      f"({result['model']}), batch {result['batch']}, "
      f"{_shape(result['input_shape'])}, {result['dtype']}, "
      f"{result['precision']} precision, {where}", title_justify="left")
  # The vector path's column only where some layer is vector-sparse.
  vector = any(r["choice"] and r["choice"].get("vector_us") is not None
               for r in result["layers"])
  cols = ["layer", "kernel (HWIO)", "input (NHWC)", "sparsity", "nnz",
          "path", "escort", *(["vector"] if vector else []), "dense",
          "escort vs dense", "chosen"]
  for col in cols:
    table.add_column(col, justify="left" if col in ("layer", "path")
                     else "right", no_wrap=col == "layer")
  for r in result["layers"]:
    c = r["choice"]
    kind = f" [dim]{c['speedup_kind']}[/]" if c and c["speedup_kind"] else ""
    table.add_row(
        r["layer"], _shape(r["kernel_shape"]), _shape(r["input_shape"]),
        f"{r['sparsity']:.1%}", str(r["nnz"]), _path_text(c),
        _us(c and c["escort_us"]),
        *([_us(c and c.get("vector_us"))] if vector else []),
        _us(c and c["dense_us"]),
        (_x(c["escort_speedup"]) + kind) if c and c["escort_speedup"]
        else "—",
        _speed_style(c and c["speedup"]))
  console.print(table)
  t = result["totals"]
  vector_layers = (f"{t['vector_layers']} the vector path, "
                   if t.get("vector_layers") else "")
  console.print(
      f"{t['layers']} SparseConv layers, {t['nnz']:,} of {t['weights']:,} "
      f"weights kept ({t['sparsity']:.1%} sparse); {t['escort_layers']} take "
      f"the escort path, {vector_layers}{t['dense_layers']} dense.",
      highlight=False)
  if "speedup" in t:
    console.print(
        f"Sparse layers together ({t['speedup_kind']}, not measured here): "
        f"chosen paths {_us(t['chosen_us'])} vs dense {_us(t['dense_us'])} "
        f"→ {_speed_style(t['speedup'])}; escort everywhere "
        f"{_us(t['escort_us'])} → {_x(t['escort_speedup'])}.",
        highlight=False)
  elif not result["assume_gpu"]:
    console.print(
        f"[yellow]No GPU here: method='auto' runs every layer dense on the "
        f"{result['backend'].upper()}. Add --assume-gpu to see what an H100 "
        "would run (its tuned plans, else the cost model).[/]",
        highlight=False)
  for n in result["notes"]:
    console.print(f"[yellow]Note: {n}[/]", highlight=False)


def _cmd_inspect(args) -> int:
  from escort_jax import report
  console = _console(stderr=args.json)
  slug = None
  if args.assume_gpu or args.device:
    slug = args.device or report.DEFAULT_GPU_SLUG
  try:
    spec = report.resolve_model(args.model)
    shape = (report.parse_input_shape(args.input_shape, spec.input_shape)
             if args.input_shape or spec.input_shape else None)
    result = report.inspect_checkpoint(
        args.checkpoint, spec, batch=args.batch, input_shape=shape,
        dtype=args.dtype, precision=args.precision, gpu_slug=slug,
        progress=RichProgress(console))
  except report.InputError as e:
    return _input_error("inspect", str(e))
  _print_inspect(result, console)
  if args.json:
    _print_json(result)
  return EXIT_OK

# --------------------------------------------------------------------------
# bench


def _cmd_bench(args) -> int:
  from escort_jax import bench
  from escort_jax.structure import ALIGNED_COLUMNS
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
  if args.network and selectors and not args.tune:
    return usage("--layers with --network goes with --tune (it picks the "
                 "network layers to tune)")
  try:
    if args.network:
      # Network layers are paths in the model, not workload rows: --layers
      # filters them in _tune_networks.
      layers = [None]
    elif args.sweep:
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
  if args.sharded:
    return _bench_sharded(args, batches, max_hw, repeats, usage)
  if args.candidates != "all" and not args.tune:
    return usage("--candidates goes with --tune")
  if args.precision != "default" and not args.tune:
    return usage("--precision goes with --tune (--network times both "
                 "precisions)")
  if args.network and args.tune:
    try:
      dtypes = [bench.parse_dtype(d)
                for d in _split_list(args.dtype) or ["float32"]]
    except bench.UsageError as e:
      return usage(str(e))
    return _tune_networks(_split_list(args.network),
                          batches or wl.batch_sizes(), dtypes, args, console,
                          max_hw=max_hw, num_inputs=inputs)
  if args.network:
    from escort_jax import bench_network
    methods = _split_list(args.method) or ["auto"]
    unknown = [m for m in methods
               if m not in ("auto", "escort", "dense", bench.AUTO_FALLBACK)]
    if unknown:
      return usage(f"--network runs the pruned networks with methods auto, "
                   f"{bench.AUTO_FALLBACK}, escort or dense, not "
                   f"{', '.join(unknown)}")
    try:
      dtypes = [bench.parse_dtype(d)
                for d in _split_list(args.dtype) or ["float32"]]
    except bench.UsageError as e:
      return usage(str(e))
    results = bench_network.run(_split_list(args.network),
                                batches or wl.batch_sizes(), out=args.out,
                                methods=methods, dtypes=dtypes, in_hw=max_hw,
                                num_inputs=inputs or 5)
    if args.json:
      print(json.dumps(results, indent=1))
    return EXIT_OK
  try:
    vector_widths = bench.parse_vector_widths(_split_list(args.vector_width))
  except bench.UsageError as e:
    return usage(str(e))
  if args.tune:
    try:
      dtypes = [bench.parse_dtype(d)
                for d in _split_list(args.dtype) or ["float32"]]
    except bench.UsageError as e:
      return usage(str(e))
    return _tune(layers, batches or wl.batch_sizes(), dtypes, args, console,
                 vector_widths=vector_widths, sparsities=sparsities or None,
                 max_hw=max_hw, num_inputs=inputs)
  try:
    results, path = bench.run_benchmark(
        layers, batches=batches or wl.batch_sizes(),
        dtypes=_split_list(args.dtype) or ["float32"],
        methods=_split_list(args.method) or ["escort"],
        configs=args.config,
        sparsities=sparsities or None,
        vector_widths=vector_widths,
        column_multiple=args.column_multiple or ALIGNED_COLUMNS,
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


def _bench_sharded(args, batches, max_hw, repeats, usage) -> int:
  """`bench --sharded`: escort_jax.bench_sharded, one net, batch (per
  device), method and dtype."""
  from escort_jax import bench, bench_sharded
  from escort_jax.models import INPUT_SHAPES
  nets = _split_list(args.network) or ["resnet50"]
  methods = _split_list(args.method) or ["escort"]
  dtypes = _split_list(args.dtype) or ["float32"]
  if max(len(nets), len(batches), len(methods), len(dtypes)) > 1:
    return usage("--sharded takes one --network, --batch, --method and "
                 "--dtype")
  # Options of the per-layer benchmark, which a whole pruned network does
  # not take: its kernels are unstructured, its layers pick their configs.
  ignored = [flag for flag, value in (("--vector-width", args.vector_width),
                                      ("--column-multiple",
                                       args.column_multiple),
                                      ("--config", args.config),
                                      ("--tune", args.tune))
             if value]
  if ignored:
    return usage(f"--sharded does not take {', '.join(ignored)}: it runs "
                 "the whole pruned network, whose kernels are unstructured "
                 "and whose layers pick their own configs")
  if nets[0] not in INPUT_SHAPES:
    return usage(f"unknown network {nets[0]!r}; expected one of "
                 f"{', '.join(INPUT_SHAPES)}")
  try:
    dtype = bench.parse_dtype(dtypes[0])
    bench_sharded.check_method(methods[0])
  except bench.UsageError as e:
    return usage(str(e))
  if args.out:
    from escort_jax.report import InputError
    try:
      _check_writable("--out", args.out)
    except InputError as e:
      return usage(str(e))
  results = bench_sharded.run_sharded(
      nets[0], batches[0] if batches else 128, in_hw=max_hw, dtype=dtype,
      method=methods[0], calls=repeats or 20, out=args.out)
  if args.json:
    print(json.dumps(results, indent=1))
  return EXIT_OK if results["outputs_equal"] else EXIT_CHECK_FAILED


def _tune_options(args):
  """(plan directory or None, escort candidates, vector candidates,
  precision) of `bench --tune`'s arguments."""
  import pathlib
  from escort_jax import tune
  directory = pathlib.Path(args.plan_dir) if args.plan_dir else None
  candidates, vector_candidates = tune.CANDIDATE_SETS[args.candidates]
  precision = None if args.precision == "default" else "highest"
  return directory, candidates, vector_candidates, precision


def _plan_text(entry) -> str:
  """'escort (escort 9.1 us, dense 12.0 us)': a plan's method and the best
  time of each kernel it timed ("framed": the vector kernel on a frame,
  where timed)."""
  from escort_jax import tune
  best = tune.best_times(entry)
  parts = [f"{kernel} {best[kernel]:.1f} us"
           for kernel in ("escort", "vector", "dense", "framed")
           if kernel in ("escort", "dense") or kernel in entry["best_configs"]]
  return f"{entry['method']} ({', '.join(parts)})"


def _tune(layers, batches, dtypes, args, console, *, vector_widths=(None,),
          sparsities=None, max_hw=None, num_inputs=None) -> int:
  """`bench --tune`: records a plan per (layer, vector width, sparsity,
  batch, dtype), on the kernel the benchmark would time (vector-sparse with
  --vector-width, so the vector kernel's candidates are tried too), timing
  the candidate set args.candidates (tune.CANDIDATE_SETS)."""
  from escort_jax import tune
  from escort_jax import workload as wl
  from escort_jax.bench import vector_text
  from escort_jax.structure import ALIGNED_COLUMNS, SparseKernel
  directory, candidates, vector_candidates, precision = _tune_options(args)
  report = []
  skip = lambda _, v, e: console.print(  # noqa: E731
      f"[yellow]skipped: {e}[/]", highlight=False)
  for layer, vw in wl.layer_vector_widths(layers, vector_widths, skip):
    small = layer.scaled(max_hw)
    conv = small.conv_kwargs()
    for sp in sparsities or [None]:
      sk = SparseKernel.from_dense(wl.make_kernel(
          layer, sparsity=sp, vector_width=vw,
          column_multiple=args.column_multiple or ALIGNED_COLUMNS))
      sp_text = "" if sp is None else f" sp={sp:g}"
      for batch in batches:
        for dtype in dtypes:
          entry = tune.tune_layer(
              small.input_shape(batch), sk, conv["window_strides"],
              conv["padding"],
              feature_group_count=conv["feature_group_count"],
              dtype=dtype, candidates=candidates, precision=precision,
              vector_candidates=vector_candidates,
              num_inputs=num_inputs or 10, directory=directory)
          console.print(f"{layer.name}{vector_text(vw)}{sp_text} b={batch} "
                        f"{dtype}: {_plan_text(entry)}", highlight=False)
          report.append(dict(layer=layer.name, batch=batch, dtype=dtype,
                             in_hw=small.in_hw, requested_vector_width=vw,
                             sparsity=round(1.0 - sk.nnz / layer.size, 6),
                             **entry))
  if args.json:
    print(json.dumps(report, indent=1))
  return EXIT_OK


def _tune_networks(nets, batches, dtypes, args, console, *, max_hw=None,
                   num_inputs=None) -> int:
  """`bench --tune --network NET`: records a plan for every sparse layer of
  the pruned network that `bench --network` runs (the same seeded model), at
  each batch and dtype and at --precision, so that its "auto" layers follow
  tuned plans (escort_jax.tune.tune_model, which times each layer after an
  elementwise op, as a batch norm and ReLU feed it there). --layers keeps
  the layers whose path contains one of its names (e.g. "fc" for the fully
  connected ones)."""
  import jax
  import jax.numpy as jnp
  from escort_jax import bench_network, tune
  directory, candidates, vector_candidates, precision = _tune_options(args)
  report = []
  for name in nets:
    for dtype in dtypes:
      _, sparse = bench_network.build_networks(name, dtype=jnp.dtype(dtype))
      h, w, c = bench_network.input_hwc(name, max_hw)
      for batch in batches:
        def show(path, shape, entry, name=name, batch=batch, dtype=dtype):
          console.print(f"{name} b={batch} {dtype} {path} {shape}: "
                        f"{_plan_text(entry)}", highlight=False)
          report.append(dict(net=name, layer=path, batch=batch, dtype=dtype,
                             input_shape=list(shape), **entry))
        tune.tune_model(
            sparse, jax.ShapeDtypeStruct((batch, h, w, c), jnp.dtype(dtype)),
            precision=precision, candidates=candidates,
            vector_candidates=vector_candidates,
            num_inputs=num_inputs or 10, directory=directory, on_layer=show,
            layers=_split_list(args.layers) or None)
  if args.json:
    print(json.dumps(report, indent=1))
  return EXIT_OK


_COMMANDS = {"demo": "_cmd_demo", "convert": "_cmd_convert",
             "inspect": "_cmd_inspect", "bench": "_cmd_bench"}


def main(argv: Sequence[str] | None = None) -> int:
  """The console script: `escort-jax` / `python -m escort_jax`.

  Returns the exit status: 0 ok, 1 a check failed, 2 a usage or input
  error (argparse's own errors exit with 2 through SystemExit).
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  if args.command is None:
    parser.print_help(sys.stderr)
    return EXIT_USAGE
  try:
    return globals()[_COMMANDS[args.command]](args)
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
