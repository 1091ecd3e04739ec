"""What the escort-jax CLI reports about sparse NNX models, as plain data.

The pieces behind `escort-jax demo`, `convert` and `inspect`, usable from
Python too:

  resolve_model(text)            "resnet50" or "pkg.module:factory" -> ModelSpec
  read_state_file(path)          a dense checkpoint (msgpack file or orbax
                                 directory) as {"a/b/kernel": array}
  save_dense(path, model)        writes a dense model in the msgpack form that
                                 read_state_file reads
  load_dense(path, spec)         a concrete model of `spec` with the file's
                                 weights (clear errors when they do not fit)
  sparse_layers(model)           [(dotted path, SparseConv)] in graph order
  probe_input_shapes(model, x)   the input shape of every SparseConv call of
                                 one forward pass (jax.eval_shape: no FLOPs)
  choose_path(...)               which path sparse_conv takes for a layer and
                                 why (plan / cost model / backend / caller),
                                 with the recorded or predicted speedup, on
                                 this backend or an assumed GPU
  layer_rows(model, ...)         one JSON-able dict per SparseConv: shapes,
                                 sparsity, nnz, chosen path and speedup
  plot_speedups(...)             a per-layer speedup bar chart (PNG, Agg)

Errors in the user's input (missing files, a checkpoint that does not fit the
model, an unknown model) raise InputError, which the CLI turns into exit
status 2.

Dense checkpoint formats read here:
  * msgpack (flax.serialization): the nested dict of nnx.state(model), e.g.
    `flax.serialization.to_bytes(nnx.to_pure_dict(nnx.state(model)))`
    (State.to_pure_dict() on older flax), or `save_dense`. Leaves may
    also be wrapped as {"value": array}.
  * orbax: a directory written by
    `orbax.checkpoint.StandardCheckpointer().save(dir, nnx.state(model))`
    (or a CheckpointManager step directory); needs orbax-checkpoint.
PRNG key state may be left out of either (a fresh one is used); every other
Variable (parameters, BatchNorm statistics) must be there.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import math
import os
from pathlib import Path
import re
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DEFAULT_GPU_SLUG", "InputError", "ModelSpec", "NullProgress",
    "choose_path", "convert_checkpoint", "flatten_state", "geometry_of",
    "inspect_checkpoint", "layer_name", "layer_rows", "load_dense",
    "load_sparse_checked", "packaged_gpu_slugs", "parse_input_shape",
    "plot_speedups", "probe_input_shapes", "read_state_file",
    "resolve_model", "save_dense", "sparse_layers",
]

# The plan file `--assume-gpu` uses when given no device: the GPU whose tuned
# plans ship with the package (escort_jax/plans/<slug>.json).
DEFAULT_GPU_SLUG = "nvidia-h100-80gb-hbm3"


class InputError(ValueError):
  """A problem with the user's input: a missing or unreadable file, a
  checkpoint that does not fit the model, an unknown model or a bad option.
  The CLI prints the message and exits with status 2."""


# --------------------------------------------------------------------------
# Models.


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """An architecture the CLI can build.

  Attributes:
    name: "resnet50", "googlenet", "caffenet" or the import path given.
    factory: a zero-argument callable returning a new (dense) model with
      random weights.
    input_shape: the model's (H, W, C) input, or None if unknown.
    builtin: whether it is one of escort_jax.models.
  """

  name: str
  factory: Callable[[], Any]
  input_shape: tuple[int, int, int] | None
  builtin: bool

  def abstract(self):
    """The model built abstractly (nnx.eval_shape: no weights allocated)."""
    from flax import nnx
    try:
      return nnx.eval_shape(self.factory)
    except InputError:
      raise
    except Exception as e:
      raise InputError(f"cannot build model {self.name!r}: "
                       f"{type(e).__name__}: {e}") from e

  def build(self):
    """The model built concretely (random weights)."""
    try:
      return self.factory()
    except Exception as e:
      raise InputError(f"cannot build model {self.name!r}: "
                       f"{type(e).__name__}: {e}") from e


def _call_with_rngs(obj):
  from flax import nnx
  try:
    # A class's own __init__: NNX's metaclass hides it behind (*args, **kw).
    target = obj.__init__ if isinstance(obj, type) else obj
    params = inspect.signature(target).parameters
  except (TypeError, ValueError):
    params = {}
  if "rngs" in params:
    return obj(rngs=nnx.Rngs(0))
  return obj()


def resolve_model(text: str) -> ModelSpec:
  """A model given on the command line.

  Args:
    text: a net of escort_jax.models ("resnet50", "googlenet", "caffenet"),
      or "package.module:attr" naming an nnx.Module class or a function
      returning a model; it is called with rngs=nnx.Rngs(0) if it takes
      `rngs`, else with no arguments. Its `input_shape` attribute (H, W, C),
      if any, is the default input shape.

  Raises:
    InputError: unknown net, module not importable, attribute missing.
  """
  from escort_jax import models
  if text in models.MODELS:
    cls = models.MODELS[text]
    from flax import nnx
    return ModelSpec(text, lambda: cls(rngs=nnx.Rngs(0)),
                     tuple(models.INPUT_SHAPES[text]), True)
  if ":" not in text:
    raise InputError(
        f"unknown model {text!r}; expected one of "
        f"{', '.join(sorted(models.MODELS))}, or an import path "
        "'package.module:factory' of your own NNX model")
  module_name, attr = text.split(":", 1)
  try:
    obj = importlib.import_module(module_name)
  except ImportError as e:
    raise InputError(f"cannot import {module_name!r} for --model {text!r}: "
                     f"{e}") from e
  try:
    for part in attr.split("."):
      obj = getattr(obj, part)
  except AttributeError:
    raise InputError(f"module {module_name!r} has no attribute {attr!r} "
                     f"(--model {text!r})") from None
  if not callable(obj):
    raise InputError(f"--model {text!r} is not a class or function")
  shape = getattr(obj, "input_shape", None)
  shape = tuple(int(d) for d in shape) if shape is not None else None
  return ModelSpec(text, lambda: _call_with_rngs(obj), shape, False)


def parse_input_shape(text: str | None, default: Sequence[int] | None
                      ) -> tuple[int, int, int]:
  """"224", "224,224" or "224,224,3" -> (H, W, C); channels default to the
  model's. Raises InputError if neither gives a full shape."""
  if text is None:
    if default is None:
      raise InputError("the model has no input_shape attribute: give "
                       "--input-shape H,W,C")
    return tuple(int(d) for d in default)  # type: ignore[return-value]
  parts = [p for p in re.split(r"[,x× ]+", text.strip()) if p]
  try:
    dims = [int(p) for p in parts]
  except ValueError:
    raise InputError(f"--input-shape {text!r}: expected N, H,W or H,W,C "
                     "with positive integers") from None
  if not dims or len(dims) > 3 or any(d <= 0 for d in dims):
    raise InputError(f"--input-shape {text!r}: expected N, H,W or H,W,C "
                     "with positive integers")
  if len(dims) == 3:
    return tuple(dims)  # type: ignore[return-value]
  if default is None:
    raise InputError(f"--input-shape {text!r} gives no channel count and "
                     "the model has no input_shape: give H,W,C")
  h, w = (dims[0], dims[0]) if len(dims) == 1 else dims
  return (h, w, int(default[-1]))


