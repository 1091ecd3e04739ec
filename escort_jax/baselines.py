"""Reference convolutions with `sparse_conv`'s call signature: dense and BCOO.

Both are the baselines of /work/shared/BENCHMARKING.md, and both build their
kernel form ONCE, outside the timed call:

  make_dense_conv(sk, ...) -> fn(x)   lax.conv_general_dilated of
                                      sk.todense(), at `precision`.
  make_bcoo_conv(sk, ...)  -> fn(x)   a jax.experimental.sparse BCOO weight
                                      matrix (O, C*R*S) times the patches of
                                      lax.conv_general_dilated_patches.

`dense_conv(x, sk, ...)` and `bcoo_conv(x, sk, ...)` take the op's arguments
and build the kernel form on every call: convenient, but never time them.

Every argument is validated by escort_jax.ops.make_spec, so the baselines
accept and reject exactly what sparse_conv does; dtypes promote the same way
(x, the kernel and the bias to one compute dtype; the output in
preferred_element_type or that dtype), and bias and relu are added after the
convolution as the op's dense path adds them.

Layouts (dimension_numbers):
  x:      any permutation of "NCHW" (dimension_numbers[0]);
  kernel: sk.layout, "HWIO" (R, S, C/G, O) or "OIHW" (O, C/G, R, S);
  output: any permutation of "NCHW" (dimension_numbers[2]).

The BCOO weight matrix. lax.conv_general_dilated_patches returns C*R*S
features per output pixel, channel-major: feature (c * R + r) * S + s, with c
the global input channel (checked in tests/test_baselines.py). A kernel entry
(k, c, r, s) of group g = k // (O / G), c local to the group, therefore sits in
column (g * C/G + c) * R * S + r * S + s = g * (C/G) * R * S + its CSR column
index. So one block-diagonal (O, C*R*S) matrix covers every group, and it is
the CSR structure itself with a per-group column offset: rows and columns are
already sorted, as cuSPARSE wants them.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence
import warnings

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import sparse as jsparse
import numpy as np

from escort_jax.ops import DEFAULT_DIMENSION_NUMBERS, ConvSpec, make_spec
from escort_jax.structure import SparseKernel

__all__ = ["BuiltConv", "bcoo_conv", "bcoo_weight_matrix", "dense_conv",
           "make_bcoo_conv", "make_dense_conv"]


# --------------------------------------------------------------------------
# Shared pieces.


def _channel_axis(spec: str) -> int:
  return spec.index("C")


def _finish(y, bias, activation, out_spec: str):
  """Adds the bias on the channel axis of `out_spec`, then the activation;
  in y's dtype, as the op's dense path does."""
  if bias is not None:
    shape = [1, 1, 1, 1]
    shape[_channel_axis(out_spec)] = -1
    y = y + bias.astype(y.dtype).reshape(shape)
  if activation == "relu":
    y = jnp.maximum(y, jnp.zeros((), y.dtype))
  return y


def _static_spec_key(spec: ConvSpec) -> tuple:
  """The hashable, static parameters of a validated call."""
  g = spec.geometry
  return (spec.lhs_spec, spec.out_spec, g.strides, g.padding, g.dilation,
          g.groups, jnp.dtype(spec.compute_dtype).name,
          jnp.dtype(spec.out_dtype).name)


class BuiltConv:
  """A baseline convolution with its kernel form built once: call it as fn(x).

  The kernel form (`operands`, device arrays) is passed to one jitted
  function as arguments rather than closed over, so it is neither baked into
  the executable as a constant nor rebuilt per call. Each new input shape or
  dtype is validated once by escort_jax.ops.make_spec (host work, outside the
  device time) and then compiles once.

  Attributes:
    name: "dense" or "bcoo".
    sk: the SparseKernel it was built from.
    operands: the device arrays of the kernel form (and bias).
  """

  def __init__(self, name: str, sk: SparseKernel, impl: Callable,
               operands: tuple, call_args: dict,
               context: Callable[[], Any] | None = None):
    self.name = name
    self.sk = sk
    self.operands = operands
    self._impl = impl
    self._call_args = call_args
    self._context = context
    self._specs: dict[tuple, ConvSpec] = {}

  def spec(self, x) -> ConvSpec:
    """Validates the call for x's shape and dtype (cached)."""
    key = (tuple(np.shape(x)), jnp.dtype(x.dtype).name)
    spec = self._specs.get(key)
    if spec is None:
      spec = make_spec(x, self.sk, method="dense", lhs_dilation=None,
                       **self._call_args)
      self._specs[key] = spec
    return spec

  def __call__(self, x):
    spec = self.spec(x)
    if self._context is None:
      return self._impl(x, *self.operands, static=_static_spec_key(spec),
                        empty=_empty_shape(spec))
    with self._context():
      return self._impl(x, *self.operands, static=_static_spec_key(spec),
                        empty=_empty_shape(spec))

  def __repr__(self) -> str:
    return f"BuiltConv({self.name!r}, {self.sk!r})"


