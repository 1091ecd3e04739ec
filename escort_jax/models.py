"""CaffeNet, GoogLeNet v1 and ResNet-50 in Flax NNX, named as in Caffe.

The three networks whose pruned SkimCaffe models Escort/Escoin evaluated,
with the layer geometry of the Caffe models (escort_jax/layers.json lists
their pruned conv layers), in NHWC with HWIO kernels:

  CaffeNet   (N, 227, 227, 3) -> (N, num_classes); conv2, conv4, conv5 in
             two groups; local response normalisation as in Caffe (lrn=True).
  GoogLeNet  (N, 224, 224, 3) -> (N, num_classes); inception 3a..5b; the
             auxiliary classifiers (loss1, loss2, used in training only) and
             dropout are left out.
  ResNet50   (N, 224, 224, 3) -> (N, num_classes); Caffe's bottleneck v1
             (stride 2 on the 1x1 branch2a and branch1 convs), BatchNorm +
             Scale as nnx.BatchNorm, in inference mode by default.

Every conv and linear module carries its Caffe layer name in a `caffe_name`
attribute ("conv2", "inception_3a/3x3", "res2a_branch2b", "fc1000"), which
escort_jax.prune uses to look layers up in a sparsity profile; the module's
path in the model follows the Caffe name too ("inception_3a.conv_3x3",
"res2a.branch2b"). `layer_names(model)` maps one to the other.

Pooling follows Caffe: max pooling rounds the output size up (ceil mode), so
GoogLeNet's and ResNet-50's first pool maps 112 to 56. The final average
pools of GoogLeNet and ResNet-50 (7x7 on a 7x7 map in Caffe) are global
means, so smaller inputs work too (64x64 for tests); CaffeNet's fc6 needs
the 6x6x256 map of a 227x227 input.

Dropout is left out of all three (these are inference models); CaffeNet's
fc6 flattens in (H, W, C) order, not Caffe's (C, H, W): permute fc6's rows
when importing Caffe weights.

Builders: `build_model(name, pruned=..., seed=...)`, `caffenet(...)`,
`googlenet(...)`, `resnet50(...)`. With pruned=True the dense model's conv
and fc kernels are magnitude-pruned to SKIMCAFFE_PROFILES[name].
`trace_layers` records the geometry of every layer by tracing a forward pass
with jax.eval_shape (no FLOPs, no parameters allocated).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any

from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp

from escort_jax import prune as prune_lib

# He initialisation: these are ReLU nets, and a random-weight forward pass
# (benchmarks, tests) then keeps activations of order one through the layers
# of CaffeNet and GoogLeNet, which have no normalisation.
_CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")

# --------------------------------------------------------------------------
# Layer recording for trace_layers: each conv / linear call of the models
# goes through _apply, which appends a record while a recorder is active.

_RECORDER: contextvars.ContextVar[list | None] = contextvars.ContextVar(
    "escort_jax_models_recorder", default=None)


def _apply(layer, x):
  y = layer(x)
  records = _RECORDER.get()
  if records is not None:
    records.append(_record(layer, x, y))
  return y


def _pair(v) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  return tuple(int(a) for a in v)  # type: ignore[return-value]


def _record(layer, x, y) -> dict[str, Any]:
  rec: dict[str, Any] = {
      "layer": getattr(layer, "caffe_name", None),
      "type": type(layer).__name__,
      "in_shape": tuple(x.shape),
      "out_shape": tuple(y.shape),
  }
  if hasattr(layer, "kernel_size"):
    (kh, kw) = _pair(layer.kernel_size)
    (sh, sw) = _pair(getattr(layer, "strides", 1) or 1)
    padding = getattr(layer, "padding", None)
    if isinstance(padding, str):
      pads = padding
    elif isinstance(padding, int):
      pads = ((padding, padding), (padding, padding))
    else:
      pads = tuple(_pair(p) for p in padding)
    rec.update(kernel=(kh, kw), stride=(sh, sw), padding=pads,
               groups=int(getattr(layer, "feature_group_count", 1)))
  if hasattr(layer, "in_features"):
    rec.update(in_features=int(layer.in_features),
               out_features=int(layer.out_features))
  return rec


# --------------------------------------------------------------------------
# Building blocks.


def _conv(in_features: int, out_features: int, kernel: int, stride: int = 1,
          pad: int = 0, groups: int = 1, use_bias: bool = True, *,
          name: str, dtype, param_dtype, rngs: nnx.Rngs) -> nnx.Conv:
  """A square Caffe convolution: explicit symmetric padding, HWIO kernel."""
  conv = nnx.Conv(in_features, out_features, (kernel, kernel),
                  strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)),
                  feature_group_count=groups, use_bias=use_bias,
                  kernel_init=_CONV_INIT, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
  conv.caffe_name = name
  return conv


def _linear(in_features: int, out_features: int, *, name: str, dtype,
            param_dtype, rngs: nnx.Rngs) -> nnx.Linear:
  fc = nnx.Linear(in_features, out_features, dtype=dtype,
                  param_dtype=param_dtype, rngs=rngs)
  fc.caffe_name = name
  return fc


def _batch_norm(features: int, *, name: str, use_running_average: bool,
                dtype, param_dtype, rngs: nnx.Rngs) -> nnx.BatchNorm:
  # Caffe's BatchNorm + Scale pair: eps 1e-5, moving-average factor 0.9
  # (Caffe's 0.999 applies to its unnormalised sums).
  bn = nnx.BatchNorm(features, use_running_average=use_running_average,
                     momentum=0.9, epsilon=1e-5, dtype=dtype,
                     param_dtype=param_dtype, rngs=rngs)
  bn.caffe_name = name
  return bn


def max_pool(x: jax.Array, window: int, stride: int, pad: int = 0
             ) -> jax.Array:
  """Caffe's max pooling of (N, H, W, C): output size rounded up.

  Output size ceil((H + 2 * pad - window) / stride) + 1, less one when the
  last window would start inside the bottom / right padding (Caffe's rule).
  Padding never wins the max (it is -inf).
  """

  def extra(size: int) -> tuple[int, int]:
    out = -(-(size + 2 * pad - window) // stride) + 1
    if pad and (out - 1) * stride >= size + pad:
      out -= 1
    return (pad, max(0, (out - 1) * stride + window - size - pad))

  _, h, w, _ = x.shape
  if jnp.issubdtype(x.dtype, jnp.floating):
    init = jnp.array(-jnp.inf, x.dtype)
  else:
    init = jnp.array(jnp.iinfo(x.dtype).min, x.dtype)
  return lax.reduce_window(x, init, lax.max, (1, window, window, 1),
                           (1, stride, stride, 1),
                           ((0, 0), extra(h), extra(w), (0, 0)))


def local_response_norm(x: jax.Array, size: int = 5, alpha: float = 1e-4,
                        beta: float = 0.75, k: float = 1.0) -> jax.Array:
  """Caffe's across-channel LRN of (N, H, W, C): x / (k + a/n sum x^2)^b.

  The sum runs over `size` channels centred on each channel (zero-padded),
  computed in float32 at least.
  """
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  half = (size - 1) // 2
  sq = lax.reduce_window(xf * xf, jnp.array(0, xf.dtype), lax.add,
                         (1, 1, 1, size), (1, 1, 1, 1),
                         ((0, 0), (0, 0), (0, 0), (half, size - 1 - half)))
  return (xf / (k + (alpha / size) * sq) ** beta).astype(x.dtype)


def _global_avg_pool(x: jax.Array) -> jax.Array:
  """(N, H, W, C) -> (N, C); Caffe's 7x7 average pool of a 7x7 map."""
  return jnp.mean(x, axis=(1, 2))


# --------------------------------------------------------------------------
# CaffeNet.


class CaffeNet(nnx.Module):
  """BVLC reference CaffeNet (AlexNet with pool before norm), NHWC.

  Input (N, 227, 227, 3); output (N, num_classes) logits.
  conv1 11x11/4 -> pool 3/2 -> LRN -> conv2 5x5 g2 -> pool -> LRN ->
  conv3 3x3 -> conv4 3x3 g2 -> conv5 3x3 g2 -> pool -> fc6 -> fc7 -> fc8.
  Grouped convs use feature_group_count=2 (HWIO kernel (R, S, C / 2, O)).
  """

  input_shape = (227, 227, 3)

  def __init__(self, num_classes: int = 1000, *, lrn: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lrn = lrn
    self.conv1 = _conv(3, 96, 11, 4, 0, name="conv1", **kw)
    self.conv2 = _conv(96, 256, 5, 1, 2, groups=2, name="conv2", **kw)
    self.conv3 = _conv(256, 384, 3, 1, 1, name="conv3", **kw)
    self.conv4 = _conv(384, 384, 3, 1, 1, groups=2, name="conv4", **kw)
    self.conv5 = _conv(384, 256, 3, 1, 1, groups=2, name="conv5", **kw)
    self.fc6 = _linear(6 * 6 * 256, 4096, name="fc6", **kw)
    self.fc7 = _linear(4096, 4096, name="fc7", **kw)
    self.fc8 = _linear(4096, num_classes, name="fc8", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    norm = local_response_norm if self.lrn else (lambda y: y)
    x = norm(max_pool(nnx.relu(_apply(self.conv1, x)), 3, 2))
    x = norm(max_pool(nnx.relu(_apply(self.conv2, x)), 3, 2))
    x = nnx.relu(_apply(self.conv3, x))
    x = nnx.relu(_apply(self.conv4, x))
    x = max_pool(nnx.relu(_apply(self.conv5, x)), 3, 2)
    x = x.reshape(x.shape[0], -1)  # (N, 6 * 6 * 256), (H, W, C) order
    x = nnx.relu(_apply(self.fc6, x))
    x = nnx.relu(_apply(self.fc7, x))
    return _apply(self.fc8, x)


# --------------------------------------------------------------------------
# GoogLeNet.


class Inception(nnx.Module):
  """An inception module: four branches concatenated on channels.

  (N, H, W, in_features) -> (N, H, W, c1x1 + c3x3 + c5x5 + pool_proj).
  Modules conv_1x1, conv_3x3_reduce, conv_3x3, conv_5x5_reduce, conv_5x5,
  pool_proj are Caffe's "<name>/1x1", ..., "<name>/pool_proj".
  """

  def __init__(self, in_features: int, c1x1: int, c3x3_reduce: int,
               c3x3: int, c5x5_reduce: int, c5x5: int, pool_proj: int, *,
               name: str, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.conv_1x1 = _conv(in_features, c1x1, 1, name=f"{name}/1x1", **kw)
    self.conv_3x3_reduce = _conv(in_features, c3x3_reduce, 1,
                                 name=f"{name}/3x3_reduce", **kw)
    self.conv_3x3 = _conv(c3x3_reduce, c3x3, 3, 1, 1, name=f"{name}/3x3",
                          **kw)
    self.conv_5x5_reduce = _conv(in_features, c5x5_reduce, 1,
                                 name=f"{name}/5x5_reduce", **kw)
    self.conv_5x5 = _conv(c5x5_reduce, c5x5, 5, 1, 2, name=f"{name}/5x5",
                          **kw)
    self.pool_proj = _conv(in_features, pool_proj, 1,
                           name=f"{name}/pool_proj", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    relu = nnx.relu
    b1 = relu(_apply(self.conv_1x1, x))
    b3 = relu(_apply(self.conv_3x3, relu(_apply(self.conv_3x3_reduce, x))))
    b5 = relu(_apply(self.conv_5x5, relu(_apply(self.conv_5x5_reduce, x))))
    bp = relu(_apply(self.pool_proj, max_pool(x, 3, 1, 1)))
    return jnp.concatenate([b1, b3, b5, bp], axis=-1)


# name: (in, 1x1, 3x3 reduce, 3x3, 5x5 reduce, 5x5, pool proj), Caffe's
# bvlc_googlenet; a max pool 3/2 precedes 4a and 5a.
GOOGLENET_INCEPTIONS = {
    "inception_3a": (192, 64, 96, 128, 16, 32, 32),
    "inception_3b": (256, 128, 128, 192, 32, 96, 64),
    "inception_4a": (480, 192, 96, 208, 16, 48, 64),
    "inception_4b": (512, 160, 112, 224, 24, 64, 64),
    "inception_4c": (512, 128, 128, 256, 24, 64, 64),
    "inception_4d": (512, 112, 144, 288, 32, 64, 64),
    "inception_4e": (528, 256, 160, 320, 32, 128, 128),
    "inception_5a": (832, 256, 160, 320, 32, 128, 128),
    "inception_5b": (832, 384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nnx.Module):
  """BVLC GoogLeNet (Inception v1) without auxiliary classifiers, NHWC.

  Input (N, 224, 224, 3) (or smaller: the last pool is global); output
  (N, num_classes) logits. conv1/7x7_s2 -> pool -> LRN -> conv2/3x3_reduce
  -> conv2/3x3 -> LRN -> pool -> 3a, 3b -> pool -> 4a..4e -> pool -> 5a, 5b
  -> global average pool -> loss3/classifier.
  """

  input_shape = (224, 224, 3)

  def __init__(self, num_classes: int = 1000, *, lrn: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.lrn = lrn
    self.conv1 = _conv(3, 64, 7, 2, 3, name="conv1/7x7_s2", **kw)
    self.conv2_reduce = _conv(64, 64, 1, name="conv2/3x3_reduce", **kw)
    self.conv2 = _conv(64, 192, 3, 1, 1, name="conv2/3x3", **kw)
    for name, cfg in GOOGLENET_INCEPTIONS.items():
      setattr(self, name, Inception(*cfg, name=name, **kw))
    self.classifier = _linear(1024, num_classes, name="loss3/classifier",
                              **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    norm = local_response_norm if self.lrn else (lambda y: y)
    x = norm(max_pool(nnx.relu(_apply(self.conv1, x)), 3, 2))
    x = nnx.relu(_apply(self.conv2_reduce, x))
    x = max_pool(norm(nnx.relu(_apply(self.conv2, x))), 3, 2)
    for name in GOOGLENET_INCEPTIONS:
      if name in ("inception_4a", "inception_5a"):
        x = max_pool(x, 3, 2)
      x = getattr(self, name)(x)
    return _apply(self.classifier, _global_avg_pool(x))


# --------------------------------------------------------------------------
# ResNet-50.


class Bottleneck(nnx.Module):
  """Caffe ResNet-50's bottleneck block "res<name>" (v1, post-activation).

  (N, H, W, in_features) -> (N, H / stride, W / stride, out_features).
  branch2a 1x1/stride -> branch2b 3x3 -> branch2c 1x1, each followed by its
  BatchNorm (bn<name>_branch2x); branch1 (1x1/stride + BN) projects the
  shortcut when `projection`, else the shortcut is the identity. As in
  Caffe's model (not torchvision's), the stride sits on the 1x1 convs.
  """

  def __init__(self, in_features: int, mid_features: int, out_features: int,
               stride: int, projection: bool, *, name: str,
               use_running_average: bool = True, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    bn = dict(use_running_average=use_running_average, **kw)
    if projection:
      self.branch1 = _conv(in_features, out_features, 1, stride,
                           use_bias=False, name=f"res{name}_branch1", **kw)
      self.bn_branch1 = _batch_norm(out_features, name=f"bn{name}_branch1",
                                    **bn)
    else:
      self.branch1 = None
      self.bn_branch1 = None
    self.branch2a = _conv(in_features, mid_features, 1, stride,
                          use_bias=False, name=f"res{name}_branch2a", **kw)
    self.bn_branch2a = _batch_norm(mid_features, name=f"bn{name}_branch2a",
                                   **bn)
    self.branch2b = _conv(mid_features, mid_features, 3, 1, 1,
                          use_bias=False, name=f"res{name}_branch2b", **kw)
    self.bn_branch2b = _batch_norm(mid_features, name=f"bn{name}_branch2b",
                                   **bn)
    self.branch2c = _conv(mid_features, out_features, 1, use_bias=False,
                          name=f"res{name}_branch2c", **kw)
    self.bn_branch2c = _batch_norm(out_features, name=f"bn{name}_branch2c",
                                   **bn)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.branch1 is not None:
      shortcut = self.bn_branch1(_apply(self.branch1, x))
    else:
      shortcut = x
    y = nnx.relu(self.bn_branch2a(_apply(self.branch2a, x)))
    y = nnx.relu(self.bn_branch2b(_apply(self.branch2b, y)))
    y = self.bn_branch2c(_apply(self.branch2c, y))
    return nnx.relu(y + shortcut)


# stage: (blocks, mid features, out features, stride of the first block)
RESNET50_STAGES = {
    2: (3, 64, 256, 1),
    3: (4, 128, 512, 2),
    4: (6, 256, 1024, 2),
    5: (3, 512, 2048, 2),
}


def _resnet50_blocks():
  """(block name "2a", in, mid, out, stride, projection) in forward order."""
  in_features = 64
  for stage, (n, mid, out, stride) in RESNET50_STAGES.items():
    for i in range(n):
      yield (f"{stage}{'abcdefgh'[i]}", in_features, mid, out,
             stride if i == 0 else 1, i == 0)
      in_features = out


class ResNet50(nnx.Module):
  """Caffe's ResNet-50 (He et al. 2015), NHWC.

  Input (N, 224, 224, 3) (or smaller: the last pool is global); output
  (N, num_classes) logits. conv1 7x7/2 + bn_conv1 -> max pool 3/2 (ceil)
  -> res2a..res2c, res3a..res3d, res4a..res4f, res5a..res5c (attributes
  res2a, ...) -> global average pool -> fc1000.

  Args:
    use_running_average: the BatchNorm mode of every BN layer; True
      (inference, the default) uses and keeps the stored statistics.
  """

  input_shape = (224, 224, 3)

  def __init__(self, num_classes: int = 1000, *,
               use_running_average: bool = True, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    # Caffe's conv1 has a bias (the block convs do not).
    self.conv1 = _conv(3, 64, 7, 2, 3, name="conv1", **kw)
    self.bn_conv1 = _batch_norm(64, name="bn_conv1",
                                use_running_average=use_running_average,
                                **kw)
    for name, cin, mid, out, stride, proj in _resnet50_blocks():
      setattr(self, f"res{name}", Bottleneck(
          cin, mid, out, stride, proj, name=name,
          use_running_average=use_running_average, **kw))
    self.fc1000 = _linear(2048, num_classes, name="fc1000", **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn_conv1(_apply(self.conv1, x)))
    x = max_pool(x, 3, 2)
    for name, *_ in _resnet50_blocks():
      x = getattr(self, f"res{name}")(x)
    return _apply(self.fc1000, _global_avg_pool(x))


# --------------------------------------------------------------------------
# Builders and introspection.

MODELS = {"caffenet": CaffeNet, "googlenet": GoogLeNet, "resnet50": ResNet50}
INPUT_SHAPES = {name: cls.input_shape for name, cls in MODELS.items()}
"""net -> the (H, W, C) input shape of its Caffe model."""


def _model_class(name: str):
  try:
    return MODELS[name]
  except KeyError:
    raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}"
                     ) from None


def build_model(name: str, *, pruned: bool = False, seed: int = 0,
                rngs: nnx.Rngs | None = None, num_classes: int = 1000,
                dtype=None, param_dtype=jnp.float32,
                vector_width: int | None = None, column_multiple: int = 1,
                **kwargs):
  """Builds "caffenet", "googlenet" or "resnet50" with random weights.

  Args:
    name: the net.
    pruned: magnitude-prune the conv and fc kernels to the net's SkimCaffe
      profile (prune.SKIMCAFFE_PROFILES[name]); the result is a dense model
      with exact zeros (see prune.prune_model; `nonzero_masks` recovers the
      masks).
    seed: seeds nnx.Rngs(seed) when `rngs` is not given.
    rngs: the parameter RNGs.
    num_classes, dtype, param_dtype: as the model classes take them. For
      a model that computes in bfloat16 give both: with dtype=None each
      nnx.BatchNorm (ResNet-50's) returns float32, its running statistics'
      dtype, and what follows it computes in float32.
    vector_width: with pruned=True, prune V-wide output-channel vectors
      (prune.vector_mask); V must divide every pruned layer's outputs.
    column_multiple: with vector_width, each block keeps a multiple of this
      many positions (prune.vector_mask; structure.ALIGNED_COLUMNS is the
      one the vector kernel loads fastest).
    **kwargs: more constructor arguments (lrn, use_running_average).

  Returns:
    The model.
  """
  cls = _model_class(name)
  model = cls(num_classes, dtype=dtype, param_dtype=param_dtype,
              rngs=rngs if rngs is not None else nnx.Rngs(seed), **kwargs)
  if pruned:
    model, _ = prune_lib.prune_model(model, profile=name, inplace=True,
                                     vector_width=vector_width,
                                     column_multiple=column_multiple)
  return model


def caffenet(*, pruned: bool = False, seed: int = 0, **kwargs) -> CaffeNet:
  """build_model("caffenet", ...)."""
  return build_model("caffenet", pruned=pruned, seed=seed, **kwargs)


def googlenet(*, pruned: bool = False, seed: int = 0, **kwargs) -> GoogLeNet:
  """build_model("googlenet", ...)."""
  return build_model("googlenet", pruned=pruned, seed=seed, **kwargs)


def resnet50(*, pruned: bool = False, seed: int = 0, **kwargs) -> ResNet50:
  """build_model("resnet50", ...)."""
  return build_model("resnet50", pruned=pruned, seed=seed, **kwargs)


def layer_names(model, types: tuple[type, ...] | None = None
                ) -> dict[str, str]:
  """Dotted module path -> Caffe layer name, for modules with a caffe_name.

  Args:
    model: an NNX module.
    types: only modules of these types (e.g. (nnx.Conv,)); default all.
  """
  out = {}
  for path, node in nnx.iter_graph(model):
    name = getattr(node, "caffe_name", None)
    if isinstance(name, str) and isinstance(node, nnx.Module) and (
        types is None or isinstance(node, types)):
      out[prune_lib.path_str(path)] = name
  return out


def conv_layer_names(model) -> dict[str, str]:
  """Dotted path -> Caffe name of every nnx.Conv of the model."""
  return layer_names(model, (nnx.Conv,))


@contextlib.contextmanager
def _recording():
  records: list[dict[str, Any]] = []
  token = _RECORDER.set(records)
  try:
    yield records
  finally:
    _RECORDER.reset(token)


def trace_layers(model, batch: int = 1, input_shape=None, dtype=jnp.float32
                 ) -> list[dict[str, Any]]:
  """Records each conv and linear call of one forward pass, in call order.

  Traces with jax.eval_shape, so nothing is computed; given a net name the
  model is built abstractly (nnx.eval_shape) and no parameter is allocated.

  Args:
    model: a net name of MODELS, or a model of this module.
    batch: N of the traced input.
    input_shape: (H, W, C); default the model's Caffe input shape.
    dtype: the input dtype.

  Returns:
    One dict per call: "layer" (caffe_name), "type", "in_shape" and
    "out_shape" (NHWC or (N, features)); convs add "kernel", "stride"
    ((h, w) pairs), "padding" (((top, bottom), (left, right)) or a string)
    and "groups"; all add "in_features" and "out_features".
  """
  if isinstance(model, str):
    cls = _model_class(model)
    model = nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0)))
  if input_shape is None:
    input_shape = model.input_shape
  graphdef, state = nnx.split(model)
  state = jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
  x = jax.ShapeDtypeStruct((batch, *input_shape), dtype)
  with _recording() as records:
    jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
  return records


def conv_table(model) -> list[dict[str, Any]]:
  """The model's conv layers in escort_jax/layers.json's format.

  Args:
    model: a net name or a model (see trace_layers).

  Returns:
    One dict per nnx.Conv call with keys layer, in_channels, out_channels,
    in_hw, kernel, stride, padding, groups (square kernels, strides and
    symmetric padding, as all convs of these nets have) and out_hw.
  """
  out = []
  for rec in trace_layers(model):
    if "kernel" not in rec:
      continue
    (top, bottom), (left, right) = rec["padding"]
    kh, kw = rec["kernel"]
    sh, sw = rec["stride"]
    _, h, w, _ = rec["in_shape"]
    if not (kh == kw and sh == sw and top == bottom == left == right
            and h == w):
      raise ValueError(f"layer {rec['layer']} is not square: {rec}")
    out.append({
        "layer": rec["layer"], "in_channels": rec["in_features"],
        "out_channels": rec["out_features"], "in_hw": h, "kernel": kh,
        "stride": sh, "padding": top, "groups": rec["groups"],
        "out_hw": rec["out_shape"][1],
    })
  return out


def num_params(model) -> int:
  """The number of parameter entries (nnx.Param) of a model."""
  return sum(math.prod(a.shape) for a in jax.tree_util.tree_leaves(
      nnx.state(model, nnx.Param)))


__all__ = [
    "Bottleneck", "CaffeNet", "GOOGLENET_INCEPTIONS", "GoogLeNet",
    "INPUT_SHAPES", "Inception", "MODELS", "RESNET50_STAGES", "ResNet50",
    "build_model", "caffenet", "conv_layer_names", "conv_table",
    "googlenet", "layer_names", "local_response_norm", "max_pool",
    "num_params", "resnet50", "trace_layers",
]
