"""Tests of escort_jax.prune: masks, profiles, prune_model, masked fine-tuning."""

import json
import pathlib

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from escort_jax import prune
from escort_jax.prune import _get

LAYERS_JSON = pathlib.Path(prune.__file__).with_name("layers.json")


def _kept_scores_separate(kernel, mask):
  """Every kept |w| >= every pruned |w|."""
  a = np.abs(np.asarray(kernel, np.float64))
  if mask.all() or not mask.any():
    return True
  return a[mask].min() >= a[~mask].max()


# --------------------------------------------------------------------------
# Single-kernel masks.


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (5, 5, 8, 12), (7,),
                                   (64, 10)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.856455, 0.99, 1.0])
def test_magnitude_mask_exact_count(shape, sparsity):
  kernel = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  mask = prune.magnitude_mask(kernel, sparsity)
  assert mask.shape == shape and mask.dtype == bool
  size = int(np.prod(shape))
  assert mask.sum() == round(size * (1 - sparsity)) == prune.num_kept(
      size, sparsity)
  assert _kept_scores_separate(kernel, mask)


def test_magnitude_mask_ties_lowest_index_and_jax_input():
  kernel = jnp.ones((2, 3, 4, 5), jnp.bfloat16)
  mask = prune.magnitude_mask(kernel, 0.75)  # keeps 30 of 120
  np.testing.assert_array_equal(mask.reshape(-1),
                                np.arange(120) < 30)
  # Deterministic: the same call gives the same mask.
  np.testing.assert_array_equal(mask, prune.magnitude_mask(kernel, 0.75))


def test_magnitude_mask_sign_and_nan():
  kernel = np.array([0.1, -5.0, 3.0, np.nan, -0.2, 0.0])
  mask = prune.magnitude_mask(kernel, 0.5)  # keeps 3
  np.testing.assert_array_equal(mask, [False, True, True, True, False,
                                       False])


def test_magnitude_mask_errors():
  with pytest.raises(ValueError, match="sparsity"):
    prune.magnitude_mask(np.ones(4), 1.5)
  with pytest.raises(ValueError, match="sparsity"):
    prune.magnitude_mask(np.ones(4), -0.1)
  with pytest.raises(TypeError, match="concrete"):
    jax.jit(lambda k: jnp.asarray(prune.magnitude_mask(k, 0.5)))(
        jnp.ones(4))


def test_global_magnitude_masks():
  rng = np.random.default_rng(1)
  kernels = {
      "small": rng.normal(size=(3, 3, 4, 8)) * 0.1,
      "large": rng.normal(size=(3, 3, 8, 8)) * 10.0,
      "mid": rng.normal(size=(16, 4)),
  }
  masks = prune.global_magnitude_masks(kernels, 0.6)
  assert list(masks) == list(kernels)
  total = sum(k.size for k in kernels.values())
  assert sum(m.sum() for m in masks.values()) == round(total * 0.4)
  for name in kernels:
    assert masks[name].shape == kernels[name].shape
  kept = np.concatenate([np.abs(kernels[n])[masks[n]] for n in kernels])
  pruned = np.concatenate([np.abs(kernels[n])[~masks[n]] for n in kernels])
  assert kept.min() >= pruned.max()
  # One threshold: the small-weight layer loses far more than the large.
  assert masks["small"].mean() < 0.05 and masks["large"].mean() > 0.6
  assert prune.global_magnitude_masks({}, 0.5) == {}


def test_global_ties_follow_mapping_order():
  kernels = {"a": np.ones(4), "b": np.ones(4)}
  masks = prune.global_magnitude_masks(kernels, 0.25)  # keeps 6
  np.testing.assert_array_equal(masks["a"], [True] * 4)
  np.testing.assert_array_equal(masks["b"], [True, True, False, False])