def layer_name(path: str, module) -> str:
  """A layer's display name: its Caffe name (escort_jax.models sets
  `caffe_name`), else its dotted path in the model."""
  name = getattr(module, "caffe_name", None)
  return name if isinstance(name, str) else path


def _path_key(path) -> str:
  return "/".join(str(p) for p in path)


def sparse_layers(model) -> list[tuple[str, Any]]:
  """(dotted path, SparseConv) of every SparseConv in `model`, graph order."""
  from flax import nnx
  from escort_jax.nnx import SparseConv
  return [(".".join(str(p) for p in path), node)
          for path, node in nnx.iter_graph(model)
          if isinstance(node, SparseConv)]


# --------------------------------------------------------------------------
# Dense checkpoints.


def _is_leaf(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array, int, float,
                        bool, complex))


def flatten_state(tree: Mapping[str, Any], prefix: str = ""
                  ) -> dict[str, Any]:
  """A nested state dict as {"a/b/kernel": leaf}.

  Keys are joined with "/" as strings (list indices too); a dict
  {"value": leaf} or {"raw_value": leaf} (how nnx.State and orbax store a
  Variable) counts as the leaf itself.
  """
  out: dict[str, Any] = {}
  for k, v in tree.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, Mapping):
      if len(v) == 1 and next(iter(v)) in ("value", "raw_value") and (
          _is_leaf(next(iter(v.values())))):
        out[key] = next(iter(v.values()))
      else:
        out.update(flatten_state(v, key))
    elif _is_leaf(v):
      out[key] = v
    elif v is None:
      continue
    else:
      raise InputError(f"unexpected entry {key!r} of type "
                       f"{type(v).__name__} in the checkpoint")
  return out


_ORBAX_ITEM_MARKERS = ("_METADATA", "manifest.ocdbt")


def _orbax_item_dir(path: Path, depth: int = 0) -> Path:
  """The folder of an orbax checkpoint that holds the arrays: `path`
  itself, or, for a CheckpointManager root or step folder, its latest step's
  "default" / "state" / only item."""
  if any((path / m).exists() for m in _ORBAX_ITEM_MARKERS):
    return path
  subdirs = sorted(p for p in path.iterdir() if p.is_dir())
  if depth < 3 and subdirs:
    steps = [p for p in subdirs if p.name.isdigit()]
    if steps:  # a CheckpointManager root: the latest step
      return _orbax_item_dir(max(steps, key=lambda p: int(p.name)),
                             depth + 1)
    for name in ("default", "state"):
      if (path / name).is_dir():
        return _orbax_item_dir(path / name, depth + 1)
    if len(subdirs) == 1:
      return _orbax_item_dir(subdirs[0], depth + 1)
  raise InputError(f"{path} is a directory but not an orbax checkpoint "
                   "(no _METADATA or manifest.ocdbt in it)")


