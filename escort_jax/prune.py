"""Magnitude pruning and mask-fixed fine-tuning of Flax NNX models.

Small composable pieces, in the style of optax:

  magnitude_mask(kernel, sparsity)           one kernel, exact kept count
  global_magnitude_masks(kernels, sparsity)  one threshold over many kernels
  vector_mask(kernel_hwio, sparsity, V)      V-wide output-channel vectors
  SKIMCAFFE_PROFILES                         net -> {layer name: sparsity}
  prune_model(model, ...)                    zeroes nnx.Conv / nnx.Linear
                                             kernels, returns (model, masks)
  apply_masks(model, masks)                  re-zeroes pruned weights
  mask_tree(model, masks)                    masks laid out like the params
  keep_masked(tx, mask_tree)                 optax wrapper: pruned weights
                                             get no update
  masked_finetune(model, masks, tx, ...)     a mask-fixed training loop

Masks are boolean numpy arrays of the kernel's shape, True = kept. They are
concrete on purpose: a SparseKernel's structure is static, so the mask of a
layer has to be known outside jit (SparseKernel.from_mask takes them as is).

A "sparsity" is the fraction of entries that are zero after pruning; a kernel
of `size` entries keeps exactly round(size * (1 - sparsity)) of them (Python's
round, as escort_jax/layers.json's benchmark workload does).

Layer names. `prune_model` keys masks by the module's dotted path in the
model ("res2a.branch2b"), as nnx.iter_graph walks it. A sparsity profile names
layers instead by their Caffe name ("res2a_branch2b"): a module's name is its
`caffe_name` attribute when it has one (escort_jax.models sets it on every
conv and linear layer), else its dotted path; `name_fn` overrides both.
"""

from __future__ import annotations

import importlib.resources
import itertools
import json
import math
from typing import Any, Callable, Iterable, Mapping, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from escort_jax.structure import select_vectors

# --------------------------------------------------------------------------
# Masks of single arrays.


def _check_sparsity(sparsity) -> float:
  s = float(sparsity)
  if not 0.0 <= s <= 1.0 or math.isnan(s):
    raise ValueError(f"sparsity must lie in [0, 1], got {sparsity!r}")
  return s


def num_kept(size: int, sparsity: float) -> int:
  """How many of `size` entries a kernel of this sparsity keeps.

  round(size * (1 - sparsity)), clipped to [0, size]: the count that
  escort_jax/layers.json's benchmark workload keeps too.
  """
  s = _check_sparsity(sparsity)
  return min(int(size), max(0, int(round(int(size) * (1.0 - s)))))


def _scores(kernel) -> np.ndarray:
  """|kernel| as float64 (exact for every float type up to 64 bits).

  NaN scores +inf: a NaN weight is a bug to see, and pruning it would hide
  it (SparseKernel keeps NaNs visible for the same reason).
  """
  if isinstance(kernel, jax.core.Tracer):
    raise TypeError(
        "masks are computed from concrete kernels (the sparse structure is "
        "static): call this outside jit/grad/vmap")
  a = np.abs(np.asarray(kernel).astype(np.float64))
  a[np.isnan(a)] = np.inf
  return a


def _top_k_flat(scores: np.ndarray, k: int) -> np.ndarray:
  """Boolean (n,) mask of the k largest of flat `scores`.

  Ties at the threshold go to the lowest flat index, so the result is
  deterministic and has exactly k True entries. O(n) (argpartition), so
  that fc6 of CaffeNet (37.7M weights) takes well under a second.
  """
  n = scores.size
  mask = np.zeros(n, bool)
  if k <= 0:
    return mask
  if k >= n:
    mask[:] = True
    return mask
  threshold = np.partition(scores, n - k)[n - k]  # the k-th largest score
  above = scores > threshold
  mask |= above
  ties = np.flatnonzero(scores == threshold)[:k - int(above.sum())]
  mask[ties] = True
  return mask


