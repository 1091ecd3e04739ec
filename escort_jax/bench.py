"""Benchmark harness: device kernel time of sparse_conv against the baselines
of /work/shared/BENCHMARKING.md, on the layers of escort_jax/layers.json.

  python -m escort_jax bench                     # 39 pruned layers, batch 1, 32
  python -m escort_jax bench --layers res3a inception_3a/3x3 --batch 32
  python -m escort_jax bench --sweep             # sparsity 50..99% on 3 layers
  python -m escort_jax bench --resume FILE       # skip the rows FILE has
  python -m escort_jax bench --vector-width 16 --method vector escort \
      --dtype bf16 --batch 32                    # vector-sparse kernels

Vector-sparse rows (vector_widths=[V], --vector-width V): each layer's kernel
keeps whole vectors of V consecutive output channels (workload.make_kernel
with vector_width=V), every method of the row runs on that kernel, and rows
record "vector_width": V (null for the unstructured kernels). Method "vector"
is the tensor-core kernel (sparse_conv(method="vector")); it runs on
vector-sparse kernels only. Method "vector_framed" is the same kernel
between frames (escort_jax.frames): its input is the layer's input already
in a frame with margins of the layer's padding, made outside the timed
call, and its output the frame that a next layer of the same map size
reads; so its time is that of a layer inside a chain of framed sparse
layers, with no layout pass (the NHWC baselines are unchanged, and the
error is taken on the output out of its frame).

How time is measured (one method for every side of a ratio):
  GPU  "perfetto-gpu": warm up (compile, run twice); run the op once on each
       of `num_inputs` distinct input batches inside
       jax.profiler.trace(create_perfetto_trace=True); sum the "dur" of the
       complete ("ph": "X") events of the process named "/device:GPU:0" in
       perfetto_trace.json.gz and divide by the number of calls. This counts
       every kernel the op launches (pads, transposes, slices). The median of
       `repeats` such traces is reported, and their spread (max - min).
  CPU  "cpu-wallclock": the same loop timed with time.perf_counter around
       each call and block_until_ready; only so that the harness runs in
       tests. It says nothing about GPU speed.

Each row is one (layer, vector width, batch, sparsity, dtype, method). The
dense and BCOO baselines are measured for each (layer, vector width, batch,
sparsity) in the same run as the rows that use them:
  lax_fp32_highest  lax.conv_general_dilated, float32, precision HIGHEST
  lax_default       the same at default precision (TF32 on Hopper)
  lax_bf16          the same in bfloat16 (NHWC / HWIO)
  bcoo              BCOO (O, C*R*S) weight matrix times conv patches, float32
  bcoo_cusparse     (opt-in) the same with jax_bcoo_cusparse_lowering on

The floor of a row is max(useful FLOPs / rate, bytes / bandwidth) with useful
FLOPs = 2 * nnz * Ho * Wo * batch, rate = 67e12 FLOP/s (fp32 FMA on CUDA
cores; bf16 inputs on CUDA cores run at the same rate), bandwidth = 3.0e12
B/s, bytes = input read once + output written once + values and metadata
(int32 column index per nonzero, int32 row pointers) once. floor_fraction =
floor_us / time_us (1.0 = at the floor). A vector-sparse kernel (V >= 8) can
run on tensor cores, so its floor takes the tensor-core rate for bf16/f16
inputs (989e12 FLOP/s, H100 SXM dense) and one int32 index per kept vector
and row pointers per block of V channels.

Results: benchmarks/results/<YYYY-MM-DD>T<HHMM>-<gpu-slug>.json, rewritten
after every row (so a killed run keeps its rows), plus write_report()'s
Markdown table and PNG plots next to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gzip
import inspect
import json
import math
import os
from pathlib import Path
import re
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax import KernelConfig, sparse_conv
from escort_jax import baselines as bl
from escort_jax import frames
from escort_jax import workload as wl
from escort_jax.ops import CUDNN_KERNEL_LAYOUT, VectorConfig, dispatch_choice
from escort_jax.structure import ALIGNED_COLUMNS, VECTOR_WIDTHS, SparseKernel

# --------------------------------------------------------------------------
# Constants.

TIMER_GPU = "perfetto-gpu"
TIMER_CPU = "cpu-wallclock"

BASELINES = ("lax_fp32_highest", "lax_default", "lax_bf16", "bcoo")
OPTIONAL_BASELINES = ("bcoo_cusparse",)
ALL_BASELINES = BASELINES + OPTIONAL_BASELINES
BASELINE_TITLES = {
    "lax_fp32_highest": "lax fp32 HIGHEST",
    "lax_default": "lax fp32 default (TF32)",
    "lax_bf16": "lax bf16",
    "bcoo": "BCOO im2col",
    "bcoo_cusparse": "BCOO cuSPARSE",
}
# The dense baseline of the same input and output dtype, for each dtype.
SAME_DTYPE_BASELINE = {"float32": "lax_fp32_highest", "bfloat16": "lax_bf16"}

VECTOR_FRAMED = "vector_framed"
METHOD_NAMES = ("escort", "auto", "vector", "dense", "auto_fallback",
                VECTOR_FRAMED)
# Methods that run the vector kernel, on vector-sparse kernels only.
VECTOR_METHODS = ("vector", VECTOR_FRAMED)
# Not a sparse_conv method: the layer as escort_jax.convert.dense_fallback
# leaves it. Where "auto" picks dense, the pruned kernel held dense (as
# OHWI, as escort_jax.nnx.DenseConv holds it) and run by lax.conv (no
# densification or transpose per call);
# elsewhere the sparse path "auto" picks. The row's "chosen" says which.
AUTO_FALLBACK = "auto_fallback"
# The config class of each method that takes one (--config).
CONFIG_CLASSES = {"escort": KernelConfig, "auto": KernelConfig,
                  AUTO_FALLBACK: KernelConfig,
                  "vector": VectorConfig, VECTOR_FRAMED: VectorConfig}
DTYPES = {"float32": "float32", "f32": "float32", "fp32": "float32",
          "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "f16": "float16", "fp16": "float16"}

# H100 SXM ceilings (BENCHMARKING.md): measured or datasheet leads.
CUDA_CORE_RATE = 67e12          # FLOP/s, fp32 FMA on CUDA cores
RATES = {"float32": CUDA_CORE_RATE,
         # The escort kernels compute bf16/f16 inputs on CUDA cores too.
         "bfloat16": CUDA_CORE_RATE, "float16": CUDA_CORE_RATE}
# Dense bf16/f16 tensor-core rate, for vector-sparse kernels (V >= 8).
TENSOR_CORE_RATES = {"bfloat16": 989e12, "float16": 989e12}
HBM_BANDWIDTH = 3.0e12          # B/s, device-to-device copy
INDEX_BYTES = 4                 # int32 metadata per nonzero and row pointer

SWEEP_LAYERS = ("resnet50/res3a_branch2b", "resnet50/res4a_branch2b",
                "googlenet/inception_3a/3x3")
SWEEP_SPARSITIES = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.98, 0.99)

# Short names of config fields in --config and in method labels.
CONFIG_ALIASES = {"rpp": "rows_per_program", "bq": "block_q",
                  "nw": "num_warps", "ns": "num_stages", "u": "unroll",
                  "gpp": "groups_per_program", "qm": "q_major",
                  "nzl": "nonzero_lanes"}
VECTOR_CONFIG_ALIASES = {"bq": "block_q", "bk": "block_k", "nw": "num_warps",
                         "ns": "num_stages", "pf": "prefetch"}
_ALIASES = {KernelConfig: CONFIG_ALIASES, VectorConfig: VECTOR_CONFIG_ALIASES}
_SHORT = {v: k for aliases in _ALIASES.values() for k, v in aliases.items()}

# Lines of a device process that xprof derives from the stream lines; they
# repeat the kernels' time, so they are never summed (if a trace has them).
_DERIVED_LINES = ("xla modules", "xla ops", "xla traceme", "tensorflow ops",
                  "tensorflow name scope", "framework ops",
                  "framework name scope", "source code", "steps",
                  "launch stats", "_counters_")


class UsageError(ValueError):
  """A bad benchmark request (the CLI exits with status 2)."""


# --------------------------------------------------------------------------
# Reading perfetto traces.


@dataclasses.dataclass
class TraceSummary:
  """Device activity of one trace.

  Attributes:
    total_us: summed "dur" of the device process's complete events.
    kernels_us: the same per event name.
    num_events: how many events were summed.
    processes: names of the matched processes.
    threads: names of the summed threads (lines), where the trace names them.
    events: (ts, dur, name) of each summed event, sorted by ts.
    all_processes: the names of every process in the trace.
  """

  total_us: float
  kernels_us: dict[str, float]
  num_events: int
  processes: list[str]
  threads: list[str]
  events: list[tuple[float, float, str]] = dataclasses.field(
      default_factory=list)
  all_processes: list[str] = dataclasses.field(default_factory=list)

  def split(self, parts: int) -> list[TraceSummary] | None:
    """Splits the events, in time order, into `parts` runs of equal event
    count (the same calls repeated `parts` times launch the same kernels);
    None if the count does not divide or the runs' kernel sequences
    differ."""
    n = len(self.events)
    if parts <= 0 or n == 0 or n % parts:
      return None
    size = n // parts
    names = [e[2] for e in self.events]
    if any(names[i * size:(i + 1) * size] != names[:size]
           for i in range(1, parts)):
      return None
    out = []
    for i in range(parts):
      chunk = self.events[i * size:(i + 1) * size]
      kernels: dict[str, float] = {}
      for _, dur, name in chunk:
        kernels[name] = kernels.get(name, 0.0) + dur
      out.append(TraceSummary(
          total_us=sum(d for _, d, _ in chunk), kernels_us=kernels,
          num_events=len(chunk), processes=self.processes,
          threads=self.threads, events=chunk,
          all_processes=self.all_processes))
    return out


def _device_name_matches(name: str, device: str) -> bool:
  """True if `name` contains `device`, not followed by another digit (so
  "/device:GPU:1" does not match "/device:GPU:10")."""
  start = name.find(device)
  while start >= 0:
    end = start + len(device)
    if end == len(name) or not name[end].isdigit():
      return True
    start = name.find(device, start + 1)
  return False


def load_trace_events(trace) -> list[dict]:
  """The event list of a Chrome/perfetto JSON trace: a path (.json or
  .json.gz), a dict with "traceEvents", or a list of events."""
  if isinstance(trace, (str, os.PathLike)):
    path = Path(trace)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
      trace = json.load(f)
  if isinstance(trace, dict):
    trace = trace.get("traceEvents", [])
  if not isinstance(trace, list):
    raise ValueError("not a Chrome/perfetto JSON trace")
  return trace


def parse_perfetto_trace(trace, device: str = "/device:GPU:0"
                         ) -> TraceSummary:
  """Sums the device time of a perfetto_trace.json(.gz) from jax.profiler.

  The processes are named by metadata events {"ph": "M", "name":
  "process_name", "pid": P, "args": {"name": ...}}; every complete event
  {"ph": "X", "pid": P, "dur": microseconds} of a process whose name contains
  `device` is summed, except on lines that merely repeat the stream lines
  ("XLA Ops", "XLA Modules", ...: see _DERIVED_LINES), should a trace carry
  them.
  """
  events = load_trace_events(trace)
  pids: dict[Any, str] = {}
  every_process: set[str] = set()
  thread_names: dict[tuple[Any, Any], str] = {}
  for e in events:
    if e.get("ph") != "M":
      continue
    name = str((e.get("args") or {}).get("name", ""))
    if e.get("name") == "process_name":
      every_process.add(name)
      if _device_name_matches(name, device):
        pids[e.get("pid")] = name
    elif e.get("name") == "thread_name":
      thread_names[(e.get("pid"), e.get("tid"))] = name
  total = 0.0
  count = 0
  kernels: dict[str, float] = {}
  threads: set[str] = set()
  timed: list[tuple[float, float, str]] = []
  for e in events:
    if e.get("ph") != "X" or e.get("pid") not in pids:
      continue
    tname = thread_names.get((e.get("pid"), e.get("tid")), "")
    if tname.strip().lower().startswith(_DERIVED_LINES):
      continue
    dur = float(e.get("dur", 0.0) or 0.0)
    total += dur
    count += 1
    key = str(e.get("name", "?"))
    kernels[key] = kernels.get(key, 0.0) + dur
    timed.append((float(e.get("ts", 0.0) or 0.0), dur, key))
    if tname:
      threads.add(tname)
  timed.sort(key=lambda t: t[0])
  return TraceSummary(total_us=total, kernels_us=kernels, num_events=count,
                      processes=sorted(set(pids.values())),
                      threads=sorted(threads), events=timed,
                      all_processes=sorted(every_process))


def find_perfetto_trace(log_dir: str | os.PathLike) -> Path:
  """The newest perfetto_trace.json.gz under log_dir."""
  found = sorted(Path(log_dir).rglob("perfetto_trace.json.gz"),
                 key=lambda p: p.stat().st_mtime)
  if not found:
    raise FileNotFoundError(
        f"jax.profiler.trace wrote no perfetto_trace.json.gz under {log_dir}")
  return found[-1]


# --------------------------------------------------------------------------
# Timing.


@dataclasses.dataclass
class Timing:
  """A device-time measurement of one function.

  Attributes:
    median_us: median over repeats of (total time / calls), microseconds.
    spread_us: max - min over the repeats.
    samples_us: each repeat's time per call.
    timer: TIMER_GPU or TIMER_CPU.
    kernels_us: per-call time of each kernel name (GPU; from the repeat
      closest to the median), largest first.
  """

  median_us: float
  spread_us: float
  samples_us: list[float]
  timer: str
  kernels_us: dict[str, float] = dataclasses.field(default_factory=dict)


def default_timer() -> str:
  """TIMER_GPU where JAX's default backend is a GPU, else TIMER_CPU."""
  return TIMER_GPU if jax.default_backend() == "gpu" else TIMER_CPU