def _read_orbax(path: Path) -> dict[str, Any]:
  try:
    import orbax.checkpoint as ocp
  except ImportError:
    raise InputError(
        f"{path} is a directory, so it would be an orbax checkpoint, but "
        "orbax-checkpoint is not installed (pip install orbax-checkpoint); "
        "or save the state as msgpack: flax.serialization.to_bytes("
        "nnx.to_pure_dict(nnx.state(model)))") from None
  item = _orbax_item_dir(path).resolve()
  try:
    checkpointer = ocp.StandardCheckpointer()
    try:
      tree = checkpointer.restore(item)
    finally:
      close = getattr(checkpointer, "close", None)
      if close is not None:
        close()
  except InputError:
    raise
  except Exception as e:
    raise InputError(f"cannot restore the orbax checkpoint {item}: "
                     f"{type(e).__name__}: {e}") from e
  if not isinstance(tree, Mapping):
    raise InputError(f"the orbax checkpoint {item} does not hold a state "
                     f"dict (got {type(tree).__name__})")
  return {k: np.asarray(v) if isinstance(v, jax.Array) else v
          for k, v in flatten_state(tree).items()}


def read_state_file(path: str | os.PathLike) -> dict[str, Any]:
  """A dense checkpoint's Variables as {"a/b/kernel": array}.

  Args:
    path: a msgpack file (flax.serialization of nnx.state(model)'s pure
      dict) or an orbax checkpoint directory; see the module docstring.

  Raises:
    InputError: missing or unreadable, or an escort-jax sparse checkpoint.
  """
  from flax import serialization
  from escort_jax import checkpoint
  p = Path(path)
  if not p.exists():
    raise InputError(f"{path}: no such file or directory")
  if p.is_dir():
    return _read_orbax(p)
  try:
    data = p.read_bytes()
  except OSError as e:
    raise InputError(f"cannot read {path}: {e.strerror or e}") from e
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:
    raise InputError(
        f"{path} is not a msgpack checkpoint ({type(e).__name__}); expected "
        "flax.serialization bytes of nnx.to_pure_dict(nnx.state(model)) or "
        "an orbax checkpoint directory") from e
  if isinstance(tree, Mapping) and tree.get("format") == checkpoint.FORMAT:
    raise InputError(f"{path} is already an escort-jax sparse checkpoint; "
                     "look at it with 'escort-jax inspect'")
  if not isinstance(tree, Mapping) or not tree:
    raise InputError(f"{path} does not hold a state dict (a msgpack map of "
                     "layer names to arrays)")
  return flatten_state(tree)


def save_dense(path: str | os.PathLike, model) -> None:
  """Writes a dense NNX model's Variables as a msgpack state dict.

  The nested dict of nnx.state(model) with plain arrays (lists indexed by
  "0", "1", ...); PRNG key Variables are left out. read_state_file and
  `escort-jax convert` read it back.
  """
  from flax import nnx, serialization
  from escort_jax.nnx import _get_value
  tree: dict[str, Any] = {}
  for p, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Variable):
      continue
    v = _get_value(node)
    if v is None or _is_prng(v):
      continue
    d = tree
    for part in p[:-1]:
      d = d.setdefault(str(part), {})
    d[str(p[-1])] = np.asarray(v)
  Path(path).write_bytes(serialization.msgpack_serialize(tree))


def _is_prng(v) -> bool:
  dtype = getattr(v, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype,
                                                     jax.dtypes.prng_key)


def _variables(model) -> dict[str, Any]:
  from flax import nnx
  from escort_jax.nnx import _get_value
  return {_path_key(p): n for p, n in nnx.iter_graph(model)
          if isinstance(n, nnx.Variable) and _get_value(n) is not None}


def _examples(items: Sequence[str], n: int = 4) -> str:
  items = list(items)
  more = f", ... ({len(items)} in all)" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def load_dense(path: str | os.PathLike, spec: ModelSpec):
  """A concrete model of `spec` holding a dense checkpoint's Variables.

  Builds the model abstractly (no random init) and sets every Variable from
  the file; only if the file lacks the model's PRNG state is the model
  built concretely, for a fresh one.

  Raises:
    InputError: the file is unreadable or does not fit the model (missing
      or unexpected Variables, other shapes), with examples of each.
  """
  from escort_jax.nnx import _get_value, _set_value
  flat = read_state_file(path)
  model = spec.abstract()
  variables = _variables(model)
  missing = [k for k in variables if k not in flat]
  rng_missing = [k for k in missing if _is_prng(_get_value(variables[k]))
                 or _is_rng_variable(variables[k])]
  missing = [k for k in missing if k not in rng_missing]
  unexpected = [k for k in flat if k not in variables]
  shapes = []
  for k, v in flat.items():
    if k in variables:
      want = tuple(getattr(_get_value(variables[k]), "shape", ()))
      have = tuple(np.shape(v))
      if want != have and not _is_prng(_get_value(variables[k])):
        shapes.append(f"{k}: model {want}, file {have}")
  if missing or unexpected or shapes:
    parts = []
    if missing:
      parts.append(f"{len(missing)} of the model's variables are not in the "
                   f"file ({_examples(missing)})")
    if unexpected:
      parts.append(f"{len(unexpected)} entries of the file are not in the "
                   f"model ({_examples(unexpected)})")
    if shapes:
      parts.append(f"{len(shapes)} have other shapes ({_examples(shapes, 3)})")
    hint = ""
    if missing and not unexpected and not shapes:
      hint = ("; save the whole nnx.state(model) (BatchNorm statistics "
              "too), not only the nnx.Param state")
    raise InputError(f"{path} does not fit --model {spec.name}: "
                     + "; ".join(parts) + hint)
  if rng_missing:
    model = spec.build()
    variables = _variables(model)
  for k, v in flat.items():
    var = variables[k]
    old = _get_value(var)
    if _is_prng(old):
      if not _is_prng(v):
        v = jax.random.wrap_key_data(jnp.asarray(v),
                                     impl=jax.random.key_impl(old))
      _set_value(var, v)
      continue
    _set_value(var, jnp.asarray(v, dtype=getattr(old, "dtype", None)))
  return model


