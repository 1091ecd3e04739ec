"""The benchmark workload: the pruned conv layers of CaffeNet, GoogLeNet-v1
and ResNet-50 (escort_jax/layers.json), with random kernels and inputs.

layers.json lists 40 conv layers with the per-layer weight sparsity of the
pruned models published with SkimCaffe; 39 are pruned (caffenet/conv1 is
dense). The standard workload (/work/shared/BENCHMARKING.md) keeps
round(size * (1 - sparsity)) random N(0, 1) weights at positions drawn
uniformly over the whole kernel, with a fixed seed per layer, and feeds
random N(0, 1) inputs. make_kernel(..., vector_width=V) draws the
vector-sparse variant instead: whole vectors of V consecutive output channels
at one kernel position (r, s, c), for the method="vector" kernel.

Layouts: kernels are HWIO (k, k, in_channels / groups, out_channels), inputs
NHWC (batch, in_hw, in_hw, in_channels); padding is symmetric.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence
import zlib

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax.structure import select_vectors

__all__ = ["Layer", "batch_sizes", "find_layers", "get_layer", "layer_seed",
           "layer_vector_widths", "load_layers", "make_input", "make_kernel",
           "pruned_layers"]

LAYERS_FILE = Path(__file__).resolve().parent / "layers.json"


@dataclasses.dataclass(frozen=True)
class Layer:
  """One convolution layer of the workload (Caffe semantics, per image).

  Attributes:
    net, layer: e.g. "resnet50", "res3a_branch2b".
    in_channels, out_channels: C and O.
    in_hw: input height = width.
    kernel: kernel height = width (k).
    stride: stride in both dimensions.
    padding: symmetric padding on every side.
    groups: feature groups.
    sparsity: published fraction of zero weights (0.0: not pruned).
  """

  net: str
  layer: str
  in_channels: int
  out_channels: int
  in_hw: int
  kernel: int
  stride: int
  padding: int
  groups: int
  sparsity: float

  @property
  def name(self) -> str:
    """"net/layer", e.g. "googlenet/inception_3a/3x3"."""
    return f"{self.net}/{self.layer}"

  @property
  def kernel_shape(self) -> tuple[int, int, int, int]:
    """HWIO: (k, k, in_channels / groups, out_channels)."""
    return (self.kernel, self.kernel, self.in_channels // self.groups,
            self.out_channels)

  @property
  def size(self) -> int:
    """Weights in the dense kernel."""
    return int(np.prod(self.kernel_shape))

  @property
  def out_hw(self) -> int:
    """Output height = width."""
    return (self.in_hw + 2 * self.padding - self.kernel) // self.stride + 1

  @property
  def pruned(self) -> bool:
    """Whether the published model pruned this layer (sparsity > 0)."""
    return self.sparsity > 0

  def nnz(self, sparsity: float | None = None,
          vector_width: int | None = None) -> int:
    """round(size * (1 - sparsity)): the weights kept (published sparsity
    by default); with vector_width V, V * round(size * (1 - sparsity) / V)
    (whole V-vectors are kept)."""
    sp = self.sparsity if sparsity is None else float(sparsity)
    if vector_width is None:
      return int(round(self.size * (1.0 - sp)))
    v = int(vector_width)
    return v * int(round(self.size * (1.0 - sp) / v))

  def check_vector_width(self, vector_width: int) -> int:
    """V as an int, if whole V-vectors of output channels fit the layer.

    Raises:
      ValueError: V is not positive, or does not divide the output channels
        of each feature group (a vector never straddles two groups).
    """
    v = int(vector_width)
    if v != vector_width or v <= 0:
      raise ValueError(f"vector_width must be a positive integer, got "
                       f"{vector_width!r}")
    per_group = self.out_channels // self.groups
    if self.out_channels % v or per_group % v:
      raise ValueError(
          f"{self.name}: vector_width={v} does not divide its "
          f"{self.out_channels} output channels"
          + (f" ({per_group} per feature group)" if self.groups > 1 else "")
          + "; vectors of V consecutive output channels must tile them")
    return v

  def input_shape(self, batch: int) -> tuple[int, int, int, int]:
    """NHWC: (batch, in_hw, in_hw, in_channels)."""
    return (batch, self.in_hw, self.in_hw, self.in_channels)

  def output_shape(self, batch: int) -> tuple[int, int, int, int]:
    """NHWC: (batch, out_hw, out_hw, out_channels)."""
    return (batch, self.out_hw, self.out_hw, self.out_channels)

  @property
  def window_strides(self) -> tuple[int, int]:
    """(stride, stride)."""
    return (self.stride, self.stride)

  @property
  def explicit_padding(self) -> tuple[tuple[int, int], tuple[int, int]]:
    """((p, p), (p, p))."""
    p = self.padding
    return ((p, p), (p, p))

  def conv_kwargs(self) -> dict[str, Any]:
    """window_strides, padding and feature_group_count, for sparse_conv,
    the baselines or lax.conv_general_dilated (NHWC / HWIO)."""
    return dict(window_strides=self.window_strides,
                padding=self.explicit_padding,
                feature_group_count=self.groups)

  def useful_flops(self, batch: int, sparsity: float | None = None,
                   vector_width: int | None = None) -> int:
    """2 * nnz * Ho * Wo * batch."""
    return (2 * self.nnz(sparsity, vector_width) * self.out_hw * self.out_hw
            * batch)

  def dense_flops(self, batch: int) -> int:
    """2 * size * Ho * Wo * batch: the dense convolution's FLOPs."""
    return 2 * self.size * self.out_hw * self.out_hw * batch

  def scaled(self, max_hw: int | None) -> Layer:
    """The layer with its input size capped at max_hw (channels, kernel,
    stride and groups unchanged), for quick CPU runs; at least one output
    pixel is kept."""
    if max_hw is None or self.in_hw <= max_hw:
      return self
    hw = max(int(max_hw), self.kernel - 2 * self.padding, 1)
    return dataclasses.replace(self, in_hw=min(hw, self.in_hw))

  def to_dict(self) -> dict[str, Any]:
    """The layer as the dict of layers.json."""
    return dataclasses.asdict(self)