def _as_args(inp) -> tuple:
  return inp if isinstance(inp, tuple) else (inp,)


def _profile_options():
  """Profiler options with the Python tracer off (smaller traces; the device
  lines are unaffected), where this jax has them."""
  try:
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    return options
  except Exception:
    return None


@functools.lru_cache(maxsize=1)
def _trace_accepts_options() -> bool:
  try:
    return "profiler_options" in inspect.signature(
        jax.profiler.trace).parameters
  except (TypeError, ValueError):
    return False


def _trace(log_dir: str):
  kwargs = {"create_perfetto_trace": True}
  options = _profile_options() if _trace_accepts_options() else None
  if options is not None:
    kwargs["profiler_options"] = options
  return jax.profiler.trace(log_dir, **kwargs)


def _traced_summary(fn, inputs_list, rounds: int, device: str,
                    log_dir: str | None) -> TraceSummary:
  """One profiler trace of `rounds` passes over inputs_list."""
  with contextlib.ExitStack() as stack:
    if log_dir is None:
      log_dir = stack.enter_context(
          tempfile.TemporaryDirectory(prefix="escort-trace-"))
    with _trace(log_dir):
      for _ in range(rounds):
        for inp in inputs_list:
          jax.block_until_ready(fn(*_as_args(inp)))
    summary = parse_perfetto_trace(find_perfetto_trace(log_dir), device)
  if summary.num_events == 0:
    raise RuntimeError(
        f"the profiler trace has no device events for {device!r} (its "
        f"processes: {summary.all_processes}); is the GPU visible to the "
        "profiler (CUPTI)? Never mix jax.profiler.trace with the CUPTI "
        "profiler (mosaic.gpu.profiler.measure) in one process.")
  return summary


