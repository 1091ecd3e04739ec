"""escort_jax.linen: SparseConv against flax.linen.Conv, and the
dense -> sparse params workflow (CPU)."""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
from flax.core import frozen_dict
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

import escort_jax.linen as esl
from escort_jax.nnx import UnsupportedConvError
from escort_jax.structure import SparseKernel, SparseStructure
from tests.conftest import assert_close, np_init

HIGHEST = lax.Precision.HIGHEST
F32_BOUND = 1e-5


class Net(nn.Module):
  """The module docstring's example: conv1 (3 -> 8, stride 2) -> relu ->
  conv2 (8 -> 4); dense where structures is None."""

  structures: Any = None
  method: str = "auto"

  def conv(self, features, name, **kw):
    kw.update(precision=HIGHEST, kernel_init=np_init, name=name)
    if self.structures is None or name not in self.structures:
      return nn.Conv(features, (3, 3), **kw)
    return esl.SparseConv(features, (3, 3), structure=self.structures[name],
                          method=self.method, **kw)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self.conv(8, "conv1", strides=2)(x))
    return self.conv(4, "conv2", use_bias=False)(x)


def _x(shape=(2, 8, 8, 3), seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _dense_params():
  params = Net().init(jax.random.key(0), _x())
  # Nonzero biases, so that they are checked too.
  return jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if "bias" in jax.tree_util.keystr(p) else v,
      params)


@pytest.mark.parametrize("method", ["dense", "escort"])
def test_workflow_dense_equals_sparse(method):
  params = _dense_params()
  pruned = esl.prune_params(params, sparsity=0.7)
  sparse_params, structures = esl.sparsify_params(pruned)
  assert set(structures) == {"conv1", "conv2"}
  p = sparse_params["params"]
  assert set(p["conv1"]) == {"values", "bias"} and set(p["conv2"]) == {
      "values"}
  for name, s in structures.items():
    k = np.asarray(pruned["params"][name]["kernel"])
    assert s.nnz == np.count_nonzero(k) == k.size - round(0.7 * k.size)
    assert p[name]["values"].shape == (s.nnz,)
  x = _x()
  y = Net(structures=structures, method=method).apply(sparse_params, x)
  assert_close(y, Net().apply(pruned, x), F32_BOUND)
  # Back to dense: exactly the pruned params.
  chex.assert_trees_all_equal(esl.densify_params(sparse_params, structures),
                              pruned)


def test_structures_and_threshold_modes():
  params = _dense_params()
  k1 = np.asarray(params["params"]["conv1"]["kernel"])
  mask = np.abs(k1) > np.median(np.abs(k1))
  # structures=: only conv1 converts; a bool mask is accepted.
  sp, st = esl.sparsify_params(params, {"conv1": mask})
  assert set(st) == {"conv1"} and "kernel" in sp["params"]["conv2"]
  assert st["conv1"] == SparseStructure.from_mask(mask)
  x = _x()
  ref = Net().apply(
      {"params": {"conv1": {"kernel": jnp.where(mask, k1, 0),
                            "bias": params["params"]["conv1"]["bias"]},
                  "conv2": params["params"]["conv2"]}}, x)
  assert_close(Net(structures=st, method="dense").apply(sp, x), ref,
               F32_BOUND)
  # threshold=: keeps |w| > threshold; bare params tree, FrozenDict in/out.
  frozen = frozen_dict.freeze(params["params"])
  sp2, st2 = esl.sparsify_params(frozen, threshold=0.2, filter="conv2")
  assert isinstance(sp2, frozen_dict.FrozenDict) and set(st2) == {"conv2"}
  k2 = np.asarray(params["params"]["conv2"]["kernel"])
  assert st2["conv2"].nnz == np.count_nonzero(np.abs(k2) > 0.2)
  with pytest.raises(KeyError, match="nope"):
    esl.sparsify_params(params, {"nope": mask})
  with pytest.raises(ValueError, match="at most one"):
    esl.sparsify_params(params, threshold=0.1, sparsity=0.5)


