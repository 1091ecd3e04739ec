"""Tests of escort_jax.models: Caffe geometry, names, pruned builds.

Full 224x224 passes are only traced (jax.eval_shape); concrete forward
passes use 32x32 inputs (the last pools are global). Building CaffeNet and
GoogLeNet with jax's initializers costs 15-40 s of per-shape compiles on a
small CPU, so their pruning is tested on numpy-filled models and
build_model(pruned=True) on ResNet-50 only.
"""

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import models, prune
from escort_jax.prune import _get

LAYERS = json.loads(pathlib.Path(models.__file__).with_name(
    "layers.json").read_text())["layers"]
GEOMETRY = ("in_channels", "out_channels", "in_hw", "kernel", "stride",
            "padding", "groups")


@pytest.fixture(scope="module")
def conv_tables():
  return {net: models.conv_table(net) for net in models.MODELS}


@pytest.fixture(scope="module")
def abstract_models():
  return {net: nnx.eval_shape(lambda cls=cls: cls(rngs=nnx.Rngs(0)))
          for net, cls in models.MODELS.items()}


def _random_model(net, seed=0):
  """A concrete model filled from numpy (fast: no per-shape compiles).

  Gaussian weights with He scale; BatchNorm keeps scale 1, bias 0, mean 0,
  var 1. For pruning tests, which need values but not jax's initializers.
  """
  cls = models.MODELS[net]
  graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(a.shape[:-1]))
      w = rng.standard_normal(a.shape, np.float32) * np.sqrt(2 / fan_in)
      return jnp.asarray(w, a.dtype)
    if "scale" in name or "var" in name:
      return jnp.ones(a.shape, a.dtype)
    return jnp.zeros(a.shape, a.dtype)  # biases, BatchNorm means

  leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
  new = [fill(p, a) for p, a in leaves]
  return nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, new))


# --------------------------------------------------------------------------
# Geometry against layers.json, by tracing only.


def test_all_40_pruned_layers_match_layers_json(conv_tables):
  assert len(LAYERS) == 40
  for layer in LAYERS:
    table = {r["layer"]: r for r in conv_tables[layer["net"]]}
    rec = table[layer["layer"]]
    got = {k: rec[k] for k in GEOMETRY}
    want = {k: layer[k] for k in GEOMETRY}
    assert got == want, layer["layer"]
    # The output size follows from Caffe's formula.
    assert rec["out_hw"] == (layer["in_hw"] + 2 * layer["padding"]
                             - layer["kernel"]) // layer["stride"] + 1


def test_conv_counts_and_unique_names(conv_tables):
  assert {net: len(t) for net, t in conv_tables.items()} == {
      "caffenet": 5, "googlenet": 57, "resnet50": 53}
  for table in conv_tables.values():
    names = [r["layer"] for r in table]
    assert len(set(names)) == len(names) and None not in names


def test_caffenet_groups_and_fc_shapes():
  recs = {r["layer"]: r for r in models.trace_layers("caffenet", batch=2)}
  assert [recs[n]["groups"] for n in ("conv1", "conv2", "conv3", "conv4",
                                      "conv5")] == [1, 2, 1, 2, 2]
  assert recs["conv5"]["out_shape"] == (2, 13, 13, 256)
  assert recs["fc6"]["in_shape"] == (2, 9216)
  assert recs["fc8"]["out_shape"] == (2, 1000)


def test_resnet50_strides_on_1x1(conv_tables):
  table = {r["layer"]: r for r in conv_tables["resnet50"]}
  for stage, hw in ((3, 56), (4, 28), (5, 14)):
    for branch in ("branch1", "branch2a"):
      rec = table[f"res{stage}a_{branch}"]
      assert (rec["kernel"], rec["stride"], rec["in_hw"]) == (1, 2, hw)
    assert table[f"res{stage}a_branch2b"]["stride"] == 1
  assert table["res2a_branch1"]["stride"] == 1
  assert table["res5c_branch2c"]["out_channels"] == 2048


