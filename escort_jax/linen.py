"""Flax Linen integration: `SparseConv`, a drop-in for `flax.linen.Conv`
(2-D, NHWC), and `sparsify_params` to carry a dense model's weights over.

A Linen module cannot change its own parameter shapes, so the sparsity
structure is a static attribute given at construction, and the workflow is:
initialise / train the dense model, prune its params, call
`sparsify_params` to get the sparse params and the structures, and build
the sparse model from those structures:

    import flax.linen as nn
    import escort_jax.linen as esl

    class Net(nn.Module):
      structures: Any = None           # None: dense; else {path: structure}
      method: str = "auto"

      def conv(self, features, name):
        if self.structures is None or name not in self.structures:
          return nn.Conv(features, (3, 3), name=name)
        return esl.SparseConv(features, (3, 3), name=name,
                              structure=self.structures[name],
                              method=self.method)

      @nn.compact
      def __call__(self, x):                      # x (N, H, W, 3)
        x = nn.relu(self.conv(8, "conv1")(x))
        return self.conv(4, "conv2")(x)           # (N, H, W, 4)

    params = Net().init(key, x)                   # {"params": {"conv1":
                                                  #   {"kernel", "bias"}, ...}}
    pruned = esl.prune_params(params, sparsity=0.9)   # zero 90% per layer
    sparse_params, structures = esl.sparsify_params(pruned)
    # sparse_params: {"params": {"conv1": {"values" (nnz,), "bias"}, ...}}
    # structures:    {"conv1": SparseStructure, "conv2": SparseStructure}
    y = Net(structures=structures).apply(sparse_params, x)
    # == Net().apply(pruned, x)

    esl.densify_params(sparse_params, structures)    # back to kernels

Structures are keyed by the module's path inside the params tree, names
joined by "/" ("conv1", "Block_0/Conv_0"; "" for a lone Conv's own params).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax.core import frozen_dict
from flax.linen import dtypes as linen_dtypes
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from escort_jax.nnx import (UnsupportedConvError, _canonical_padding,
                            _check_activation, _check_method, _conv_nhwc,
                            _kernel_size, _pair)
from escort_jax.convert import path_filter
from escort_jax.frames import Framed
from escort_jax.prune import magnitude_mask
from escort_jax.ops import KernelConfig, VectorConfig
from escort_jax.structure import SparseKernel, SparseStructure

__all__ = ["SparseConv", "sparsify_params", "densify_params", "prune_params"]

default_kernel_init = nn.initializers.lecun_normal()


class SparseConv(nn.Module):
  """A 2-D convolution with a pruned kernel; a drop-in for flax.linen.Conv.

  Inputs (*batch, H, W, C) (NHWC; any number of batch dimensions, or none),
  outputs (*batch, Ho, Wo, features). Params: "values" (nnz,), the kept
  kernel entries in CSR order of `structure`, and "bias" (features,).

  Attributes:
    features, kernel_size, strides, padding, input_dilation,
    kernel_dilation, feature_group_count, use_bias, dtype, param_dtype,
    precision, kernel_init, bias_init: as in linen.Conv. kernel_size must be
      a pair; input_dilation must be 1; 'CIRCULAR' / 'REFLECT' / 'CAUSAL'
      padding is unsupported (UnsupportedConvError). kernel_init
      initialises the dense HWIO kernel, of which "values" keeps the
      structure's entries.
    structure: the static SparseStructure of the HWIO kernel
      (kh, kw, C // feature_group_count, features). Required.
    method: "auto", "escort", "vector" or "dense" (see
      escort_jax.sparse_conv); "vector", the tensor-core kernel, needs a
      vector-sparse kernel (whole vectors of 8, 16, 32 or 64 consecutive
      output channels kept; escort_jax.prune.vector_mask).
    activation: None or "relu", fused into the kernels.
    preferred_element_type: the output dtype, as in lax.conv.
    config: an escort_jax.KernelConfig (escort, auto) or
      escort_jax.VectorConfig (vector), or None for the default tiles (a
      tuned plan's, where one exists).
  """

  features: int
  kernel_size: Sequence[int]
  strides: None | int | Sequence[int] = 1
  padding: Any = "SAME"
  input_dilation: None | int | Sequence[int] = 1
  kernel_dilation: None | int | Sequence[int] = 1
  feature_group_count: int = 1
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: lax.PrecisionLike = None
  kernel_init: Callable = default_kernel_init
  bias_init: Callable = nn.initializers.zeros_init()
  structure: SparseStructure | None = None
  method: str = "auto"
  activation: str | None = None
  preferred_element_type: Any = None
  config: KernelConfig | VectorConfig | None = None

  @nn.compact
  def __call__(self, inputs: jax.Array) -> jax.Array:
    """(*batch, H, W, C) -> (*batch, Ho, Wo, features); a Framed input
    (escort_jax.frames) -> the Framed output."""
    kernel_size = _kernel_size(self.kernel_size)
    if _pair(self.input_dilation, "input_dilation") != (1, 1):
      raise UnsupportedConvError(
          f"input_dilation={self.input_dilation} (transposed convolution) "
          "is not supported by SparseConv")
    padding = _canonical_padding(self.padding)
    _check_method(self.method)
    _check_activation(self.activation)
    structure = self.structure
    if not isinstance(structure, SparseStructure):
      raise TypeError(
          "SparseConv needs structure= (a SparseStructure of the HWIO kernel; "
          "escort_jax.linen.sparsify_params returns them), got "
          f"{type(structure).__name__}")

    frame = inputs.frame if isinstance(inputs, Framed) else None
    if frame is None:
      inputs = jnp.asarray(inputs)
      if inputs.ndim < 3:
        raise ValueError(f"inputs must be (*batch, H, W, C), got shape "
                         f"{inputs.shape}")
      batch_shape = inputs.shape[:-3]
      if len(batch_shape) != 1:
        inputs = inputs.reshape((-1,) + inputs.shape[-3:])
    else:  # a frame's batch is one dimension already
      batch_shape, inputs = (frame.batch,), inputs.data
    in_features = frame.channels if frame else inputs.shape[-1]
    groups = self.feature_group_count
    if in_features % groups:
      raise ValueError(f"feature_group_count={groups} does not divide the "
                       f"{in_features} input channels")
    kernel_shape = kernel_size + (in_features // groups, self.features)
    if structure.layout != "HWIO" or structure.shape != kernel_shape:
      raise ValueError(
          f"structure is {structure.layout} {structure.shape}; this layer's "
          f"kernel is HWIO {kernel_shape}")

    positions = structure.dense_positions()

    def init_values(key, shape, dtype):
      # The same distribution as linen.Conv's kernel, restricted to the
      # structure's entries.
      del shape
      return self.kernel_init(key, kernel_shape, dtype)[positions]

    values = self.param("values", init_values, (structure.nnz,),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,),
                       self.param_dtype) if self.use_bias else None)
    inputs, values, bias = linen_dtypes.promote_dtype(inputs, values, bias,
                                                      dtype=self.dtype)
    if frame is not None:
      inputs = Framed(inputs, frame)
    y = _conv_nhwc(
        inputs, values, bias, structure=structure,
        strides=_pair(self.strides, "strides"), padding=padding,
        dilation=_pair(self.kernel_dilation, "kernel_dilation"),
        groups=groups, activation=self.activation, precision=self.precision,
        method=self.method,
        preferred_element_type=self.preferred_element_type,
        config=self.config)
    if len(batch_shape) != 1:
      y = y.reshape(batch_shape + y.shape[1:])
    return y


# --------------------------------------------------------------------------
# Params conversion.


def _unwrap(tree):
  """(inner params mapping, rewrap function) for {"params": ...} or a bare
  params tree, FrozenDict or dict."""
  frozen = isinstance(tree, frozen_dict.FrozenDict)
  d = frozen_dict.unfreeze(tree) if frozen else _copy_dicts(tree)
  if isinstance(d.get("params"), Mapping):
    def rewrap(inner):
      out = dict(d)
      out["params"] = inner
      return frozen_dict.freeze(out) if frozen else out
    return d["params"], rewrap
  return d, (lambda inner: frozen_dict.freeze(inner) if frozen else inner)


def _copy_dicts(tree):
  if isinstance(tree, Mapping):
    return {k: _copy_dicts(v) for k, v in tree.items()}
  return tree


def _is_conv(mod) -> bool:
  kernel = mod.get("kernel")
  return kernel is not None and not isinstance(kernel, Mapping) and (
      len(np.shape(kernel)) == 4)


def _conv_paths(params, prefix=()):
  """Yields (path tuple, module params) of every mapping with a 4-D
  "kernel" leaf (a 2-D conv: linen.Conv's kernel is HWIO); the root itself
  (a lone Conv's params) has path ()."""
  if _is_conv(params):
    yield prefix, params
    return
  for k, v in params.items():
    if isinstance(v, Mapping):
      yield from _conv_paths(v, prefix + (k,))


def _get(params, path):
  for k in path:
    params = params[k]
  return params


def _put(root, path, value):
  """Sets root[path] = value in place; returns the new root (value itself
  for the empty path)."""
  if not path:
    return value
  _get(root, path[:-1])[path[-1]] = value
  return root


def _split_path(name: str) -> tuple[str, ...]:
  return tuple(name.split("/")) if name else ()


def sparsify_params(params, structures: Mapping[str, Any] | None = None, *,
                    threshold: float | None = None,
                    sparsity: float | None = None,
                    filter: Any = None):
  """Converts a dense linen model's params to the sparse model's params.

  Each selected conv's {"kernel" (kh, kw, I, O), "bias"} becomes
  {"values" (nnz,), "bias"}; everything else is copied unchanged.

  Which entries are kept (at most one of the three; default: the nonzeros,
  for params that are already pruned):
    structures: {path: SparseStructure or HWIO bool mask}; converts exactly
      these convs and keeps the structure's entries (even zero ones).
    threshold: keep entries with |w| > threshold.
    sparsity: magnitude-prune each conv to this fraction of zeros.

  Args:
    params: the dense params: a variables dict {"params": {...}, ...} or a
      bare params tree; dict or FrozenDict (returned the same way). Convs are
      found as mappings whose "kernel" is 4-D; ConvTranspose / ConvLocal
      kernels are 4-D too, so exclude those with `filter` (or pass
      `structures`).
    filter: which convs to convert, by "/"-joined path: a regex (re.search)
      or a callable path -> bool. None: all.

  Returns:
    (sparse_params, structures): the sparse params tree, and {path:
    SparseStructure} for every converted conv, to build the sparse model's
    SparseConv(structure=structures[path], ...) layers.

  Note that with threshold / sparsity the sparse model computes the pruned
  function: compare it with densify_params(sparse_params, structures).
  """
  if sum(x is not None for x in (structures, threshold, sparsity)) > 1:
    raise ValueError("pass at most one of structures, threshold, sparsity")
  inner, rewrap = _unwrap(params)
  keep = path_filter(filter)
  chosen = {} if structures is None else dict(structures)
  out_structures: dict[str, SparseStructure] = {}
  found = set()
  for path, mod in list(_conv_paths(inner)):
    name = "/".join(path)
    if structures is not None and name not in chosen:
      continue
    if not keep(name):
      continue
    found.add(name)
    kernel = mod["kernel"]
    if isinstance(kernel, jax.core.Tracer):
      raise TypeError("sparsify_params needs concrete params (the "
                      "structure is static); call it outside jit")
    if structures is not None:
      s = chosen[name]
      if not isinstance(s, SparseStructure):
        s = SparseStructure.from_mask(np.asarray(s) != 0, "HWIO")
      if s.layout != "HWIO" or s.shape != tuple(np.shape(kernel)):
        raise ValueError(f"structure for {name!r} is {s.layout} {s.shape}; "
                         f"the kernel is HWIO {tuple(np.shape(kernel))}")
    elif threshold is not None:
      s = SparseStructure.from_mask(np.abs(np.asarray(kernel)) > threshold)
    elif sparsity is not None:
      s = SparseStructure.from_mask(magnitude_mask(kernel, sparsity))
    else:
      s = SparseKernel.from_dense(kernel).structure
    new_mod = {k: v for k, v in mod.items() if k != "kernel"}
    new_mod["values"] = jnp.asarray(kernel)[s.dense_positions()]
    inner = _put(inner, path, new_mod)
    out_structures[name] = s
  if structures is not None and set(chosen) - found:
    raise KeyError(f"no conv kernel at {sorted(set(chosen) - found)} in the "
                   "params (paths are '/'-joined module names)")
  return rewrap(inner), out_structures


def densify_params(params, structures: Mapping[str, SparseStructure]):
  """The inverse of sparsify_params: {"values", ...} -> {"kernel", ...}.

  The kernels are HWIO with zeros at pruned entries, for the dense model.
  """
  inner, rewrap = _unwrap(params)
  for name, s in structures.items():
    path = _split_path(name)
    mod = _get(inner, path)
    if "values" not in mod:
      raise KeyError(f"no 'values' at {name!r}")
    new_mod = {k: v for k, v in mod.items() if k != "values"}
    new_mod["kernel"] = SparseKernel(jnp.asarray(mod["values"]), s).todense()
    inner = _put(inner, path, new_mod)
  return rewrap(inner)


def prune_params(params, *, sparsity: float | None = None,
                 threshold: float | None = None, filter: Any = None):
  """Zeros small conv kernel entries of a dense params tree (same layout).

  sparsity: the fraction of each conv's entries to zero (by magnitude);
  threshold: zero entries with |w| <= threshold. Exactly one. `filter` as in
  sparsify_params. Dense models run the result unchanged; sparsify_params of
  it (default mode) then keeps exactly the surviving entries.
  """
  if (sparsity is None) == (threshold is None):
    raise ValueError("pass exactly one of sparsity and threshold")
  inner, rewrap = _unwrap(params)
  keep = path_filter(filter)
  for path, mod in list(_conv_paths(inner)):
    if not keep("/".join(path)):
      continue
    kernel = mod["kernel"]
    m = (magnitude_mask(kernel, sparsity) if sparsity is not None
         else np.abs(np.asarray(kernel)) > threshold)
    new_mod = dict(mod)
    new_mod["kernel"] = jnp.where(m, kernel, jnp.zeros((), kernel.dtype))
    inner = _put(inner, path, new_mod)
  return rewrap(inner)
