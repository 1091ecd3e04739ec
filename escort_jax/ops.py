"""`sparse_conv`: direct sparse 2-D convolution with a static structure.

Which path runs where (`method`):
  "escort"  the Pallas direct sparse kernels (pallas_kernels/): compiled
            through Triton on NVIDIA GPUs, run by the Pallas interpreter on
            other backends (slow: for tests).
  "vector"  the vector-sparse kernel on tensor cores
            (pallas_kernels/vector_sparse_conv.py), for structures whose
            blocks of V = 8, 16, 32 or 64 consecutive output channels share
            their kept positions (SparseStructure.vector_width; prune with
            escort_jax.prune.vector_mask). Its weight gradient runs on
            the same blocks and tensor cores
            (pallas_kernels/vector_weight_grad.py); its input gradient
            runs the escort kernel, which handles any structure.
  "dense"   lax.conv_general_dilated of the densified kernel, at `precision`.
  "auto"    on GPUs, the tuned plan for this layer if one is recorded, else
            the fastest path by a cost model (escort_jax.dispatch);
            elsewhere "dense" (XLA's CPU convolution is far faster than the
            interpreter).

Gradients (jax.custom_vjp around the kernels):
  input   the direct sparse kernels run with the transposed structure (on
          small grids where the forward pass takes the nonzero-lanes kernel,
          that kernel; else the escort kernel);
  values  a sampled dense-dense product at the nonzero positions only (for
          "vector", per block a tensor-core product of the cotangent rows
          and the gathered input columns);
  bias    a sum over positions.
Pruned positions have no value, so they get no gradient and stay zero.

NaN semantics differ between the paths: the sparse kernels skip pruned
weights (structural zeros), so a NaN in the input reaches only the outputs it
reaches through a kept weight; the dense path multiplies pruned zeros too and
0 * NaN = NaN spreads further.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax import conv_geometry as cg
from escort_jax.conv_geometry import structure_vector_width
from escort_jax import dispatch
from escort_jax import frames
from escort_jax import sharding
from escort_jax.structure import SparseKernel
from pallas_kernels.direct_sparse_conv import (accumulator_dtype,
                                               direct_sparse_conv)
from pallas_kernels.flat_layout import flat_layout
from pallas_kernels.nonzero_lanes_conv import (NonzeroRows,
                                               nonzero_lanes_conv,
                                               pack_nonzero_rows)
from pallas_kernels.output_layout import sum_in_order
from pallas_kernels.row_groups import RowGroups, pack_row_groups
from pallas_kernels.sampled_dense_dense import sampled_dense_dense
from pallas_kernels.vector_sparse_conv import (MIN_VECTOR_WIDTH,
                                               VECTOR_WIDTHS, VectorBlocks,
                                               pack_vector_blocks,
                                               vector_sparse_conv)
from pallas_kernels.vector_weight_grad import vector_weight_grad

METHODS = ("auto", "escort", "vector", "dense")
ACTIVATIONS = (None, "relu")
SUPPORTED_DTYPES = tuple(
    jnp.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16,
                           jnp.float64))
DEFAULT_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")
# The filter layout of cuDNN's NHWC convolutions (KRSC): a dense kernel held
# in it goes to them as it is, where an HWIO kernel that is an argument of
# the jitted call is transposed on every call (escort_jax.nnx.DenseConv).
CUDNN_KERNEL_LAYOUT = "OHWI"


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tile parameters of the direct sparse kernels.

  rows_per_program: output channels per program; block_q: output positions
  per program (both powers of two); num_warps, num_stages: Triton's; unroll:
  loop steps whose loads are issued together; groups_per_program: row groups
  one program runs in turn over the same positions (input reuse in L1);
  q_major: output blocks on the fastest grid axis; unmasked: lay a run of
  zeros after the input and point padding entries at it, so that the kernel
  loads without masks; nhwc_out: the forward kernel writes the NHWC output
  itself instead of wide rows and a transpose pass; split: the forward
  kernel runs each output row's nonzeros as this many contiguous parts, in
  separate programs, into float32 partial outputs that one XLA pass sums in
  a fixed order (so results stay bitwise reproducible) before the bias and
  activation. It shortens the serial loop of each program where rows are
  long and the grid is small (batch 1). nonzero_lanes: 0 for the escort
  kernel above; K > 0 runs the forward pass on the kernel of
  pallas_kernels/nonzero_lanes_conv.py instead, one output row per program
  taking K of its nonzeros per step (for small grids; rows_per_program and
  groups_per_program must then be 1, and of the launch only block_q,
  num_warps, num_stages, q_major, nhwc_out, split and unpadded apply).
  unpadded: with nonzero_lanes, read the input as unpadded (C, H, W, N)
  planes with masked reads at the borders (conv_geometry.plane_problem), so
  that its pass is a plain transpose, which XLA fuses into the ops before
  (a batch norm and ReLU) instead of a layout kernel of its own; without
  nhwc_out the kernel then writes rows whose transpose to NHWC XLA fuses
  into the ops after. Alone the kernel is about 1 µs slower at batch 1
  (its masks), so it pays only between such ops: tune.tune_model times
  configs there. Where the geometry does not allow it or gains nothing
  (stride > 1, Wo > W, no padding: conv_geometry.reads_unpadded_planes)
  the padded layout is used.
  """

  # The best single config over 8 workload layers at batch 32 on an H100
  # (benchmarks/kernel_sweep.py, 2026-11-24): 1.52x the speed of lax.conv
  # fp32 HIGHEST as a geometric mean, against 1.26x for (8, 256, 4, 1, 1).
  rows_per_program: int = 4
  block_q: int = 128
  num_warps: int = 4
  num_stages: int = 1
  unroll: int = 4
  groups_per_program: int = 1
  q_major: bool = False
  # Unmasked loads were 2-8% faster on the H100 (tile sweep d, 2026-11-24).
  unmasked: bool = True
  nhwc_out: bool = False
  split: int = 1
  nonzero_lanes: int = 0
  unpadded: bool = False

  def __post_init__(self):
    if self.nonzero_lanes and (self.rows_per_program,
                               self.groups_per_program) != (1, 1):
      raise ValueError(
          "KernelConfig.nonzero_lanes runs one row per program: "
          "rows_per_program and groups_per_program must be 1, got "
          f"{self.rows_per_program}, {self.groups_per_program}")