def _is_rng_variable(var) -> bool:
  from flax import nnx
  rng_state = getattr(nnx, "RngState", None)
  return (rng_state is not None and isinstance(var, rng_state)) or type(
      var).__name__ in ("RngKey", "RngCount")


# --------------------------------------------------------------------------
# Shapes and paths.


def probe_input_shapes(model, x_shape: Sequence[int], dtype=jnp.float32,
                       call: Callable | None = None
                       ) -> dict[str, tuple[int, ...]]:
  """The input shape of each SparseConv in one forward pass
  (escort_jax.convert.probe_calls: traced, nothing computed).

  Args:
    model: an NNX module with SparseConv layers (concrete or abstract).
    x_shape: the model's input shape, e.g. (N, H, W, C).
    dtype: the input dtype.
    call: (model, x) -> output, if the model is not called as model(x).

  Returns:
    Dotted path -> input shape of the layer's first call, in call order;
    layers the forward pass does not call are absent.
  """
  from escort_jax.convert import probe_calls
  x = jax.ShapeDtypeStruct(tuple(int(d) for d in x_shape), dtype)
  return {p: calls[0].input_shape
          for p, calls in probe_calls(model, x, call).items()}


def geometry_of(layer, x_shape: Sequence[int]):
  """The ConvGeometry of a SparseConv called on an (N, H, W, C) input."""
  from escort_jax import conv_geometry as cg
  n = int(math.prod(x_shape[:-3])) if len(x_shape) > 3 else 1
  return cg.make_geometry((n, *x_shape[-3:]), layer.structure, layer.strides,
                          layer.padding, layer.kernel_dilation,
                          layer.feature_group_count)


# --------------------------------------------------------------------------
# Which path, and how fast.


def packaged_gpu_slugs() -> list[str]:
  """The devices whose tuned plans ship with the package (or are in
  $ESCORT_JAX_PLAN_DIR), e.g. ["nvidia-h100-80gb-hbm3"]."""
  from escort_jax import plans
  dirs = [d for d in (plans.user_dir(), plans.PACKAGED_DIR) if d is not None]
  slugs = set()
  for d in dirs:
    if Path(d).is_dir():
      slugs |= {p.stem for p in Path(d).glob("*.json")}
  return sorted(slugs)


PATHS = ("escort", "vector", "dense")


def _plan_times(entry: Mapping[str, Any]) -> dict[str, float | None]:
  """{"escort": µs, "vector": µs, "dense": µs}: the fastest time of each
  path recorded in a plan entry (escort_jax.tune.best_times), None where it
  has none."""
  from escort_jax import tune
  return {k: None if math.isnan(t) else t
          for k, t in tune.best_times(entry).items()}


def _times_text(times: Mapping[str, float | None]) -> str:
  """"escort 12.0 µs, vector 8.0 µs vs dense 20.0 µs" (known times)."""
  sparse = ", ".join(f"{k} {times[k]:.1f} µs" for k in ("escort", "vector")
                     if times.get(k) is not None)
  return f"{sparse} vs dense {times['dense']:.1f} µs"


