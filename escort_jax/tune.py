"""The autotuner: measures a layer's candidate kernel configs and dense
lax.conv of the same dtype and precision, and records the fastest as its plan.

Every layer tries the escort kernel's candidates; a vector-sparse layer
(ops.structure_vector_width >= 8 on its geometry) also tries the vector
kernel's. The plan records the winning method ("escort", "vector" or
"dense") and the config of the faster sparse kernel, with "config_method"
naming that kernel (plans.config_from_entry reads it). Where the layer can
also read a frame (escort_jax.frames: stride 1, 'SAME'), the vector
candidates are timed on a frame too, and the best is recorded as the
"framed" config (the kernel's output store differs: dispatch.choose_framed
reads it).

Tuning is explicit (this API, or `escort-jax bench --tune`); nothing tunes
inside SparseKernel.from_dense or at trace time. Times are device kernel
times (escort_jax.bench.device_time_us), layout passes included.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import dispatch, frames, plans
from escort_jax.conv_geometry import reads_unpadded_planes
from escort_jax.ops import (TINY_MAP_POSITIONS, KernelConfig, VectorConfig,
                            default_kernel_config, make_spec, sparse_conv,
                            structure_vector_width)
from escort_jax.structure import SparseKernel

# Candidates from the H100 tile sweeps of 2026-11-24
# (benchmarks/results/*tile-sweep*): the configs that won on some layer.
# Configs for large grids (thousands of programs: batch 32).
LARGE_GRID_CANDIDATES = (
    KernelConfig(4, 128, 4, 1, 4),
    KernelConfig(4, 128, 4, 1, 4, q_major=True),
    KernelConfig(2, 256, 4, 1, 4),
    KernelConfig(8, 256, 4, 1, 1),
    # bfloat16 at batch 32: with fused multiply-adds, 8 positions per thread
    # (4 x 256 and 8 x 256 on 8 warps) were 1.22-1.34x faster than 4 x 128
    # on 6 layers, and 16 per thread (8 x 256 on 4 warps) is the next step;
    # 8 rows of 128 had won before the fusion (results/
    # 2026-11-24T1637-*-escort-rows-per-program.json, T1650-*-fused-fma.json).
    KernelConfig(4, 256, 4, 1, 4),
    KernelConfig(8, 256, 8, 1, 4),
    KernelConfig(8, 256, 4, 1, 4),
    KernelConfig(8, 128, 4, 1, 4),
)

DEFAULT_CANDIDATES = LARGE_GRID_CANDIDATES + (
    # Writing NHWC from the kernel won at batch 1 (tile sweep e).
    KernelConfig(4, 128, 4, 1, 4, nhwc_out=True),
    # Small grids (batch 1): one row per program, rows split in 1-8 parts
    # (benchmarks/results/*split*).
    KernelConfig(1, 128, 4, 1, 4, nhwc_out=True),
    KernelConfig(1, 128, 4, 1, 4, nhwc_out=True, split=2),
    KernelConfig(1, 128, 4, 1, 4, nhwc_out=True, split=8),
    # Batch 1 again: 8 loads in flight, and 256 or 64 positions per program
    # (1.1-1.25x faster than the above on 6 of 8 ResNet-50 layers in
    # float32; benchmarks/results/2026-11-24T1049-*-b1-unroll-sweep.json).
    KernelConfig(1, 128, 4, 1, 8, nhwc_out=True),
    KernelConfig(1, 256, 4, 1, 8, nhwc_out=True),
    KernelConfig(1, 64, 2, 1, 8, nhwc_out=True),
    KernelConfig(1, 128, 4, 1, 8, nhwc_out=True, split=2),
    KernelConfig(1, 64, 2, 1, 4, nhwc_out=True, split=2),
    # Small grids: a row's nonzeros across lanes (nonzero_lanes_conv), with
    # the output blocks on the fastest grid axis, mostly 32 to 64 of the
    # K x BQ tile per thread: seven of sixteen tiles on twelve layers at
    # batch 1 in float32 (the five best on geometric mean, and the best on
    # res4d and on res2), each layer's best 3-26 % faster than with the
    # three 16-per-thread tiles tried before (res5 8.5 -> 6.6 us at BQ 32,
    # K 64 on 2 warps; benchmarks/results/2026-11-25T0849-*-lanes-sweep.json).
    # Those three stay in through each layer's default above 7x7 maps
    # (ops.default_kernel_config, which layer_candidates adds; on 7x7 maps
    # the default is the first tile here).
    *(KernelConfig(1, block_q, num_warps, 1, 4, nhwc_out=True,
                   nonzero_lanes=lanes, q_major=True)
      for block_q, num_warps, lanes in ((32, 2, 64), (64, 2, 64),
                                        (128, 2, 32), (256, 2, 16),
                                        (256, 4, 16), (256, 4, 32),
                                        (256, 4, 8))),
)

# Vector-kernel candidates (block_q, block_k, num_warps, num_stages), tried
# on vector-sparse layers only.
# The three best of six vector configs over 8 workload layers at batch 32 in
# bf16 on the H100 (benchmarks/vector_sweep.py, 2026-11-24), where block_k
# 64 and block_q 64 lost on every layer at V = 16; and the best of eight at
# V = 64 (7 layers at 90 % and 75 %, results/*T1405*-vector64-configs.json),
# block_k 64 on 8 warps: its 64 output channels then take 32 accumulators
# per thread.
# Then the V = 16 and V = 64 defaults with each step's source offsets
# loaded a step ahead (prefetch 1): 1.13-1.24x faster on grids of under one
# program per SM (res5a, inception_4c/5x5 at V = 64), 0.8-1.0x on larger
# ones (8 layers, batch 32, bf16; results/*T1110*-vector-prefetch-*.json).
# Then 64 positions per program, for grids of a wave or less at V = 64
# (7x7 and 14x14 maps, the 5x5 layers' 64 output channels): each won on
# some of the 33 layers at 90 % (NHWC or on a frame), up to 1.25x, 1.03x
# (framed) and 1.02x (NHWC) geometric mean over the six above
# (results/*T1533*-vector64-90-framed-tune-small-q.txt); 32 positions
# never won.
DEFAULT_VECTOR_CANDIDATES = (
    VectorConfig(128, 32, 4, 3),
    VectorConfig(256, 32, 8, 3),
    VectorConfig(128, 32, 4, 2),
    VectorConfig(128, 64, 8, 3),
    VectorConfig(128, 32, 4, 3, prefetch=1),
    VectorConfig(128, 64, 8, 3, prefetch=1),
    VectorConfig(64, 32, 4, 3),
    VectorConfig(64, 32, 4, 3, prefetch=1),
    VectorConfig(64, 64, 4, 3, prefetch=1),
    VectorConfig(64, 64, 8, 3, prefetch=1),
)

VECTOR_PREFIX = "vector:"
FRAMED_PREFIX = "framed:"

# Tiny maps (at most TINY_MAP_POSITIONS positions per image: fully connected
# layers, 1x1 maps) have grids of their own, so the tuner also tries their
# default tile with K nonzeros per step and W warps from these.
TINY_MAP_LANES_CHOICES = (32, 64, 128, 256)
TINY_MAP_WARPS_CHOICES = (1, 2, 4, 8)


def layer_candidates(geometry, itemsize: int,
                     candidates: Sequence[KernelConfig], *,
                     unpadded: bool = False) -> tuple[KernelConfig, ...]:
  """The escort configs that tune_layer times on one layer: `candidates`,
  then the layer's own default (ops.default_kernel_config, what it runs
  with no plan, so that a plan is never slower than no plan), and on tiny
  maps that default's K x warps variants (TINY_MAP_*_CHOICES; warps only
  as many as the K x BQ tile fills). With `unpadded`, where the geometry
  reads unpadded planes (conv_geometry.reads_unpadded_planes), also every
  nonzero-lanes config so, storing NHWC and rows. No config twice."""
  g = geometry
  default = default_kernel_config(g.out_channels, g.out_len, itemsize,
                                  g.batch)
  extra = [default]
  if g.out_len // g.batch <= TINY_MAP_POSITIONS:
    extra += [dataclasses.replace(default, nonzero_lanes=k, num_warps=w)
              for k in TINY_MAP_LANES_CHOICES
              for w in TINY_MAP_WARPS_CHOICES
              if 32 * w <= k * default.block_q]
  configs = tuple(candidates) + tuple(extra)
  if unpadded and reads_unpadded_planes(g):
    configs += tuple(dataclasses.replace(c, unpadded=True, nhwc_out=nhwc)
                     for c in configs if c.nonzero_lanes
                     for nhwc in (True, False))
  return tuple(dict.fromkeys(configs))

# Named candidate sets, (escort candidates, vector candidates), for
# `escort-jax bench --tune --candidates NAME`:
#   all     every escort and (on vector-sparse layers) every vector candidate
#   vector  the vector candidates against the escort kernel at its default
#           config only (a quick tuning of vector-sparse kernels)
#   escort  the escort candidates only, no vector kernel
#   escort-large  the escort candidates for large grids only (batch 32:
#           the small-grid configs never win there), no vector kernel
#   small-grid  the escort candidates for small grids only (one row per
#           program: batch 1), no vector kernel
#   layer   none but what layer_candidates adds: each layer's own default
#           and, on tiny maps (fully connected layers), its K x warps
#           variants; no vector kernel
CANDIDATE_SETS = {
    "all": (DEFAULT_CANDIDATES, DEFAULT_VECTOR_CANDIDATES),
    "vector": ((KernelConfig(),), DEFAULT_VECTOR_CANDIDATES),
    "escort": (DEFAULT_CANDIDATES, ()),
    "escort-large": (LARGE_GRID_CANDIDATES, ()),
    "small-grid": (tuple(c for c in DEFAULT_CANDIDATES
                         if c.rows_per_program == 1), ()),
    "layer": ((), ()),
}


def config_label(cfg: KernelConfig | VectorConfig) -> str:
  """'rows_per_program=4,block_q=128,...' (or 'block_q=128,block_k=32,...'
  for a VectorConfig): the fields of a config."""
  return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())


def best_times(entry) -> dict[str, float]:
  """The fastest recorded time of each kernel in a plan entry's times_us:
  {"escort": us, "vector": us, "dense": us, "framed": us}, NaN where the
  entry has no (finite) time of that kernel (e.g. "vector" on a layer that
  is not vector-sparse, or a plan recorded before the vector kernel
  existed). "framed" is the vector kernel on a frame, its input's layout
  pass not counted, so it is no alternative to the other three."""
  best = {"escort": math.nan, "vector": math.nan, "dense": math.nan,
          "framed": math.nan}
  for key, t in (entry.get("times_us") or {}).items():
    if t is None or not math.isfinite(float(t)):
      continue  # a candidate that failed
    kernel = ("dense" if key == "dense" else
              "vector" if key.startswith(VECTOR_PREFIX) else
              "framed" if key.startswith(FRAMED_PREFIX) else "escort")
    if math.isnan(best[kernel]) or float(t) < best[kernel]:
      best[kernel] = float(t)
  return best


def time_key(method: str, cfg: KernelConfig | VectorConfig) -> str:
  """The key of a candidate's time in a plan's times_us: config_label for
  escort configs, 'vector:' + config_label for vector ones, 'framed:' +
  config_label for vector ones on a frame."""
  prefix = {"vector": VECTOR_PREFIX, "framed": FRAMED_PREFIX}.get(method, "")
  return prefix + config_label(cfg)


def tune_layer(x_shape: Sequence[int], sk: SparseKernel,
               window_strides=(1, 1), padding="SAME", *,
               rhs_dilation=(1, 1), feature_group_count: int = 1,
               dimension_numbers=("NHWC", "HWIO", "NHWC"), dtype=jnp.float32,
               precision=None,
               candidates: Sequence[KernelConfig] = DEFAULT_CANDIDATES,
               vector_candidates: Sequence[VectorConfig] = (
                   DEFAULT_VECTOR_CANDIDATES),
               num_inputs: int = 10, seed: int = 0, save: bool = True,
               directory=None, in_context: bool = False) -> dict:
  """Times the candidates on random inputs and records the winner.

  Args:
    x_shape: the input shape in dimension_numbers[0] layout.
    in_context: time every candidate (and dense) between elementwise ops,
      as batch norms surround a network's convolutions: on
      relu(x * scale + shift), its output then scaled and shifted per
      output channel. The nonzero-lanes candidates are then also tried on
      unpadded input planes, storing NHWC or rows (layer_candidates):
      there the input pass is a transpose that XLA fuses into the op
      before, and rows a transpose it fuses into the op after, which a
      layer timed alone cannot show (ResNet-50 at batch 1: 541.6 -> 532.3
      µs with unpadded planes, T0653; 532.7 -> 531.5 with rows, T0725).
    sk: the SparseKernel (its values are cast to `dtype`).
    dtype: the input dtype to tune for.
    precision: the precision of the dense alternative (and of the plan key).
    candidates: escort kernel configs to try (with the layer's default and,
      on tiny maps, its variants: layer_candidates).
    vector_candidates: vector kernel configs to try where the structure is
      vector-sparse on this geometry (V >= 8); () to skip the vector kernel.
      Where the layer can read a frame (frames.tightest_frame), they are
      also timed on one: the layer alone, its input already framed (in a
      chain of framed layers the elementwise ops are fused into the
      kernel), so in_context does not apply to them.
    save: record the plan (escort_jax.plans.record).

  Returns:
    The plan entry: method ("escort", "vector" or "dense"), config (of the
    faster sparse kernel) and config_method (its kernel: "escort" or
    "vector"), best_configs (the best config of each sparse kernel timed,
    and "framed": the vector kernel's on a frame, where timed),
    vector_width (the structure's V here, 1 if not vector-sparse),
    times_us of every candidate (keys: time_key) and of "dense", device,
    date.
  """
  # Heavy imports; tuning only.
  from escort_jax.bench import device_time_us, framed_layer
  rng = np.random.default_rng(seed)
  inputs = [jnp.asarray(rng.standard_normal(tuple(x_shape)), dtype)
            for _ in range(num_inputs)]
  plain_inputs = inputs
  skd = sk.with_values(jnp.asarray(sk.values, dtype))
  conv = dict(rhs_dilation=rhs_dilation,
              feature_group_count=feature_group_count,
              dimension_numbers=dimension_numbers, precision=precision)
  spec = make_spec(inputs[0], skd, window_strides, padding, bias=None,
                   activation=None, method="escort", lhs_dilation=None,
                   preferred_element_type=None, **{
                       k: v for k, v in conv.items() if k != "precision"})
  if in_context:
    # Per channel of the input and output layouts, broadcast against them.
    def per_channel(layout, channels):
      return tuple(channels if d == "C" else 1 for d in layout)
    in_shape = per_channel(dimension_numbers[0], spec.geometry.in_channels)
    out_shape = per_channel(dimension_numbers[2],
                            spec.geometry.out_channels)
    inputs = [(x, jnp.asarray(rng.random(in_shape) + 0.5, dtype),
               jnp.asarray(rng.standard_normal(in_shape), dtype),
               jnp.asarray(rng.random(out_shape) + 0.5, dtype),
               jnp.asarray(rng.standard_normal(out_shape), dtype))
              for x in inputs]

  def timed(run):
    """run(x) -> y, as the function device_time_us times: on x itself, or
    between the elementwise ops."""
    if in_context:
      return jax.jit(lambda x, a, b, c, d: run(jax.nn.relu(x * a + b)) * c
                     + d)
    return jax.jit(run)
  times: dict[str, float] = {}
  dense = timed(lambda x: sparse_conv(x, skd, window_strides, padding,
                                      method="dense", **conv))
  times["dense"] = device_time_us(dense, inputs).median_us

  def nhwc_call(method, cfg):
    return timed(lambda x: sparse_conv(x, skd, window_strides, padding,
                                       method=method, config=cfg, **conv))

  def fastest(method, configs, call=nhwc_call, args=inputs):
    """(config, time) of the fastest of `configs`: call(method, cfg) timed
    on `args`."""
    best_cfg, best_t = None, float("inf")
    for cfg in configs:
      f = call(method, cfg)
      label = time_key(method, cfg)
      try:
        t = device_time_us(f, args).median_us
      except Exception as e:  # pylint: disable=broad-except
        # A config the compiler rejects (e.g. out of registers) is no
        # candidate.
        times[label] = float("nan")
        print(f"tune: {label} failed: {type(e).__name__}: {str(e)[:200]}")
        continue
      times[label] = t
      if t < best_t:
        best_cfg, best_t = cfg, t
    return best_cfg, best_t

  best = {"escort": fastest("escort", layer_candidates(
      spec.geometry, jnp.dtype(dtype).itemsize, candidates,
      unpadded=in_context))}
  vector_width = structure_vector_width(skd.structure, spec.geometry)
  if vector_width >= 8 and vector_candidates:
    best["vector"] = fastest("vector", vector_candidates)
  frame = frames.tightest_frame(spec.geometry)
  framed = None
  if vector_width >= 8 and vector_candidates and frame is not None:
    lhs, rhs, _ = dimension_numbers
    framed_conv = dict(conv, dimension_numbers=("NHWC", rhs, "NHWC"))

    def framed_call(_, cfg):
      f = framed_layer(frame, cfg, window_strides=window_strides,
                       padding=padding, **framed_conv)
      return lambda data: f(data, skd)
    framed_inputs = [
        frames.frame_data(jnp.transpose(x, [lhs.index(d) for d in "NHWC"]),
                          frame) for x in plain_inputs]
    framed = fastest("framed", vector_candidates, framed_call, framed_inputs)
  # The faster sparse kernel (escort on a tie), then it against dense.
  kernel = min(best, key=lambda m: best[m][1])
  best_cfg, best_t = best[kernel]
  method = kernel if best_t < times["dense"] else "dense"
  best_configs = {m: dataclasses.asdict(c) for m, (c, _) in best.items()
                  if c is not None}
  if framed is not None and framed[0] is not None:
    best_configs["framed"] = dataclasses.asdict(framed[0])
  entry = {
      "method": method,
      "config": dataclasses.asdict(best_cfg) if best_cfg else {},
      "config_method": kernel,
      "best_configs": best_configs,
      "vector_width": int(vector_width),
      "times_us": times,
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "date": datetime.date.today().isoformat(),
  }
  if in_context:
    entry["timed_between"] = "elementwise ops"
  if save:
    key = plans.plan_key(sk.structure.digest, spec.geometry,
                         spec.compute_dtype,
                         dispatch.precision_name(precision))
    plans.record(key, entry, directory=directory)
  return entry


def tune_model(model, example_input, *, call=None, precision=None,
               candidates: Sequence[KernelConfig] = DEFAULT_CANDIDATES,
               vector_candidates: Sequence[VectorConfig] = (
                   DEFAULT_VECTOR_CANDIDATES),
               num_inputs: int = 10, seed: int = 0, save: bool = True,
               directory=None, on_layer=None,
               layers: Sequence[str] | None = None,
               in_context: bool = True) -> dict[str, list[dict]]:
  """Tunes every SparseConv of an NNX model for the inputs it gets.

  One forward pass of `example_input` is traced abstractly
  (escort_jax.convert.probe_calls) to find each SparseConv's input shapes;
  each (layer, input shape) is then tuned as tune_layer does, under the
  layer's own precision (or, if it has none, `precision`, as the model's
  calls resolve it: jax.default_matmul_precision inside), with its
  structure, strides, padding, dilation and groups, in the dtype the layer
  computes in. The plans land under the keys the model's calls look up, so
  that its "auto" layers (and escort or vector layers with no config)
  follow them.

  Args:
    model: an NNX module with SparseConv layers.
    example_input: the model's input (an array, or a jax.ShapeDtypeStruct).
    call: (model, x) -> output, if the model is not called as model(x).
    precision: a jax.default_matmul_precision value ("highest", ...) under
      which the model will run; None leaves the current one.
    candidates, vector_candidates, num_inputs, seed, save, directory: as
      for tune_layer.
    on_layer: called as on_layer(path, input_shape, entry) after each.
    layers: tune only the SparseConvs whose dotted path contains one of
      these strings (None: all of them).
    in_context: as tune_layer's; by default on, since inside a model
      a convolution mostly sits between other ops (batch norms and
      ReLUs).

  Returns:
    Dotted layer path -> the plan entries of its distinct input shapes.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from escort_jax import convert  # convert imports the modules tuned here
  from escort_jax.nnx import SparseConv, _get_value
  results: dict[str, list[dict]] = {}
  # (jax.default_matmul_precision(None) would reset an enclosing one.)
  scope = (contextlib.nullcontext() if precision is None else
           jax.default_matmul_precision(precision))
  with scope:
    calls = convert.probe_calls(model, example_input, call=call)
    for path, node in nnx.iter_graph(model):
      if not isinstance(node, SparseConv):
        continue
      name = convert.path_str(path)
      if layers is not None and not any(part in name for part in layers):
        continue
      sk = node.sparse_kernel
      bias = None if node.bias is None else _get_value(node.bias)
      seen = set()
      for c in calls.get(name, ()):
        # The module flattens leading batch dimensions into one (none: one
        # image) and promotes its operands before sparse_conv.
        shape = (int(np.prod(c.input_shape[:-3])),) + tuple(
            c.input_shape[-3:])
        dtype = jnp.dtype(node.promote_dtype(
            (jnp.zeros((), c.input_dtype), sk.values, bias),
            dtype=node.dtype)[0].dtype)
        if (shape, dtype) in seen:
          continue
        seen.add((shape, dtype))
        entry = tune_layer(
            shape, sk, node.strides, node.padding,
            rhs_dilation=node.kernel_dilation,
            feature_group_count=node.feature_group_count, dtype=dtype,
            precision=node.precision, candidates=candidates,
            vector_candidates=vector_candidates, num_inputs=num_inputs,
            seed=seed, save=save, directory=directory,
            in_context=in_context)
        results.setdefault(name, []).append(entry)
        if on_layer is not None:
          on_layer(name, shape, entry)
  return results
