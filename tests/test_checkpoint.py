"""escort_jax.checkpoint: save_sparse / load_sparse round trips (CPU)."""

from __future__ import annotations

import warnings

import chex
from flax import nnx
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax.checkpoint import (load_sparse, save_sparse,
                                   structure_from_dict, structure_to_dict)
from escort_jax.convert import sparsify
from escort_jax.nnx import SparseConv, _get_value, _set_value
from escort_jax.prune import magnitude_mask
from tests.conftest import np_init

HIGHEST = lax.Precision.HIGHEST


class Net(nnx.Module):
  """conv -> BatchNorm -> relu -> Dropout -> conv(relu fused once sparse)
  -> circular conv (stays dense)."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, precision=HIGHEST,
                          kernel_init=np_init, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.drop = nnx.Dropout(0.5, rngs=rngs)
    self.conv2 = nnx.Conv(8, 4, (3, 3), precision=HIGHEST, use_bias=False,
                          kernel_init=np_init, rngs=rngs)
    self.wrap = nnx.Conv(4, 4, (3, 3), padding="CIRCULAR",
                         precision=HIGHEST, kernel_init=np_init, rngs=rngs)

  def __call__(self, x):  # (N, 8, 8, 3) -> (N, 4, 4, 4)
    x = nnx.relu(self.bn(self.conv1(x)))
    return self.wrap(self.conv2(self.drop(x)))


def _x(n=2, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(
      (n, 8, 8, 3)), jnp.float32)


def _sparse_model(method="dense"):
  net = Net(nnx.Rngs(0))
  for conv in (net.conv1, net.conv2):
    k = _get_value(conv.kernel)
    _set_value(conv.kernel, jnp.where(magnitude_mask(k, 0.75), k, 0))
  net(_x(4, seed=3))  # train mode: non-trivial batch statistics
  net.eval()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    sparse = sparsify(net, method=method)
  # A different per-layer method / activation must survive the round trip.
  sparse.conv2 = SparseConv.from_conv(net.conv2, method=method,
                                      activation=None)
  _set_value(sparse.bn.mean, _get_value(sparse.bn.mean) + 0.5)
  return sparse


def test_round_trip_is_bitwise(tmp_path):
  model = _sparse_model()
  path = tmp_path / "model.msgpack"
  save_sparse(path, model)
  x = _x()
  y = model(x)

  def constructor():
    m = Net(nnx.Rngs(123))  # other initial values: all must be overwritten
    m.eval()
    return m

  loaded = load_sparse(path, constructor)
  assert isinstance(loaded.conv1, SparseConv)
  assert isinstance(loaded.conv2, SparseConv)
  assert type(loaded.wrap) is nnx.Conv
  assert loaded.conv1.structure == model.conv1.structure
  assert loaded.conv2.structure == model.conv2.structure
  assert loaded.conv1.method == "dense"
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(y))
  chex.assert_trees_all_equal(nnx.state(loaded, nnx.Param),
                              nnx.state(model, nnx.Param))

  # An abstract model (nnx.eval_shape) and the sparse model itself also
  # describe the architecture; neither is modified.
  abstract = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
  loaded2 = load_sparse(path, abstract)
  loaded2.eval()
  np.testing.assert_array_equal(np.asarray(loaded2(x)), np.asarray(y))
  other = _sparse_model()
  _set_value(other.conv1.values, jnp.zeros_like(_get_value(
      other.conv1.values)))
  loaded3 = load_sparse(path, other)
  np.testing.assert_array_equal(np.asarray(loaded3(x)), np.asarray(y))
  assert not np.any(np.asarray(_get_value(other.conv1.values)))


def test_escort_round_trip(tmp_path):
  model = _sparse_model(method="escort")
  path = tmp_path / "escort.msgpack"
  save_sparse(path, model)
  loaded = load_sparse(path, lambda: Net(nnx.Rngs(1)))
  loaded.eval()
  assert loaded.conv1.method == "escort"
  x = _x(1)
  np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_mismatched_model_raises(tmp_path):
  model = _sparse_model()
  path = tmp_path / "model.msgpack"
  save_sparse(path, model)

  class Other(nnx.Module):
    def __init__(self, rngs):
      self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, kernel_init=np_init,
                            rngs=rngs)

  with pytest.raises(ValueError, match="SparseConv at 'conv2'"):
    load_sparse(path, lambda: Other(nnx.Rngs(0)))
  (tmp_path / "junk").write_bytes(b"\x80")
  with pytest.raises(Exception):
    load_sparse(tmp_path / "junk", lambda: Net(nnx.Rngs(0)))


def test_structure_dict_round_trip():
  mask = np.random.default_rng(0).random((3, 3, 4, 5)) < 0.3
  from escort_jax.structure import SparseStructure
  s = SparseStructure.from_mask(mask)
  assert structure_from_dict(structure_to_dict(s)) == s