def _empty_shape(spec: ConvSpec) -> tuple[int, ...] | None:
  """The output shape if the output is empty (no convolution to run)."""
  g = spec.geometry
  if g.out_h and g.out_w and g.batch:
    return None
  nhwc = dict(N=g.batch, H=g.out_h, W=g.out_w, C=g.out_channels)
  return tuple(nhwc[d] for d in spec.out_spec)


def _call_args(window_strides, padding, rhs_dilation, feature_group_count,
               dimension_numbers, bias, activation,
               preferred_element_type) -> dict:
  return dict(window_strides=window_strides, padding=padding,
              rhs_dilation=rhs_dilation,
              feature_group_count=feature_group_count,
              dimension_numbers=dimension_numbers, bias=bias,
              activation=activation,
              preferred_element_type=preferred_element_type)


# --------------------------------------------------------------------------
# Dense: lax.conv_general_dilated of the densified kernel.


@functools.partial(jax.jit,
                   static_argnames=("static", "empty", "layout", "activation",
                                    "precision"))
def _dense_impl(x, kernel, bias, *, static, empty, layout, activation,
                precision):
  (lhs_spec, out_spec, strides, padding, dilation, groups, compute_dtype,
   out_dtype) = static
  if empty is not None:
    return _finish(jnp.zeros(empty, out_dtype), bias, activation, out_spec)
  # No-ops when the dtypes already agree (the benchmark's case), so no
  # convert kernel is timed.
  x = x.astype(compute_dtype)
  kernel = kernel.astype(compute_dtype)
  y = lax.conv_general_dilated(
      x, kernel, strides, padding, rhs_dilation=dilation,
      dimension_numbers=(lhs_spec, layout, out_spec),
      feature_group_count=groups, precision=precision,
      preferred_element_type=out_dtype)
  if bias is not None:
    bias = bias.astype(compute_dtype)
  return _finish(y, bias, activation, out_spec)


def make_dense_conv(sk: SparseKernel,
                    window_strides: Sequence[int] = (1, 1),
                    padding: str | Sequence[tuple[int, int]] = "SAME", *,
                    rhs_dilation: Sequence[int] = (1, 1),
                    feature_group_count: int = 1,
                    dimension_numbers: Sequence[str] = (
                        DEFAULT_DIMENSION_NUMBERS),
                    bias: jax.Array | None = None,
                    activation: str | None = None,
                    precision: lax.PrecisionLike = None,
                    preferred_element_type=None,
                    kernel_layout: str | None = None) -> BuiltConv:
  """Builds fn(x) = lax.conv_general_dilated(x, sk.todense(), ...) + bias.

  The dense kernel (sk's dtype) is made once, here.

  Args: as sparse_conv (escort_jax.ops), without method and config.
    precision: passed to lax.conv_general_dilated (None: XLA's default,
      TF32 tensor cores for float32 on Hopper; lax.Precision.HIGHEST: fp32).
    kernel_layout: the layout the dense kernel is held in, a permutation of
      "OIHW" (None: sk.layout, as a Flax user's HWIO kernel;
      escort_jax.ops.CUDNN_KERNEL_LAYOUT, as escort_jax.nnx.DenseConv
      holds it).

  Returns:
    fn(x) with x in layout dimension_numbers[0] (N, H, W, C by default),
    returning the output in layout dimension_numbers[2].
  """
  if not isinstance(sk, SparseKernel):
    raise TypeError("the kernel must be a SparseKernel (build one with "
                    f"SparseKernel.from_dense), got {type(sk).__name__}")
  layout = kernel_layout or sk.layout
  kernel = sk.todense(layout)
  bias_arr = None if bias is None else jnp.asarray(bias)
  if isinstance(precision, list):
    precision = tuple(precision)
  impl = functools.partial(_dense_impl, layout=layout,
                           activation=activation, precision=precision)
  return BuiltConv(
      "dense", sk, impl, (kernel, bias_arr),
      _call_args(window_strides, padding, rhs_dilation, feature_group_count,
                 dimension_numbers, bias_arr, activation,
                 preferred_element_type))


