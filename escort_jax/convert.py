"""`sparsify`: turn the nnx.Conv layers of an NNX model into SparseConvs.

    sparse_model = escort_jax.sparsify(model)              # every 2-D conv
    sparse_model = escort_jax.sparsify(model, max_density=0.5)
    sparse_model = escort_jax.sparsify(model, filter=r"^backbone\\.")
    sparse_model = escort_jax.sparsify(model, example_input=x)  # see below

The input model is not modified: sparsify works on an `nnx.clone` of it and
replaces, in the clone, every convertible nnx.Conv by
`SparseConv.from_conv(conv)`, which keeps the conv's exact nonzeros (prune
first, e.g. by zeroing weights, then sparsify). Replacement happens wherever
the conv is referenced: module attributes, nnx.Sequential layers, plain
lists / dicts / tuples and nnx.List / nnx.Dict, so shared layers stay shared.

`dense_fallback(model, x)` (or sparsify's `example_input=x`) settles
method="auto" once, for the shapes the model gives each layer on inputs
like x: a SparseConv that would run dense becomes a dense convolution
again (an escort_jax.nnx.DenseConv holding its kernel as OHWI, or with
kernel_layout="HWIO" an nnx.Conv), so that jitted inference does not
rebuild its dense kernel from the values on every call. This is Escoin's
conversion-time fallback; the plain "auto" layer decides at trace time and
densifies per call.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any, Callable

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import dispatch
from escort_jax.nnx import (SparseConv, SparseLinear, _get_value,
                            _is_concrete, conv_unsupported_reason)
from escort_jax.ops import CUDNN_KERNEL_LAYOUT, KernelConfig, VectorConfig

__all__ = ["sparsify", "dense_fallback", "probe_calls", "path_str"]

# The base classes of graph nodes with attributes, on every flax version:
# nnx.Object (0.10, 0.11), nnx.Pytree (0.12+; Object is kept as an alias).
_OBJECT_TYPES = tuple(t for t in (getattr(nnx, "Pytree", None),
                                  getattr(nnx, "Object", None), nnx.Module)
                      if isinstance(t, type))
_NNX_LIST = getattr(nnx, "List", None)  # flax >= 0.12


def path_str(path) -> str:
  """A graph path (a tuple of keys from nnx.iter_graph) as "a.b.0"."""
  return ".".join(str(p) for p in path)


def path_filter(filter) -> Callable[[str], bool]:
  """None, a regex (string or compiled; re.search) or a callable on the
  dotted path -> a predicate on dotted paths."""
  if filter is None:
    return lambda path: True
  if isinstance(filter, str):
    filter = re.compile(filter)
  if isinstance(filter, re.Pattern):
    return lambda path: filter.search(path) is not None
  if callable(filter):
    return lambda path: bool(filter(path))
  raise TypeError("filter must be None, a regex string, a compiled regex or "
                  f"a callable on the dotted path, got {filter!r}")


def _kernel_density(conv) -> float:
  kernel = _get_value(conv.kernel)
  mask = getattr(conv, "mask", None)
  if mask is not None:
    kernel = kernel * mask
  k = np.asarray(kernel)
  return float(np.count_nonzero(k)) / max(1, k.size)


def _replace_in(node, repl: dict[int, Any]) -> bool:
  """Replaces node's direct children whose id is in repl, in place.

  A tuple cannot change in place: its replacement is recorded in repl, and
  the function returns True so that the caller runs another pass to update
  the tuple's own parents.
  """
  if isinstance(node, nnx.Variable):
    return False
  if _NNX_LIST is not None and isinstance(node, _NNX_LIST) or isinstance(
      node, (list, MutableSequence)):
    for i in range(len(node)):
      if id(node[i]) in repl:
        node[i] = repl[id(node[i])]
    return False
  if isinstance(node, MutableMapping):  # dict, nnx.Dict
    for k in list(node.keys()):
      if id(node[k]) in repl:
        node[k] = repl[id(node[k])]
    return False
  if isinstance(node, tuple):
    if id(node) not in repl and any(id(c) in repl for c in node):
      items = [repl.get(id(c), c) for c in node]
      repl[id(node)] = (type(node)._make(items) if hasattr(node, "_fields")
                        else type(node)(items))
      return True
    return False
  if isinstance(node, _OBJECT_TYPES) and not isinstance(node, Mapping):
    for k, v in list(vars(node).items()):
      if id(v) in repl:
        setattr(node, k, repl[id(v)])
  return False


def replace_nodes(root, repl: dict[int, Any]):
  """Replaces, everywhere in root's graph, each node whose id is a key of
  repl by its value; returns the (possibly replaced) root."""
  if not repl:
    return root
  # Hold the nodes (so ids stay unique) before mutating anything.
  nodes = [n for _, n in nnx.iter_graph(root)]
  for _ in range(len(nodes) + 1):
    again = False
    for n in nodes:
      again |= _replace_in(n, repl)
    if not again:
      break
  return repl.get(id(root), root)


def sparsify(model, *, filter: Any = None, max_density: float | None = None,
             method: str = "auto",
             config: KernelConfig | VectorConfig | None = None,
             warn: bool = True, example_input: Any = None,
             call: Callable | None = None, linear: bool = False):
  """A copy of an NNX model with its 2-D nnx.Conv layers as SparseConvs
  (and, with linear=True, its nnx.Linear layers as SparseLinears).

  Args:
    model: an NNX module (or any graph node: a list, an nnx.Sequential, ...)
      with concrete parameters. It is left unchanged.
    filter: which convs to convert, by their dotted path in the model
      ("block.conv1", "layers.0"): a regex string or compiled regex
      (re.search, so anchor with ^...$ for exact names), or a callable
      path -> bool. None: all.
    max_density: convert only convs whose fraction of nonzero kernel entries
      is <= max_density (dense layers are faster dense). None: all.
    method, config: passed to every new SparseConv (activations stay where
      the model applies them): method "auto", "escort", "vector" or "dense",
      config a KernelConfig (escort, auto) or VectorConfig (vector).
      method="vector" needs every converted conv to be vector-sparse (whole
      vectors of 8, 16, 32 or 64 consecutive output channels kept;
      escort_jax.prune.vector_mask); restrict it with `filter` otherwise.
    warn: warn (once, listing them) about convs that the filters selected
      but that cannot be converted (not 2-D, input dilation, circular /
      reflect padding, custom conv function, subclass with its own
      __call__); those stay dense nnx.Conv.
    example_input, call: if given, an input of the model (an array or a
      jax.ShapeDtypeStruct; `call(model, x)` if the model is not called as
      model(x)): the converted layers that would run dense on it stay dense
      dense convolutions (dense_fallback, whose notes apply).
    linear: also convert the nnx.Linear layers that `filter` and
      `max_density` select into SparseLinears (escort_jax.nnx), which run
      as 1x1 SparseConvs: a pruned fully connected layer (the SkimCaffe
      profile prunes them to 74-92 %) on the escort kernels.

  Returns:
    The new model; its converted layers keep every nonzero weight, bias and
    hyper-parameter of the originals, so it computes the same function.
  """
  if max_density is not None and not 0.0 <= max_density <= 1.0:
    raise ValueError(f"max_density must lie in [0, 1], got {max_density}")
  keep = path_filter(filter)
  new = nnx.clone(model)
  repl: dict[int, Any] = {}
  skipped: list[str] = []
  for path, node in nnx.iter_graph(new):
    if id(node) in repl:
      continue
    if linear and isinstance(node, nnx.Linear):
      name = path_str(path)
      if keep(name) and type(node).__call__ is nnx.Linear.__call__ and (
          max_density is None or _kernel_density(node) <= max_density):
        if not _is_concrete(_get_value(node.kernel)):
          raise TypeError(f"the kernel of {name or '<root>'} is abstract or "
                          "traced; sparsify needs concrete parameters")
        repl[id(node)] = SparseLinear.from_linear(node, method=method,
                                                  config=config)
      continue
    if not isinstance(node, nnx.Conv):
      continue
    name = path_str(path)
    if not keep(name):
      continue
    reason = conv_unsupported_reason(node)
    if reason is not None:
      skipped.append(f"{name or '<root>'} ({reason})")
      continue
    if not _is_concrete(_get_value(node.kernel)):
      raise TypeError(f"the kernel of {name or '<root>'} is abstract or "
                      "traced; sparsify needs concrete parameters (call it "
                      "outside jit / eval_shape)")
    if max_density is not None and _kernel_density(node) > max_density:
      continue
    repl[id(node)] = SparseConv.from_conv(node, method=method,
                                          config=config)
  if skipped and warn:
    warnings.warn(
        f"sparsify: {len(skipped)} convolution(s) cannot be converted and "
        "stay dense: " + "; ".join(skipped), UserWarning, stacklevel=2)
  new = replace_nodes(new, repl)
  if example_input is not None:
    new = dense_fallback(new, example_input, call=call)
  return new


# --------------------------------------------------------------------------
# What each SparseConv is called with, and which path it takes.


@dataclasses.dataclass(frozen=True)
class LayerCall:
  """One call of a SparseConv in a traced forward pass."""
  input_shape: tuple[int, ...]
  input_dtype: Any
  # The dispatch decision of each sparse_conv the call made (one).
  choices: tuple[dispatch.Choice, ...]


_PROBE_RECORDS: list[dict[int, list[LayerCall]]] = []
_PROBE_CLASSES: dict[type, type] = {}


def _probe_class(cls: type) -> type:
  """A subclass of the SparseConv class `cls` whose calls are recorded."""
  if cls not in _PROBE_CLASSES:
    def __call__(self, inputs):
      if not _PROBE_RECORDS:
        return cls.__call__(self, inputs)
      # Without jit, so that a layer traced before (jit's cache) still
      # runs the dispatch code; inside eval_shape nothing is computed.
      with dispatch.recording() as choices, jax.disable_jit():
        y = cls.__call__(self, inputs)
      _PROBE_RECORDS[-1].setdefault(id(self), []).append(LayerCall(
          tuple(inputs.shape), jnp.dtype(inputs.dtype), tuple(choices)))
      return y
    _PROBE_CLASSES[cls] = type(f"_Probe{cls.__name__}", (cls,),
                               {"__call__": __call__,
                                "__module__": __name__})
  return _PROBE_CLASSES[cls]


def probe_calls(model, x, call: Callable | None = None
                ) -> dict[str, list[LayerCall]]:
  """Every call of each SparseConv in one forward pass of `model` on x.

  Traces the pass with jax.eval_shape on a copy of the model whose
  SparseConvs record their inputs and dispatch decisions (nothing is
  computed; the model is not changed). The decisions are those of the
  current backend and jax.default_matmul_precision.

  Args:
    model: an NNX module with SparseConv layers (concrete or abstract).
    x: the model's input: an array, a jax.ShapeDtypeStruct, or a shape
      (float32).
    call: (model, x) -> output, if the model is not called as model(x).

  Returns:
    Dotted path -> that layer's calls, in the order of first calls; layers
    the forward pass does not call are absent.
  """
  if not hasattr(x, "shape"):
    x = jax.ShapeDtypeStruct(tuple(int(d) for d in x), jnp.float32)
  x = jax.ShapeDtypeStruct(tuple(x.shape), x.dtype)
  probe = nnx.clone(model)
  paths: dict[int, str] = {}
  for p, node in nnx.iter_graph(probe):
    if isinstance(node, SparseConv):
      node.__class__ = _probe_class(type(node))
      paths[id(node)] = path_str(p)
  records: dict[int, list[LayerCall]] = {}
  _PROBE_RECORDS.append(records)
  try:
    jax.eval_shape(lambda v: call(probe, v) if call else probe(v), x)
  finally:
    _PROBE_RECORDS.pop()
  return {paths[i]: c for i, c in records.items() if i in paths}


# dense_fallback's kernel layouts: SparseConv -> its dense layer.
_DENSE_LAYERS = {CUDNN_KERNEL_LAYOUT: SparseConv.to_dense_conv,
                 "HWIO": SparseConv.to_conv}


def dense_fallback(model, example_input, *, call: Callable | None = None,
                   kernel_layout: str = CUDNN_KERNEL_LAYOUT):
  """A copy of `model` in which every SparseConv that runs dense on inputs
  like `example_input` is a dense convolution again.

  A SparseConv whose method resolves to the dense path (method="dense", or
  "auto" where the tuned plan or cost model picks lax.conv: always off the
  GPU) densifies its kernel from `values` on every call: a scatter of a few
  µs, which at batch 1 is a large part of a layer's time. Settling the
  choice here, for the shapes each layer gets, lets those layers hold their
  dense kernel instead, as a dense model would.

  Args:
    model: an NNX model with SparseConv layers; it is not changed.
    example_input: an input of the model (array or jax.ShapeDtypeStruct);
      only its shape and dtype matter. Decide for the batch size and dtype
      you will run: the plans differ between them.
    call: (model, x) -> output, if the model is not called as model(x).
    kernel_layout: how those layers hold their kernel: "OHWI", as an
      escort_jax.nnx.DenseConv (SparseConv.to_dense_conv), the layout
      cuDNN's NHWC convolutions read, so that no transpose of the kernel
      runs per call; or "HWIO", as an nnx.Conv (SparseConv.to_conv).

  Returns:
    The new model. It computes the same function (the dense layers by
    lax.conv, with its NaN semantics; escort_jax.ops). The choice is made
    on this backend under the current jax.default_matmul_precision, so call
    it inside the same `jax.default_matmul_precision` context as inference.
    Its dense layers are ordinary parameters: fine-tune the sparse model,
    not this one, to keep pruned weights at zero.
  """
  if kernel_layout not in _DENSE_LAYERS:
    raise ValueError(f"kernel_layout must be one of {sorted(_DENSE_LAYERS)}, "
                     f"got {kernel_layout!r}")
  to_dense = _DENSE_LAYERS[kernel_layout]
  calls = probe_calls(model, example_input, call)
  dense_paths = {p for p, cs in calls.items()
                 if all(c.choices and all(ch.method == "dense"
                                          for ch in c.choices) for c in cs)}
  new = nnx.clone(model)
  repl = {id(node): to_dense(node) for p, node in nnx.iter_graph(new)
          if isinstance(node, SparseConv) and path_str(p) in dense_paths}
  return replace_nodes(new, repl)