def choose_path(structure, geometry, dtype="float32", precision=None,
                method: str = "auto", config=None, *,
                gpu_slug: str | None = None) -> dict[str, Any]:
  """Which path sparse_conv takes for one layer, why, and how fast.

  On this backend (escort_jax.dispatch.choose), or, with gpu_slug, as on
  that GPU from its plan file and the cost model (nothing runs).

  Args:
    structure: the layer's SparseStructure.
    geometry: its ConvGeometry (geometry_of).
    dtype: the compute dtype.
    precision: None (default) or "highest" / lax.Precision.HIGHEST.
    method, config: the layer's (SparseConv.method / .config).
    gpu_slug: assume this GPU (a plans/<slug>.json device); None: the
      current backend.

  Returns:
    A dict: method ("escort", "vector" or "dense"), source ("plan",
    "cost-model", "caller" or "backend"), reason (one line), device (the
    device whose choice it is), vector_width (the structure's V on this
    geometry, escort_jax.ops.structure_vector_width, for a GPU: the vector
    path is a candidate where it is >= 8; 1 off the GPU), escort_us,
    vector_us and dense_us (recorded in the plan, else predicted by the cost
    model, for a GPU; vector_us None where the vector path is no
    candidate), speedup_kind ("recorded", "predicted" or None),
    escort_speedup (dense / escort), vector_speedup (dense / vector) and
    speedup (dense / the chosen path: 1.0 for dense).
  """
  from escort_jax import dispatch, plans
  backend = jax.default_backend()
  on_gpu = gpu_slug is not None or backend == "gpu"
  dtype = jnp.dtype(dtype)
  if isinstance(precision, str) and precision.lower() == "default":
    precision = None
  pname = dispatch.precision_name(precision)
  device = gpu_slug or (plans.device_slug() if on_gpu else backend)
  entry = None
  if on_gpu:
    entry = plans.lookup(plans.plan_key(structure.digest, geometry, dtype,
                                        pname), gpu_slug)
  if not on_gpu:
    if method == "auto":
      chosen, source = "dense", "backend"
      reason = (f"method='auto' runs dense on the {backend.upper()} (the "
                "escort kernels need a GPU)")
    else:
      chosen, source = method, "caller"
      reason = f"method={method!r} set on the layer"
  vector_width = 1
  if on_gpu:
    from escort_jax.ops import structure_vector_width
    # Passed explicitly, so that the cost model weighs the vector path
    # whether or not dispatch.choose would work it out itself.
    vector_width = int(structure_vector_width(structure, geometry))
    choice = dispatch.choose(structure, geometry, dtype, precision, method,
                             config, True, slug=gpu_slug,
                             vector_width=vector_width)
    chosen, source = choice.method, choice.source
    reason = ""
  times: dict[str, float | None] = dict.fromkeys(PATHS)
  kind = None
  if on_gpu:
    # The times a speedup needs: escort, dense and the chosen path's.
    needed = {"escort", "dense", chosen}
    if entry is not None:
      times, kind = _plan_times(entry), "recorded"
    if any(times[k] is None for k in needed):
      t = dispatch.predicted_seconds(geometry, structure.nnz, dtype,
                                     precision, vector_width)
      times = {k: t[k] * 1e6 if k in t else None for k in PATHS}
      kind = "predicted"
  if not reason:
    if source == "plan":
      reason = (f"tuned plan ({entry.get('device', device)}, "
                f"{entry.get('date', '?')}): {_times_text(times)}")
    elif source == "cost-model":
      reason = f"cost model: {_times_text(times)} predicted"
    else:
      reason = f"method={method!r} set on the layer"
  dense_us = times["dense"]
  speedups = {k: dense_us / times[k] if times[k] and dense_us else None
              for k in PATHS}
  speedup = speedups.get(chosen) if dense_us else None
  return {"method": chosen, "source": source, "reason": reason,
          "device": device, "precision": pname or "default",
          "vector_width": vector_width,
          "escort_us": times["escort"], "vector_us": times["vector"],
          "dense_us": dense_us, "speedup_kind": kind,
          "escort_speedup": speedups["escort"],
          "vector_speedup": speedups["vector"], "speedup": speedup}


def layer_rows(model, batch: int, input_shape: Sequence[int], *,
               dtype="float32", precision=None, gpu_slug: str | None = None,
               call: Callable | None = None) -> list[dict[str, Any]]:
  """One dict per SparseConv of `model`, in graph order.

  Args:
    model: an NNX module with SparseConvs (e.g. from sparsify/load_sparse).
    batch, input_shape: the model input (batch, *input_shape), which fixes
      each layer's input shape (probe_input_shapes).
    dtype, precision, gpu_slug: as choose_path.
    call: as probe_input_shapes.

  Returns:
    In the order the forward pass calls them (unreached layers last),
    dicts with path, layer (display name), kernel_shape (HWIO),
    input_shape and output_shape (NHWC; None for layers the forward pass
    does not reach), stride, dilation, groups, sparsity, nnz, size, and
    "choice": choose_path's dict (None for unreached layers).
  """
  shapes = probe_input_shapes(model, (batch, *input_shape), call=call)
  order = {p: i for i, p in enumerate(shapes)}
  layers = sorted(sparse_layers(model),
                  key=lambda pl: order.get(pl[0], len(order)))
  rows = []
  for path, layer in layers:
    s = layer.structure
    row: dict[str, Any] = {
        "path": path, "layer": layer_name(path, layer),
        "kernel_shape": list(s.shape), "stride": list(layer.strides),
        "dilation": list(layer.kernel_dilation),
        "groups": int(layer.feature_group_count),
        "sparsity": 1.0 - s.nnz / max(1, s.size), "nnz": int(s.nnz),
        "size": int(s.size), "method_attr": layer.method,
        "input_shape": None, "output_shape": None, "choice": None}
    if path in shapes:
      g = geometry_of(layer, shapes[path])
      row["input_shape"] = [g.batch, g.in_h, g.in_w, g.in_channels]
      row["output_shape"] = [g.batch, g.out_h, g.out_w, g.out_channels]
      row["choice"] = choose_path(s, g, dtype, precision, layer.method,
                                  layer.config, gpu_slug=gpu_slug)
    rows.append(row)
  return rows


# --------------------------------------------------------------------------
# Plots.


