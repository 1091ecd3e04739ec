"""`sparsify`: turn the nnx.Conv layers of an NNX model into SparseConvs.

    sparse_model = escort_jax.sparsify(model)              # every 2-D conv
    sparse_model = escort_jax.sparsify(model, max_density=0.5)
    sparse_model = escort_jax.sparsify(model, filter=r"^backbone\\.")

The input model is not modified: sparsify works on an `nnx.clone` of it and
replaces, in the clone, every convertible nnx.Conv by
`SparseConv.from_conv(conv)`, which keeps the conv's exact nonzeros (prune
first, e.g. by zeroing weights, then sparsify). Replacement happens wherever
the conv is referenced: module attributes, nnx.Sequential layers, plain
lists / dicts / tuples and nnx.List / nnx.Dict, so shared layers stay shared.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Mapping, MutableMapping, MutableSequence
from typing import Any, Callable

from flax import nnx
import numpy as np

from escort_jax.nnx import (SparseConv, _get_value, _is_concrete,
                            conv_unsupported_reason)
from escort_jax.ops import KernelConfig, VectorConfig

__all__ = ["sparsify", "path_str"]

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
             warn: bool = True):
  """A copy of an NNX model with its 2-D nnx.Conv layers as SparseConvs.

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
    if not isinstance(node, nnx.Conv) or id(node) in repl:
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
  return replace_nodes(new, repl)