DEFAULT_CONFIG = KernelConfig()
# Below this many programs with the default tiles (small maps, batch 1)
# the GPU is short of work. One output channel per program, the NHWC store
# and rows split into up to 8 programs had been 1.1-1.6x faster there
# (tile sweeps e and f; benchmarks/results/2026-11-24T0740-*-split-*.json);
# a row's nonzeros across lanes (KernelConfig.nonzero_lanes) is 1.1-1.4x
# faster again (*T2138*-b1-nonzero-lanes-sweep.json; tuned, the batch-1
# plans pick it on 61 of 62 entries). The best configs there had K x BQ =
# NONZERO_LANES_TILE on 4 warps with BQ 128 up to 1024 wide positions per
# image and 256 above. On 7x7 maps with a 3x3 kernel (at most 64 wide
# positions per image) SEVEN_BY_SEVEN_TILE, (BQ, warps, K), is 1.11-1.26x
# faster than BQ 64 there (res5a-c, inception_5a/5b 3x3, float32 and
# bfloat16, no plans; its tiles on the larger maps were 0.74-1.07x,
# benchmarks/results/2026-11-25T1102-*-default-tiles-*.json). The rule
# reads the positions of one image, not of the batch: K and BQ set the
# order of each output's sum, and a device's share of a batch must get the
# config of the whole batch to give the same bits (tests/test_sharding.py).
SMALL_GRID_PROGRAMS = 1024
NONZERO_LANES_TILE = 2048
SEVEN_BY_SEVEN_POSITIONS = 64
SEVEN_BY_SEVEN_TILE = (32, 2, 64)
# With at most this many positions per image (a 1x1 map: a fully connected
# layer as a 1x1 convolution, escort_jax.nnx.SparseLinear) BQ is the
# positions rounded up to a power of two and K is TINY_MAP_LANES: 2.2-3.0x
# faster than the dense matmul on caffenet fc6-fc8 and resnet50 fc1000 at
# batch 1, where BQ 16 x K 32 lost to it (K 64 and 256 within 15 % of 128;
# benchmarks/results/2026-11-25T0446-*-sparse-linear-probe.json).
TINY_MAP_POSITIONS = 16
TINY_MAP_LANES = 128


# 2-byte inputs on large grids: with fused multiply-adds, 8 positions per
# thread (one 16-byte load per row and step) were 1.22-1.34x faster than the
# float32 default's 4 on 6 layers at batch 32 (bfloat16; float32 stays L2
# bound and keeps 4; benchmarks/results/2026-11-24T1650-*-fused-fma.json).
HALF_CONFIG = KernelConfig(rows_per_program=4, block_q=256)