def magnitude_mask(kernel, sparsity: float) -> np.ndarray:
  """The mask keeping the largest-magnitude entries of one kernel.

  Args:
    kernel: a concrete array of any shape, e.g. (R, S, C, O) HWIO conv or
      (in, out) dense kernel; not a tracer.
    sparsity: the fraction of entries to prune, in [0, 1].

  Returns:
    A numpy bool array of kernel's shape with exactly
    round(size * (1 - sparsity)) True entries, at the largest |w|. Ties at
    the threshold are broken by the lowest row-major (flat) index; NaN
    weights count as the largest.
  """
  scores = _scores(kernel)
  k = num_kept(scores.size, sparsity)
  return _top_k_flat(scores.reshape(-1), k).reshape(scores.shape)


def global_magnitude_masks(kernels: Mapping[str, Any], sparsity: float
                           ) -> dict[str, np.ndarray]:
  """Masks with one magnitude threshold shared by all kernels.

  Args:
    kernels: name -> concrete array (any shapes).
    sparsity: the fraction of all entries together to prune, in [0, 1].

  Returns:
    name -> numpy bool mask of that kernel's shape. Exactly
    round(total_size * (1 - sparsity)) entries are kept over all kernels;
    per kernel the sparsity varies (layers of small weights lose more).
    Ties are broken by the kernels' order in the mapping, then flat index.
  """
  names = list(kernels)
  scores = [_scores(kernels[n]) for n in names]
  flat = (np.concatenate([s.reshape(-1) for s in scores])
          if scores else np.zeros(0))
  keep = _top_k_flat(flat, num_kept(flat.size, sparsity))
  out, start = {}, 0
  for name, s in zip(names, scores):
    out[name] = keep[start:start + s.size].reshape(s.shape)
    start += s.size
  return out