def dense_conv(x: jax.Array, sk: SparseKernel,
               window_strides: Sequence[int] = (1, 1),
               padding: str | Sequence[tuple[int, int]] = "SAME", *,
               rhs_dilation: Sequence[int] = (1, 1),
               feature_group_count: int = 1,
               dimension_numbers: Sequence[str] = DEFAULT_DIMENSION_NUMBERS,
               bias: jax.Array | None = None,
               activation: str | None = None,
               precision: lax.PrecisionLike = None,
               preferred_element_type=None) -> jax.Array:
  """lax.conv_general_dilated of sk.todense(), with sparse_conv's signature.

  Builds the dense kernel on every call; to time it, use make_dense_conv.
  """
  return make_dense_conv(
      sk, window_strides, padding, rhs_dilation=rhs_dilation,
      feature_group_count=feature_group_count,
      dimension_numbers=dimension_numbers, bias=bias, activation=activation,
      precision=precision, preferred_element_type=preferred_element_type)(x)


# --------------------------------------------------------------------------
# BCOO: a sparse weight matrix times im2col patches.


def bcoo_weight_matrix_indices(sk: SparseKernel, feature_group_count: int
                               ) -> tuple[np.ndarray, tuple[int, int]]:
  """The (nnz, 2) int32 (row, column) indices of the block-diagonal weight
  matrix and its shape (O, C*R*S), in CSR order (sorted), see the module
  docstring."""
  st = sk.structure
  o, i, r, s = st.oirs
  groups = int(feature_group_count)
  if groups <= 0 or o % groups:
    raise ValueError(f"feature_group_count={feature_group_count!r} must be "
                     f"a positive divisor of the {o} output channels")
  rows = np.repeat(np.arange(o, dtype=np.int64), np.diff(st.indptr))
  group = rows // (o // groups)
  cols = group * (i * r * s) + st.indices.astype(np.int64)
  shape = (o, groups * i * r * s)
  if shape[1] > np.iinfo(np.int32).max:
    raise OverflowError("the weight matrix is too wide for int32 indices")
  return np.stack([rows, cols], axis=1).astype(np.int32), shape


def bcoo_weight_matrix(sk: SparseKernel, feature_group_count: int = 1
                       ) -> jsparse.BCOO:
  """The (O, C*R*S) BCOO weight matrix of sk (block-diagonal over groups),
  with sk.values as data, sorted unique indices."""
  indices, shape = bcoo_weight_matrix_indices(sk, feature_group_count)
  return jsparse.BCOO((jnp.asarray(sk.values), jnp.asarray(indices)),
                      shape=shape, indices_sorted=True, unique_indices=True)


_BCOO_STATIC = ("static", "empty", "matrix_shape", "window", "activation",
                "precision")


def _bcoo_impl_py(x, data, indices, bias, *, static, empty, matrix_shape,
                  window, activation, precision):
  (lhs_spec, out_spec, strides, padding, dilation, groups, compute_dtype,
   out_dtype) = static
  del groups  # folded into the block-diagonal matrix
  if empty is not None:
    return _finish(jnp.zeros(empty, out_dtype), bias, activation, out_spec)
  x = x.astype(compute_dtype)
  # The patches are pure data movement (a convolution with a one-hot
  # kernel); HIGHEST keeps float32 inputs exact instead of rounding them to
  # TF32 on the way through the tensor cores.
  patches = lax.conv_general_dilated_patches(
      x, window, strides, padding, rhs_dilation=dilation,
      dimension_numbers=(lhs_spec, "OIHW", "CNHW"),
      precision=lax.Precision.HIGHEST)
  crs, n, ho, wo = patches.shape
  w = jsparse.BCOO((data.astype(compute_dtype), indices), shape=matrix_shape,
                   indices_sorted=True, unique_indices=True)
  # (O, CRS) @ (CRS, N*Ho*Wo): the 2-D sparse-times-dense form that
  # jax.experimental.sparse can hand to cuSPARSE (when that lowering is on).
  y = jsparse.bcoo_dot_general(
      w, patches.reshape(crs, n * ho * wo),
      dimension_numbers=(((1,), (0,)), ((), ())), precision=precision,
      preferred_element_type=out_dtype)
  y = y.astype(out_dtype).reshape(matrix_shape[0], n, ho, wo)  # "CNHW"
  y = y.transpose(["CNHW".index(d) for d in out_spec])
  if bias is not None:
    bias = bias.astype(compute_dtype)
  return _finish(y, bias, activation, out_spec)