def default_kernel_config(num_rows: int, out_len: int, itemsize: int = 4,
                          batch: int = 1) -> KernelConfig:
  """The escort config of a row problem (num_rows rows of out_len wide
  positions over `batch` images, inputs of `itemsize` bytes) with no tuned
  plan and no caller config."""
  c = DEFAULT_CONFIG
  per_image = out_len // batch
  if per_image <= TINY_MAP_POSITIONS:
    # Whatever the grid: the default tiles would leave all but a few of
    # block_q lanes idle and walk a row's nonzeros one per step (caffenet
    # fc6 at fp32 HIGHEST, 4096 rows: ~400 µs against 21).
    return dataclasses.replace(
        c, rows_per_program=1, block_q=1 << max(per_image - 1, 0).bit_length(),
        nhwc_out=True, nonzero_lanes=TINY_MAP_LANES)
  programs = (-(-num_rows // c.rows_per_program) *
              -(-out_len // c.block_q))
  if programs >= SMALL_GRID_PROGRAMS:
    return HALF_CONFIG if itemsize <= 2 else c
  if per_image <= SEVEN_BY_SEVEN_POSITIONS:
    (block_q, num_warps, lanes), q_major = SEVEN_BY_SEVEN_TILE, True
  else:
    block_q = 128 if per_image <= 1024 else 256
    num_warps, q_major = c.num_warps, False
    lanes = NONZERO_LANES_TILE // block_q
  return dataclasses.replace(c, rows_per_program=1, block_q=block_q,
                             num_warps=num_warps, nhwc_out=True,
                             nonzero_lanes=lanes, q_major=q_major)


@dataclasses.dataclass(frozen=True)
class VectorConfig:
  """Tile parameters of the vector-sparse (tensor-core) kernel.

  block_q: output positions per program (a power of two, >= 16); block_k:
  kept columns per matrix-product step (a multiple of 16); num_warps,
  num_stages: Triton's; prefetch: 1 loads each step's source offsets
  during the step before, 0 leaves the loads to Triton's pipeliner (see
  pallas_kernels.vector_sparse_conv).
  """

  # (128, 32, 4, 3) had the best geometric mean over 8 workload layers at
  # batch 32 in bf16 on an H100 (benchmarks/vector_sweep.py, 2026-11-24).
  block_q: int = 128
  block_k: int = 32
  num_warps: int = 4
  num_stages: int = 3
  prefetch: int = 0


DEFAULT_VECTOR_CONFIG = VectorConfig()
# At V = 64: 1.51x lax bf16 against the default's 1.46x at 90 % vector
# sparsity, 1.06x against 0.98x at 75 % (7 layers, batch 32, H100,
# benchmarks/results/*T1405*-vector64-configs.json).
WIDE_VECTOR_CONFIG = VectorConfig(block_q=128, block_k=64, num_warps=8,
                                  num_stages=3)


# Below this many warps in its grid (programs x num_warps; about 16 per SM
# of the H100's 132) the vector kernel loads each step's source offsets a
# step ahead (VectorConfig.prefetch = 1): too few warps are resident there
# to hide that load behind each other. Batch 32, bf16, the best tile with it
# against the best without (benchmarks/results/2026-11-25T1114-*-vector-
# prefetch-tune.txt, *T1123*-vector-prefetch-tune-medium.txt, *T1110*-
# vector-prefetch-*.json): 1.04-1.23x on all 28 plan entries of grids of
# 320-1024 warps and 1.04-1.07x at 1280-1536 (inception_5a/5b 3x3, V = 16);
# 0.98-1.05x at 1568-2352 (caffenet conv3-5 and res4 at V = 64, inception
# 3a/4e 5x5 at V = 16); 0.93-1.00x at 2912-4480 (the 14x14 layers at
# V = 16); 0.83-0.93x on res3a at V = 64 (3360).
VECTOR_PREFETCH_WARPS = 2048


def default_vector_config(vector_width: int, num_rows: int | None = None,
                          out_len: int | None = None) -> VectorConfig:
  """The vector kernel's config when no plan or config is given: by the
  width, and, given the problem's rows (output channels) and wide output
  positions, with prefetch on grids of under VECTOR_PREFETCH_WARPS warps."""
  c = WIDE_VECTOR_CONFIG if vector_width >= 64 else DEFAULT_VECTOR_CONFIG
  if num_rows is None or out_len is None:
    return c
  programs = num_rows // vector_width * -(-out_len // c.block_q)
  if programs * c.num_warps < VECTOR_PREFETCH_WARPS:
    return dataclasses.replace(c, prefetch=1)
  return c


def _default_vector_config_of(structure, g: cg.ConvGeometry) -> VectorConfig:
  """default_vector_config of a vector-sparse structure on geometry g."""
  return default_vector_config(structure_vector_width(structure, g),
                               g.out_channels, g.out_len)


def on_gpu() -> bool:
  """Whether JAX's default backend is a GPU (the escort kernels compile there).
  """
  return jax.default_backend() == "gpu"


# --------------------------------------------------------------------------
# Argument handling shared by every path.


@dataclasses.dataclass(frozen=True)
class ConvSpec:
  """A validated call: layouts, geometry (in NHWC terms) and dtypes."""

  lhs_spec: str
  out_spec: str
  geometry: cg.ConvGeometry
  compute_dtype: Any
  out_dtype: Any


def _parse_dimension_numbers(dimension_numbers, layout: str
                             ) -> tuple[str, str]:
  if dimension_numbers is None:
    dimension_numbers = DEFAULT_DIMENSION_NUMBERS
  if isinstance(dimension_numbers, lax.ConvDimensionNumbers) or not (
      isinstance(dimension_numbers, (tuple, list))
      and len(dimension_numbers) == 3
      and all(isinstance(s, str) for s in dimension_numbers)):
    raise TypeError(
        "dimension_numbers must be three layout strings such as "
        f"('NHWC', 'HWIO', 'NHWC'), got {dimension_numbers!r}")
  lhs, rhs, out = (s.upper() for s in dimension_numbers)
  for spec, letters, what in ((lhs, "NCHW", "input"), (out, "NCHW", "output"),
                              (rhs, "OIHW", "kernel")):
    if sorted(spec) != sorted(letters):
      raise ValueError(
          f"{what} layout {spec!r} must be a permutation of {letters!r} "
          "(2-D convolution only)")
  if rhs != layout:
    raise ValueError(
        f"dimension_numbers says the kernel layout is {rhs!r}, but the "
        f"SparseKernel was built with layout {layout!r}; pass "
        f"dimension_numbers=(..., {layout!r}, ...) or rebuild it with "
        f"SparseKernel.from_dense(kernel, layout={rhs!r})")
  return lhs, out


def _check_dtype(dtype, what: str):
  if jnp.dtype(dtype) not in SUPPORTED_DTYPES:
    raise TypeError(
        f"{what} has dtype {jnp.dtype(dtype)}; sparse_conv supports "
        "float32, bfloat16, float16 and float64")


def make_spec(x, sk: SparseKernel, window_strides, padding, *, rhs_dilation,
              feature_group_count, dimension_numbers, bias, activation,
              method, lhs_dilation, preferred_element_type) -> ConvSpec:
  """Validates every argument of sparse_conv; raises a clear error if bad."""
  if not isinstance(sk, SparseKernel):
    raise TypeError("the kernel must be a SparseKernel (build one with "
                    f"SparseKernel.from_dense), got {type(sk).__name__}")
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
  if activation not in ACTIVATIONS:
    raise ValueError(f"unknown activation {activation!r}; expected None or "
                     "'relu'")
  if lhs_dilation is not None:
    dil = np.atleast_1d(np.asarray(lhs_dilation))
    if dil.ndim != 1 or dil.size not in (1, 2):
      raise ValueError(f"lhs_dilation must be an int or a pair of ints, got "
                       f"{lhs_dilation!r}")
    if not np.all(dil == 1):
      raise NotImplementedError(
          "lhs_dilation (transposed convolution) is not supported by "
          "sparse_conv")
  x_shape = np.shape(x)
  if len(x_shape) != 4:
    raise ValueError(
        f"x must have rank 4 (a batch of 2-D images), got shape {x_shape}; "
        "use jax.vmap for extra leading dimensions")
  lhs_spec, out_spec = _parse_dimension_numbers(dimension_numbers, sk.layout)
  values = sk.values
  if np.shape(values) != (sk.nnz,):
    raise ValueError(
        f"the SparseKernel's values have shape {np.shape(values)}, but its "
        f"structure has {sk.nnz} nonzeros: values and structure no longer "
        "match (use sk.with_values(v) with v of shape (nnz,))")
  _check_dtype(x.dtype, "x")
  _check_dtype(values.dtype, "the kernel")
  dtypes = [x.dtype, values.dtype]
  if bias is not None:
    _check_dtype(bias.dtype, "bias")
    dtypes.append(bias.dtype)
  compute_dtype = jnp.result_type(*dtypes)
  out_dtype = jnp.dtype(preferred_element_type or compute_dtype)
  _check_dtype(out_dtype, "preferred_element_type")
  if jnp.promote_types(compute_dtype, out_dtype) != out_dtype:
    raise ValueError(
        f"preferred_element_type={out_dtype} is narrower than the inputs' "
        f"{jnp.dtype(compute_dtype)}; as in lax, it may only widen")
  x_nhwc_shape = [x_shape[lhs_spec.index(d)] for d in "NHWC"]
  geometry = cg.make_geometry(x_nhwc_shape, sk.structure, window_strides,
                              padding, rhs_dilation, feature_group_count)
  if bias is not None and np.shape(bias) != (geometry.out_channels,):
    raise ValueError(f"bias must have shape ({geometry.out_channels},), got "
                     f"{np.shape(bias)}")
  return ConvSpec(lhs_spec=lhs_spec, out_spec=out_spec, geometry=geometry,
                  compute_dtype=compute_dtype, out_dtype=out_dtype)


def _to_nhwc(x, spec: str):
  return x if spec == "NHWC" else x.transpose([spec.index(d) for d in "NHWC"])


def _from_nhwc(y, spec: str):
  return y if spec == "NHWC" else y.transpose(["NHWC".index(d) for d in spec])


def _apply_activation(y, activation):
  # (XLA's maximum keeps NaN, as the kernels' select does.)
  return jnp.maximum(y, jnp.zeros((), y.dtype)) if activation == "relu" else y


# --------------------------------------------------------------------------
# The Pallas path.


@dataclasses.dataclass(frozen=True, eq=False)
class EscortPlan:
  """Everything static about one escort call: the packed row problems of the
  forward pass and of the input gradient, and the launch parameters."""

  geometry: cg.ConvGeometry
  problem: cg.StretchedProblem
  forward: RowGroups
  transposed: RowGroups
  config: KernelConfig
  # The forward problem in CSR form, for config.nonzero_lanes (else None).
  nonzero_rows: NonzeroRows | None = None
  # With config.nonzero_lanes, the input gradient's problem in CSR form too
  # (rows: input planes), and where its entries sit in the values vector.
  transposed_rows: NonzeroRows | None = None
  transposed_order: np.ndarray | None = None
  # With config.nonzero_lanes and config.unpadded, where the geometry allows
  # it: the forward problem on unpadded planes (it replaces nonzero_rows).
  planes: cg.PlaneProblem | None = None
  plane_rows: NonzeroRows | None = None

  @property
  def dy_row_len(self) -> int:
    """Length of one row of the padded output cotangent: max_shift + plane_len.
    """
    return self.geometry.max_shift + self.geometry.plane_len

  @property
  def x_tail(self) -> int:
    """Zeros after the input planes: what the wide columns of the last plane
    read, plus (unmasked) the zero run that padding entries read."""
    return _tail(self.geometry.out_len, self.geometry.max_shift, self.config)

  @property
  def dy_tail(self) -> int:
    """Zeros after the padded cotangent rows, as x_tail is for the input."""
    return _tail(self.geometry.plane_len, self.geometry.max_shift,
                 self.config)


def _tail(out_len: int, max_shift: int, config: KernelConfig) -> int:
  if not config.unmasked:
    return max_shift
  return _zero_run_tail(out_len, max_shift, config.block_q)


def _zero_run_tail(out_len: int, max_shift: int, block_q: int) -> int:
  """Zeros after the planes when padding entries read a zero run: one padded
  output row (read by whole blocks of block_q), after the max_shift that the
  last plane's wide columns read past its end."""
  return -(-out_len // block_q) * block_q + max_shift


@functools.lru_cache(maxsize=1024)
def escort_plan(structure, geometry: cg.ConvGeometry,
                config: KernelConfig = DEFAULT_CONFIG) -> EscortPlan:
  """Packs the forward and transposed problems (cached per structure,
  geometry and config)."""
  if not (isinstance(config.split, int) and config.split >= 1):
    raise ValueError(f"KernelConfig.split must be a positive int, got "
                     f"{config.split!r}")
  problem = cg.stretched_problem(structure, geometry)
  g = geometry
  if min(g.num_planes, g.out_channels) < 4:
    # The zero run is one padded output row long: next to fewer than four
    # planes (or rows) it would grow the input (or dy) by a quarter or more.
    config = dataclasses.replace(config, unmasked=False)
  forward_rows = split_rows(problem.rows, g.out_channels, config.split)
  forward = pack_row_groups(
      forward_rows, problem.offsets, g.out_channels * config.split,
      config.rows_per_program, config.unroll,
      zeros_offset=g.num_planes * g.plane_len if config.unmasked else None)
  # dx[plane, p] = sum w * dy[k, p - shift]: read dy padded in front by
  # max_shift, at offset k * dy_row_len + (max_shift - shift).
  dy_row_len = geometry.max_shift + geometry.plane_len
  t_offsets = problem.rows * dy_row_len + (geometry.max_shift - problem.shifts)
  transposed = pack_row_groups(
      problem.planes, t_offsets, g.num_planes, config.rows_per_program,
      config.unroll,
      zeros_offset=g.out_channels * dy_row_len if config.unmasked else None)
  nonzero_rows = transposed_rows = transposed_order = None
  planes = plane_rows = None
  if config.nonzero_lanes and config.unpadded and cg.reads_unpadded_planes(g):
    planes = cg.plane_problem(structure, g)
    plane_rows = pack_nonzero_rows(forward_rows, planes.offsets,
                                   g.out_channels * config.split,
                                   taps=planes.taps, bounds=planes.bounds)
  elif config.nonzero_lanes:
    nonzero_rows = pack_nonzero_rows(forward_rows, problem.offsets,
                                     g.out_channels * config.split)
  if config.nonzero_lanes:
    transposed_order = np.argsort(problem.planes, kind="stable")
    transposed_rows = pack_nonzero_rows(problem.planes[transposed_order],
                                        t_offsets[transposed_order],
                                        g.num_planes)
  return EscortPlan(geometry=geometry, problem=problem, forward=forward,
                    transposed=transposed, config=config,
                    nonzero_rows=nonzero_rows,
                    transposed_rows=transposed_rows,
                    transposed_order=transposed_order, planes=planes,
                    plane_rows=plane_rows)


def transposed_lanes_config(plan: EscortPlan, itemsize: int) -> KernelConfig:
  """The tiles of a plan's input gradient on the nonzero-lanes kernel
  (plan.transposed_rows): the small-grid default of the transposed
  problem's own grid, else the forward config's."""
  g = plan.geometry
  c = default_kernel_config(g.num_planes, g.plane_len, itemsize, g.batch)
  return c if c.nonzero_lanes else plan.config


def split_rows(rows: np.ndarray, num_rows: int, split: int) -> np.ndarray:
  """Row ids of the split forward problem: nonzero i of row k (CSR order,
  rows ascending), the j-th of its row's n, goes to partial row
  k * split + (j * split) // n, so each row's nonzeros form `split`
  contiguous parts of near-equal length, rows stay ascending (the kernel
  still reads the values in CSR order), and the partial outputs of row k are
  channels k * split ... k * split + split - 1."""
  rows = np.asarray(rows, np.int64)
  if split == 1:
    return rows
  lengths = np.bincount(rows, minlength=num_rows)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  rank = np.arange(rows.size) - starts[rows]
  return rows * split + (rank * split) // lengths[rows]


def _launch(c: KernelConfig) -> dict:
  """The escort kernel's launch arguments from a config."""
  return dict(block_q=c.block_q, num_warps=c.num_warps,
              num_stages=c.num_stages,
              groups_per_program=c.groups_per_program, q_major=c.q_major)


def _lanes_launch(c: KernelConfig) -> dict:
  """The nonzero-lanes kernel's launch arguments from a config (forward and
  input gradient alike)."""
  return dict(lanes=c.nonzero_lanes, block_q=c.block_q,
              num_warps=c.num_warps, num_stages=c.num_stages,
              q_major=c.q_major)


def _vector_launch(c: VectorConfig) -> dict:
  """The vector kernel's launch arguments from a config (NHWC and framed
  outputs alike)."""
  return dict(block_q=c.block_q, num_warps=c.num_warps,
              num_stages=c.num_stages, prefetch=c.prefetch)


# --------------------------------------------------------------------------
# The vector-sparse (tensor-core) path.


@dataclasses.dataclass(frozen=True, eq=False)
class VectorPlan:
  """Everything static about one vector forward call: the packed blocks and
  the launch parameters. (The weight gradient runs on the same blocks; the
  input gradient runs the escort kernels.)"""

  geometry: cg.ConvGeometry
  blocks: VectorBlocks
  config: VectorConfig

  @property
  def x_tail(self) -> int:
    """Zeros after the input planes: the zero run that padding columns read,
    which also covers the wide columns of the last plane."""
    return _zero_run_tail(self.geometry.out_len, self.geometry.max_shift,
                          self.config.block_q)


def _vector_width_or_raise(structure, g: cg.ConvGeometry) -> int:
  """The structure's V on geometry g; raises ValueError if it is not
  vector-sparse."""
  v = structure_vector_width(structure, g)
  if v < MIN_VECTOR_WIDTH:
    raise ValueError(
        f"method='vector' needs a vector-sparse kernel: blocks of "
        f"{', '.join(map(str, VECTOR_WIDTHS[::-1]))} consecutive output "
        "channels (within one feature group) that keep the same positions; "
        f"{structure} is not (prune with escort_jax.prune.vector_mask, or "
        "use method='escort')")
  return v


@functools.lru_cache(maxsize=1024)
def vector_plan(structure, geometry: cg.ConvGeometry,
                config: VectorConfig = DEFAULT_VECTOR_CONFIG) -> VectorPlan:
  """Packs the vector blocks (cached per structure, geometry and config).

  Raises:
    ValueError: if the structure is not vector-sparse on this geometry.
  """
  g = geometry
  problem = cg.stretched_problem(structure, g)
  v = _vector_width_or_raise(structure, g)
  blocks = pack_vector_blocks(problem.rows, problem.offsets, g.out_channels,
                              v, config.block_k,
                              zeros_offset=g.num_planes * g.plane_len)
  return VectorPlan(geometry=g, blocks=blocks, config=config)


# --------------------------------------------------------------------------
# The input's layout pass.


def flat_input(x_nhwc, g: cg.ConvGeometry, tail: int) -> jax.Array:
  """conv_geometry.to_flat_input(x_nhwc, g, tail), by the layout kernel
  (pallas_kernels/flat_layout.py) where it was measured faster than XLA's
  fusion on the H100 (2-byte inputs at batch 32, 1.06-1.67x, and batch 1,
  1.5-2.4x; float32 at batch 32 is mixed, so it stays with XLA;
  benchmarks/results/*T1450*-flat-layout.json, *T1455*), else XLA's. The
  kernel covers stride 1 without cropping. Where the flat layout is the
  input itself (one 1x1 image, no padding, no tail: a fully connected
  layer), a reshape."""
  if (g.batch * g.in_h * g.in_w == 1 and tail == 0 and g.strides == (1, 1)
      and all(p == (0, 0) for p in g.padding)):
    return x_nhwc.reshape(-1)
  if (on_gpu() and g.strides == (1, 1)
      and min(min(p) for p in g.padding) >= 0
      and (jnp.dtype(x_nhwc.dtype).itemsize <= 2 or g.batch == 1)):
    return flat_input_kernel(x_nhwc, g, tail)
  return cg.to_flat_input(x_nhwc, g, tail)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def flat_input_kernel(x_nhwc, g: cg.ConvGeometry, tail: int) -> jax.Array:
  """to_flat_input by the layout kernel (stride 1, padding >= 0); its
  transpose, for gradients, is XLA's."""
  return sharding.kernel_call(flat_layout, x_nhwc, g.padding,
                              -(-tail // g.plane_len),
                              interpret=not on_gpu())


def _flat_input_kernel_fwd(x_nhwc, g, tail):
  return flat_input_kernel(x_nhwc, g, tail), None


def _flat_input_kernel_bwd(g, tail, _, ct):
  x = jax.ShapeDtypeStruct((g.batch, g.in_h, g.in_w, g.in_channels),
                           ct.dtype)
  return jax.linear_transpose(
      functools.partial(cg.to_flat_input, g=g, tail=tail), x)(ct)


flat_input_kernel.defvjp(_flat_input_kernel_fwd, _flat_input_kernel_bwd)


# --------------------------------------------------------------------------
# The escort and vector paths, per device.


@dataclasses.dataclass(frozen=True)
class _SparseCall:
  """The static part of one escort or vector call.

  Its methods take any batch and use the geometry and plans of the batch
  they are given, so that under data parallelism (escort_jax.sharding) each
  device runs them on its own images. Gradients: the escort kernels of the
  transposed structure for the input (both methods); for the values, a
  sampled dense-dense product (escort) or the vector blocks' weight-gradient
  product on tensor cores (vector).
  """

  structure: Any
  geometry: cg.ConvGeometry
  method: str  # "escort" or "vector"
  # KernelConfig or VectorConfig from the caller or a tuned plan; None: the
  # defaults, chosen per device for the batch that each device runs.
  config: Any
  relu: bool
  out_dtype: Any

  def _geometry(self, batch: int) -> cg.ConvGeometry:
    g = self.geometry
    return g if batch == g.batch else dataclasses.replace(g, batch=batch)

  def _forward_config(self, g: cg.ConvGeometry, itemsize: int):
    """The forward kernel's config for geometry g and inputs of `itemsize`
    bytes."""
    if self.config is not None:
      return self.config
    if self.method == "vector":
      return _default_vector_config_of(self.structure, g)
    # For the batch this device runs, so that each device computes what
    # one device would on its share, bit for bit. (The config sets the order
    # of the sums: where the default differs between the share and the
    # whole batch, those two results agree to rounding only.)
    return default_kernel_config(g.out_channels, g.out_len, itemsize,
                                 g.batch)

  def _backward_config(self, g: cg.ConvGeometry,
                       itemsize: int) -> KernelConfig:
    """The escort kernels' config for the gradients: the forward's for the
    escort path (as measured on the GPU; with nonzero_lanes, the input
    gradient runs that kernel on the transposed problem's own default
    tiles); the plain default for the vector path."""
    if self.method == "escort":
      return self._forward_config(g, itemsize)
    return DEFAULT_CONFIG

  def forward(self, values, bias, x_nhwc):
    """-> ((), (y,)): y (N, Ho, Wo, K) for the batch of x_nhwc."""
    g = self._geometry(x_nhwc.shape[0])
    bias_kw = {} if bias is None else {"bias": bias}
    if self.method == "vector":
      plan = vector_plan(self.structure, g,
                         self._forward_config(g, x_nhwc.dtype.itemsize))
      x_flat = flat_input(x_nhwc, g, plan.x_tail)
      # The kernel reads its weight tiles straight from the CSR values and
      # writes NHWC itself: no gather or transpose pass around it.
      y = sharding.kernel_call(
          vector_sparse_conv, x_flat, values, plan.blocks,
          out_len=g.out_len, relu=self.relu, out_dtype=self.out_dtype,
          nhwc=g.nhwc_output(), interpret=not on_gpu(), **bias_kw,
          **_vector_launch(plan.config))
      return (), (y,)
    else:
      plan = escort_plan(self.structure, g,
                         self._forward_config(g, x_nhwc.dtype.itemsize))
      c = plan.config
      split = c.split
      out_len = g.out_len
      # The forward nonzeros are in CSR order, so the kernel reads the
      # values as they are (no gather pass).
      # Where the wide output rows land in (N, Ho, Wo, K): the kernel
      # writes there itself with nhwc_out, else XLA crops and transposes
      # them (a transpose it can fuse into the ops that follow).
      wide = g.nhwc_output()
      if plan.planes is not None:
        # A plain transpose: XLA fuses it into the ops that produce x.
        x_flat = cg.to_unpadded_planes(x_nhwc)
        out_len, wide = plan.planes.out_len, plan.planes.nhwc
      else:
        # The nonzero-lanes kernel masks every read, so it needs only what
        # the last plane's wide columns read past its end, not the zero run
        # (with a 1x1 kernel nothing: then a 1x1 map is its own flat
        # layout).
        x_flat = flat_input(x_nhwc, g, g.max_shift
                            if plan.nonzero_rows is not None else plan.x_tail)
      nhwc = wide if c.nhwc_out else None
      if c.nonzero_lanes:
        kernel = nonzero_lanes_conv
        meta = (plan.plane_rows if plan.planes is not None
                else plan.nonzero_rows)
        launch = _lanes_launch(c)
      else:
        kernel, meta = direct_sparse_conv, plan.forward
        launch = dict(values_by_row=True, **_launch(c))
      if split == 1:
        y = sharding.kernel_call(
            kernel, x_flat, values, meta, out_len=out_len, relu=self.relu,
            out_dtype=self.out_dtype, nhwc=nhwc, interpret=not on_gpu(),
            **bias_kw, **launch)
        return (), (y if nhwc is not None else wide.from_wide(y),)
      # Partial outputs in the accumulator dtype; bias and activation after
      # their sum, which is elementwise: inside a network XLA fuses it into
      # the ops that follow (a batch norm, say).
      acc = accumulator_dtype(jnp.result_type(x_flat.dtype, values.dtype))
      y = sharding.kernel_call(
          kernel, x_flat, values, meta, out_len=out_len, out_dtype=acc,
          nhwc=nhwc, interpret=not on_gpu(), **launch)
      if nhwc is None:
        y = wide.from_wide(y)
      y = sum_in_order(y.reshape(y.shape[:3] + (g.out_channels, split)),
                       axis=-1)
      if bias is not None:
        y = y + bias.astype(acc)
      y = _apply_activation(y, "relu" if self.relu else None)
      return (), (y.astype(self.out_dtype),)

  def backward(self, values, bias, x_nhwc, y_nhwc, dy_nhwc):
    """-> ((dvalues, dbias), (dx,)): the values and bias gradients summed
    over this batch in the accumulator dtype (no dbias without a bias), and
    the input gradient. y_nhwc (the output) is needed only with relu."""
    g = self._geometry(x_nhwc.shape[0])
    plan = escort_plan(self.structure, g,
                       self._backward_config(g, x_nhwc.dtype.itemsize))
    interpret = not on_gpu()
    dy = dy_nhwc
    if self.relu:
      dy = jnp.where(y_nhwc > 0, dy, jnp.zeros((), dy.dtype))
    summed = () if bias is None else (
        jnp.sum(dy, axis=(0, 1, 2), dtype=accumulator_dtype(dy.dtype)),)
    # The wide (K, out_len) cotangent, zero in the cropped columns.
    dy = cg.to_wide_output(dy, g)
    vplan = (vector_plan(self.structure, g,
                         self._forward_config(g, x_nhwc.dtype.itemsize))
             if self.method == "vector" else None)
    tail = plan.x_tail if vplan is None else max(plan.x_tail, vplan.x_tail)
    # x_flat, and the transpose of the layout that takes its cotangent back
    # to (N, H, W, C).
    x_flat, flat_to_nhwc = jax.vjp(
        functools.partial(flat_input, g=g, tail=tail), x_nhwc)
    if vplan is None:
      dvalues = sharding.kernel_call(
          sampled_dense_dense, dy, x_flat, plan.problem.rows,
          plan.problem.offsets, valid_period=g.valid_period,
          valid_len=g.valid_len, interpret=interpret)
    else:
      dvalues = sharding.kernel_call(
          vector_weight_grad, dy, x_flat, vplan.blocks,
          valid_period=g.valid_period, valid_len=g.valid_len,
          interpret=interpret)
    # Each row padded in front by max_shift, then the tail as whole zero
    # rows: one pad (a flat pad after it would copy dy once more).
    tail_rows = -(-plan.dy_tail // plan.dy_row_len)
    dy_flat = jnp.pad(dy, ((0, tail_rows), (g.max_shift, plan.dy_row_len -
                                            g.max_shift - g.out_len)))
    dy_flat = dy_flat.reshape(-1)
    if plan.transposed_rows is not None:
      # A small grid forward, so a small grid here too: the nonzero-lanes
      # kernel with the default tiles of the transposed problem's own grid
      # (1.01-1.95x faster than the escort kernel for the input gradient at
      # batch 1, 8 layers in float32 and bfloat16;
      # benchmarks/results/*T0054*-b1-grad-sweep.json).
      dx_planes = sharding.kernel_call(
          nonzero_lanes_conv, dy_flat,
          jnp.take(values, plan.transposed_order), plan.transposed_rows,
          out_len=g.plane_len, out_dtype=x_nhwc.dtype, interpret=interpret,
          **_lanes_launch(transposed_lanes_config(plan,
                                                  x_nhwc.dtype.itemsize)))
    else:
      dx_planes = sharding.kernel_call(
          direct_sparse_conv, dy_flat, plan.transposed.gather_values(values),
          plan.transposed, out_len=g.plane_len, out_dtype=x_nhwc.dtype,
          interpret=interpret, **_launch(plan.config))
    # The cotangent of x_flat's zero tail is zero.
    dx_flat = dx_planes.reshape(-1)
    (dx,) = flat_to_nhwc(
        jnp.pad(dx_flat, (0, x_flat.shape[0] - dx_flat.shape[0])))
    return (dvalues,) + summed, (dx,)


def _with_bias(method, bias):
  """method(values, bias, *batched) as f(values, *bias_args, *batched)."""
  if bias is None:
    return lambda values, *batched: method(values, None, *batched)
  return method


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sparse_core(call: _SparseCall, values, bias, x_nhwc):
  """(nnz,), (K,) | None, (N, H, W, C) -> (N, Ho, Wo, K), each device on its
  own share of the batch (escort_jax.sharding)."""
  return _sparse_core_fwd(call, values, bias, x_nhwc)[0]


def _sparse_core_fwd(call, values, bias, x_nhwc):
  weights = (values,) if bias is None else (values, bias)
  _, (y,) = sharding.batch_parallel(_with_bias(call.forward, bias), weights,
                                    (x_nhwc,))
  return y, (values, bias, x_nhwc, y if call.relu else None)


def _sparse_core_bwd(call, residuals, dy):
  values, bias, x_nhwc, y = residuals
  weights = (values,) if bias is None else (values, bias)

  def backward(*args):
    w, (x, dy_, *y_) = args[:len(weights)], args[len(weights):]
    return call.backward(w[0], w[1] if bias is not None else None, x,
                         y_[0] if y_ else None, dy_)

  summed, (dx,) = sharding.batch_parallel(
      backward, weights, (x_nhwc, dy) + (() if y is None else (y,)))
  grads = tuple(sharding.as_cotangent(s.astype(w.dtype), w)
                for s, w in zip(summed, weights))
  return (grads[0], grads[1] if bias is not None else None,
          sharding.as_cotangent(dx, x_nhwc))


_sparse_core.defvjp(_sparse_core_fwd, _sparse_core_bwd)


def _check_vector_config(config) -> None:
  if config is not None and not isinstance(config, VectorConfig):
    raise TypeError(f"method='vector' takes a VectorConfig, got "
                    f"{type(config).__name__}")


def _sparse_conv_path(x_nhwc, values, bias, structure, spec: ConvSpec,
                      activation, method: str, config):
  """The escort or vector path (NHWC in, NHWC out; see _SparseCall), data
  parallel over a sharded batch. `config` None: the defaults per device."""
  if method == "vector":
    _check_vector_config(config)
    # Errors early, at the call, if the structure is not vector-sparse.
    vector_plan(structure, spec.geometry,
                config or _default_vector_config_of(structure, spec.geometry))
  else:
    if config is not None and not isinstance(config, KernelConfig):
      raise TypeError(f"method='escort' takes a KernelConfig, got "
                      f"{type(config).__name__}")
  call = _SparseCall(structure=structure, geometry=spec.geometry,
                     method=method, config=config,
                     relu=activation == "relu",
                     out_dtype=jnp.dtype(spec.out_dtype))
  return _sparse_core(call, values, bias, x_nhwc)


# --------------------------------------------------------------------------
# Framed activations (escort_jax.frames): the vector kernel from frame to
# frame, with no layout pass.


@dataclasses.dataclass(frozen=True, eq=False)
class FramedVectorPlan:
  """The vector kernel's packing for a framed input: source offsets into
  the frame, wide rows of the frame's width, and the output frame."""

  blocks: VectorBlocks
  config: VectorConfig
  out_len: int
  output: Any  # pallas_kernels.output_layout.FramedOutput


@functools.lru_cache(maxsize=1024)
def framed_vector_plan(structure, geometry: cg.ConvGeometry,
                       frame: frames.Frame,
                       config: VectorConfig) -> FramedVectorPlan:
  """Packs the vector blocks on a frame (frames.check_reads must hold).

  Raises:
    ValueError: if the structure is not vector-sparse, or block_q exceeds
      the reads past the last plane that a frame's zero planes cover.
  """
  v = _vector_width_or_raise(structure, geometry)
  if config.block_q > frames.FRAME_SLACK:
    raise ValueError(f"a framed input takes block_q up to "
                     f"{frames.FRAME_SLACK}, got {config.block_q}")
  rows, offsets = frames.framed_offsets(structure, geometry, frame)
  # A frame has no zero run: padding columns repeat a kept column.
  blocks = pack_vector_blocks(rows, offsets, geometry.out_channels, v,
                              config.block_k, zeros_offset=None)
  output = frame.output_layout()
  return FramedVectorPlan(blocks=blocks, config=config,
                          out_len=output.out_len, output=output)


@dataclasses.dataclass(frozen=True)
class _FramedCall:
  """The static part of one framed vector call (single device). Its
  gradients are the NHWC vector path's (_SparseCall.backward), with the
  cotangents taken out of and put back into frames."""

  structure: Any
  geometry: cg.ConvGeometry
  frame: frames.Frame
  config: VectorConfig
  relu: bool
  out_dtype: Any

  @property
  def out_frame(self) -> frames.Frame:
    return self.frame.with_channels(self.geometry.out_channels)

  def forward(self, values, bias, x_data):
    plan = framed_vector_plan(self.structure, self.geometry, self.frame,
                              self.config)
    bias_kw = {} if bias is None else {"bias": bias}
    return vector_sparse_conv(
        x_data.reshape(-1), values, plan.blocks, out_len=plan.out_len,
        relu=self.relu, out_dtype=self.out_dtype, framed=plan.output,
        interpret=not on_gpu(), **bias_kw, **_vector_launch(plan.config))

  def backward(self, values, bias, x_data, y_data, dy_data):
    nhwc = _SparseCall(structure=self.structure, geometry=self.geometry,
                       method="vector", config=self.config, relu=self.relu,
                       out_dtype=self.out_dtype)
    unframe_out = functools.partial(frames.unframe_data,
                                    frame=self.out_frame)
    summed, (dx,) = nhwc.backward(
        values, bias, frames.unframe_data(x_data, self.frame),
        None if y_data is None else unframe_out(y_data), unframe_out(dy_data))
    # Only the data's cotangent: the margins read as the padding's zeros.
    return summed, frames.frame_data(dx, self.frame).astype(x_data.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _framed_core(call: _FramedCall, values, bias, x_data):
  """(nnz,), (K,) | None, frame data (C + e, Ha, Wb, N) -> the output's
  frame data (K + e, Ha, Wb, N)."""
  return call.forward(values, bias, x_data)


def _framed_core_fwd(call, values, bias, x_data):
  y = call.forward(values, bias, x_data)
  return y, (values, bias, x_data, y if call.relu else None)


def _framed_core_bwd(call, residuals, dy):
  values, bias, x_data, y = residuals
  summed, dx = call.backward(values, bias, x_data, y, dy)
  return (summed[0].astype(values.dtype),
          None if bias is None else summed[1].astype(bias.dtype), dx)


_framed_core.defvjp(_framed_core_fwd, _framed_core_bwd)


def _framed_sparse_conv(xf: frames.Framed, sk: SparseKernel, window_strides,
                        padding, *, dimension_numbers, bias, activation,
                        precision, method, config, **spec_kwargs
                        ) -> frames.Framed:
  """sparse_conv of a Framed input: the vector kernel from frame to frame
  where the structure is vector-sparse and the method is "vector" (or
  "auto" on a GPU: there no layout pass is the point, whatever the NHWC
  dispatch would pick); every other path through NHWC and back."""
  lhs, out = _parse_dimension_numbers(dimension_numbers, sk.layout)
  if (lhs, out) != ("NHWC", "NHWC"):
    raise ValueError(
        "a Framed input carries its own layout: dimension_numbers' input "
        f"and output layouts must be 'NHWC' (the default), got {lhs!r} and "
        f"{out!r}")
  spec = make_spec(jax.ShapeDtypeStruct(xf.shape, xf.dtype), sk,
                   window_strides, padding, dimension_numbers=dimension_numbers,
                   bias=bias, activation=activation, method=method,
                   **spec_kwargs)
  g = spec.geometry
  frames.check_reads(xf.frame, g)
  vector = method == "vector" or (
      method == "auto" and on_gpu()
      and structure_vector_width(sk.structure, g) >= MIN_VECTOR_WIDTH)
  if not vector or g.batch == 0:
    y = sparse_conv(frames.from_frame(xf), sk, window_strides, padding,
                    dimension_numbers=dimension_numbers, bias=bias,
                    activation=activation, precision=precision,
                    method=method, config=config, **spec_kwargs)
    return frames.to_frame(y, xf.frame.margins)
  _check_vector_config(config)
  choice = dispatch.record(dispatch.choose_framed(
      sk.structure, g, spec.compute_dtype, precision, config))
  call = _FramedCall(
      structure=sk.structure, geometry=g, frame=xf.frame,
      config=choice.config or _default_vector_config_of(sk.structure, g),
      relu=activation == "relu", out_dtype=jnp.dtype(spec.out_dtype))
  # Errors here, at the call, if the structure is not vector-sparse.
  framed_vector_plan(call.structure, g, call.frame, call.config)
  if bias is not None:
    bias = jnp.asarray(bias).astype(spec.compute_dtype)
  y = _framed_core(call, sk.values.astype(spec.compute_dtype), bias,
                   xf.data.astype(spec.compute_dtype))
  return frames.Framed(y, call.out_frame)


# --------------------------------------------------------------------------
# The dense path.


def dense_conv_ohwi(x_nhwc: jax.Array, kernel_ohwi: jax.Array,
                    strides: Sequence[int], padding, *,
                    rhs_dilation: Sequence[int] = (1, 1),
                    feature_group_count: int = 1,
                    precision: lax.PrecisionLike = None,
                    preferred_element_type=None) -> jax.Array:
  """lax.conv_general_dilated of x (N, H, W, C) with an OHWI kernel
  (K, kh, kw, C // groups) -> (N, Ho, Wo, K); padding as lax's (a string
  or pairs).

  A 1x1 kernel on a 1x1 map (stride 1, no padding, no groups) is a fully
  connected layer, and runs as the matmul that nnx.Linear runs: cuDNN's
  convolution of that shape was 1.15-1.9x slower at TF32 on the H100 for
  1000 outputs, and 6-21x at fp32 HIGHEST (benchmarks/results/
  2026-11-25T0640-*-pointwise-dense-probe.json).
  """
  k, kh, kw, c = kernel_ohwi.shape
  unpadded = padding in ("SAME", "VALID") or all(
      tuple(p) == (0, 0) for p in padding)
  if ((kh, kw) == (1, 1) and x_nhwc.shape[1:3] == (1, 1) and unpadded
      and tuple(strides) == (1, 1) and feature_group_count == 1):
    return lax.dot_general(
        x_nhwc, kernel_ohwi.reshape(k, c), (((3,), (1,)), ((), ())),
        precision=precision, preferred_element_type=preferred_element_type)
  return lax.conv_general_dilated(
      x_nhwc, kernel_ohwi, strides, padding, rhs_dilation=rhs_dilation,
      dimension_numbers=("NHWC", CUDNN_KERNEL_LAYOUT, "NHWC"),
      feature_group_count=feature_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def _dense_conv(x_nhwc, values, bias, structure, spec: ConvSpec, activation,
                precision):
  g = spec.geometry
  # Scattered straight into the layout the NHWC convolution reads, so that
  # no transpose of the kernel follows the scatter.
  kernel = SparseKernel(values, structure).todense(CUDNN_KERNEL_LAYOUT)
  y = dense_conv_ohwi(
      x_nhwc, kernel, g.strides, g.padding, rhs_dilation=g.dilation,
      feature_group_count=g.groups, precision=precision,
      preferred_element_type=spec.out_dtype)
  if bias is not None:
    y = y + bias.astype(y.dtype)
  return _apply_activation(y, activation)


# --------------------------------------------------------------------------
# The public op.


def sparse_conv(x: jax.Array, sk: SparseKernel,
                window_strides: Sequence[int] = (1, 1),
                padding: str | Sequence[tuple[int, int]] = "SAME", *,
                rhs_dilation: Sequence[int] = (1, 1),
                feature_group_count: int = 1,
                dimension_numbers: Sequence[str] = DEFAULT_DIMENSION_NUMBERS,
                bias: jax.Array | None = None,
                activation: str | None = None,
                precision: lax.PrecisionLike = None,
                method: str = "auto",
                lhs_dilation: Sequence[int] | None = None,
                preferred_element_type=None,
                config: KernelConfig | VectorConfig | None = None
                ) -> jax.Array:
  """2-D convolution of `x` with a pruned kernel, by direct sparse convolution.

  Matches lax.conv_general_dilated(x, sk.todense(), ...) (plus bias and
  activation), with Flax's NHWC/HWIO layouts by default.

  Args:
    x: (N, H, W, C) input, or any layout named by dimension_numbers[0]; or
      a Framed activation (escort_jax.frames), which a convolution that
      keeps the map's size reads with no layout pass.
    sk: the SparseKernel; its layout must be dimension_numbers[1].
    window_strides: (sh, sw) or an int.
    padding: "SAME", "SAME_LOWER", "VALID", an int, or ((top, bottom),
      (left, right)); negative entries crop.
    rhs_dilation: kernel dilation (dh, dw).
    feature_group_count: groups; C and the output channels must divide.
    dimension_numbers: (input, kernel, output) layout strings.
    bias: optional (out_channels,) bias.
    activation: None or "relu", fused into the kernel.
    precision: the precision of the dense path.
    method: "auto", "escort", "vector" or "dense" (see the module
      docstring).
    lhs_dilation: unsupported (transposed convolution); must be None or 1.
    preferred_element_type: output dtype; by default the promoted dtype of
      x, the kernel and the bias, as nnx.Conv promotes them.
    config: tile parameters: a KernelConfig for "escort", a VectorConfig for
      "vector" (default: the tuned plan of this layer, else the defaults).

  Returns:
    The output in layout dimension_numbers[2], (N, Ho, Wo, O) by default;
    for a Framed input (escort_jax.frames), the Framed output.
  """
  if isinstance(x, frames.Framed):
    return _framed_sparse_conv(
        x, sk, window_strides, padding, dimension_numbers=dimension_numbers,
        bias=bias, activation=activation, precision=precision,
        method=method, config=config, rhs_dilation=rhs_dilation,
        feature_group_count=feature_group_count, lhs_dilation=lhs_dilation,
        preferred_element_type=preferred_element_type)
  # Lists and numpy arrays are accepted as lax accepts them.
  x = x if isinstance(x, jax.Array) else jnp.asarray(x)
  if bias is not None and not isinstance(bias, jax.Array):
    bias = jnp.asarray(bias)
  spec = make_spec(x, sk, window_strides, padding, rhs_dilation=rhs_dilation,
                   feature_group_count=feature_group_count,
                   dimension_numbers=dimension_numbers, bias=bias,
                   activation=activation, method=method,
                   lhs_dilation=lhs_dilation,
                   preferred_element_type=preferred_element_type)
  g = spec.geometry
  x_nhwc = _to_nhwc(jnp.asarray(x).astype(spec.compute_dtype), spec.lhs_spec)
  values = sk.values.astype(spec.compute_dtype)
  if bias is not None:
    bias = jnp.asarray(bias).astype(spec.compute_dtype)
  choice = dispatch.record(dispatch.choose(
      sk.structure, g, spec.compute_dtype, precision, method, config,
      on_gpu()))
  if g.out_h == 0 or g.out_w == 0 or g.batch == 0:
    y = jnp.zeros((g.batch, g.out_h, g.out_w, g.out_channels), spec.out_dtype)
  elif choice.method == "dense":
    y = _dense_conv(x_nhwc, values, bias, sk.structure, spec, activation,
                    precision)
  else:
    y = _sparse_conv_path(x_nhwc, values, bias, sk.structure, spec,
                          activation, choice.method, choice.config)
  return _from_nhwc(y, spec.out_spec)


def dispatch_choice(x, sk: SparseKernel, *args, **kwargs) -> dispatch.Choice:
  """The path (method, config and source: escort_jax.dispatch.Choice) that
  sparse_conv(x, sk, *args, **kwargs) takes on this backend under the
  current default precision. Traced abstractly: nothing runs, and x may be
  a jax.ShapeDtypeStruct."""
  # Without jit, so that a call traced before (jit's cache) still runs the
  # dispatch code.
  with dispatch.recording() as log, jax.disable_jit():
    jax.eval_shape(lambda x, sk: sparse_conv(x, sk, *args, **kwargs), x, sk)
  return log[0]