def test_googlenet_inception_widths():
  recs = models.trace_layers("googlenet")
  assert [r["in_shape"][-1] for r in recs
          if r["layer"].endswith("/1x1")] == [
              192, 256, 480, 512, 512, 512, 528, 832, 832]
  assert recs[-1]["layer"] == "loss3/classifier"
  assert recs[-1]["in_shape"] == (1, 1024)


@pytest.mark.parametrize("net", sorted(models.MODELS))
def test_eval_shape_forward(net, abstract_models):
  model = abstract_models[net]
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((2, *models.INPUT_SHAPES[net]), jnp.float32)
  out = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
  assert out.shape == (2, 1000) and out.dtype == jnp.float32
  # num_classes, dtype and param_dtype reach the layers.
  small = nnx.eval_shape(lambda: models.MODELS[net](
      10, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
      rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(small)
  out = jax.eval_shape(lambda s, v: nnx.merge(graphdef, s)(v), state, x)
  assert out.shape == (2, 10) and out.dtype == jnp.bfloat16
  assert all(a.dtype == jnp.bfloat16 for a in jax.tree_util.tree_leaves(
      nnx.state(small, nnx.Param)))


def test_parameter_counts(abstract_models):
  # The published sizes (Caffe's, with biases and BN scale/shift).
  assert models.num_params(abstract_models["caffenet"]) == 60_965_224
  assert models.num_params(abstract_models["googlenet"]) == 6_998_552
  assert models.num_params(abstract_models["resnet50"]) == 25_557_096


# --------------------------------------------------------------------------
# Names.


@pytest.mark.parametrize("net", sorted(models.MODELS))
def test_profile_names_resolve(net, abstract_models):
  names = models.layer_names(abstract_models[net], (nnx.Conv, nnx.Linear))
  values = list(names.values())
  assert len(set(values)) == len(values)
  profile = prune.SKIMCAFFE_PROFILES[net]
  assert set(profile) <= set(values)
  conv_names = models.conv_layer_names(abstract_models[net])
  assert len(conv_names) == {"caffenet": 5, "googlenet": 57,
                             "resnet50": 53}[net]


def test_paths_follow_caffe_names(abstract_models):
  names = models.layer_names(abstract_models["resnet50"])
  assert names["res2a.branch2b"] == "res2a_branch2b"
  assert names["res4f.bn_branch2c"] == "bn4f_branch2c"
  assert names["fc1000"] == "fc1000"
  names = models.layer_names(abstract_models["googlenet"])
  assert names["inception_3a.conv_3x3"] == "inception_3a/3x3"
  assert names["inception_5b.pool_proj"] == "inception_5b/pool_proj"
  assert names["classifier"] == "loss3/classifier"
  assert models.layer_names(abstract_models["caffenet"])["conv2"] == "conv2"


# --------------------------------------------------------------------------
# Pooling and normalisation.


def test_max_pool_is_caffe_ceil_mode():
  x = jnp.zeros((1, 112, 112, 1))
  assert models.max_pool(x, 3, 2).shape == (1, 56, 56, 1)
  assert models.max_pool(jnp.zeros((1, 55, 55, 1)), 3, 2).shape == (
      1, 27, 27, 1)
  assert models.max_pool(jnp.zeros((1, 28, 28, 1)), 3, 1, 1).shape == (
      1, 28, 28, 1)
  # Values: each output is the max over its (clipped) window.
  a = np.random.default_rng(0).normal(size=(1, 6, 6, 2)).astype(np.float32)
  out = np.asarray(models.max_pool(jnp.asarray(a), 3, 2))
  assert out.shape == (1, 3, 3, 2)  # ceil((6 - 3) / 2) + 1
  for i in range(3):
    for j in range(3):
      np.testing.assert_array_equal(
          out[0, i, j], a[0, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max((0, 1)))
  # Padding never wins, even when everything is negative.
  out = models.max_pool(-jnp.ones((1, 4, 4, 1)), 3, 1, 1)
  assert (np.asarray(out) == -1).all()


def test_local_response_norm_matches_caffe_formula():
  a = np.random.default_rng(1).normal(size=(2, 3, 3, 7)).astype(np.float32)
  a *= 10
  out = np.asarray(models.local_response_norm(jnp.asarray(a), 5, 1e-2,
                                              0.75, 2.0))
  want = np.empty_like(a)
  for c in range(7):
    lo, hi = max(0, c - 2), min(7, c + 3)
    s = (a[..., lo:hi] ** 2).sum(-1)
    want[..., c] = a[..., c] / (2.0 + 1e-2 / 5 * s) ** 0.75
  np.testing.assert_allclose(out, want, rtol=1e-5)
  assert models.local_response_norm(jnp.asarray(a, jnp.bfloat16)).dtype == (
      jnp.bfloat16)


# --------------------------------------------------------------------------
# Concrete models: pruned builds and small forward passes.


def _check_profile_sparsity(model, net):
  profile = prune.SKIMCAFFE_PROFILES[net]
  names = models.layer_names(model, (nnx.Conv, nnx.Linear))
  for path, module in prune.prunable_layers(model).items():
    kernel = np.asarray(_get(module.kernel))
    sparsity = profile.get(names[path], 0.0)
    assert (kernel != 0).sum() == prune.num_kept(kernel.size, sparsity), (
        path, names[path])


@pytest.fixture(scope="module")
def pruned_resnet50():
  return models.resnet50(pruned=True, seed=0)


def test_build_resnet50_pruned(pruned_resnet50):
  model = pruned_resnet50
  _check_profile_sparsity(model, "resnet50")
  masks = prune.nonzero_masks(model)
  assert len(masks) == 17  # 16 branch2b convs + fc1000
  bn_mean = np.asarray(_get(model.res2a.bn_branch2b.mean))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)),
                  jnp.float32)
  y = model(x)
  assert y.shape == (2, 1000) and bool(jnp.isfinite(y).all())
  # Inference-mode BatchNorm: the forward pass leaves the statistics alone.
  np.testing.assert_array_equal(_get(model.res2a.bn_branch2b.mean), bn_mean)