@functools.lru_cache(maxsize=None)
def _load(path: str) -> tuple[tuple[Layer, ...], tuple[int, ...]]:
  with open(path) as f:
    data = json.load(f)
  fields = {f.name for f in dataclasses.fields(Layer)}
  layers = tuple(
      Layer(**{k: v for k, v in entry.items() if k in fields})
      for entry in data["layers"])
  return layers, tuple(data.get("batch_sizes", (1, 32)))


def load_layers(path: str | Path | None = None) -> list[Layer]:
  """All layers of layers.json (40), in file order."""
  return list(_load(str(path or LAYERS_FILE))[0])


def pruned_layers(path: str | Path | None = None) -> list[Layer]:
  """The layers with published sparsity > 0 (39)."""
  return [l for l in load_layers(path) if l.pruned]


def batch_sizes(path: str | Path | None = None) -> list[int]:
  """The workload's batch sizes ([1, 32])."""
  return list(_load(str(path or LAYERS_FILE))[1])


def get_layer(name: str, path: str | Path | None = None) -> Layer:
  """The layer named exactly "net/layer"."""
  for l in load_layers(path):
    if l.name == name:
      return l
  raise KeyError(f"no layer named {name!r}; names look like "
                 "'resnet50/res3a_branch2b' (see escort_jax/layers.json)")


def find_layers(selectors: Iterable[str] | None = None,
                nets: Iterable[str] | None = None,
                pool: Sequence[Layer] | None = None) -> list[Layer]:
  """Layers matching any selector, in workload order.

  A selector matches a layer whose "net/layer" name equals it, or, failing
  an exact match anywhere, contains it as a substring (case-insensitive).
  `nets` restricts to those networks. With no selectors, every layer of
  `pool` (default: all 40) is returned.

  Raises:
    KeyError: a selector or net matches nothing.
  """
  pool = list(load_layers() if pool is None else pool)
  if nets:
    nets = [n.lower() for n in nets]
    known = sorted({l.net for l in load_layers()})
    for n in nets:
      if n not in known:
        raise KeyError(f"unknown net {n!r}; expected one of {known}")
    pool = [l for l in pool if l.net.lower() in nets]
  if not selectors:
    return pool
  chosen: set[str] = set()
  for sel in selectors:
    s = sel.strip().lower()
    if not s:
      continue
    exact = [l for l in pool if l.name.lower() == s]
    hits = exact or [l for l in pool if s in l.name.lower()]
    if not hits:
      raise KeyError(
          f"no layer matches {sel!r}; use 'net/layer' names or substrings, "
          "e.g. 'resnet50/res3a_branch2b', 'res4', 'inception_3a'")
    chosen.update(l.name for l in hits)
  return [l for l in pool if l.name in chosen]