def device_time_us(fn: Callable, inputs_list: Sequence, *, repeats: int = 3,
                   warmup: int = 2, timer: str | None = None,
                   device: str = "/device:GPU:0",
                   trace_per_repeat: bool = False,
                   keep_traces: str | os.PathLike | None = None) -> Timing:
  """Device kernel time per call of fn over distinct inputs.

  The GPU route (BENCHMARKING.md): each repeat runs fn once on every input
  inside jax.profiler.trace and sums the device events of `device` in the
  perfetto trace, divided by the number of calls. By default all repeats
  share one trace (profiler start/stop costs far more than these kernels)
  and the trace's device events, in time order, are cut into `repeats` runs
  of equal event count; where that count does not divide (something ran
  once only), or with trace_per_repeat=True, each repeat gets its own trace.

  Args:
    fn: the function to time (jitted; its kernel form already built).
    inputs_list: 10-20 distinct inputs; each an array (fn(x)) or a tuple of
      arguments (fn(*args)).
    repeats: measurements; the median is reported, max - min as spread.
    warmup: untimed calls on inputs_list[0] first (the first compiles).
    timer: TIMER_GPU (perfetto device time) or TIMER_CPU (wall clock);
      default: default_timer().
    device: the process name to sum in the trace.
    trace_per_repeat: one trace per repeat instead of one in all.
    keep_traces: a folder to keep the traces in (default: deleted).

  Returns:
    A Timing, microseconds per call.
  """
  inputs_list = list(inputs_list)
  if not inputs_list:
    raise ValueError("inputs_list is empty")
  timer = timer or default_timer()
  if timer not in (TIMER_GPU, TIMER_CPU):
    raise ValueError(f"unknown timer {timer!r}")
  repeats = max(1, int(repeats))
  for _ in range(max(1, warmup)):
    jax.block_until_ready(fn(*_as_args(inputs_list[0])))
  n = len(inputs_list)
  summaries: list[TraceSummary] = []
  samples: list[float] = []
  if timer == TIMER_CPU:
    for _ in range(repeats):
      total = 0.0
      for inp in inputs_list:
        args = _as_args(inp)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        total += time.perf_counter() - t0
      samples.append(total / n * 1e6)
    kernels: dict[str, float] = {}
  else:
    def log_dir(i):
      return None if keep_traces is None else str(
          Path(keep_traces) / f"trace{i}")
    parts = None
    if not trace_per_repeat:
      parts = _traced_summary(fn, inputs_list, repeats, device,
                              log_dir(0)).split(repeats)
    if parts is None:
      parts = [_traced_summary(fn, inputs_list, 1, device, log_dir(i + 1))
               for i in range(repeats)]
    summaries = parts
    samples = [p.total_us / n for p in parts]
  median = statistics.median(samples)
  if summaries:
    closest = min(range(len(samples)),
                  key=lambda i: abs(samples[i] - median))
    kernels = {k: v / n for k, v in sorted(
        summaries[closest].kernels_us.items(), key=lambda kv: -kv[1])}
  return Timing(median_us=median, spread_us=max(samples) - min(samples),
                samples_us=samples, timer=timer, kernels_us=kernels)


# --------------------------------------------------------------------------
# The floor model.