def plot_speedups(labels: Sequence[str],
                  series: Mapping[str, Sequence[float | None]],
                  path: str | os.PathLike, *, title: str,
                  ylabel: str = "speedup over dense lax.conv (x)",
                  note: str | None = None) -> Path:
  """A per-layer bar chart of speedups (log scale, a line at 1x), as PNG.

  Args:
    labels: one per layer (x axis).
    series: legend label -> one value per layer (None: no bar).
    path: the PNG to write (its folder must exist).
    title, ylabel: the chart's.
    note: a line of small print under the chart (what was measured, where).

  Returns:
    The path written. Uses matplotlib's Agg canvas directly, so the global
    backend is left alone.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  n = len(labels)
  fig = Figure(figsize=(max(6.0, 0.45 * n + 2.5), 4.8))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  k = max(1, len(series))
  width = 0.8 / k
  x = np.arange(n)
  values = []
  for i, (name, vals) in enumerate(series.items()):
    v = np.array([np.nan if a is None else float(a) for a in vals])
    values += [a for a in v if np.isfinite(a) and a > 0]
    color = None
    if k == 1:  # one series: faster than dense in green, slower in grey
      color = ["tab:green" if a > 1 else "tab:gray" for a in v]
    bars = ax.bar(x + (i - (k - 1) / 2) * width, v, width, label=name,
                  color=color)
    if n * k <= 48:
      for b, a in zip(bars, v):
        if np.isfinite(a) and a > 0:
          ax.annotate(f"{a:.2g}", (b.get_x() + b.get_width() / 2, a),
                      ha="center", va="bottom", fontsize=6,
                      xytext=(0, 1), textcoords="offset points")
  ax.axhline(1.0, color="black", linewidth=0.8)
  if values:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator
    lo, hi = min(values + [1.0]) / 1.3, max(values + [1.0]) * 1.4
    ax.set_yscale("log")
    ax.set_ylim(lo, hi)
    ticks = [t for t in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20,
                         50, 100) if lo <= t <= hi]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}x"))
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
  ax.set_ylabel(ylabel)
  ax.set_title(title, fontsize=10)
  if len(series) > 1:
    ax.legend(fontsize=8)
  ax.grid(axis="y", alpha=0.3)
  if note:
    fig.text(0.01, 0.01, note, fontsize=7, ha="left", va="bottom")
  fig.tight_layout(rect=(0, 0.04 if note else 0, 1, 1))
  out = Path(path)
  fig.savefig(out, dpi=120)
  return out


# --------------------------------------------------------------------------
# Progress.


class NullProgress:
  """The progress interface of the CLI's long steps, doing nothing.

  `with progress.step("building"):` wraps one step; `progress.track(items,
  "checking", total)` iterates over items with a bar; `progress.note(text)`
  prints a line. The CLI passes a rich implementation (escort_jax.cli).
  """

  def step(self, description: str):
    """A context manager around one step."""
    import contextlib
    return contextlib.nullcontext()

  def track(self, iterable, description: str, total: int | None = None):
    """Iterates over `iterable`."""
    del description, total
    return iter(iterable)

  def note(self, text: str) -> None:
    """Prints a line of commentary (here: nothing)."""
    del text


# --------------------------------------------------------------------------
# `escort-jax convert` and `escort-jax inspect`.


def _density_of(kernel) -> float:
  k = np.asarray(kernel)
  return float(np.count_nonzero(k)) / max(1, k.size)


def _same_file(a, b) -> bool:
  try:
    return Path(a).resolve() == Path(b).resolve()
  except OSError:
    return False


def convert_checkpoint(in_path: str | os.PathLike,
                       out_path: str | os.PathLike, spec: ModelSpec, *,
                       sparsity: float | None = None,
                       profile: str | None = None,
                       max_density: float | None = None,
                       progress: Any = None) -> dict[str, Any]:
  """Dense checkpoint -> pruned -> sparsify -> sparse checkpoint.

  Args:
    in_path: a dense checkpoint of `spec` (read_state_file's formats).
    out_path: the sparse checkpoint to write (checkpoint.save_sparse).
    spec: the architecture (resolve_model).
    sparsity: magnitude-prune every nnx.Conv to this fraction of zeros (per
      layer) and convert every pruned conv.
    profile: instead, prune to a SkimCaffe profile (prune.SKIMCAFFE_PROFILES
      net name; matches layers by `caffe_name`, else dotted path).
    max_density: convert only convs of at most this density; default 0.5
      (with `sparsity` and no max_density: every pruned conv). With neither
      sparsity nor profile the existing zeros are kept as they are.
    progress: a NullProgress-like object.

  Returns:
    A JSON-able dict: "layers" (every conv: path, layer, kernel_shape,
    density_before, sparsity, nnz, converted, note), "totals", "checks"
    (kernels kept exactly, the file reads back), "ok" and the settings.

  Raises:
    InputError: unreadable input, a checkpoint that does not fit the model,
      a profile naming none of its layers, OUT not writable.
  """
  from flax import nnx
  from escort_jax import checkpoint, prune
  from escort_jax.convert import sparsify
  from escort_jax.nnx import _get_value, conv_unsupported_reason

  progress = progress or NullProgress()
  if _same_file(in_path, out_path):
    raise InputError("OUT is the same file as IN; write the sparse "
                     "checkpoint elsewhere")
  out_dir = Path(out_path).resolve().parent
  if not out_dir.is_dir():
    raise InputError(f"cannot write {out_path}: no such directory "
                     f"{out_dir}")
  if Path(out_path).is_dir():
    raise InputError(f"cannot write {out_path}: it is a directory")
  mode = ("sparsity" if sparsity is not None else
          "profile" if profile is not None else "keep-zeros")
  with progress.step(f"loading {in_path} as {spec.name}"):
    model = load_dense(in_path, spec)
  convs = {prune.path_str(p): m for p, m in nnx.iter_graph(model)
           if isinstance(m, nnx.Conv)}
  if not convs:
    raise InputError(f"--model {spec.name} has no nnx.Conv layers to "
                     "convert")
  before = {p: _density_of(_get_value(c.kernel)) for p, c in convs.items()}
  filter_ = None
  pruned_linear: list[str] = []
  if mode == "sparsity":
    what = f"magnitude-pruning every conv to {sparsity:.1%} zeros"
  elif mode == "profile":
    what = f"pruning to the SkimCaffe {profile} profile"
  else:
    what = "keeping the checkpoint's zeros (no pruning)"
  with progress.step(what):
    if mode == "sparsity":
      _, masks = prune.prune_model(model, sparsity=sparsity, inplace=True)
      selected = set(masks) & set(convs)
      filter_ = lambda path: path in selected  # noqa: E731
    elif mode == "profile":
      try:
        table = prune.resolve_profile(profile)
      except (ValueError, TypeError) as e:
        raise InputError(str(e)) from None
      _, masks = prune.prune_model(model, profile=profile, inplace=True)
      if not masks:
        names = [prune.layer_name(p, m)
                 for p, m in prune.prunable_layers(model).items()]
        raise InputError(
            f"the {profile} profile names none of this model's layers "
            f"(the profile has {_examples(sorted(table), 3)}; the model "
            f"has {_examples(names, 3)}); use --sparsity instead")
      pruned_linear = [p for p in masks if p not in convs]
  if max_density is None and mode != "sparsity":
    max_density = 0.5
  with progress.step("converting to SparseConv (escort_jax.sparsify)"):
    sparse = sparsify(model, filter=filter_, max_density=max_density,
                      warn=False)
  converted = dict(sparse_layers(sparse))
  rows = []
  kernels_ok = True
  for path, conv in convs.items():
    kernel = np.asarray(_get_value(conv.kernel))
    nnz = int(np.count_nonzero(kernel))
    row: dict[str, Any] = {
        "path": path, "layer": layer_name(path, conv),
        "kernel_shape": list(kernel.shape),
        "density_before": before[path],
        "sparsity": 1.0 - nnz / max(1, kernel.size), "nnz": nnz,
        "size": int(kernel.size), "converted": path in converted,
        "note": ""}
    if path in converted:
      same = np.array_equal(np.asarray(converted[path].dense_kernel()),
                            kernel)
      row["kernel_kept_exactly"] = bool(same)
      kernels_ok &= bool(same)
    else:
      reason = conv_unsupported_reason(conv)
      if reason is not None:
        row["note"] = f"stays dense: {reason}"
      elif filter_ is not None and not filter_(path):
        row["note"] = "stays dense: not pruned"
      elif max_density is not None and nnz / max(1, kernel.size) > (
          max_density):
        row["note"] = (f"stays dense: density {nnz / max(1, kernel.size):.2f}"
                       f" > {max_density:g}")
      else:
        row["note"] = "stays dense"
    rows.append(row)
  if not converted:
    hint = ("prune it with --sparsity S or --profile NET" if mode ==
            "keep-zeros" else "raise --max-density")
    raise InputError(
        f"no conv of {in_path} is sparse enough to convert (density <= "
        f"{max_density:g}; the sparsest has "
        f"{min(1 - r['sparsity'] for r in rows):.2f}); {hint}. Nothing "
        "was written.")
  with progress.step(f"writing {out_path}"):
    try:
      checkpoint.save_sparse(out_path, sparse)
    except OSError as e:
      raise InputError(f"cannot write {out_path}: {e.strerror or e}") from e
  with progress.step(f"reading {out_path} back"):
    loaded = checkpoint.load_sparse(out_path, spec.abstract())
    want, got = _variables(sparse), _variables(loaded)
    readback_ok = set(want) == set(got) and all(
        _equal(_get_value(want[k]), _get_value(got[k])) for k in want)
    readback_ok &= [p for p, _ in sparse_layers(loaded)] == list(converted)
  conv_rows = [r for r in rows if r["converted"]]
  size = sum(r["size"] for r in conv_rows)
  nnz = sum(r["nnz"] for r in conv_rows)
  all_size = sum(r["size"] for r in rows)
  all_nnz = sum(r["nnz"] for r in rows)
  return {
      "command": "convert", "input": str(in_path), "output": str(out_path),
      "model": spec.name, "mode": mode, "sparsity": sparsity,
      "profile": profile, "max_density": max_density, "layers": rows,
      "pruned_linear_layers": pruned_linear,
      "totals": {"convs": len(rows), "converted": len(conv_rows),
                 "converted_weights": size, "converted_nnz": nnz,
                 "converted_sparsity": 1 - nnz / max(1, size),
                 "conv_weights": all_size, "conv_nnz": all_nnz,
                 "conv_sparsity": 1 - all_nnz / max(1, all_size),
                 "output_bytes": Path(out_path).stat().st_size},
      "checks": {"kernels_kept_exactly": bool(kernels_ok),
                 "reads_back": bool(readback_ok)},
      "ok": bool(kernels_ok and readback_ok)}


def _equal(a, b) -> bool:
  if _is_prng(a) or _is_prng(b):
    return _is_prng(a) and _is_prng(b) and np.array_equal(
        np.asarray(jax.random.key_data(a)), np.asarray(jax.random.key_data(b)))
  return np.shape(a) == np.shape(b) and np.array_equal(np.asarray(a),
                                                       np.asarray(b))


def load_sparse_checked(path: str | os.PathLike, spec: ModelSpec):
  """checkpoint.load_sparse(path, spec's abstract model), with InputErrors
  that say what is wrong (missing file, not a sparse checkpoint, another
  model's checkpoint)."""
  from escort_jax import checkpoint
  p = Path(path)
  if not p.exists():
    raise InputError(f"{path}: no such file")
  if p.is_dir():
    raise InputError(f"{path} is a directory; a sparse checkpoint is one "
                     "msgpack file (escort-jax convert writes it)")
  abstract = spec.abstract()
  try:
    model = checkpoint.load_sparse(path, abstract)
  except OSError as e:
    raise InputError(f"cannot read {path}: {e.strerror or e}") from e
  except ValueError as e:
    text = str(e)
    if "is not an escort-jax sparse checkpoint" in text or type(
        e).__module__.startswith("msgpack"):
      raise InputError(f"{path} is not an escort-jax sparse checkpoint "
                       "(a dense one? convert it with 'escort-jax convert "
                       f"{path} OUT')") from None
    if "format version" in text:
      raise InputError(text) from None
    raise InputError(f"{path} does not fit --model {spec.name}: {text}"
                     ) from None
  except Exception as e:  # msgpack's own errors on a file that is not one
    raise InputError(f"{path} is not an escort-jax sparse checkpoint "
                     f"({type(e).__name__}: {e})") from None
  return model


def inspect_checkpoint(path: str | os.PathLike, spec: ModelSpec, *,
                       batch: int = 32,
                       input_shape: Sequence[int] | None = None,
                       dtype="float32", precision: str | None = None,
                       gpu_slug: str | None = None,
                       progress: Any = None) -> dict[str, Any]:
  """A sparse checkpoint's converted layers and the path each would run.

  Args:
    path: a sparse checkpoint (checkpoint.save_sparse).
    spec: its architecture.
    batch, input_shape: the model input (default input_shape: the
      model's).
    dtype, precision: as choose_path ("default" or None: the default
      precision).
    gpu_slug: decide as on this GPU (plans/<slug>.json, else the cost
      model); None: the current backend.
    progress: a NullProgress-like object.

  Returns:
    A JSON-able dict: "layers" (layer_rows), "totals" (layers, weights,
    nnz, sparsity, how many take the escort, vector and dense paths, and
    the sum of the layers' escort / dense / chosen times where known) and
    the settings.
  """
  progress = progress or NullProgress()
  if precision == "default":
    precision = None
  with progress.step(f"loading {path} as {spec.name}"):
    model = load_sparse_checked(path, spec)
  if input_shape is None:
    input_shape = parse_input_shape(None, spec.input_shape or getattr(
        model, "input_shape", None))
  with progress.step(f"tracing batch {batch} at "
                     f"{'x'.join(map(str, input_shape))} "
                     "(jax.eval_shape, no compute)"):
    try:
      rows = layer_rows(model, batch, input_shape, dtype=dtype,
                        precision=precision, gpu_slug=gpu_slug)
    except InputError:
      raise
    except Exception as e:
      raise InputError(
          f"cannot run {spec.name} on input {(batch, *input_shape)}: "
          f"{type(e).__name__}: {e}") from e
  choices = [r["choice"] for r in rows if r["choice"] is not None]
  size = sum(r["size"] for r in rows)
  nnz = sum(r["nnz"] for r in rows)
  totals: dict[str, Any] = {
      "layers": len(rows), "weights": size, "nnz": nnz,
      "sparsity": 1 - nnz / max(1, size),
      "escort_layers": sum(c["method"] == "escort" for c in choices),
      "vector_layers": sum(c["method"] == "vector" for c in choices),
      "dense_layers": sum(c["method"] == "dense" for c in choices),
      "unreached_layers": sum(r["choice"] is None for r in rows)}
  if choices and all(c["dense_us"] is not None and c["escort_us"] is not None
                     and c.get(f"{c['method']}_us") is not None
                     for c in choices):
    dense = sum(c["dense_us"] for c in choices)
    escort = sum(c["escort_us"] for c in choices)
    chosen = sum(c[f"{c['method']}_us"] for c in choices)
    kinds = sorted({c["speedup_kind"] for c in choices})
    totals.update(dense_us=dense, escort_us=escort, chosen_us=chosen,
                  speedup=dense / chosen, escort_speedup=dense / escort,
                  speedup_kind="/".join(kinds))
  notes = []
  if not rows:
    notes.append(f"{path} has no SparseConv layers (nothing was converted)")
  slugs = packaged_gpu_slugs()
  if gpu_slug is not None and gpu_slug not in slugs:
    notes.append(f"no plan file for {gpu_slug!r} (known: "
                 f"{', '.join(slugs) or 'none'}): the cost model decides "
                 "every layer")
  return {"command": "inspect", "checkpoint": str(path), "model": spec.name,
          "batch": batch, "input_shape": list(input_shape),
          "dtype": str(jnp.dtype(dtype)),
          "precision": "highest" if precision else "default",
          "backend": jax.default_backend(), "assume_gpu": gpu_slug,
          "layers": rows, "totals": totals, "notes": notes}
