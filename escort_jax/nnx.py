"""Flax NNX integration: `SparseConv`, a drop-in for `nnx.Conv` (2-D, NHWC).

A SparseConv holds the kept weights of a pruned HWIO kernel as one
`nnx.Param` of shape (nnz,) and the static `SparseStructure` (where they
sit) as a plain, non-Param attribute, so it lives in the graphdef of
`nnx.split` and only the values are state: optimisers never see pruned
weights, which therefore stay exactly zero through training.

    conv = SparseConv(16, 32, (3, 3), sparsity=0.9, rngs=nnx.Rngs(0))
    y = conv(x)                          # x (N, H, W, 16) -> (N, H, W, 32)
    conv.values                          # nnx.Param, (nnz,)
    conv.structure                       # SparseStructure, static
    conv.dense_kernel()                  # (3, 3, 16, 32) HWIO, zeros pruned

    sparse = SparseConv.from_conv(dense_conv)   # keeps its exact nonzeros

The call runs `escort_jax.sparse_conv` (the Pallas kernels on GPUs with
method="auto", XLA's dense convolution elsewhere).

Works with flax 0.10 and later: Variable values are read and written through
`_get_value` / `_set_value`, which use `get_value`/`set_value` where they
exist (flax >= 0.12 deprecates `.value`) and `.value` otherwise.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable, Sequence

from flax import nnx
from flax.nnx.nn import dtypes as nnx_dtypes
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax.ops import (ACTIVATIONS, CUDNN_KERNEL_LAYOUT, METHODS,
                            KernelConfig, VectorConfig, dense_conv_ohwi,
                            sparse_conv)
from escort_jax.frames import Framed, from_frame, to_frame
from escort_jax.prune import magnitude_mask
from escort_jax.structure import SparseKernel, SparseStructure

__all__ = ["DenseConv", "SparseConv", "SparseLinear", "UnsupportedConvError",
           "conv_unsupported_reason"]

default_kernel_init = nnx.initializers.lecun_normal()
default_bias_init = nnx.initializers.zeros_init()

# Paddings nnx.Conv implements by padding the input itself (wrap / reflect /
# causal); sparse_conv only zero-pads.
_UNSUPPORTED_PADDINGS = ("CIRCULAR", "REFLECT", "CAUSAL")
_SUPPORTED_DTYPES = tuple(jnp.dtype(d) for d in (
    jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64))


class UnsupportedConvError(NotImplementedError, ValueError):
  """A convolution SparseConv cannot express (not 2-D, input dilation,
  circular/reflect/causal padding, a custom conv function, ...).

  Both a NotImplementedError and a ValueError, so either catches it.
  """


# --------------------------------------------------------------------------
# Variable access that works on flax 0.10 ... 0.12+.


def _get_value(var):
  if hasattr(var, "get_value"):
    return var.get_value()
  return var.value


def _set_value(var, value) -> None:
  if hasattr(var, "set_value"):
    var.set_value(value)
  else:
    var.value = value


def _is_concrete(x) -> bool:
  return not isinstance(x, (jax.core.Tracer, jax.ShapeDtypeStruct))


# --------------------------------------------------------------------------
# Argument canonicalisation.


def _pair(x, name: str) -> tuple[int, int]:
  """None or an int or a 2-sequence -> (a, b), as nnx.Conv broadcasts."""
  if x is None:  # nnx.Conv's legacy sentinel for 1
    x = 1
  if isinstance(x, (int, np.integer)):
    return (int(x), int(x))
  t = tuple(int(v) for v in x)
  if len(t) != 2:
    raise UnsupportedConvError(
        f"{name}={x!r} has {len(t)} entries; SparseConv is 2-D only")
  return t


def _kernel_size(kernel_size) -> tuple[int, int]:
  if isinstance(kernel_size, (int, np.integer)):
    # nnx.Conv and linen.Conv read an int as a 1-D kernel; keep that meaning
    # rather than silently building a 2-D layer.
    raise UnsupportedConvError(
        f"kernel_size={kernel_size} means a 1-D convolution (as in "
        f"nnx.Conv); SparseConv is 2-D only: pass ({kernel_size}, "
        f"{kernel_size})")
  ks = tuple(int(k) for k in kernel_size)
  if len(ks) != 2:
    raise UnsupportedConvError(
        f"kernel_size={tuple(kernel_size)} is a {len(ks)}-D kernel; "
        "SparseConv supports 2-D convolutions only")
  return ks


def _canonical_padding(padding):
  """nnx.Conv's padding forms -> a sparse_conv padding (str or 2 pairs)."""
  if isinstance(padding, str):
    p = padding.upper()
    if p in _UNSUPPORTED_PADDINGS:
      raise UnsupportedConvError(
          f"padding={padding!r} is not supported by SparseConv (the sparse "
          "kernels only zero-pad); use 'SAME', 'VALID' or explicit pairs")
    return p
  if isinstance(padding, (int, np.integer)):
    return ((int(padding), int(padding)),) * 2
  pads = list(padding)
  if len(pads) != 2:
    raise UnsupportedConvError(
        f"padding={padding!r} must give 2 spatial dimensions")
  out = []
  for p in pads:
    if isinstance(p, (int, np.integer)):
      out.append((int(p), int(p)))
    else:
      lo, hi = p
      out.append((int(lo), int(hi)))
  return tuple(out)