_bcoo_impl = jax.jit(_bcoo_impl_py, static_argnames=_BCOO_STATIC)


def _cusparse_context(enabled: bool):
  """A context manager setting jax_bcoo_cusparse_lowering while the call is
  traced and compiled (jax's default is off: the generic gather/scatter)."""
  try:
    from jax._src import config as jax_config
    state = jax_config.bcoo_cusparse_lowering
  except (ImportError, AttributeError):  # pragma: no cover - other versions
    warnings.warn("this jax has no jax_bcoo_cusparse_lowering flag; "
                  "make_bcoo_conv(cusparse=...) uses jax's default lowering",
                  RuntimeWarning)
    return None
  return lambda: state(enabled)


def make_bcoo_conv(sk: SparseKernel,
                   window_strides: Sequence[int] = (1, 1),
                   padding: str | Sequence[tuple[int, int]] = "SAME", *,
                   rhs_dilation: Sequence[int] = (1, 1),
                   feature_group_count: int = 1,
                   dimension_numbers: Sequence[str] = (
                       DEFAULT_DIMENSION_NUMBERS),
                   bias: jax.Array | None = None,
                   activation: str | None = None,
                   precision: lax.PrecisionLike = None,
                   preferred_element_type=None,
                   cusparse: bool | None = None) -> BuiltConv:
  """Builds fn(x) = BCOO(O, C*R*S) @ patches(x) (+ bias, activation).

  The BCOO indices are made once, here, from sk's structure; the data are
  sk.values. The patches come from lax.conv_general_dilated_patches in
  layout "CNHW", (C*R*S, N, Ho, Wo), reshaped to (C*R*S, N*Ho*Wo).

  Args: as sparse_conv (escort_jax.ops), without method and config, plus
    cusparse: None keeps jax's default lowering of bcoo_dot_general (the
      generic one at jax 0.10/0.11); True or False sets
      jax_bcoo_cusparse_lowering while this function's own jitted call is
      traced (it has no effect when fn is called inside another jit).

  Returns:
    fn(x), x in layout dimension_numbers[0], output in dimension_numbers[2].
  """
  if not isinstance(sk, SparseKernel):
    raise TypeError("the kernel must be a SparseKernel (build one with "
                    f"SparseKernel.from_dense), got {type(sk).__name__}")
  indices, matrix_shape = bcoo_weight_matrix_indices(sk, feature_group_count)
  _, _, r, s = sk.structure.oirs
  bias_arr = None if bias is None else jnp.asarray(bias)
  if isinstance(precision, list):
    precision = tuple(precision)
  jitted = _bcoo_impl
  context = None if cusparse is None else _cusparse_context(bool(cusparse))
  if context is not None:
    # The flag is not part of jit's cache key: give this builder a function
    # of its own, so that it shares no trace or executable with calls made
    # under the other setting.
    def own_impl(*args, **kwargs):
      return _bcoo_impl_py(*args, **kwargs)
    jitted = jax.jit(own_impl, static_argnames=_BCOO_STATIC)
  impl = functools.partial(jitted, matrix_shape=matrix_shape, window=(r, s),
                           activation=activation, precision=precision)
  return BuiltConv(
      "bcoo", sk, impl,
      (jnp.asarray(sk.values), jnp.asarray(indices), bias_arr),
      _call_args(window_strides, padding, rhs_dilation, feature_group_count,
                 dimension_numbers, bias_arr, activation,
                 preferred_element_type),
      context=context)


def bcoo_conv(x: jax.Array, sk: SparseKernel,
              window_strides: Sequence[int] = (1, 1),
              padding: str | Sequence[tuple[int, int]] = "SAME", *,
              rhs_dilation: Sequence[int] = (1, 1),
              feature_group_count: int = 1,
              dimension_numbers: Sequence[str] = DEFAULT_DIMENSION_NUMBERS,
              bias: jax.Array | None = None,
              activation: str | None = None,
              precision: lax.PrecisionLike = None,
              preferred_element_type=None) -> jax.Array:
  """BCOO weight matrix times im2col patches, with sparse_conv's signature.

  Builds the BCOO indices on every call; to time it, use make_bcoo_conv.
  """
  return make_bcoo_conv(
      sk, window_strides, padding, rhs_dilation=rhs_dilation,
      feature_group_count=feature_group_count,
      dimension_numbers=dimension_numbers, bias=bias, activation=activation,
      precision=precision, preferred_element_type=preferred_element_type)(x)