def test_build_resnet50_vector_pruned_aligned():
  """vector_width with column_multiple: every pruned kernel (the 16 convs
  and fc1000, whose 1000 outputs take V = 8) keeps blocks of 8 output
  channels with a shared pattern, each a multiple of 8 positions."""
  model = models.build_model("resnet50", pruned=True, vector_width=8,
                             column_multiple=8)
  masks = prune.nonzero_masks(model)
  assert len(masks) == 17
  for path, m in masks.items():
    blocks = m.reshape(-1, m.shape[-1] // 8, 8)
    assert (blocks == blocks[..., :1]).all(), path
    counts = blocks[..., 0].sum(axis=0)
    assert np.all(counts % 8 == 0), path


def test_build_model_seed_and_errors():
  with pytest.raises(ValueError, match="unknown model"):
    models.build_model("vgg16")
  with pytest.raises(ValueError, match="unknown model"):
    models.trace_layers("vgg16")


@pytest.mark.parametrize("net", ["caffenet", "googlenet"])
def test_profile_pruning_of_numpy_filled_models(net):
  model = _random_model(net)
  pruned, masks = prune.prune_model(model, profile=net)
  _check_profile_sparsity(pruned, net)
  assert len(masks) == {"caffenet": 7, "googlenet": 20}[net]


def test_googlenet_small_forward():
  model = _random_model("googlenet", seed=1)
  model, _ = prune.prune_model(model, profile="googlenet", inplace=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 32, 32, 3)),
                  jnp.float32)
  y = model(x)
  assert y.shape == (1, 1000) and bool(jnp.isfinite(y).all())