def _check_activation(activation):
  if activation not in ACTIVATIONS:
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got "
                     f"{activation!r}")


def _check_method(method):
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def conv_unsupported_reason(conv) -> str | None:
  """Why an nnx.Conv cannot become a SparseConv, or None if it can."""
  ks = getattr(conv, "kernel_size", None)
  if isinstance(ks, (int, np.integer)):
    ks = (ks,)
  if ks is None or len(tuple(ks)) != 2:
    n = "?" if ks is None else len(tuple(ks))
    return f"{n}-D convolution (only 2-D is supported)"
  try:
    if _pair(getattr(conv, "input_dilation", 1), "input_dilation") != (1, 1):
      return (f"input_dilation={conv.input_dilation} (transposed "
              "convolution is not supported)")
    _pair(getattr(conv, "kernel_dilation", 1), "kernel_dilation")
    _pair(getattr(conv, "strides", 1), "strides")
    _canonical_padding(getattr(conv, "padding", "SAME"))
  except UnsupportedConvError as e:
    return str(e)
  except (TypeError, ValueError) as e:
    return f"unrecognised argument ({e})"
  fn = getattr(conv, "conv_general_dilated", lax.conv_general_dilated)
  if fn is not lax.conv_general_dilated:
    return f"custom conv_general_dilated {fn!r}"
  if isinstance(conv, nnx.Conv) and type(conv).__call__ is not (
      nnx.Conv.__call__):
    return f"{type(conv).__name__} overrides nnx.Conv.__call__"
  kernel = getattr(conv, "kernel", None)
  kernel = _get_value(kernel) if isinstance(kernel, nnx.Variable) else kernel
  if kernel is None or len(getattr(kernel, "shape", ())) != 4:
    return "no 4-D kernel"
  if jnp.dtype(kernel.dtype) not in _SUPPORTED_DTYPES:
    return f"kernel dtype {kernel.dtype} is not supported"
  return None


@functools.partial(
    jax.jit, static_argnames=("structure", "strides", "padding", "dilation",
                              "groups", "activation", "precision", "method",
                              "preferred_element_type", "config"))
def _conv_nhwc(x, values, bias, *, structure, strides, padding, dilation,
               groups, activation, precision, method, preferred_element_type,
               config):
  """sparse_conv of an NHWC batch with an HWIO structure, as one jitted
  call: called eagerly, a layer then compiles once per configuration and
  input shape instead of once per primitive (inside an outer jit it is
  inlined). All but the arrays are hashable statics."""
  return sparse_conv(
      x, SparseKernel(values, structure), strides, padding,
      rhs_dilation=dilation, feature_group_count=groups,
      dimension_numbers=("NHWC", "HWIO", "NHWC"), bias=bias,
      activation=activation, precision=precision, method=method,
      preferred_element_type=preferred_element_type, config=config)


# --------------------------------------------------------------------------
# The module.


_PLAIN_ATTRIBUTES_KEPT = ("caffe_name",)
# nnx.Conv arguments that older flax versions do not have.
_OPTIONAL_CONV_ARGS = ("promote_dtype", "preferred_element_type")
_CONV_PARAMETERS = frozenset(inspect.signature(nnx.Conv.__init__).parameters)