def layer_vector_widths(
    layers: Iterable[Layer], vector_widths: Iterable[int | None],
    on_skip: Callable[[Layer, int, ValueError], Any] | None = None
) -> Iterator[tuple[Layer, int | None]]:
  """(layer, V) for each layer and each V of vector_widths (None: the
  unstructured kernel), in that order, where whole V-vectors fit the layer
  (Layer.check_vector_width); for the others on_skip(layer, V, error) is
  called instead, if given."""
  vector_widths = list(vector_widths)
  for layer in layers:
    for v in vector_widths:
      if v is not None:
        try:
          layer.check_vector_width(v)
        except ValueError as e:
          if on_skip is not None:
            on_skip(layer, v, e)
          continue
      yield layer, v


def layer_seed(layer: Layer) -> int:
  """The layer's fixed seed: crc32 of "net/layer"."""
  return zlib.crc32(layer.name.encode("utf-8"))


def make_kernel(layer: Layer, sparsity: float | None = None,
                seed: int | None = None, dtype=np.float32,
                vector_width: int | None = None,
                column_multiple: int = 1) -> np.ndarray:
  """A random pruned HWIO kernel (k, k, in/groups, out) for `layer`.

  Keeps exactly round(size * (1 - sparsity)) N(0, 1) weights, at positions
  drawn uniformly (without replacement) over the whole kernel; the rest are
  zero. The seed defaults to layer_seed(layer), so the kernel is fixed per
  layer. The kept positions are a prefix of one random permutation per seed,
  so the kernels of a sparsity sweep are nested (fewer weights are a subset
  of more), and the values at the kept positions do not depend on sparsity.
  Kept weights are never zero, also after rounding to `dtype`.

  With vector_width V the kernel is vector-sparse instead: it keeps
  round(size * (1 - sparsity) / V) whole V-vectors, each the V consecutive
  output channels b*V .. b*V + V - 1 at one kernel position (r, s, c), drawn
  uniformly (without replacement) from the size / V vectors, again as a
  prefix of one permutation per (seed, V), so nested across sparsities;
  exactly V times that many nonzeros. The values are those of the
  unstructured kernel at the same positions. With column_multiple m > 1,
  each block of V output channels keeps its count among those vectors
  rounded to the nearest multiple of m, its first that many in the same
  permutation (structure.select_vectors; still nested), so the total can
  differ by up to m / 2 vectors per block.

  Args:
    layer: the workload layer.
    sparsity: fraction of zero weights (default: the layer's published one).
    seed: overrides the per-layer seed.
    dtype: a numpy or jax dtype (float32, bfloat16, ...).
    vector_width: V, or None for unstructured sparsity.
    column_multiple: see above (vector kernels only).

  Raises:
    ValueError: sparsity outside [0, 1], or V does not divide the layer's
      output channels (per feature group).
  """
  sp = layer.sparsity if sparsity is None else float(sparsity)
  if not 0.0 <= sp <= 1.0:
    raise ValueError(f"sparsity must lie in [0, 1], got {sp}")
  seed = layer_seed(layer) if seed is None else int(seed)
  size = layer.size
  if vector_width is None:
    keep = layer.nnz(sp)
    positions = np.random.default_rng([seed, 0]).permutation(size)[:keep]
  else:
    v = layer.check_vector_width(vector_width)
    keep = layer.nnz(sp, v) // v
    # HWIO with O innermost: vector i holds the flat positions i*V .. i*V+V-1.
    vectors = np.random.default_rng([seed, 2, v]).permutation(size // v)
    chosen = np.flatnonzero(select_vectors(
        vectors, keep, layer.kernel_shape[-1] // v, column_multiple))
    positions = (chosen[:, None] * v + np.arange(v)).reshape(-1)
  values = np.random.default_rng([seed, 1]).standard_normal(size)
  dtype = jnp.dtype(dtype)
  kept = values[positions].astype(dtype)
  # A draw that rounds to zero in `dtype` would silently drop a weight.
  kept = np.where(kept == 0, np.ones((), dtype), kept)
  flat = np.zeros(size, dtype)
  flat[positions] = kept
  return flat.reshape(layer.kernel_shape)


def make_input(layer: Layer, batch: int, seed: int = 0, dtype=jnp.float32,
               in_hw: int | None = None) -> jax.Array:
  """A random N(0, 1) NHWC input (batch, in_hw, in_hw, in_channels), on the
  default device. Drawn with jax.random (fast on the GPU) from `seed` and the
  layer's seed, in float32, then rounded to `dtype`."""
  hw = layer.in_hw if in_hw is None else int(in_hw)
  key = jax.random.fold_in(jax.random.key(int(seed)),
                           layer_seed(layer) & 0x7FFFFFFF)
  x = jax.random.normal(key, (int(batch), hw, hw, layer.in_channels),
                        jnp.float32)
  return x.astype(dtype)