@pytest.mark.parametrize("v", [1, 4, 8])
def test_vector_mask_blocks_share_positions(v):
  kernel = np.random.default_rng(2).normal(size=(3, 3, 6, 16))
  mask = prune.vector_mask(kernel, 0.7, v)
  assert mask.shape == kernel.shape
  blocks = mask.reshape(3, 3, 6, 16 // v, v)
  # All V channels of a block agree at every (r, s, c).
  assert (blocks == blocks[..., :1]).all()
  n_vectors = kernel.size // v
  assert mask.sum() == v * round(n_vectors * 0.3)
  norms = np.linalg.norm(kernel.reshape(3, 3, 6, 16 // v, v), axis=-1)
  kept = blocks[..., 0]
  assert norms[kept].min() >= norms[~kept].max()
  if v == 1:
    np.testing.assert_array_equal(mask, prune.magnitude_mask(kernel, 0.7))


@pytest.mark.parametrize("m", [4, 8])
def test_vector_mask_aligned_column_counts(m):
  """column_multiple: every block keeps a multiple of m positions, its
  largest vectors, close to the target count."""
  kernel = np.random.default_rng(m).normal(size=(3, 3, 20, 32))
  v = 8
  mask = prune.vector_mask(kernel, 0.8, v, column_multiple=m)
  blocks = mask.reshape(-1, 32 // v, v)
  assert (blocks == blocks[..., :1]).all()
  kept = blocks[..., 0]
  counts = kept.sum(axis=0)
  assert np.all(counts % m == 0)
  plain = prune.vector_mask(kernel, 0.8, v).reshape(-1, 32 // v, v)[..., 0]
  assert abs(int(counts.sum()) - int(plain.sum())) <= m // 2 * (32 // v)
  norms = np.linalg.norm(kernel.reshape(-1, 32 // v, v), axis=-1)
  for b in range(32 // v):
    if 0 < counts[b] < kept.shape[0]:
      assert norms[kept[:, b], b].min() >= norms[~kept[:, b], b].max()
  np.testing.assert_array_equal(
      prune.vector_mask(kernel, 0.8, v, column_multiple=1),
      prune.vector_mask(kernel, 0.8, v))


def test_vector_mask_scores_by_l2_norm():
  # Vector 0 has one big weight (L2 2.0), vector 1 many medium ones (L2 ~3).
  kernel = np.zeros((1, 1, 1, 8))
  kernel[..., 0] = 2.0
  kernel[..., 4:] = 1.5
  mask = prune.vector_mask(kernel, 0.5, 4)
  np.testing.assert_array_equal(mask.reshape(-1), [0] * 4 + [1] * 4)


def test_vector_mask_indivisible_raises():
  with pytest.raises(ValueError, match="divide"):
    prune.vector_mask(np.ones((3, 3, 4, 10)), 0.5, 4)
  with pytest.raises(ValueError, match="positive"):
    prune.vector_mask(np.ones((3, 3, 4, 8)), 0.5, 0)


# --------------------------------------------------------------------------
# Profiles.


def test_skimcaffe_profiles_match_layers_json():
  layers = json.loads(LAYERS_JSON.read_text())["layers"]
  assert len(layers) == 40
  for layer in layers:
    assert prune.SKIMCAFFE_PROFILES[layer["net"]][layer["layer"]] == (
        layer["sparsity"])
  p = prune.SKIMCAFFE_PROFILES
  assert (p["caffenet"]["fc6"], p["caffenet"]["fc7"],
          p["caffenet"]["fc8"]) == (0.903, 0.844, 0.738)
  assert p["googlenet"]["loss3/classifier"] == 0.907
  assert p["resnet50"]["fc1000"] == 0.915
  assert {n: len(v) for n, v in p.items()} == {
      "caffenet": 8, "googlenet": 20, "resnet50": 17}
  assert prune.resolve_profile("resnet50") is p["resnet50"]
  with pytest.raises(ValueError, match="unknown profile"):
    prune.resolve_profile("vgg16")


# --------------------------------------------------------------------------
# prune_model on a small NNX model.


class Block(nnx.Module):

  def __init__(self, rngs):
    self.conv = nnx.Conv(8, 8, (3, 3), feature_group_count=2, rngs=rngs)
    self.conv.caffe_name = "block_conv"

  def __call__(self, x):
    return nnx.relu(self.conv(x))


class Tiny(nnx.Module):
  """(N, H, W, 3) -> (N, 4): conv, grouped conv, mean pool, linear."""

  def __init__(self, rngs, batch_norm=False):
    self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.conv1.caffe_name = "conv1"
    self.block = Block(rngs)
    self.bn = (nnx.BatchNorm(8, use_running_average=False, rngs=rngs)
               if batch_norm else None)
    self.fc = nnx.Linear(8, 4, rngs=rngs)
    self.fc.caffe_name = "fc"

  def __call__(self, x):
    x = self.block(nnx.relu(self.conv1(x)))
    if self.bn is not None:
      x = self.bn(x)
    return self.fc(x.mean(axis=(1, 2)))


def _kernels(model):
  return {p: np.asarray(_get(m.kernel))
          for p, m in prune.prunable_layers(model).items()}


def test_prune_model_uniform_copy():
  model = Tiny(nnx.Rngs(0))
  before = _kernels(model)
  pruned, masks = prune.prune_model(model, sparsity=0.75)
  assert pruned is not model
  assert set(masks) == {"conv1", "block.conv"}  # linear layers stay dense
  for path, kernel in _kernels(model).items():  # the original is unchanged
    np.testing.assert_array_equal(kernel, before[path])
  after = _kernels(pruned)
  for path, mask in masks.items():
    assert mask.shape == before[path].shape
    assert mask.sum() == round(mask.size * 0.25)
    np.testing.assert_array_equal(after[path], np.where(mask, before[path],
                                                        0))
    np.testing.assert_array_equal(mask, prune.magnitude_mask(before[path],
                                                             0.75))
  np.testing.assert_array_equal(after["fc"], before["fc"])
  # Biases are not pruned.
  np.testing.assert_array_equal(_get(pruned.conv1.bias),
                                _get(model.conv1.bias))
  rep = prune.sparsity_report(pruned)
  assert rep["fc"] == 0.0 and rep["conv1"] == pytest.approx(0.75, abs=0.01)


def test_prune_model_inplace_and_nonzero_masks():
  model = Tiny(nnx.Rngs(0))
  pruned, masks = prune.prune_model(model, sparsity=0.5, inplace=True)
  assert pruned is model
  recovered = prune.nonzero_masks(model)
  assert set(recovered) == set(masks)
  for p in masks:
    np.testing.assert_array_equal(recovered[p], masks[p])


def test_prune_model_profile_names():
  model = Tiny(nnx.Rngs(1))
  profile = {"conv1": 0.5, "fc": 0.9, "unused": 0.3}
  pruned, masks = prune.prune_model(model, profile=profile)
  assert set(masks) == {"conv1", "fc"}
  assert masks["fc"].sum() == round(32 * 0.1)
  assert prune.sparsity_report(pruned)["block.conv"] == 0.0
  # Layers without a caffe_name are named by path; sparsity fills in convs
  # the profile does not list.
  del model.block.conv.caffe_name
  _, masks = prune.prune_model(model, sparsity=0.25,
                               profile={"block.conv": 0.5, "conv1": 0.0})
  assert set(masks) == {"block.conv"}
  assert masks["block.conv"].mean() == 0.5
  _, masks = prune.prune_model(model, sparsity=0.25, profile={"fc": 0.5})
  assert set(masks) == {"conv1", "block.conv", "fc"}
  # name_fn overrides the lookup.
  _, masks = prune.prune_model(model, profile={"CONV1": 0.5},
                               name_fn=lambda p, m: p.upper())
  assert set(masks) == {"conv1"}


def test_prune_model_global_and_vector():
  model = Tiny(nnx.Rngs(2))
  before = _kernels(model)
  _, masks = prune.prune_model(model, sparsity=0.6, mode="global")
  total = sum(before[p].size for p in masks)
  assert sum(m.sum() for m in masks.values()) == round(total * 0.4)
  kept = np.concatenate([np.abs(before[p])[m] for p, m in masks.items()])
  pruned = np.concatenate([np.abs(before[p])[~m] for p, m in masks.items()])
  assert kept.min() >= pruned.max()

  _, masks = prune.prune_model(model, sparsity=0.5, vector_width=4)
  for p, m in masks.items():
    blocks = m.reshape(*m.shape[:-1], -1, 4)
    assert (blocks == blocks[..., :1]).all()
    np.testing.assert_array_equal(m, prune.vector_mask(before[p], 0.5, 4))

  _, masks = prune.prune_model(model, sparsity=0.5, mode="global",
                               vector_width=4)
  assert sum(m.sum() for m in masks.values()) == 4 * round(total / 4 * 0.5)
  for m in masks.values():
    blocks = m.reshape(*m.shape[:-1], -1, 4)
    assert (blocks == blocks[..., :1]).all()

  for mode in ("layer", "global"):
    _, masks = prune.prune_model(model, sparsity=0.5, mode=mode,
                                 vector_width=4, column_multiple=4)
    for p, m in masks.items():
      kept = m.reshape(-1, m.shape[-1] // 4, 4)[..., 0]
      assert np.all(kept.sum(axis=0) % 4 == 0), (mode, p)

  with pytest.raises(ValueError, match="divide"):
    prune.prune_model(model, sparsity=0.5, vector_width=3)


def test_prune_model_argument_errors():
  model = Tiny(nnx.Rngs(0))
  with pytest.raises(ValueError, match="sparsity, a profile"):
    prune.prune_model(model)
  with pytest.raises(ValueError, match="global"):
    prune.prune_model(model, profile={"conv1": 0.5}, mode="global")
  with pytest.raises(ValueError, match="mode"):
    prune.prune_model(model, sparsity=0.5, mode="per-channel")
  with pytest.raises(ValueError, match="sparsity"):
    prune.prune_model(model, profile={"conv1": 2.0})
  with pytest.raises(KeyError):
    prune.apply_masks(model, {"nope": np.ones((3, 3, 3, 8), bool)})
  with pytest.raises(ValueError, match="shape"):
    prune.apply_masks(model, {"conv1": np.ones((3, 3, 3, 4), bool)})


# --------------------------------------------------------------------------
# Mask-fixed fine-tuning.


def test_mask_tree_matches_param_state():
  model = Tiny(nnx.Rngs(0), batch_norm=True)
  _, masks = prune.prune_model(model, sparsity=0.5, inplace=True)
  tree = prune.mask_tree(model, masks)
  params = nnx.state(model, nnx.Param)
  assert (jax.tree_util.tree_structure(tree)
          == jax.tree_util.tree_structure(params))
  np.testing.assert_array_equal(tree["conv1"]["kernel"], masks["conv1"])
  assert tree["fc"]["kernel"].shape == ()


def test_keep_masked_adamw_keeps_zeros():
  params = {"w": jnp.asarray([[0.0, 1.0], [2.0, 0.0]]), "b": jnp.ones(2)}
  masks = {"w": jnp.asarray([[False, True], [True, False]]),
           "b": jnp.ones((), bool)}
  tx = prune.keep_masked(optax.adamw(0.1, weight_decay=0.5), masks)
  state = tx.init(params)
  for _ in range(3):
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  w = np.asarray(params["w"])
  assert w[0, 0] == 0.0 and w[1, 1] == 0.0
  assert w[0, 1] != 1.0 and (np.asarray(params["b"]) != 1.0).all()


def _regression_data(seed=0, n=4, batch=8):
  rng = np.random.default_rng(seed)
  teacher = rng.normal(size=(3, 4))
  batches = []
  for _ in range(n):
    x = rng.normal(size=(batch, 6, 6, 3)).astype(np.float32)
    y = (x.mean(axis=(1, 2)) @ teacher).astype(np.float32)
    batches.append((jnp.asarray(x), jnp.asarray(y)))
  return batches


def _mse(model, batch):
  x, y = batch
  return jnp.mean((model(x) - y) ** 2)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_masked_finetune_keeps_zeros_and_learns(batch_norm):
  model = Tiny(nnx.Rngs(3), batch_norm=batch_norm)
  # Prune by magnitude, then put the original weights back: fine-tuning
  # must zero the pruned positions itself and keep them at zero.
  dense = _kernels(model)
  _, masks = prune.prune_model(model, sparsity=0.7)
  masks["fc"] = prune.magnitude_mask(dense["fc"], 0.5)
  before_fc_bias = np.asarray(_get(model.fc.bias))
  losses = prune.masked_finetune(model, masks,
                                 optax.sgd(0.05, momentum=0.9), _mse,
                                 _regression_data(), steps=40)
  assert losses.shape == (40,) and np.isfinite(losses).all()
  assert losses[-5:].mean() < 0.5 * losses[:2].mean()
  after = _kernels(model)
  for path, mask in masks.items():
    assert (after[path][~mask] == 0).all(), path
    assert (after[path][mask] != dense[path][mask]).any(), path
  assert (np.asarray(_get(model.fc.bias)) != before_fc_bias).any()
  if batch_norm:  # training-mode statistics came back out of the step
    assert (np.asarray(_get(model.bn.mean)) != 0).any()


def test_masked_finetune_iterator_and_one_pass():
  model, masks = prune.prune_model(Tiny(nnx.Rngs(4)), sparsity=0.5)
  data = _regression_data(n=3)
  losses = prune.masked_finetune(model, masks, optax.adam(1e-2), _mse, data)
  assert losses.shape == (3,)
  losses = prune.masked_finetune(model, masks, optax.adam(1e-2), _mse,
                                 iter(data * 5), steps=7)
  assert losses.shape == (7,)
  for path, mask in masks.items():
    assert (_kernels(model)[path][~mask] == 0).all()