def _vector_scores(kernel, vector_width: int) -> np.ndarray:
  """L2 norms of V-wide output-channel vectors: (..., O) -> (..., O // V)."""
  v = int(vector_width)
  if v < 1:
    raise ValueError(f"vector_width must be a positive integer, got "
                     f"{vector_width!r}")
  shape = np.shape(kernel)
  if len(shape) < 1 or shape[-1] % v:
    raise ValueError(
        f"vector_width={v} must divide the number of output channels (the "
        f"last axis) of the kernel, got kernel shape {tuple(shape)}")
  s = _scores(kernel)
  s = s.reshape(*shape[:-1], shape[-1] // v, v)
  return np.sqrt(np.sum(s * s, axis=-1))


def _expand_vectors(vector_mask_: np.ndarray, vector_width: int) -> np.ndarray:
  """(..., O // V) -> (..., O): each vector's mask on its V channels."""
  return np.repeat(vector_mask_, int(vector_width), axis=-1)


def vector_mask(kernel_hwio, sparsity: float, vector_width: int, *,
                column_multiple: int = 1) -> np.ndarray:
  """A mask in which blocks of V output channels share their kept positions.

  Output channels o = b*V .. b*V + V - 1 form block b. For each kernel
  position (r, s, c) and block b the V weights form one vector, scored by
  its L2 norm; the largest vectors are kept whole. This is the
  vector-sparse pattern that lets a kernel load one input value for V
  outputs.

  Args:
    kernel_hwio: a concrete (R, S, C, O) kernel (C = input channels per
      group); any array whose last axis is the output channels works, e.g.
      an (in, out) dense kernel.
    sparsity: the fraction of vectors (hence of entries) to prune.
    vector_width: V; must divide O.
    column_multiple: m. With m > 1 every block keeps a multiple of m
      positions (its own count rounded to the nearest multiple, its largest
      vectors), which lets the vector kernel load its weights 16 bytes at a
      time at m = 8 (structure.ALIGNED_COLUMNS); the total kept may then
      differ from the target by up to m / 2 vectors per block.

  Returns:
    A numpy bool array of the kernel's shape, keeping
    round((size / V) * (1 - sparsity)) vectors (m = 1), i.e. V times that
    many entries. Ties as in `magnitude_mask`, over the (R, S, C, O // V)
    grid.

  Raises:
    ValueError: if V does not divide O, or m < 1.
  """
  scores = _vector_scores(kernel_hwio, vector_width)
  keep = _round_vector_counts(
      _top_k_flat(scores.reshape(-1), num_kept(scores.size, sparsity)),
      scores, column_multiple)
  return _expand_vectors(keep.reshape(scores.shape), vector_width)


def _round_vector_counts(keep: np.ndarray, scores: np.ndarray,
                         column_multiple: int) -> np.ndarray:
  """A flat vector mask `keep` over `scores` (..., blocks), with each
  block's count rounded to a multiple (structure.select_vectors), keeping
  each block's largest vectors (ties to the lowest flat index)."""
  if int(column_multiple) == 1:
    return keep
  flat = scores.reshape(-1)
  ranking = np.lexsort((np.arange(flat.size), -flat))
  return select_vectors(ranking, int(keep.sum()), scores.shape[-1],
                        column_multiple)


# --------------------------------------------------------------------------
# SkimCaffe's published per-layer sparsities.

# Fully connected layers of the pruned SkimCaffe models (SkimCaffe README);
# layers.json lists the conv layers only.
_FC_SPARSITY = {
    "caffenet": {"fc6": 0.903, "fc7": 0.844, "fc8": 0.738},
    "googlenet": {"loss3/classifier": 0.907},
    "resnet50": {"fc1000": 0.915},
}


def _load_profiles() -> dict[str, dict[str, float]]:
  text = importlib.resources.files("escort_jax").joinpath(
      "layers.json").read_text()
  profiles: dict[str, dict[str, float]] = {}
  for layer in json.loads(text)["layers"]:
    profiles.setdefault(layer["net"], {})[layer["layer"]] = float(
        layer["sparsity"])
  for net, fcs in _FC_SPARSITY.items():
    profiles.setdefault(net, {}).update(fcs)
  return profiles


SKIMCAFFE_PROFILES: dict[str, dict[str, float]] = _load_profiles()
"""net ("caffenet", "googlenet", "resnet50") -> {Caffe layer name: sparsity}.

The conv layers of escort_jax/layers.json plus the fully connected layers
(caffenet fc6/fc7/fc8, googlenet loss3/classifier, resnet50 fc1000). Layers
not named are dense (sparsity 0).
"""


def resolve_profile(profile) -> Mapping[str, float]:
  """A profile as a mapping: a net name of SKIMCAFFE_PROFILES or a mapping."""
  if isinstance(profile, str):
    try:
      return SKIMCAFFE_PROFILES[profile]
    except KeyError:
      raise ValueError(f"unknown profile {profile!r}; known: "
                       f"{sorted(SKIMCAFFE_PROFILES)}") from None
  if not isinstance(profile, Mapping):
    raise TypeError("profile must be a net name or a mapping of layer name "
                    f"to sparsity, got {type(profile).__name__}")
  return profile


# --------------------------------------------------------------------------
# NNX plumbing. Variable access changed across flax versions (.value is
# deprecated in 0.12 in favour of get_value/set_value), so go through these.


def _get(var) -> Any:
  get = getattr(var, "get_value", None)
  return get() if get is not None else var.value


def _set(var, value) -> None:
  set_ = getattr(var, "set_value", None)
  if set_ is not None:
    set_(value)
  else:
    var.value = value


def path_str(path) -> str:
  """The dotted string of an nnx.iter_graph path: ("res2a", "branch2b")."""
  return ".".join(str(p) for p in path)


PRUNABLE = (nnx.Conv, nnx.Linear)


def prunable_layers(model) -> dict[str, Any]:
  """Dotted path -> module of every nnx.Conv and nnx.Linear, in graph order.

  Shared modules appear once (nnx.iter_graph visits a node once).
  """
  return {path_str(p): m for p, m in nnx.iter_graph(model)
          if isinstance(m, PRUNABLE)}


def layer_name(path: str, module) -> str:
  """A module's name for profiles: its `caffe_name`, else its dotted path."""
  name = getattr(module, "caffe_name", None)
  return name if isinstance(name, str) else path


def _where_kept(x, mask):
  # where, not multiply: 0 * inf would be NaN, and -0.0 would survive.
  return jnp.where(jnp.asarray(mask), x, jnp.zeros((), jnp.asarray(x).dtype))


def prune_model(model, sparsity: float | None = None, profile=None,
                mode: str = "layer", vector_width: int | None = None, *,
                column_multiple: int = 1, inplace: bool = False,
                name_fn: Callable[[str, Any], str] | None = None
                ) -> tuple[Any, dict[str, np.ndarray]]:
  """Magnitude-prunes the conv (and named linear) kernels of an NNX model.

  Which layers, at which sparsity:
    * `sparsity` alone: every nnx.Conv at that sparsity; linear layers stay
      dense.
    * `profile` (a SKIMCAFFE_PROFILES net name or {layer name: sparsity}):
      every nnx.Conv and nnx.Linear whose name (see `layer_name`) the
      profile lists, at its sparsity; convs it does not list get `sparsity`
      if given, else stay dense.
  Layers at sparsity 0 are left alone and get no mask.

  Args:
    model: an NNX module holding concrete parameters.
    sparsity: a fraction in [0, 1], see above.
    profile: see above.
    mode: "layer" prunes each kernel to its own sparsity; "global" prunes
      the selected kernels (all at the one `sparsity`; no profile) with one
      magnitude threshold over all of them.
    vector_width: if set, prune V-wide output-channel vectors (vector_mask)
      instead of single weights; in "global" mode the vectors' L2 norms
      share the threshold.
    column_multiple: with vector_width, every block of each kernel keeps a
      multiple of this many positions (see vector_mask).
    inplace: False (default) prunes a copy (nnx.clone) and leaves `model`
      unchanged; True zeroes `model`'s own kernels.
    name_fn: (dotted path, module) -> name to look up in the profile;
      default `layer_name`.

  Returns:
    (pruned model, masks): masks maps the dotted module path
    ("res2a.branch2b") to a numpy bool array of the kernel's shape
    ((R, S, C, O) for nnx.Conv, (in, out) for nnx.Linear), True = kept.
    Kernels are zeroed where the mask is False; biases are not pruned.
  """
  if mode not in ("layer", "global"):
    raise ValueError(f"mode must be 'layer' or 'global', got {mode!r}")
  if sparsity is None and profile is None:
    raise ValueError("give a sparsity, a profile or both")
  if sparsity is not None:
    sparsity = _check_sparsity(sparsity)
  if mode == "global" and (profile is not None or sparsity is None):
    raise ValueError("mode='global' prunes to one overall sparsity: give "
                     "`sparsity` and no profile")
  table = resolve_profile(profile) if profile is not None else {}
  name_fn = name_fn or layer_name

  if not inplace:
    model = nnx.clone(model)
  targets: dict[str, float] = {}
  layers = prunable_layers(model)
  for path, module in layers.items():
    name = name_fn(path, module)
    if name in table:
      s = _check_sparsity(table[name])
    elif isinstance(module, nnx.Conv) and sparsity is not None:
      s = sparsity
    else:
      continue
    if s > 0.0:
      targets[path] = s

  kernels = {p: _get(layers[p].kernel) for p in targets}
  if mode == "global":
    if vector_width:
      scores = {p: _vector_scores(k, vector_width) for p, k in kernels.items()}
      keep = global_magnitude_masks(scores, sparsity)
      masks = {p: _expand_vectors(_round_vector_counts(
          m.reshape(-1), scores[p], column_multiple).reshape(m.shape),
                                  vector_width) for p, m in keep.items()}
    else:
      masks = global_magnitude_masks(kernels, sparsity)
  elif vector_width:
    masks = {p: vector_mask(k, targets[p], vector_width,
                            column_multiple=column_multiple)
             for p, k in kernels.items()}
  else:
    masks = {p: magnitude_mask(k, targets[p]) for p, k in kernels.items()}

  apply_masks(model, masks)
  return model, masks


def apply_masks(model, masks: Mapping[str, Any]):
  """Zeroes the kernels of `model` where the masks are False, in place.

  Args:
    model: an NNX module.
    masks: dotted module path -> bool array of that module's kernel shape
      (as prune_model returns them).

  Returns:
    `model`, for chaining.
  """
  layers = {path_str(p): m for p, m in nnx.iter_graph(model)}
  missing = [p for p in masks if p not in layers]
  if missing:
    raise KeyError(f"no module at paths {missing}")
  for path, mask in masks.items():
    var = layers[path].kernel
    kernel = _get(var)
    if tuple(np.shape(mask)) != tuple(kernel.shape):
      raise ValueError(f"mask of {path} has shape {np.shape(mask)}, its "
                       f"kernel {tuple(kernel.shape)}")
    _set(var, _where_kept(kernel, mask))
  return model


# --------------------------------------------------------------------------
# Mask-fixed fine-tuning.


def mask_tree(model, masks: Mapping[str, Any], wrt=nnx.Param):
  """The masks laid out like nnx.state(model, wrt), for tree_map.

  Args:
    model: an NNX module.
    masks: dotted module path -> bool mask of that module's kernel.
    wrt: the nnx filter of the trained variables (default nnx.Param).

  Returns:
    A pytree of the same structure as nnx.state(model, wrt) (and as
    nnx.grad's gradients): the kernel of each masked module holds its mask
    as a bool jax array; every other leaf holds a scalar True (keep all).
  """
  # Building it from a clone of the model guarantees the very same tree
  # structure (State layout and Variable metadata) across flax versions.
  shadow = nnx.clone(model)
  for _, var in nnx.iter_graph(shadow):
    if isinstance(var, nnx.Variable):
      _set(var, jnp.ones((), bool))
  layers = {path_str(p): m for p, m in nnx.iter_graph(shadow)}
  for path, mask in masks.items():
    if path not in layers:
      raise KeyError(f"no module at path {path!r}")
    _set(layers[path].kernel, jnp.asarray(np.asarray(mask, bool)))
  return nnx.state(shadow, wrt)


class KeepMaskedState(NamedTuple):
  inner: Any


def keep_masked(tx: optax.GradientTransformation, masks_tree
                ) -> optax.GradientTransformation:
  """Wraps an optax transformation so that pruned weights never move.

  Gradients are zeroed at pruned positions before `tx` sees them (so
  momentum and second-moment statistics of pruned weights stay zero), and
  the updates are zeroed there after it (so weight decay or any other
  parameter-dependent term cannot move them either). Pruned weights that
  are zero therefore stay exactly zero.

  Args:
    tx: any optax GradientTransformation.
    masks_tree: bools laid out like the params or broadcastable to them per
      leaf (e.g. `mask_tree(model, masks)`): True = trainable.

  Returns:
    An optax GradientTransformation.
  """

  def mask(tree):
    return jax.tree_util.tree_map(_where_kept, tree, masks_tree)

  def init_fn(params):
    return KeepMaskedState(tx.init(params))

  def update_fn(updates, state, params=None):
    updates, inner = tx.update(mask(updates), state.inner, params)
    return mask(updates), KeepMaskedState(inner)

  return optax.GradientTransformation(init_fn, update_fn)


def masked_finetune(model, masks: Mapping[str, Any],
                    optimizer: optax.GradientTransformation,
                    loss_fn: Callable[[Any, Any], jax.Array],
                    batches: Iterable[Any], steps: int | None = None,
                    *, wrt=nnx.Param) -> np.ndarray:
  """Fine-tunes `model` in place with the pruned weights held at zero.

  Each step: loss and gradients of the `wrt` variables, gradients masked,
  optax update, updates masked (keep_masked), and the mask re-applied to
  the new parameters (so a kernel that was not zero at a pruned position
  to begin with is zeroed at the first step, and stays zero).

  Args:
    model: an NNX module; updated in place. Other state that loss_fn
      changes (e.g. BatchNorm statistics in training mode) is kept.
    masks: dotted module path -> bool mask of its kernel (prune_model's).
    optimizer: an optax GradientTransformation, e.g. optax.sgd(1e-2).
    loss_fn: (model, batch) -> scalar loss; jit-compiled once.
    batches: an iterable of batches (any pytrees of arrays). A sequence is
      cycled through when `steps` exceeds its length.
    steps: how many steps (at most, for an iterator that runs out);
      default one pass over `batches`.
    wrt: the nnx filter of the trained variables.

  Returns:
    (steps taken,) numpy float32 array: each step's loss, before its update.
  """
  masks_tree = mask_tree(model, masks, wrt)
  graphdef, params, rest = nnx.split(model, wrt, ...)
  params = jax.tree_util.tree_map(_where_kept, params, masks_tree)
  opt_state = keep_masked(optimizer, masks_tree).init(params)

  @jax.jit
  def step(params, rest, opt_state, masks_tree, batch):
    # The masks come in as arguments, not closed-over constants: embedded in
    # the executable they would double its size for a large model.
    tx = keep_masked(optimizer, masks_tree)

    def loss(p):
      # tree_map rebuilds the state's nodes inside this trace: flax 0.12's
      # merge reuses the Variables of a State, and BatchNorm may only
      # mutate Variables created at the current trace level.
      m = nnx.merge(graphdef, p, jax.tree_util.tree_map(lambda a: a, rest))
      value = loss_fn(m, batch)
      # loss_fn may update non-trained state (BatchNorm statistics, RNG
      # counters): take it back out of the merged copy.
      _, _, new_rest = nnx.split(m, wrt, ...)
      return value, new_rest

    (value, rest), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params = jax.tree_util.tree_map(_where_kept, params, masks_tree)
    return params, rest, opt_state, value

  if steps is None:
    stream = iter(batches)
  elif isinstance(batches, (list, tuple)):
    stream = itertools.islice(itertools.cycle(batches), steps)
  else:
    stream = itertools.islice(batches, steps)
  losses = []
  for batch in stream:
    params, rest, opt_state, value = step(params, rest, opt_state,
                                          masks_tree, batch)
    losses.append(value)
  nnx.update(model, params, rest)
  return np.asarray(jax.device_get(losses), np.float32).reshape(-1)


def nonzero_masks(model, min_sparsity: float = 0.0) -> dict[str, np.ndarray]:
  """Masks of the nonzero kernel entries of every conv / linear layer.

  Recovers prune_model's masks from a pruned model (e.g. one built with
  models.build_model(..., pruned=True)), provided no kept weight is exactly
  zero.

  Args:
    model: an NNX module with concrete parameters.
    min_sparsity: only layers whose fraction of zeros exceeds this (default:
      layers with at least one zero).

  Returns:
    Dotted path -> numpy bool array of the kernel's shape, True = nonzero.
  """
  out = {}
  for path, module in prunable_layers(model).items():
    mask = np.asarray(_get(module.kernel)) != 0
    if mask.size and 1.0 - mask.mean() > min_sparsity:
      out[path] = mask
  return out


def sparsity_report(model, masks: Mapping[str, Any] | None = None
                    ) -> dict[str, float]:
  """Dotted path -> fraction of exact zeros in each conv / linear kernel.

  With `masks`, only those paths.
  """
  layers = prunable_layers(model)
  paths = list(masks) if masks is not None else list(layers)
  out = {}
  for p in paths:
    k = np.asarray(_get(layers[p].kernel))
    out[p] = float(np.mean(k == 0)) if k.size else 0.0
  return out


__all__ = [
    "PRUNABLE", "SKIMCAFFE_PROFILES", "KeepMaskedState", "apply_masks",
    "global_magnitude_masks", "keep_masked", "layer_name", "magnitude_mask",
    "mask_tree", "masked_finetune", "nonzero_masks", "num_kept", "path_str", "prunable_layers",
    "prune_model", "resolve_profile", "sparsity_report", "vector_mask",
]