@pytest.mark.parametrize("kw", [
    dict(),
    dict(strides=(1, 2), padding="VALID", use_bias=False),
    dict(padding=((2, 0), (1, 1)), kernel_dilation=(2, 1),
         feature_group_count=2),
])
def test_sparse_conv_matches_linen_conv(kw):
  """Drop-in: the same attributes, every kernel entry kept."""
  x = _x((2, 8, 8, 4))
  conv = nn.Conv(6, (3, 3), precision=HIGHEST, kernel_init=np_init, **kw)
  params = conv.init(jax.random.key(0), x)
  # A lone Conv's params are {"params": {"kernel", "bias"}}: the conv is
  # the root, whose path is "".
  sp, st = esl.sparsify_params(params)
  assert set(st) == {""}
  sconv = esl.SparseConv(6, (3, 3), precision=HIGHEST, structure=st[""],
                         kernel_init=np_init, method="dense", **kw)
  assert_close(sconv.apply(sp, x), conv.apply(params, x), F32_BOUND)
  # Unbatched input, as linen.Conv allows.
  assert_close(sconv.apply(sp, x[0]), conv.apply(params, x[0]), F32_BOUND)


def test_init_and_errors():
  s = SparseStructure.from_mask(
      np.random.default_rng(2).random((3, 3, 3, 8)) < 0.4)
  m = esl.SparseConv(8, (3, 3), structure=s)
  params = m.init(jax.random.key(0), _x())
  assert params["params"]["values"].shape == (s.nnz,)
  assert params["params"]["bias"].shape == (8,)
  # values are linen.Conv's initial kernel at the structure's entries.
  ref = nn.Conv(8, (3, 3)).init(jax.random.key(0), _x())
  chex.assert_trees_all_equal(
      params["params"]["values"],
      ref["params"]["kernel"][s.dense_positions()])
  with pytest.raises(TypeError, match="structure"):
    esl.SparseConv(8, (3, 3)).init(jax.random.key(0), _x())
  with pytest.raises(ValueError, match="structure"):
    esl.SparseConv(8, (3, 3), structure=s).init(jax.random.key(0),
                                                _x((1, 8, 8, 4)))
  with pytest.raises(UnsupportedConvError):
    esl.SparseConv(8, 3, structure=s).init(jax.random.key(0), _x())
  with pytest.raises(UnsupportedConvError):
    esl.SparseConv(8, (3, 3), structure=s, padding="CIRCULAR").init(
        jax.random.key(0), _x())


def test_vector_method_and_config_pass_through():
  """method="vector" and a VectorConfig reach sparse_conv: the vector
  kernel (Pallas interpreter) on a vector-sparse structure, an error on an
  unstructured one."""
  from escort_jax import VectorConfig
  from escort_jax.prune import vector_mask
  k = np.random.default_rng(0).standard_normal((3, 3, 4, 16)).astype(
      np.float32)
  k = k * vector_mask(k, 0.6, 8)
  x = _x((1, 6, 6, 4))
  sk = SparseKernel.from_dense(k)
  conv = esl.SparseConv(16, (3, 3), structure=sk.structure, use_bias=False,
                        precision=HIGHEST, method="vector",
                        config=VectorConfig(32, 16, 4, 2))
  params = {"params": {"values": sk.values}}
  ref = lax.conv_general_dilated(x, jnp.asarray(k), (1, 1), "SAME",
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                 precision=HIGHEST)
  assert_close(conv.apply(params, x), ref, 1e-4)
  mask = np.random.default_rng(1).random(k.shape) < 0.4
  bad = esl.SparseConv(16, (3, 3), structure=SparseStructure.from_mask(mask),
                       use_bias=False, method="vector")
  with pytest.raises(ValueError, match="vector-sparse"):
    bad.apply({"params": {"values": jnp.ones(int(mask.sum()))}}, x)