def floor_model(layer: wl.Layer, batch: int, nnz: int, dtype: str,
                vector_width: int | None = None) -> dict[str, float]:
  """The floor of one sparse layer (see the module docstring); with
  vector_width V >= 8, of its vector-sparse kernel.

  Returns:
    dict(floor_us, compute_us, memory_us, useful_flops, bytes).
  """
  itemsize = jnp.dtype(dtype).itemsize
  ho = layer.out_hw
  flops = 2 * nnz * ho * ho * batch
  v = vector_width if vector_width and vector_width >= 8 else 1
  nbytes = (batch * layer.in_hw * layer.in_hw * layer.in_channels * itemsize
            + batch * ho * ho * layer.out_channels * itemsize
            + nnz * itemsize + nnz // v * INDEX_BYTES
            + (layer.out_channels // v + 1) * INDEX_BYTES)
  rate = RATES.get(dtype, CUDA_CORE_RATE)
  if v > 1:
    rate = TENSOR_CORE_RATES.get(dtype, rate)
  compute_us = flops / rate * 1e6
  memory_us = nbytes / HBM_BANDWIDTH * 1e6
  return dict(floor_us=max(compute_us, memory_us), compute_us=compute_us,
              memory_us=memory_us, useful_flops=float(flops),
              bytes=float(nbytes))


# --------------------------------------------------------------------------
# Methods and kernel configs.


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A sparse op variant to time.

  Attributes:
    label: the row's "method", e.g. "escort", "escort[rpp=8,bq=256,nw=4]"
      or "vector[bq=64,bk=32]".
    method: sparse_conv's method argument.
    config: its KernelConfig or VectorConfig (None: the op's default).
    config_items: the config fields the user set, for the results.
  """

  label: str
  method: str
  config: KernelConfig | VectorConfig | None = None
  config_items: tuple[tuple[str, int], ...] = ()


def parse_config(text: str, cls: type = KernelConfig
                 ) -> tuple[Any, tuple[tuple[str, int], ...]]:
  """Parses "rows_per_program=8,block_q=256,num_warps=4" (or short names:
  see CONFIG_ALIASES, VECTOR_CONFIG_ALIASES) into a `cls` (KernelConfig or
  VectorConfig) and the (field, value) pairs. Fields are read from the class
  itself, so new ones work here too; boolean fields take 0/1/true/false."""
  name = cls.__name__
  fields = {f.name: f for f in dataclasses.fields(cls)}
  aliases = _ALIASES.get(cls, {})
  items = []
  for part in text.replace(";", ",").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" not in part:
      raise UsageError(f"bad --config entry {part!r}: expected name=value, "
                       f"e.g. rows_per_program=8,block_q=256,num_warps=4")
    key, value = (s.strip() for s in part.split("=", 1))
    key = aliases.get(key, key)
    if key not in fields:
      raise UsageError(
          f"unknown {name} field {key!r}; expected one of "
          f"{sorted(fields)} (short: {sorted(aliases)})")
    is_bool = isinstance(fields[key].default, bool)
    if is_bool and value.lower() in ("true", "false"):
      value = "1" if value.lower() == "true" else "0"
    try:
      number = int(value)
    except ValueError:
      raise UsageError(f"--config {key} must be an integer, got "
                       f"{value!r}") from None
    if is_bool and number not in (0, 1):
      raise UsageError(f"--config {key} is a flag: 0 or 1, got {value!r}")
    items.append((key, bool(number) if is_bool else number))
  if not items:
    raise UsageError(f"empty --config {text!r}")
  try:
    config = cls(**dict(items))
  except (TypeError, ValueError) as e:
    raise UsageError(f"bad --config {text!r}: {e}") from None
  return config, tuple(items)


def method_label(method: str, items: Sequence[tuple[str, int]]) -> str:
  """A row's "method": the method and the config fields set, short names,
  e.g. "escort[rpp=8,bq=256,nw=4]", "vector[bq=64,bk=32]" (a plan's times
  use escort_jax.tune.config_label instead)."""
  if not items:
    return method
  inner = ",".join(f"{_SHORT.get(k, k)}={int(v)}" for k, v in items)
  return f"{method}[{inner}]"


def _parse_for_classes(text: str, classes: Sequence[type]) -> dict:
  """{cls: (config, items)} for each class of `classes` that `text` fits.

  Raises UsageError if it fits none (with each class's reason)."""
  fits: dict[type, tuple] = {}
  errors: list[UsageError] = []
  for cls in classes:
    try:
      fits[cls] = parse_config(text, cls)
    except UsageError as e:
      errors.append(e)
  if not fits:
    if len(errors) == 1:
      raise errors[0]
    raise UsageError(f"--config {text!r} fits no method's config: " +
                     "; ".join(str(e) for e in errors))
  return fits


def method_specs(methods: Sequence[str] = ("escort",),
                 configs: Sequence[str] | None = None) -> list[MethodSpec]:
  """The MethodSpecs of methods x configs.

  Each config applies to every method whose config class (CONFIG_CLASSES:
  KernelConfig for escort and auto, VectorConfig for vector) has all its
  fields, e.g. "rpp=8" to escort and auto, "bk=64" to vector, "bq=64" to
  all three; a method that no config fits runs with its default. A config
  that fits none of the methods is an error.
  """
  for m in methods:
    if m not in METHOD_NAMES:
      raise UsageError(f"unknown method {m!r}; expected one of "
                       f"{METHOD_NAMES}")
  classes = list(dict.fromkeys(CONFIG_CLASSES[m] for m in methods
                               if m in CONFIG_CLASSES)) or [KernelConfig]
  parsed = [_parse_for_classes(c, classes) for c in (configs or [])]
  out: list[MethodSpec] = []
  for m in methods:
    cls = CONFIG_CLASSES.get(m)
    fitting = [p[cls] for p in parsed if cls in p]
    if fitting:
      for cfg, items in fitting:
        out.append(MethodSpec(method_label(m, items), m, cfg, items))
    else:
      out.append(MethodSpec(m, m))
  labels = [s.label for s in out]
  if len(set(labels)) != len(labels):
    raise UsageError(f"duplicate methods {labels}")
  return out


def parse_vector_widths(values: Iterable[int | str | None] | None
                        ) -> list[int | None]:
  """--vector-width values to a list of V (None: unstructured kernels).

  Accepts ints or strings; "none" (or 0) names the unstructured kernel.
  Default (None or empty): [None]. Raises UsageError for a V the vector
  kernel does not take (VECTOR_WIDTHS)."""
  out: list[int | None] = []
  for v in values or [None]:
    if v is None or (isinstance(v, str) and v.strip().lower() == "none"):
      out.append(None)
      continue
    try:
      number = int(v)
    except (TypeError, ValueError):
      raise UsageError(f"bad vector width {v!r}: expected one of "
                       f"{sorted(VECTOR_WIDTHS)} or 'none'") from None
    if number == 0:
      out.append(None)
    elif number in VECTOR_WIDTHS:
      out.append(number)
    else:
      raise UsageError(f"vector width {v!r} is not one of "
                       f"{sorted(VECTOR_WIDTHS)} (or 'none')")
  return list(dict.fromkeys(out))


def parse_dtype(name: str) -> str:
  """A dtype name ("float32", "bf16", ...) to its canonical name.

  Raises UsageError for an unknown name.
  """
  try:
    return DTYPES[name.strip().lower()]
  except KeyError:
    raise UsageError(f"unknown dtype {name!r}; expected one of "
                     f"{sorted(set(DTYPES.values()))}") from None


# --------------------------------------------------------------------------
# Results files.


def device_info() -> dict[str, Any]:
  """The device, jax version and GPU count of this process."""
  dev = jax.devices()[0]
  backend = jax.default_backend()
  try:
    gpus = len(jax.devices("gpu")) if backend == "gpu" else 0
  except RuntimeError:
    gpus = 0
  return {"device": str(getattr(dev, "device_kind", dev.platform)),
          "platform": dev.platform, "backend": backend,
          "jax_version": jax.__version__, "gpus": gpus,
          "timer": default_timer()}


def slugify(text: str) -> str:
  """"NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def results_dir() -> Path:
  """benchmarks/results of the checkout this package lives in, else of the
  current directory."""
  repo = Path(__file__).resolve().parent.parent
  if (repo / "benchmarks").is_dir():
    return repo / "benchmarks" / "results"
  return Path.cwd() / "benchmarks" / "results"


def results_path(suffix: str = "",
                 now: datetime.datetime | None = None) -> Path:
  """benchmarks/results/<YYYY-MM-DD>T<HHMM>-<gpu-slug><suffix>.json for now
  (suffix e.g. "-networks")."""
  now = now or datetime.datetime.now()
  return results_dir() / (f"{now:%Y-%m-%dT%H%M}-"
                          f"{slugify(device_info()['device'])}{suffix}.json")


def results_header(now: datetime.datetime | None = None,
                   **fields) -> dict[str, Any]:
  """The head of a results file: device, jax_version, date, gpus and timer
  of this process (device_info), then `fields` (which override them, e.g.
  timer=, gpus=)."""
  info = device_info()
  now = now or datetime.datetime.now()
  head = {"device": info["device"], "jax_version": info["jax_version"],
          "date": f"{now:%Y-%m-%d}", "gpus": info["gpus"],
          "timer": info["timer"]}
  head.update(fields)
  return head


def write_json(path: str | os.PathLike, data: dict) -> None:
  """Writes `data` as JSON to `path` atomically (a temporary file renamed
  over it), so a killed run leaves the last complete file; makes the
  folder."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, allow_nan=True)
    f.write("\n")
  os.replace(tmp, path)


def _key(net: str, layer: str, batch: int, sparsity: float, dtype: str,
         method: str, in_hw: int, vector_width: int | None,
         column_multiple: int) -> tuple:
  # column_multiple only shapes vector-sparse kernels.
  vector = None if vector_width is None else (int(vector_width),
                                              int(column_multiple))
  return (net, layer, int(batch), round(float(sparsity), 6), dtype, method,
          int(in_hw), vector)


def row_key(row: dict) -> tuple:
  """What identifies a row for --resume: layer, batch, (target) sparsity,
  dtype, method, in_hw, vector_width (None: unstructured; rows written
  before vector widths existed are unstructured) and, for vector-sparse
  rows, column_multiple (1 in rows written before it existed)."""
  return _key(row["net"], row["layer"], row["batch"],
              row.get("target_sparsity", row["sparsity"]), row["dtype"],
              row["method"], row.get("in_hw", -1), row.get("vector_width"),
              row.get("column_multiple", 1))


def load_results(path: str | os.PathLike) -> dict:
  """Reads a results file of the benchmark schema."""
  with open(path) as f:
    data = json.load(f)
  if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
    raise UsageError(f"{path} is not a results file (no 'rows' list)")
  return data


# --------------------------------------------------------------------------
# The benchmark.


def rel_err(y, ref) -> float:
  """Norm-wise relative error ||y - ref|| / ||ref|| in float64 (||y - ref||
  if ref is zero); y and ref are arrays of any float dtype (bfloat16 too) or
  nested lists."""
  y = np.asarray(y).astype(np.float64)
  ref = np.asarray(ref).astype(np.float64)
  denom = np.linalg.norm(ref.ravel())
  num = np.linalg.norm((y - ref).ravel())
  return float(num / denom) if denom > 0 else float(num)


def _baseline_fn(name: str, sk32: SparseKernel, conv: dict):
  """(fn, input dtype) of one baseline."""
  if name == "lax_fp32_highest":
    return bl.make_dense_conv(sk32, precision=lax.Precision.HIGHEST,
                              **conv), "float32"
  if name == "lax_default":
    return bl.make_dense_conv(sk32, **conv), "float32"
  if name == "lax_bf16":
    skb = sk32.with_values(sk32.values.astype(jnp.bfloat16))
    return bl.make_dense_conv(skb, **conv), "bfloat16"
  if name == "bcoo":
    return bl.make_bcoo_conv(sk32, **conv), "float32"
  if name == "bcoo_cusparse":
    return bl.make_bcoo_conv(sk32, cusparse=True, **conv), "float32"
  raise UsageError(f"unknown baseline {name!r}; expected one of "
                   f"{ALL_BASELINES}")


def _fmt_us(t: float | None) -> str:
  if t is None:
    return "-"
  if t < 10:
    return f"{t:.2f}"
  return f"{t:.1f}" if t < 1000 else f"{t:.0f}"


def _fmt_x(x: float | None) -> str:
  return "-" if x is None else f"{x:.2f}x"


def _error_text(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  return text if len(text) < 600 else text[:600] + "..."


def run_benchmark(layers: Sequence[wl.Layer] | None = None, *,
                  batches: Sequence[int] = (1, 32),
                  dtypes: Sequence[str] = ("float32",),
                  methods: Sequence[str] = ("escort",),
                  configs: Sequence[str] | None = None,
                  sparsities: Sequence[float] | None = None,
                  vector_widths: Sequence[int | None] | None = None,
                  column_multiple: int = ALIGNED_COLUMNS,
                  baselines: Sequence[str] = BASELINES,
                  out: str | os.PathLike | None = None,
                  resume: str | os.PathLike | None = None,
                  max_hw: int | None = None,
                  num_inputs: int | None = None,
                  repeats: int | None = None,
                  timer: str | None = None,
                  trace_per_repeat: bool = False,
                  console=None, show_progress: bool = True,
                  report: bool = False) -> tuple[dict, Path]:
  """Times sparse_conv and the baselines on workload layers.

  Args:
    layers: workload layers (default: the 39 pruned ones).
    batches, dtypes: the sweep; dtype names "float32", "bfloat16", ...
    methods: sparse_conv methods ("escort", "auto", "vector", "dense").
    configs: config strings, e.g. "rows_per_program=8,block_q=256" (a
      KernelConfig, for escort and auto) or "block_q=64,block_k=32" (a
      VectorConfig, for vector); each method runs once per config that fits
      it (see method_specs).
    sparsities: overrides each layer's published sparsity (a sweep; rows get
      "sweep": true).
    vector_widths: V of vector-sparse kernels (8, 16, 32, 64), None for
      unstructured ones (the default: [None]); every method runs on each
      (method "vector" on the vector-sparse ones only). Layers whose output
      channels V does not divide are skipped for that V.
    column_multiple: each block of a vector-sparse kernel keeps a multiple
      of this many positions (workload.make_kernel), default
      structure.ALIGNED_COLUMNS, which the vector kernel loads fastest; 1
      keeps exactly the rounded count. Vector rows record it.
    baselines: names from ALL_BASELINES.
    out: the results file (default benchmarks/results/<date>T<time>-<gpu>.json).
    resume: an earlier results file: its rows are kept and skipped, new rows
      are appended to it (out defaults to it).
    max_hw: caps every layer's input size (channels and kernels stay real):
      for quick CPU runs. Rows record the in_hw used.
    num_inputs: distinct input batches per timing (default 10 on a GPU, 2
      on the CPU).
    repeats: timings per figure, median reported (default 5 GPU, 2 CPU).
    timer: TIMER_GPU or TIMER_CPU (default: by backend).
    trace_per_repeat: one profiler trace per repeat (default: one trace per
      figure, cut into repeats; see device_time_us).
    console: a rich Console for progress and per-row lines (default: one on
      stderr); show_progress=False prints nothing.
    report: also write the Markdown report and plots at the end.

  Returns:
    (results, path): the results dict as written to path.
  """
  layers = list(wl.pruned_layers() if layers is None else layers)
  if not layers:
    raise UsageError("no layers selected")
  dtypes = [parse_dtype(d) for d in dtypes]
  batches = [int(b) for b in batches]
  if any(b <= 0 for b in batches):
    raise UsageError(f"batch sizes must be positive, got {batches}")
  specs = method_specs(methods, configs)
  widths = parse_vector_widths(vector_widths)
  vector_specs = [s.method for s in specs if s.method in VECTOR_METHODS]
  if vector_specs and widths == [None]:
    raise UsageError(f"method {vector_specs[0]!r} needs vector-sparse "
                     "kernels: give vector_widths (--vector-width 16)")
  baselines = list(dict.fromkeys(baselines))
  for b in baselines:
    if b not in ALL_BASELINES:
      raise UsageError(f"unknown baseline {b!r}; expected some of "
                       f"{ALL_BASELINES}")
  if sparsities is not None:
    sparsities = [float(s) for s in sparsities]
    if any(not 0.0 <= s < 1.0 for s in sparsities):
      raise UsageError(f"sparsities must lie in [0, 1), got {sparsities}")
  if max_hw is not None and int(max_hw) <= 0:
    raise UsageError(f"max_hw must be positive, got {max_hw}")
  if int(column_multiple) < 1:
    raise UsageError(f"column_multiple must be >= 1, got {column_multiple}")
  timer = timer or default_timer()
  on_gpu = timer == TIMER_GPU
  num_inputs = int(num_inputs or (10 if on_gpu else 2))
  repeats = int(repeats or (5 if on_gpu else 2))
  if num_inputs <= 0 or repeats <= 0:
    raise UsageError("num_inputs and repeats must be positive")

  info = device_info()
  now = datetime.datetime.now()
  run_info = {"started": now.isoformat(timespec="seconds"),
              "jax_version": info["jax_version"], "timer": timer,
              "num_inputs": num_inputs, "repeats": repeats, "max_hw": max_hw,
              "trace_per_repeat": bool(trace_per_repeat),
              "argv": sys.argv[1:]}
  if resume is not None:
    results = load_results(resume)
    if results.get("device") != info["device"]:
      raise UsageError(
          f"{resume} was measured on {results.get('device')!r}, this is "
          f"{info['device']!r}: baselines must come from the same device; "
          "start a new file")
    path = Path(out or resume)
    multiples = {r.get("column_multiple", 1) for r in results["rows"]
                 if r.get("vector_width")}
    if multiples - {int(column_multiple)} and widths != [None]:
      raise UsageError(
          f"{resume} has vector-sparse rows with column_multiple "
          f"{sorted(multiples)}, this run uses {int(column_multiple)}: their "
          "summaries would mix two structures; start a new file")
    # Rows that failed are retried.
    results["rows"] = [r for r in results["rows"] if not r.get("error")]
    results.setdefault("runs", []).append(run_info)
  else:
    path = Path(out) if out else results_path(now=now)
    results = results_header(
        now, backend=info["backend"], timer=timer,
        floor_model={"rate_flops": RATES,
                     "tensor_core_rate_flops": TENSOR_CORE_RATES,
                     "bandwidth_bytes_per_s": HBM_BANDWIDTH,
                     "index_bytes": INDEX_BYTES},
        runs=[run_info], rows=[])
  done = {row_key(r) for r in results["rows"]}

  # The plan: groups of rows sharing a kernel, inputs and baselines.
  plan = []
  skipped = []
  for layer, vw in wl.layer_vector_widths(
      layers, widths,
      on_skip=lambda l, v, _: skipped.append(f"{l.name} (V={v})")):
    small = layer.scaled(max_hw)
    for sp in (sparsities if sparsities is not None else [layer.sparsity]):
      for batch in batches:
        todo = []
        for dtype in dtypes:
          for spec in specs:
            if spec.method in VECTOR_METHODS and vw is None:
              continue  # the vector kernel needs a vector-sparse kernel
            key = _key(layer.net, layer.layer, batch, sp, dtype,
                       spec.label, small.in_hw, vw, column_multiple)
            if key not in done:
              todo.append((dtype, spec))
        if todo:
          plan.append((layer, small, vw, sp, batch, todo))
  if skipped and not plan and not results["rows"]:
    raise UsageError(f"no rows: the vector width does not divide the output "
                     f"channels of {', '.join(skipped)}")
  total = sum(len(p[-1]) for p in plan)

  if console is None and show_progress:
    from rich.console import Console
    console = Console(stderr=True)
  say = console.print if (console is not None and show_progress) else (
      lambda *a, **k: None)
  say(f"[bold]escort-jax bench[/] on {info['device']} (jax "
      f"{info['jax_version']}, timer {timer}): {total} rows in {len(plan)} "
      f"groups -> {path}")
  if timer == TIMER_CPU:
    say("[yellow]No GPU: timing by CPU wall clock (escort runs in the Pallas "
        "interpreter). These figures test the harness, not the kernels' "
        "speed." + ("" if max_hw else " Full-size layers are slow here: "
                    "--small or --max-hw N keeps a CPU run short.") + "[/]")
  if skipped:
    say(f"[yellow]Skipped, the vector width does not divide their output "
        f"channels (per feature group): {', '.join(skipped)}[/]")
  if resume is not None and results.get("jax_version") != info["jax_version"]:
    say(f"[yellow]{resume} began under jax {results.get('jax_version')}; "
        f"this run is jax {info['jax_version']} (recorded under 'runs').[/]")
  write_json(path, results)

  progress = None
  if show_progress and console is not None and total:
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress,
                               TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    progress = Progress(TextColumn("{task.description}"), BarColumn(),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        TimeRemainingColumn(), console=console,
                        transient=True)
    say = progress.console.print
  task = None
  with (progress if progress is not None else contextlib.nullcontext()):
    if progress is not None:
      task = progress.add_task("rows", total=total)
    for layer, small, vw, sp, batch, todo in plan:
      if progress is not None:
        progress.update(task, description=f"{layer.name}"
                        f"{vector_text(vw)} b={batch} sp={sp:.3f}")
      timing = functools.partial(device_time_us, repeats=repeats,
                                 timer=timer,
                                 trace_per_repeat=trace_per_repeat)
      _run_group(results, path, layer, small, vw, column_multiple, sp,
                 batch, todo, baselines, sparsities is not None, num_inputs,
                 timing, timer, say,
                 lambda: progress.advance(task) if progress else None)
  say(f"[bold]wrote[/] {path}")
  if report:
    paths = write_report(path)
    say(f"[bold]report[/] {paths['markdown']}")
  return results, path


def vector_text(vector_width: int | None) -> str:
  """" V=16" for a vector width, "" for None (unstructured)."""
  return "" if vector_width is None else f" V={vector_width}"


def _run_group(results, path, layer, small, vector_width, column_multiple,
               sp, batch, todo, baselines, sweep, num_inputs, timing, timer,
               say, advance):
  """Measures the baselines of one (layer, vector width, sparsity, batch),
  then its rows."""
  conv = small.conv_kwargs()
  w32 = wl.make_kernel(layer, sparsity=sp, vector_width=vector_width,
                       column_multiple=column_multiple)
  sk32 = SparseKernel.from_dense(w32)
  nnz = sk32.nnz
  inputs32 = [wl.make_input(small, batch, seed=i)
              for i in range(num_inputs)]
  cast_cache: dict[str, list] = {"float32": inputs32}

  def inputs_as(dtype):
    if dtype not in cast_cache:
      cast_cache[dtype] = [jax.block_until_ready(x.astype(dtype))
                           for x in inputs32]
    return cast_cache[dtype]

  base_us: dict[str, float | None] = {}
  base_spread: dict[str, float] = {}
  base_err: dict[str, str] = {}
  for name in baselines:
    try:
      fn, in_dtype = _baseline_fn(name, sk32, conv)
      t = timing(fn, inputs_as(in_dtype))
      base_us[name] = t.median_us
      base_spread[name] = t.spread_us
    except UsageError:
      raise
    except Exception as e:
      # e.g. out of memory for BCOO patches: record it, keep going.
      base_us[name] = None
      base_err[name] = _error_text(e)
      say(f"[red]baseline {name} failed on {layer.name}"
          f"{vector_text(vector_width)} b={batch}: "
          f"{base_err[name]}[/]")

  for dtype, spec in todo:
    fm = floor_model(small, batch, nnz, dtype, vector_width)
    row: dict[str, Any] = {
        "net": layer.net, "layer": layer.layer, "batch": batch,
        "sparsity": round(1.0 - nnz / layer.size, 6), "dtype": dtype,
        "method": spec.label, "vector_width": vector_width, "time_us": None,
        "baselines_us": dict(base_us),
    }
    if vector_width is not None:
      row["column_multiple"] = int(column_multiple)
    try:
      skd = sk32.with_values(sk32.values.astype(dtype))
      xs = inputs_as(dtype)
      run = _method_run(spec, skd, conv, xs[0], row)
      prepared = [jax.block_until_ready(run.prepare(x)) for x in xs]
      t = timing(run.fn, prepared)
      # Accuracy against fp32 HIGHEST of the same rounded inputs.
      ref = bl.make_dense_conv(
          skd.with_values(skd.values.astype(jnp.float32)),
          precision=lax.Precision.HIGHEST, **conv)(xs[0].astype(jnp.float32))
      err = rel_err(run.finish(run.fn(prepared[0])), ref)
      time_us = t.median_us
      speedups = {k: (v / time_us if v else None)
                  for k, v in base_us.items()}
      row.update({
          "time_us": time_us,
          "spread_us": t.spread_us,
          "samples_us": t.samples_us,
          "floor_us": fm["floor_us"],
          "floor_fraction": fm["floor_us"] / time_us,
          "tflops": fm["useful_flops"] / time_us / 1e6,
          "speedups": speedups,
          "rel_err": err,
          "kernels_us": dict(list(t.kernels_us.items())[:8]),
      })
    except UsageError:
      raise
    except Exception as e:
      # e.g. a KernelConfig that Triton rejects: record it, keep going;
      # --resume retries failed rows.
      row.update({"floor_us": fm["floor_us"], "floor_fraction": None,
                  "tflops": None, "spread_us": None, "speedups": {},
                  "error": _error_text(e)})
    row.update({
        "target_sparsity": round(sp, 6), "sweep": bool(sweep),
        "in_hw": small.in_hw, "out_hw": small.out_hw,
        "in_channels": layer.in_channels,
        "out_channels": layer.out_channels, "kernel": layer.kernel,
        "stride": layer.stride, "padding": layer.padding,
        "groups": layer.groups, "nnz": nnz,
        "config": dict(spec.config_items) or None,
        "timer": timer, "baseline_spread_us": dict(base_spread),
        "baseline_errors": base_err or None,
        "floor_compute_us": fm["compute_us"],
        "floor_memory_us": fm["memory_us"],
    })
    results["rows"].append(row)
    write_json(path, results)
    say(_row_line(row))
    advance()


@dataclasses.dataclass(frozen=True)
class MethodRun:
  """What a row times: fn(prepare(x)) for each NHWC input x, prepared
  outside the timing; finish(fn(...)) is the NHWC output."""

  fn: Callable
  prepare: Callable = lambda x: x
  finish: Callable = lambda y: y


def framed_layer(frame: frames.Frame, config: VectorConfig | None,
                 **conv) -> Callable:
  """jit fn(data, sk) -> the output frame's data: sparse_conv(method=
  "vector", config, **conv) of Framed(data, frame). It times a layer whose
  input was framed beforehand, as inside a chain of framed layers (bench's
  VECTOR_FRAMED rows, the tuner's framed candidates)."""
  return jax.jit(lambda data, sk: sparse_conv(
      frames.Framed(data, frame), sk, method="vector", config=config,
      **conv).data)


def _method_run(spec: MethodSpec, skd: SparseKernel, conv: dict, x,
                row: dict) -> MethodRun:
  """The MethodRun of a row's method on kernel skd (x: an NHWC input of
  the row's shape)."""
  if spec.method == VECTOR_FRAMED:
    frame = frames.frame_of(x.shape, conv["padding"])
    op = framed_layer(frame, spec.config, **conv)
    out_frame = frame.with_channels(skd.structure.oirs[0])
    return MethodRun(
        fn=lambda data: op(data, skd),
        prepare=functools.partial(frames.frame_data, frame=frame),
        finish=functools.partial(frames.unframe_data, frame=out_frame))
  return MethodRun(_method_fn(spec, skd, conv, x, row))


def _method_fn(spec: MethodSpec, skd: SparseKernel, conv: dict, x,
               row: dict) -> Callable:
  """fn(x) of a row's method on kernel skd; for AUTO_FALLBACK it records
  the path it takes as row["chosen"]."""
  method, config = spec.method, spec.config
  if method == AUTO_FALLBACK:
    choice = dispatch_choice(x, skd, method="auto", config=config, **conv)
    row["chosen"] = choice.method
    if choice.method == "dense":
      return bl.make_dense_conv(skd, kernel_layout=CUDNN_KERNEL_LAYOUT,
                                **conv)
    method, config = choice.method, choice.config
  op = jax.jit(functools.partial(sparse_conv, method=method, config=config,
                                 **conv))
  return lambda x: op(x, skd)


def _row_line(row: dict) -> str:
  from rich.markup import escape
  # escape: a label such as "escort[rpp=8]" is not rich markup.
  head = escape(f"{row['net']}/{row['layer']} b={row['batch']} "
                f"sp={row['sparsity']:.3f} {row['dtype']} {row['method']}"
                f"{vector_text(row.get('vector_width'))}")
  if row.get("error"):
    return f"[red]{head}: FAILED {escape(row['error'])}[/]"
  parts = [f"[bold]{head}[/]: {_fmt_us(row['time_us'])} us "
           f"(±{_fmt_us(row['spread_us'])})"]
  for name, t in row["baselines_us"].items():
    parts.append(f"{name} {_fmt_us(t)} ({_fmt_x(row['speedups'].get(name))})")
  parts.append(f"{row['tflops']:.2f} TFLOP/s")
  parts.append(f"floor {_fmt_us(row['floor_us'])} us "
               f"({row['floor_fraction']:.1%})")
  bad = row["rel_err"] > (1e-4 if row["dtype"] == "float32" else 3e-2)
  parts.append(("[red]" if bad else "") + f"err {row['rel_err']:.1e}" +
               ("[/]" if bad else ""))
  return " | ".join(parts)


def run_sweep(layers: Sequence[wl.Layer] | None = None,
              sparsities: Sequence[float] = SWEEP_SPARSITIES,
              **kwargs) -> tuple[dict, Path]:
  """run_benchmark over a sparsity sweep (default: SWEEP_LAYERS at
  50..99%), so that the break-even point against each baseline shows."""
  if layers is None:
    layers = [wl.get_layer(n) for n in SWEEP_LAYERS]
  return run_benchmark(layers, sparsities=sparsities, **kwargs)


# --------------------------------------------------------------------------
# The report.


def geomean(values: Iterable[float | None]) -> float | None:
  """The geometric mean of the positive values, or None if there are none."""
  vals = [float(v) for v in values if v is not None and v > 0 and
          math.isfinite(v)]
  if not vals:
    return None
  return float(math.exp(sum(math.log(v) for v in vals) / len(vals)))


def _ok_rows(rows):
  return [r for r in rows if r.get("time_us") and not r.get("error")]


def _group_key(r):
  """(batch, dtype, method, vector_width): rows averaged together."""
  return (r["batch"], r["dtype"], r["method"], r.get("vector_width"))


def _sort_key(key):
  # vector_width None (unstructured) first; None never meets an int.
  return tuple((v is not None, v if v is not None else 0) for v in key)


def _target(r) -> float:
  return round(float(r.get("target_sparsity", r["sparsity"])), 6)


_SUBSETS = (("pruned", lambda r: True),
            ("stride-1 ungrouped",
             lambda r: r.get("stride", 1) == 1 and r.get("groups", 1) == 1))


def summarize(results: dict) -> list[dict]:
  """Geometric-mean speedups per (subset, sparsity, batch, dtype, method,
  vector_width).

  The published (non-sweep) rows of pruned layers give the entries with
  "sparsity": None, over the subsets "pruned" (all of them, 39 layers in a
  full run) and "stride-1 ungrouped" (36). Rows at an overridden sparsity
  (--sparsity, --sweep) give one entry per target sparsity ("sparsity":
  0.9, say) over the subset "all layers", and "stride-1 ungrouped" where
  that differs. Unstructured and vector-sparse rows (vector_width V) are
  never averaged together."""
  ok = _ok_rows(results["rows"])
  regimes: list[tuple[float | None, list]] = [
      (None, [r for r in ok if not r.get("sweep") and r["sparsity"] > 0])]
  swept = [r for r in ok if r.get("sweep")]
  for sp in sorted({_target(r) for r in swept}):
    regimes.append((sp, [r for r in swept if _target(r) == sp]))
  base_names = _baseline_names(results)
  out = []
  for sp, rows in regimes:
    for subset, keep in _SUBSETS:
      if sp is not None:
        if subset == "pruned":
          subset = "all layers"
        elif all(keep(r) for r in rows):
          continue  # the same rows as "all layers"
      groups: dict[tuple, list] = {}
      for r in rows:
        if keep(r):
          groups.setdefault(_group_key(r), []).append(r)
      for key in sorted(groups, key=_sort_key):
        g = groups[key]
        out.append({
            "subset": subset, "sparsity": sp, "batch": key[0],
            "dtype": key[1], "method": key[2], "vector_width": key[3],
            "layers": len(g),
            "speedups": {b: geomean(r["speedups"].get(b) for r in g)
                         for b in base_names},
            "floor_fraction": geomean(r["floor_fraction"] for r in g),
            "tflops": geomean(r["tflops"] for r in g),
        })
  return out


def _baseline_names(results: dict) -> list[str]:
  seen: dict[str, None] = {}
  for r in results["rows"]:
    for k in r.get("baselines_us", {}):
      seen[k] = None
  return [b for b in ALL_BASELINES if b in seen] + [
      b for b in seen if b not in ALL_BASELINES]


def _v_cell(vector_width: int | None) -> str:
  """The V column: the vector width, "-" for unstructured sparsity."""
  return "-" if vector_width is None else str(vector_width)


def _shape_text(r: dict) -> str:
  text = (f"{r.get('in_channels', '?')}→{r.get('out_channels', '?')}, "
          f"{r.get('in_hw', '?')}², {r.get('kernel', '?')}×"
          f"{r.get('kernel', '?')}")
  if r.get("stride", 1) != 1:
    text += f" /{r['stride']}"
  if r.get("groups", 1) != 1:
    text += f" g{r['groups']}"
  return text


def write_report(results_json: str | os.PathLike,
                 out_dir: str | os.PathLike | None = None) -> dict:
  """Writes <stem>.md (tables) and PNG plots next to a results file.

  The Markdown has the geometric means of summarize() (per subset,
  sparsity, batch, dtype, method and vector width V), then, per row, the
  time, the floor and its fraction, TFLOP/s, each baseline's time and the
  speedup over it. A "V" column appears where some row is vector-sparse.
  Plots (matplotlib, Agg canvas): per-layer speedup bars over each baseline
  (<stem>-layers.png: the published rows, or the rows of a run at one
  overridden sparsity) and, where the results sweep a layer over sparsities,
  speedup against sparsity per baseline (<stem>-sweep.png).

  Returns:
    {"markdown": path, "plots": [paths]}.
  """
  src = Path(results_json)
  results = load_results(src)
  out_dir = Path(out_dir) if out_dir is not None else src.parent
  out_dir.mkdir(parents=True, exist_ok=True)
  stem = src.stem
  base_names = _baseline_names(results)
  rows = results["rows"]

  plots = []
  layers_png = _plot_layers(results, base_names, out_dir / f"{stem}-layers.png")
  if layers_png:
    plots.append(layers_png)
  sweep_png = _plot_sweep(results, base_names, out_dir / f"{stem}-sweep.png")
  if sweep_png:
    plots.append(sweep_png)

  lines = [f"# escort-jax benchmark: {src.name}", ""]
  lines.append(f"- device: {results.get('device')} (gpus: "
               f"{results.get('gpus')}), jax {results.get('jax_version')}, "
               f"date {results.get('date')}")
  timer = results.get("timer")
  lines.append(f"- timer: {timer}" + (
      " — CPU wall clock: these figures test the harness, they say nothing "
      "about GPU speed" if timer == TIMER_CPU else
      " — device kernel time per call (perfetto trace), median of repeats"))
  lines.append("- speedup = baseline time / sparse time (>1: the sparse op "
               "is faster); floor = max(2·nnz·Ho·Wo·N / 67 TFLOP/s, bytes / "
               "3.0 TB/s); floor % = floor / time")
  if any(r.get("vector_width") for r in rows):
    lines.append("- V: the vector width of a vector-sparse kernel (whole "
                 "vectors of V consecutive output channels kept; - = "
                 "unstructured); every method of a V row runs on that "
                 "kernel, and its floor takes the tensor-core rate (989 "
                 "TFLOP/s) for bf16/f16")
  lines.append("")
  summary = summarize(results)
  # The V column only where some row is vector-sparse.
  vector_col = any(r.get("vector_width") for r in rows)
  if summary:
    sparsity_col = any(s["sparsity"] is not None for s in summary)
    lines += ["## Geometric means" + ("" if sparsity_col else
                                      " (published sparsities)"), ""]
    head = (["subset"] + ["sparsity"] * sparsity_col +
            ["batch", "dtype", "method"] + ["V"] * vector_col + ["layers"]
            + [f"vs {BASELINE_TITLES.get(b, b)}" for b in base_names] +
            ["floor %", "TFLOP/s"])
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for s in summary:
      cells = [s["subset"]]
      if sparsity_col:
        cells.append("published" if s["sparsity"] is None else
                     f"{s['sparsity']:g}")
      cells += [str(s["batch"]), s["dtype"], s["method"]]
      if vector_col:
        cells.append(_v_cell(s["vector_width"]))
      cells.append(str(s["layers"]))
      cells += [_fmt_x(s["speedups"].get(b)) for b in base_names]
      cells += ["-" if s["floor_fraction"] is None else
                f"{s['floor_fraction']:.1%}",
                "-" if s["tflops"] is None else f"{s['tflops']:.2f}"]
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Same-dtype comparison: float32 rows against lax fp32 "
                 "HIGHEST, bfloat16 rows against lax bf16.")
    lines.append("")

  for title, subset in (("Rows at the published sparsities",
                         [r for r in rows if not r.get("sweep")]),
                        ("Sparsity sweep rows",
                         [r for r in rows if r.get("sweep")])):
    if not subset:
      continue
    lines += [f"## {title}", ""]
    head = (["layer", "shape", "batch", "sparsity", "dtype", "method"] +
            ["V"] * vector_col +
            ["time µs", "± µs", "floor µs", "floor %", "TFLOP/s"])
    for b in base_names:
      head += [f"{BASELINE_TITLES.get(b, b)} µs", "×"]
    head.append("rel err")
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in subset:
      if r.get("error"):
        cells = [f"{r['net']}/{r['layer']}", _shape_text(r), str(r["batch"]),
                 f"{r['sparsity']:.3f}", r["dtype"], r["method"]]
        if vector_col:
          cells.append(_v_cell(r.get("vector_width")))
        cells.append("FAILED: " + r["error"].replace("|", "/")[:120])
        cells += [""] * (len(head) - len(cells))
        lines.append("| " + " | ".join(cells) + " |")
        continue
      cells = [f"{r['net']}/{r['layer']}", _shape_text(r), str(r["batch"]),
               f"{r['sparsity']:.3f}", r["dtype"], r["method"]]
      if vector_col:
        cells.append(_v_cell(r.get("vector_width")))
      cells += [_fmt_us(r["time_us"]), _fmt_us(r.get("spread_us")),
               _fmt_us(r["floor_us"]), f"{r['floor_fraction']:.1%}",
               f"{r['tflops']:.2f}"]
      for b in base_names:
        cells += [_fmt_us(r["baselines_us"].get(b)),
                  _fmt_x(r["speedups"].get(b))]
      cells.append("-" if r.get("rel_err") is None else
                   f"{r['rel_err']:.1e}")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  for p in plots:
    lines += [f"![{p.stem}]({p.name})", ""]
  md = out_dir / f"{stem}.md"
  md.write_text("\n".join(lines))
  return {"markdown": md, "plots": plots}


def _figure(width: float, height: float):
  # The object-oriented API with an Agg canvas: no pyplot, so no global
  # backend is switched and no display is needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(width, height))
  FigureCanvasAgg(fig)
  return fig


def _log_speedup_axis(ax):
  from matplotlib.ticker import FuncFormatter
  ax.set_yscale("log")
  fmt = FuncFormatter(lambda v, _: f"{v:g}×")
  ax.yaxis.set_major_formatter(fmt)
  ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
  ax.axhline(1.0, color="black", linewidth=0.8)
  ax.set_ylabel("speedup")


def _plot_layers(results, base_names, path: Path) -> Path | None:
  """Per-layer speedup bars of the published rows, and of the overridden
  sparsity where a run has just one (e.g. every layer at 90%)."""
  ok = _ok_rows(results["rows"])
  rows = [r for r in ok if not r.get("sweep")]
  swept = [r for r in ok if r.get("sweep")]
  if len({_target(r) for r in swept}) == 1:
    rows += swept
  if not rows or not base_names:
    return None
  groups: dict[tuple, list] = {}
  for r in rows:
    regime = _target(r) if r.get("sweep") else None
    groups.setdefault((regime,) + _group_key(r), []).append(r)
  keys = sorted(groups, key=_sort_key)[:12]  # a figure stays legible
  n_layers = max(len(groups[k]) for k in keys)
  fig = _figure(max(8.0, 0.45 * n_layers * max(1, len(base_names)) / 2 + 3),
                3.6 * len(keys))
  axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
  width = 0.8 / len(base_names)
  for ax, key in zip(axes, keys):
    g = groups[key]
    xs = np.arange(len(g))
    for i, b in enumerate(base_names):
      vals = [r["speedups"].get(b) or np.nan for r in g]
      ax.bar(xs + (i - (len(base_names) - 1) / 2) * width, vals, width,
             label=f"vs {BASELINE_TITLES.get(b, b)}")
    _log_speedup_axis(ax)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{r['net']}/{r['layer']}" for r in g], rotation=60,
                       ha="right", fontsize=7)
    at = "" if key[0] is None else f", all at sparsity {key[0]:g}"
    ax.set_title(f"{key[3]}{vector_text(key[4])}, {key[2]}, batch "
                 f"{key[1]}{at}")
    ax.grid(axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=len(base_names))
  fig.suptitle(f"{results.get('device')} — {results.get('timer')}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


def _plot_sweep(results, base_names, path: Path) -> Path | None:
  rows = [r for r in _ok_rows(results["rows"]) if r.get("sweep")]
  if not rows or not base_names:
    return None
  lines: dict[tuple, list] = {}
  for r in rows:
    lines.setdefault((f"{r['net']}/{r['layer']}",) + _group_key(r),
                     []).append(r)
  if all(len({_target(r) for r in rs}) < 2 for rs in lines.values()):
    return None  # no line to draw: one sparsity (see _plot_layers)
  fig = _figure(5.0 * len(base_names), 4.2)
  axes = fig.subplots(1, len(base_names), squeeze=False)[0]
  for ax, b in zip(axes, base_names):
    for key, rs in sorted(lines.items(), key=lambda kv: _sort_key(kv[0])):
      rs = sorted(rs, key=lambda r: r["sparsity"])
      ax.plot([r["sparsity"] for r in rs],
              [r["speedups"].get(b) or np.nan for r in rs], marker="o",
              markersize=3, label=f"{key[0]} b={key[1]} {key[2]} {key[3]}"
              f"{vector_text(key[4])}")
    _log_speedup_axis(ax)
    ax.set_xlabel("sparsity (fraction of zero weights)")
    ax.set_title(f"vs {BASELINE_TITLES.get(b, b)}")
    ax.grid(which="both", alpha=0.3)
  axes[0].legend(fontsize=6)
  fig.suptitle(f"Sparsity sweep — {results.get('device')}")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  return path


if __name__ == "__main__":
  from escort_jax import cli
  sys.exit(cli.main(["bench", *sys.argv[1:]]))