def _keep_plain_attributes(source, target) -> None:
  """Copies the _PLAIN_ATTRIBUTES_KEPT that `source` has onto `target`."""
  for name in _PLAIN_ATTRIBUTES_KEPT:
    if hasattr(source, name):
      setattr(target, name, getattr(source, name))


def _optional_args(layer, accepted=_OPTIONAL_CONV_ARGS) -> dict:
  """The _OPTIONAL_CONV_ARGS that `layer` has and `accepted` names (by
  default all: SparseConv takes each of them)."""
  return {name: getattr(layer, name) for name in _OPTIONAL_CONV_ARGS
          if hasattr(layer, name) and name in accepted}


class SparseConv(nnx.Module):
  """A 2-D convolution with a pruned kernel; a drop-in for `nnx.Conv`.

  Layouts are Flax's: inputs (*batch, H, W, in_features) (NHWC; one or more
  batch dimensions, or none), kernel HWIO (kh, kw, in_features // groups,
  out_features), outputs (*batch, Ho, Wo, out_features).

  State: `values`, an nnx.Param (nnz,) in CSR order of `structure`, and
  `bias`, an nnx.Param (out_features,) (None without bias). The structure
  is static: it is part of the graphdef, not of nnx.state(...).

  Args:
    in_features, out_features, kernel_size, strides, padding,
    input_dilation, kernel_dilation, feature_group_count, use_bias, dtype,
    param_dtype, precision, kernel_init, bias_init, promote_dtype,
    preferred_element_type, rngs, kernel_metadata, bias_metadata: as in
      nnx.Conv. kernel_size must be a pair (an int means 1-D there);
      input_dilation must be 1 and padding must not be 'CIRCULAR',
      'REFLECT' or 'CAUSAL' (UnsupportedConvError otherwise).
    mask: which entries of the freshly initialised (kh, kw, I, O) kernel to
      keep (nonzero = kept; a float mask also scales the kept values, as
      nnx.Conv's mask multiplies the kernel). Concrete.
    sparsity: instead of mask, magnitude-prune the initialised kernel to
      this fraction of zeros (per layer); needs a concrete initialisation
      (not under jit / eval_shape). With neither, every entry is kept.
    sparse_kernel: instead of initialising, start from this HWIO
      SparseKernel (its structure and values). rngs is then needed only for
      bias_init; without rngs the bias starts at zero.
    method: "auto", "escort", "vector" or "dense" (see
      escort_jax.sparse_conv); "vector", the tensor-core kernel, needs a
      vector-sparse kernel (whole vectors of 8, 16, 32 or 64 consecutive
      output channels kept; escort_jax.prune.vector_mask).
    activation: None or "relu" (fused into the sparse kernels).
    config: tile parameters: an escort_jax.KernelConfig (escort, auto) or
      escort_jax.VectorConfig (vector), or None for the defaults (a tuned
      plan's, where one exists).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      kernel_size: Sequence[int],
      strides: None | int | Sequence[int] = 1,
      *,
      padding: Any = "SAME",
      input_dilation: None | int | Sequence[int] = 1,
      kernel_dilation: None | int | Sequence[int] = 1,
      feature_group_count: int = 1,
      use_bias: bool = True,
      mask: Any = None,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: lax.PrecisionLike = None,
      kernel_init: Callable = default_kernel_init,
      bias_init: Callable = default_bias_init,
      promote_dtype: Callable = nnx_dtypes.promote_dtype,
      preferred_element_type: Any = None,
      rngs: nnx.Rngs | None = None,
      kernel_metadata: Any = types.MappingProxyType({}),
      bias_metadata: Any = types.MappingProxyType({}),
      sparsity: float | None = None,
      sparse_kernel: SparseKernel | None = None,
      method: str = "auto",
      activation: str | None = None,
      config: KernelConfig | VectorConfig | None = None,
  ):
    kernel_size = _kernel_size(kernel_size)
    if _pair(input_dilation, "input_dilation") != (1, 1):
      raise UnsupportedConvError(
          f"input_dilation={input_dilation} (transposed convolution) is not "
          "supported by SparseConv")
    padding = _canonical_padding(padding)
    _check_method(method)
    _check_activation(activation)
    groups = int(feature_group_count)
    if groups < 1 or in_features % groups or out_features % groups:
      raise ValueError(
          f"feature_group_count={feature_group_count} must divide "
          f"in_features={in_features} and out_features={out_features}")
    given = [n for n, v in (("mask", mask), ("sparsity", sparsity),
                            ("sparse_kernel", sparse_kernel)) if v is not None]
    if len(given) > 1:
      raise ValueError(f"pass at most one of mask=, sparsity= and "
                       f"sparse_kernel=, got {given}")
    kernel_shape = kernel_size + (in_features // groups, out_features)

    if sparse_kernel is not None:
      if not isinstance(sparse_kernel, SparseKernel):
        raise TypeError("sparse_kernel must be a SparseKernel, got "
                        f"{type(sparse_kernel).__name__}")
      if sparse_kernel.layout != "HWIO" or sparse_kernel.shape != (
          kernel_shape):
        raise ValueError(
            f"sparse_kernel has shape {sparse_kernel.shape} in layout "
            f"{sparse_kernel.layout!r}; this layer needs HWIO {kernel_shape}")
      structure = sparse_kernel.structure
      values = jnp.asarray(sparse_kernel.values)
    else:
      if rngs is None:
        raise TypeError("rngs is required to initialise the kernel (or pass "
                        "sparse_kernel=)")
      kernel = kernel_init(rngs.params(), kernel_shape, param_dtype)
      if mask is not None:
        if not _is_concrete(mask):
          raise TypeError("mask must be concrete: the structure is static")
        mask = np.asarray(mask)
        if mask.shape != kernel_shape:
          raise ValueError(f"mask has shape {mask.shape}, the kernel "
                           f"{kernel_shape}")
        structure = SparseStructure.from_mask(mask != 0, "HWIO")
        pos = structure.dense_positions()
        values = kernel[pos]
        if mask.dtype != np.bool_:
          values = values * jnp.asarray(mask[pos], values.dtype)
      else:
        keep = (np.ones(kernel_shape, bool) if sparsity is None
                else magnitude_mask(kernel, sparsity))
        structure = SparseStructure.from_mask(keep, "HWIO")
        values = kernel[structure.dense_positions()]

    self.values = nnx.Param(values, **kernel_metadata)
    if use_bias:
      if rngs is not None:
        bias = bias_init(rngs.params(), (out_features,), param_dtype)
      else:
        bias = jnp.zeros((out_features,), param_dtype)
      self.bias = nnx.Param(bias, **bias_metadata)
    else:
      self.bias = None

    # Static attributes, canonicalised so that they are hashable (they end
    # up in the graphdef, which nnx.jit hashes).
    self.structure = structure
    self.in_features = int(in_features)
    self.out_features = int(out_features)
    self.kernel_size = kernel_size
    self.kernel_shape = kernel_shape
    self.strides = _pair(strides, "strides")
    self.padding = padding
    self.input_dilation = (1, 1)
    self.kernel_dilation = _pair(kernel_dilation, "kernel_dilation")
    self.feature_group_count = groups
    self.use_bias = bool(use_bias)
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.precision = precision
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    self.method = method
    self.activation = activation
    self.config = config

  # ------------------------------------------------------------------------

  @classmethod
  def from_conv(cls, conv: nnx.Conv, *, method: str = "auto",
                activation: str | None = None,
                config: KernelConfig | VectorConfig | None = None
                ) -> SparseConv:
    """A SparseConv computing what a (concrete) nnx.Conv computes.

    Keeps exactly the nonzero entries of conv's kernel (times its mask, if
    it has one) and copies its bias, strides, padding, dilation, groups,
    dtype, param_dtype, precision (and promote_dtype /
    preferred_element_type where the flax version has them). The new layer
    shares no Variables with `conv`. method, activation and config are the
    new layer's, as in SparseConv (method="vector" needs a vector-sparse
    kernel).

    Raises:
      UnsupportedConvError: conv is not 2-D, has input dilation, or pads
        circularly / by reflection, or uses a custom conv function.
    """
    reason = conv_unsupported_reason(conv)
    if reason is not None:
      raise UnsupportedConvError(f"cannot convert {type(conv).__name__}: "
                                 f"{reason}")
    kernel = _get_value(conv.kernel)
    if not _is_concrete(kernel):
      raise TypeError("from_conv needs a concrete kernel (not under jit or "
                      "eval_shape): the structure is static")
    mask = getattr(conv, "mask", None)
    if mask is not None:
      kernel = kernel * jnp.asarray(mask, kernel.dtype)
    sk = SparseKernel.from_dense(kernel, "HWIO")
    bias = _conv_bias(conv)
    new = cls._like(conv, sk, use_bias=bias is not None, method=method,
                    activation=activation, config=config)
    if bias is not None:
      _set_value(new.bias, bias)
    return new

  @classmethod
  def _like(cls, layer, sparse_kernel: SparseKernel, *, use_bias: bool,
            method: str, activation, config) -> SparseConv:
    """A SparseConv with `layer`'s hyper-parameters (an nnx.Conv or a
    SparseConv, possibly abstract) and this kernel; bias zero."""
    kwargs = _optional_args(layer)
    new = cls(
        layer.in_features, layer.out_features, tuple(layer.kernel_size),
        layer.strides, padding=layer.padding,
        input_dilation=layer.input_dilation,
        kernel_dilation=layer.kernel_dilation,
        feature_group_count=layer.feature_group_count, use_bias=use_bias,
        dtype=layer.dtype, param_dtype=layer.param_dtype,
        precision=layer.precision, sparse_kernel=sparse_kernel,
        method=method, activation=activation, config=config, **kwargs)
    # Plain attributes that models hang on their layers (the model zoo's
    # `caffe_name`) are not constructor arguments; keep them.
    _keep_plain_attributes(layer, new)
    return new

  # ------------------------------------------------------------------------

  @property
  def sparse_kernel(self) -> SparseKernel:
    """The kernel as a SparseKernel (values (nnz,) + structure), HWIO."""
    return SparseKernel(_get_value(self.values), self.structure)

  @property
  def nnz(self) -> int:
    """The number of kept weights."""
    return self.structure.nnz

  @property
  def density(self) -> float:
    """The fraction of kept weights."""
    return self.sparse_kernel.density

  def dense_kernel(self) -> jax.Array:
    """The HWIO kernel (kh, kw, in_features // groups, out_features) in the
    values' (param) dtype, zeros at pruned entries; differentiable with
    respect to `values`."""
    return self.sparse_kernel.todense()

  def to_conv(self) -> nnx.Module:
    """This layer as a dense nnx.Conv: the same hyper-parameters, the
    kernel dense_kernel() (zeros at pruned entries) and the bias, sharing no
    Variables with this layer; inside nnx.Sequential(conv, nnx.relu) when
    activation="relu". It computes the same function through lax.conv with
    no densification per call (escort_jax.convert.dense_fallback uses it
    where dense is the faster path); its pruned weights are no longer held
    at zero by structure.
    """
    kwargs = _optional_args(self, _CONV_PARAMETERS)
    conv = nnx.Conv(
        self.in_features, self.out_features, self.kernel_size, self.strides,
        padding=self.padding, kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, use_bias=self.use_bias,
        dtype=self.dtype, param_dtype=self.param_dtype,
        precision=self.precision, kernel_init=nnx.initializers.zeros_init(),
        bias_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0), **kwargs)
    _set_value(conv.kernel, self.dense_kernel())
    if self.use_bias:
      _set_value(conv.bias, _get_value(self.bias))
    _keep_plain_attributes(self, conv)
    if self.activation is None:
      return conv
    return nnx.Sequential(conv, nnx.relu)

  def to_dense_conv(self) -> DenseConv:
    """This layer as a DenseConv: the kernel dense_kernel() held as OHWI,
    the bias and the activation, sharing no Variables with this layer. Like
    to_conv, but without nnx.Conv's transpose of the HWIO kernel on every
    jitted call (escort_jax.convert.dense_fallback's default)."""
    bias = _get_value(self.bias) if self.use_bias else None
    new = DenseConv(
        self.sparse_kernel.todense(CUDNN_KERNEL_LAYOUT), bias,
        strides=self.strides, padding=self.padding,
        kernel_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count, dtype=self.dtype,
        precision=self.precision, promote_dtype=self.promote_dtype,
        preferred_element_type=self.preferred_element_type,
        activation=self.activation)
    _keep_plain_attributes(self, new)
    return new

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """Applies the convolution.

    Args:
      inputs: (*batch, H, W, in_features); batch dimensions are flattened
        into one for the convolution and restored (none: one unbatched
        image), as nnx.Conv does. Or a Framed activation
        (escort_jax.frames), which a layer of stride 1 and 'SAME' padding
        reads with no layout pass.

    Returns:
      (*batch, Ho, Wo, out_features) in the promoted dtype (`dtype` if set,
      else that of inputs, values and bias), or preferred_element_type; for
      a Framed input, the Framed output.
    """
    if isinstance(inputs, Framed):
      if inputs.frame.channels != self.in_features:
        raise ValueError(f"the frame holds {inputs.frame.channels} "
                         f"channels, the layer takes {self.in_features}")
      data, values, bias = self._promoted(inputs.data)
      return self._conv(Framed(data, inputs.frame), values, bias)
    inputs, batch_shape = _flatten_batch(inputs, self.in_features)
    inputs, values, bias = self._promoted(inputs)
    return _restore_batch(self._conv(inputs, values, bias), batch_shape)

  def _promoted(self, inputs):
    """(inputs, values, bias) in the promoted dtype."""
    values = _get_value(self.values)
    bias = _get_value(self.bias) if self.bias is not None else None
    return self.promote_dtype((inputs, values, bias), dtype=self.dtype)

  def _conv(self, x, values, bias):
    return _conv_nhwc(
        x, values, bias, structure=self.structure, strides=self.strides,
        padding=self.padding, dilation=self.kernel_dilation,
        groups=self.feature_group_count, activation=self.activation,
        precision=self.precision, method=self.method,
        preferred_element_type=self.preferred_element_type,
        config=self.config)


def _flatten_batch(inputs, in_features: int):
  """(inputs as (N, H, W, C), the batch shape to restore): a layer's input
  with its batch dimensions (any number, or none) flattened into one, as
  nnx.Conv does; checks the rank and the channel count."""
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 3:
    raise ValueError(
        f"inputs must be (*batch, H, W, C) with rank >= 3, got shape "
        f"{inputs.shape}")
  batch_shape = inputs.shape[:-3]
  if len(batch_shape) != 1:
    inputs = inputs.reshape((-1,) + inputs.shape[-3:])
  if inputs.shape[-1] != in_features:
    raise ValueError(f"inputs have {inputs.shape[-1]} channels, the layer "
                     f"expects in_features={in_features}")
  return inputs, batch_shape


def _restore_batch(y, batch_shape):
  return y if len(batch_shape) == 1 else y.reshape(batch_shape + y.shape[1:])


class DenseConv(nnx.Module):
  """A dense 2-D convolution whose kernel is held as OHWI, for inference.

  nnx.Conv holds an HWIO kernel; cuDNN's NHWC convolutions read the filter
  as OHWI (KRSC), so a jitted forward that takes the parameters as
  arguments (nnx.jit, nnx.split + jax.jit) transposes every nnx.Conv kernel
  on every call: 1.5-7 µs per layer of ResNet-50 at batch 1 on an H100,
  about a fifth of the dense network's kernel time (benchmarks/NOTES.md,
  "tenth"). Held as OHWI, the kernel goes to the convolution as it is.
  Where XLA picks another filter layout (NCHW convolutions at fp32
  HIGHEST) it transposes either way.

  Layouts: inputs (*batch, H, W, in_features) as nnx.Conv's; kernel (an
  nnx.Param) (out_features, kh, kw, in_features // groups); bias (an
  nnx.Param, (out_features,)) or None; outputs (*batch, Ho, Wo,
  out_features).

  Build one with SparseConv.to_dense_conv() (escort_jax.convert.
  dense_fallback does, for the layers that run faster dense) or from its
  arrays. It computes lax.conv_general_dilated + bias, then the activation
  (None or "relu"); a 1x1 kernel on a 1x1 map (a SparseLinear's fallback)
  runs as nnx.Linear's matmul (escort_jax.ops.dense_conv_ohwi). Its
  gradients are XLA's, and nothing holds pruned weights at zero: fine-tune
  the SparseConv, not this.
  """

  def __init__(self, kernel_ohwi: jax.Array, bias: jax.Array | None = None,
               *, strides: None | int | Sequence[int] = 1,
               padding: Any = "SAME",
               kernel_dilation: None | int | Sequence[int] = 1,
               feature_group_count: int = 1, dtype: Any = None,
               precision: lax.PrecisionLike = None,
               promote_dtype: Callable = nnx_dtypes.promote_dtype,
               preferred_element_type: Any = None,
               activation: str | None = None):
    kernel_ohwi = jnp.asarray(kernel_ohwi)
    if kernel_ohwi.ndim != 4:
      raise ValueError("kernel_ohwi must be (out_features, kh, kw, "
                       f"in_features // groups), got shape "
                       f"{kernel_ohwi.shape}")
    out_features, kh, kw, group_in = kernel_ohwi.shape
    groups = int(feature_group_count)
    if groups < 1 or out_features % groups:
      raise ValueError(f"feature_group_count={feature_group_count} must be "
                       f">= 1 and divide out_features={out_features}")
    if bias is not None and jnp.shape(bias) != (out_features,):
      raise ValueError(f"bias has shape {jnp.shape(bias)}, the kernel's "
                       f"out_features is {out_features}")
    _check_activation(activation)
    self.kernel = nnx.Param(kernel_ohwi)
    self.bias = None if bias is None else nnx.Param(jnp.asarray(bias))
    self.in_features = group_in * groups
    self.out_features = out_features
    self.kernel_size = (kh, kw)
    self.strides = _pair(strides, "strides")
    self.padding = _canonical_padding(padding)
    self.kernel_dilation = _pair(kernel_dilation, "kernel_dilation")
    self.feature_group_count = groups
    self.use_bias = bias is not None
    self.dtype = dtype
    self.precision = precision
    self.promote_dtype = promote_dtype
    self.preferred_element_type = preferred_element_type
    self.activation = activation

  def hwio_kernel(self) -> jax.Array:
    """The kernel in nnx.Conv's layout, (kh, kw, in_features // groups,
    out_features)."""
    return jnp.transpose(_get_value(self.kernel), (1, 2, 3, 0))

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """(*batch, H, W, in_features) -> (*batch, Ho, Wo, out_features), in
    the promoted dtype (or preferred_element_type). A Framed input
    (escort_jax.frames) goes through NHWC and back into a frame of the same
    margins (a dense layer has no framed kernel: two layout passes)."""
    if isinstance(inputs, Framed):
      return to_frame(self(from_frame(inputs)), inputs.frame.margins)
    inputs, batch_shape = _flatten_batch(inputs, self.in_features)
    kernel = _get_value(self.kernel)
    bias = _get_value(self.bias) if self.bias is not None else None
    inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias),
                                              dtype=self.dtype)
    y = dense_conv_ohwi(
        inputs, kernel, self.strides, self.padding,
        rhs_dilation=self.kernel_dilation,
        feature_group_count=self.feature_group_count,
        precision=self.precision,
        preferred_element_type=self.preferred_element_type)
    if bias is not None:
      y = y + bias.astype(y.dtype)
    if self.activation == "relu":
      y = jax.nn.relu(y)
    return _restore_batch(y, batch_shape)


