"""Save and load sparse NNX models: values, every other Variable, and the
static sparsity structures, in one msgpack file (flax.serialization).

    save_sparse("model.msgpack", sparse_model)
    model = load_sparse("model.msgpack", lambda: Net(rngs=nnx.Rngs(0)))
    model = load_sparse("model.msgpack", nnx.eval_shape(lambda: Net(...)))

The second argument of load_sparse describes the architecture: a module
(concrete or abstract, dense or sparse; it is not modified) or a callable
that builds one. Wherever the file has a SparseConv, the module's layer at
that path (an nnx.Conv or a SparseConv) is replaced by a SparseConv with the
saved structure, method and activation and that layer's other
hyper-parameters; then every Variable is set from the file. So a model
saved after `sparsify(dense_model)` loads with the dense model's
constructor.

File format (a msgpack map, version 1):
  format: "escort-jax-sparse-nnx", version: 1
  layers: {path: {shape: [4 ints], layout: "HWIO", indptr: int64 (O+1,),
                  indices: int32 (nnz,), method: str, activation: str|None}}
  variables: {path: array}       every Variable with an array value
  key_impls: {path: str}         PRNG key Variables: saved as key data
where path is the "/"-joined nnx.iter_graph path. msgpack (rather than
orbax) because its API has been stable across the flax versions supported.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from flax import nnx
from flax import serialization
import jax
import jax.numpy as jnp
import numpy as np

from escort_jax.convert import replace_nodes
from escort_jax.nnx import SparseConv, _get_value, _set_value
from escort_jax.structure import SparseKernel, SparseStructure

__all__ = ["save_sparse", "load_sparse", "structure_to_dict",
           "structure_from_dict"]

FORMAT = "escort-jax-sparse-nnx"
VERSION = 1


def structure_to_dict(structure: SparseStructure) -> dict[str, Any]:
  """A SparseStructure as a msgpack-friendly dict (lists and numpy arrays)."""
  return {"shape": [int(d) for d in structure.shape],
          "layout": structure.layout,
          "indptr": np.asarray(structure.indptr, np.int64),
          "indices": np.asarray(structure.indices, np.int32)}


def structure_from_dict(d: dict[str, Any]) -> SparseStructure:
  """The inverse of structure_to_dict (validates the CSR arrays)."""
  return SparseStructure(tuple(d["shape"]), d["layout"],
                         np.asarray(d["indptr"]), np.asarray(d["indices"]))


def _key(path) -> str:
  return "/".join(str(p) for p in path)


def _is_prng_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key)


def save_sparse(path: str | os.PathLike, model) -> None:
  """Writes a (sparse) NNX model's state and structures to `path`.

  Every Variable (Params, BatchNorm statistics, RNG state, ...) is saved
  with its value; SparseConv layers also save their structure, method and
  activation. The file is replaced atomically.
  """
  layers, variables, key_impls = {}, {}, {}
  for p, node in nnx.iter_graph(model):
    if isinstance(node, SparseConv):
      entry = structure_to_dict(node.structure)
      entry["method"] = node.method
      entry["activation"] = node.activation
      layers[_key(p)] = entry
    elif isinstance(node, nnx.Variable):
      v = _get_value(node)
      if v is None:  # flax 0.10's Conv keeps Param(None) without bias
        continue
      if _is_prng_key(v):
        key_impls[_key(p)] = str(jax.random.key_impl(v))
        v = jax.random.key_data(v)
      try:
        variables[_key(p)] = np.asarray(v)
      except Exception as e:
        raise TypeError(f"cannot save Variable {_key(p)!r} of type "
                        f"{type(v).__name__}: {e}") from e
  data = serialization.msgpack_serialize({
      "format": FORMAT, "version": VERSION, "layers": layers,
      "variables": variables, "key_impls": key_impls})
  path = os.fspath(path)
  d = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=d, prefix=".escort-", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def _read(path) -> dict[str, Any]:
  with open(os.fspath(path), "rb") as f:
    payload = serialization.msgpack_restore(f.read())
  if not isinstance(payload, dict) or payload.get("format") != FORMAT:
    raise ValueError(f"{path} is not an escort-jax sparse checkpoint")
  if payload.get("version") != VERSION:
    raise ValueError(f"{path} has format version {payload.get('version')}; "
                     f"this escort-jax reads version {VERSION}")
  return payload


def load_sparse(path: str | os.PathLike,
                abstract_model_or_constructor: Any, *,
                strict: bool = True):
  """Loads a model written by save_sparse.

  Args:
    path: the file.
    abstract_model_or_constructor: the architecture: an NNX module (dense or
      sparse, concrete or from nnx.eval_shape; it is cloned, not modified)
      or a zero-argument callable returning one.
    strict: raise if the file and the model do not have the same Variables
      (otherwise, Variables absent from the file keep the model's values).

  Returns:
    The model with SparseConvs (saved structures) where the file has them
    and every saved Variable restored: it reproduces the saved model's
    outputs exactly.
  """
  payload = _read(path)
  arg = abstract_model_or_constructor
  if isinstance(arg, nnx.Module) or not callable(arg):
    model = nnx.clone(arg)
  else:
    model = arg()

  nodes = {_key(p): n for p, n in nnx.iter_graph(model)}
  repl = {}
  for name, entry in payload["layers"].items():
    layer = nodes.get(name)
    if not isinstance(layer, (nnx.Conv, SparseConv)):
      raise ValueError(
          f"the checkpoint has a SparseConv at {name!r}, but the model has "
          f"{type(layer).__name__ if layer is not None else 'nothing'} "
          "there")
    structure = structure_from_dict(entry)
    dtype = getattr(layer, "param_dtype", jnp.float32)
    placeholder = SparseKernel(jnp.zeros((structure.nnz,), dtype), structure)
    repl[id(layer)] = SparseConv._like(
        layer, placeholder, use_bias=bool(getattr(layer, "use_bias", True)),
        method=entry["method"], activation=entry["activation"],
        config=getattr(layer, "config", None))
  model = replace_nodes(model, repl)

  variables = payload["variables"]
  key_impls = payload.get("key_impls", {})
  seen = set()
  missing = []
  for p, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable):
      continue
    name = _key(p)
    if name not in variables:
      if _get_value(node) is not None:
        missing.append(name)
      continue
    seen.add(name)
    v = variables[name]
    if name in key_impls:
      v = jax.random.wrap_key_data(jnp.asarray(v), impl=key_impls[name])
    else:
      v = jnp.asarray(v)
    old = _get_value(node)
    if hasattr(old, "shape") and tuple(old.shape) != tuple(v.shape):
      raise ValueError(f"Variable {name!r} has shape {tuple(old.shape)} in "
                       f"the model and {tuple(v.shape)} in the checkpoint")
    _set_value(node, v)
  unexpected = sorted(set(variables) - seen)
  if strict and (missing or unexpected):
    raise ValueError(
        "the checkpoint does not match the model: "
        f"missing from the file {missing}, not in the model {unexpected}")
  return model