class SparseLinear(nnx.Module):
  """A fully connected layer with a pruned kernel; a drop-in for nnx.Linear.

  It runs as a 1x1 SparseConv on a 1x1 map, its attribute `conv`, so the
  escort kernels, dispatch, plans, tuning and dense_fallback all serve it as
  they serve convolutions (on a GPU at batch 1 the escort path was 2.2-3.0x
  faster than the dense matmul on the SkimCaffe-pruned fc layers:
  benchmarks/results/2026-11-25T0446-*-sparse-linear-probe.json).

  Layouts: inputs (..., in_features), any number of batch dimensions or
  none; kernel (in_features, out_features) as nnx.Linear's; outputs
  (..., out_features). State: conv.values (nnz,) and conv.bias
  (out_features,) or None; the structure is static.

  Args:
    in_features, out_features, use_bias, dtype, param_dtype, precision,
    kernel_init, bias_init, rngs: as in nnx.Linear (the same rngs give the
      same initial kernel).
    mask: which entries of the initialised (in, out) kernel to keep.
    sparsity: instead, magnitude-prune the initialised kernel to this
      fraction of zeros.
    sparse_kernel: instead of initialising, an HWIO SparseKernel of shape
      (1, 1, in_features, out_features) (SparseLinear.from_linear makes one).
    method, config: as in SparseConv.
  """

  def __init__(self, in_features: int, out_features: int, *,
               use_bias: bool = True, dtype: Any = None,
               param_dtype: Any = jnp.float32,
               precision: lax.PrecisionLike = None,
               kernel_init: Callable = default_kernel_init,
               bias_init: Callable = default_bias_init,
               rngs: nnx.Rngs | None = None, mask: Any = None,
               sparsity: float | None = None,
               sparse_kernel: SparseKernel | None = None,
               method: str = "auto",
               config: KernelConfig | VectorConfig | None = None):
    shape = (int(in_features), int(out_features))
    if mask is not None:
      if not _is_concrete(mask):
        raise TypeError("mask must be concrete: the structure is static")
      mask = np.asarray(mask)
      if mask.shape != shape:
        raise ValueError(f"mask has shape {mask.shape}, the kernel {shape}")
      mask = mask.reshape((1, 1) + shape)

    def init(key, kernel_shape, dtype=jnp.float32):
      # nnx.Linear's draw, as a (1, 1, in, out) kernel.
      return kernel_init(key, kernel_shape[2:], dtype).reshape(kernel_shape)

    self.conv = SparseConv(
        shape[0], shape[1], (1, 1), padding="VALID", use_bias=use_bias,
        dtype=dtype, param_dtype=param_dtype, precision=precision,
        kernel_init=init, bias_init=bias_init, rngs=rngs, mask=mask,
        sparsity=sparsity, sparse_kernel=sparse_kernel, method=method,
        config=config)
    self.in_features, self.out_features = shape

  @classmethod
  def from_linear(cls, linear: nnx.Linear, *, method: str = "auto",
                  config: KernelConfig | VectorConfig | None = None
                  ) -> SparseLinear:
    """A SparseLinear computing what a (concrete) nnx.Linear computes: its
    exact nonzeros, bias, dtype, param_dtype and precision; no shared
    Variables.

    Raises:
      UnsupportedConvError: the layer is not a plain nnx.Linear with a 2-D
        kernel.
    """
    if not isinstance(linear, nnx.Linear) or (
        type(linear).__call__ is not nnx.Linear.__call__):
      raise UnsupportedConvError(
          f"cannot convert {type(linear).__name__}: not an nnx.Linear")
    kernel = _get_value(linear.kernel)
    if not _is_concrete(kernel):
      raise TypeError("from_linear needs a concrete kernel (not under jit "
                      "or eval_shape): the structure is static")
    if kernel.ndim != 2:
      raise UnsupportedConvError(f"cannot convert a kernel of shape "
                                 f"{kernel.shape}: not 2-D")
    sk = SparseKernel.from_dense(kernel.reshape((1, 1) + kernel.shape))
    bias = _conv_bias(linear)
    new = cls(kernel.shape[0], kernel.shape[1], use_bias=bias is not None,
              dtype=linear.dtype, param_dtype=linear.param_dtype,
              precision=linear.precision, sparse_kernel=sk, method=method,
              config=config)
    if bias is not None:
      _set_value(new.conv.bias, bias)
    return new

  @property
  def nnz(self) -> int:
    return self.conv.nnz

  @property
  def density(self) -> float:
    return self.conv.density

  def dense_kernel(self) -> jax.Array:
    """The (in_features, out_features) kernel, zeros at pruned entries;
    differentiable with respect to conv.values."""
    return self.conv.dense_kernel()[0, 0]

  def __call__(self, inputs: jax.Array) -> jax.Array:
    """(..., in_features) -> (..., out_features)."""
    inputs = jnp.asarray(inputs)
    if inputs.ndim < 1 or inputs.shape[-1] != self.in_features:
      raise ValueError(f"inputs have shape {inputs.shape}; the layer "
                       f"expects (..., {self.in_features})")
    y = self.conv(inputs.reshape((-1, 1, 1, self.in_features)))
    return y.reshape(inputs.shape[:-1] + (self.out_features,))


def _conv_bias(conv):
  """conv's bias array, or None (flax 0.10 stores Param(None), later
  versions None or nnx.data(None))."""
  if not getattr(conv, "use_bias", True):
    return None
  b = getattr(conv, "bias", None)
  if isinstance(b, nnx.Variable):
    b = _get_value(b)
  return b
