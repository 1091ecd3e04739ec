"""escort_jax.convert.sparsify on small NNX models (CPU)."""

from __future__ import annotations

import warnings

import chex
from flax import nnx
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from escort_jax.convert import sparsify
from escort_jax.nnx import DenseConv, SparseConv, _get_value, _set_value
from escort_jax.prune import magnitude_mask
from tests.conftest import ON_GPU, assert_close, np_init

HIGHEST = lax.Precision.HIGHEST
F32_BOUND = 1e-5


def _module_list(items):
  # flax >= 0.12 wants nnx.List for a list of modules; older versions take
  # a plain list (and have no nnx.List).
  return nnx.List(items) if hasattr(nnx, "List") else list(items)


class Net(nnx.Module):
  """conv (attribute) -> Sequential(conv, relu) -> list[conv] -> circular
  conv (stays dense) -> the first conv again (shared)."""

  def __init__(self, rngs: nnx.Rngs, *, shared: bool = False):
    conv = lambda i, o, **kw: nnx.Conv(i, o, (3, 3), precision=HIGHEST,
                                       kernel_init=np_init, rngs=rngs, **kw)
    self.stem = conv(3, 8)
    self.body = nnx.Sequential(conv(8, 8, strides=2), nnx.relu)
    self.blocks = _module_list([conv(8, 8, feature_group_count=2),
                                conv(8, 3, padding="VALID")])
    self.wrap = conv(3, 3, padding="CIRCULAR")
    self.shared = shared

  def __call__(self, x):  # (N, 8, 8, 3) -> (N, 2, 2, 8)
    x = nnx.relu(self.stem(x))
    x = self.body(x)
    for block in self.blocks:
      x = block(x)
    x = self.wrap(x)
    return self.stem(x) if self.shared else x


def _pruned_net(sparsity=0.7, shared=False, seed=0):
  """A Net whose 2-D conv kernels are magnitude-pruned in place; returns it
  and {path: kept-mask}."""
  net = Net(nnx.Rngs(seed), shared=shared)
  masks = {}
  for path, node in nnx.iter_graph(net):
    if isinstance(node, nnx.Conv):
      k = _get_value(node.kernel)
      m = magnitude_mask(k, sparsity)
      _set_value(node.kernel, jnp.where(m, k, 0).astype(k.dtype))
      if node.bias is not None:
        _set_value(node.bias, 0.1 * _x(node.bias.shape, seed=len(masks)))
      masks[".".join(map(str, path))] = m
  return net, masks


def _x(shape=(2, 8, 8, 3), seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape),
                     jnp.float32)


def _convs(model):
  return {".".join(map(str, p)): n for p, n in nnx.iter_graph(model)
          if isinstance(n, (nnx.Conv, SparseConv, DenseConv))}


def _snapshot(model):
  return jax.tree_util.tree_map(np.asarray,
                                jax.tree_util.tree_leaves(nnx.state(model)))


def test_sparsify_converts_and_keeps_original():
  net, masks = _pruned_net()
  before = _snapshot(net)
  x = _x()
  with pytest.warns(UserWarning, match=r"1 convolution.*wrap.*CIRCULAR"):
    sparse = sparsify(net, method="dense")
  convs = _convs(sparse)
  assert isinstance(convs["stem"], SparseConv)
  assert isinstance(convs["body.layers.0"], SparseConv)
  assert isinstance(convs["blocks.0"], SparseConv)
  assert isinstance(convs["blocks.1"], SparseConv)
  assert type(convs["wrap"]) is nnx.Conv
  for name, m in masks.items():
    if name != "wrap":
      assert convs[name].nnz == m.sum()
      np.testing.assert_array_equal(np.asarray(convs[name].dense_kernel())
                                    != 0, m)
  assert_close(sparse(x), net(x), F32_BOUND)
  # The original is untouched: same types, same values, no shared Variables.
  assert all(type(c) is nnx.Conv for c in _convs(net).values())
  chex.assert_trees_all_equal(_snapshot(net), before)
  _set_value(convs["stem"].values, jnp.zeros_like(_get_value(
      convs["stem"].values)))
  chex.assert_trees_all_equal(_snapshot(net), before)


def test_shared_layer_stays_shared():
  net, _ = _pruned_net(shared=True)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)
    sparse = sparsify(net, method="dense")
  assert isinstance(sparse.stem, SparseConv)
  x = _x()
  assert_close(sparse(x), net(x), F32_BOUND)
  # One SparseConv for the shared conv: nnx.state lists it once.
  n_values = sum(1 for p, v in nnx.iter_graph(sparse)
                 if isinstance(v, nnx.Param) and p[-1] == "values")
  assert n_values == 4


def test_filters_by_name_and_density():
  net, _ = _pruned_net()
  # Make blocks.1 dense again so that max_density excludes it.
  k = _get_value(net.blocks[1].kernel)
  _set_value(net.blocks[1].kernel, jnp.where(k == 0, 0.01, k))
  x = _x()
  kw = dict(method="dense", warn=False)
  by_regex = _convs(sparsify(net, filter=r"^blocks\.", **kw))
  assert {n for n, c in by_regex.items() if isinstance(c, SparseConv)} == {
      "blocks.0", "blocks.1"}
  by_fn = _convs(sparsify(net, filter=lambda p: p == "stem", **kw))
  assert {n for n, c in by_fn.items() if isinstance(c, SparseConv)} == {
      "stem"}
  by_density = sparsify(net, max_density=0.5, **kw)
  kinds = {n: type(c).__name__ for n, c in _convs(by_density).items()}
  assert kinds == {"stem": "SparseConv", "body.layers.0": "SparseConv",
                   "blocks.0": "SparseConv", "blocks.1": "Conv",
                   "wrap": "Conv"}
  assert_close(by_density(x), net(x), F32_BOUND)
  # Filtering out the unconvertible conv also silences the warning.
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sparsify(net, filter=lambda p: p != "wrap", method="dense")


def test_training_keeps_pruned_weights_zero():
  net, masks = _pruned_net()
  sparse = sparsify(net, method="dense", warn=False)
  x = _x((4, 8, 8, 3))
  target = _x(net(x).shape, seed=7)
  tx = optax.adam(1e-2)
  params = nnx.state(sparse, nnx.Param)
  opt_state = tx.init(params)

  @nnx.jit
  def step(model, opt_state):
    def loss_fn(m):
      return jnp.mean((m(x) - target) ** 2)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = tx.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return loss, opt_state

  losses = []
  for _ in range(4):
    loss, opt_state = step(sparse, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  convs = _convs(sparse)
  for name, m in masks.items():
    if name == "wrap":
      continue
    dense = np.asarray(convs[name].dense_kernel())
    np.testing.assert_array_equal(dense[~m], 0.0)
    orig = np.asarray(_get_value(_convs(net)[name].kernel))
    assert not np.array_equal(dense[m], orig[m]), f"{name} did not train"


def test_sparsify_escort_matches_dense():
  """The converted model on the Pallas kernels (interpreted on CPU)."""
  net, _ = _pruned_net(sparsity=0.8)
  sparse = sparsify(net, method="escort", warn=False)
  x = _x((1, 8, 8, 3))
  assert_close(sparse(x), net(x), F32_BOUND)


def test_sparsify_sequential_root_and_single_conv():
  rngs = nnx.Rngs(0)
  seq = nnx.Sequential(
      nnx.Conv(3, 4, (3, 3), precision=HIGHEST, kernel_init=np_init,
               rngs=rngs), nnx.relu,
      nnx.Conv(4, 2, (1, 1), precision=HIGHEST, kernel_init=np_init,
               rngs=rngs))
  sp = sparsify(seq, method="dense")
  assert all(isinstance(sp.layers[i], SparseConv) for i in (0, 2))
  x = _x()
  assert_close(sp(x), seq(x), F32_BOUND)
  single = sparsify(seq.layers[0], method="dense")
  assert isinstance(single, SparseConv)
  assert_close(single(x), seq.layers[0](x), F32_BOUND)


def test_sparsify_vector_method():
  """sparsify(method="vector", config=VectorConfig) on vector-sparse convs:
  the layers take the method and config, and compute the dense model's
  output on the vector kernel (Pallas interpreter)."""
  from escort_jax import VectorConfig
  from escort_jax.prune import vector_mask
  conv = nnx.Conv(4, 16, (3, 3), use_bias=False, precision=HIGHEST,
                  kernel_init=np_init, rngs=nnx.Rngs(0))
  k = np.asarray(_get_value(conv.kernel))
  _set_value(conv.kernel, jnp.asarray(k * vector_mask(k, 0.6, 8)))
  cfg = VectorConfig(32, 16, 4, 2)
  sparse = sparsify(conv, method="vector", config=cfg, warn=False)
  assert isinstance(sparse, SparseConv)
  assert sparse.method == "vector" and sparse.config == cfg
  x = _x((1, 6, 6, 4))
  assert_close(sparse(x), conv(x), 1e-4)


# --------------------------------------------------------------------------
# dense_fallback: settle method="auto" for the shapes the model gives.


class _Mixed(nnx.Module):
  """Three SparseConvs: two "auto" (one with a fused relu), one "escort"."""

  def __init__(self):
    rngs = nnx.Rngs(3)
    kw = dict(precision=HIGHEST, kernel_init=np_init, rngs=rngs)
    self.a = SparseConv(3, 8, (3, 3), sparsity=0.7, activation="relu", **kw)
    self.b = SparseConv(8, 8, (3, 3), strides=2, sparsity=0.8, **kw)
    self.c = SparseConv(8, 4, (1, 1), sparsity=0.5, method="escort", **kw)
    for layer in (self.a, self.b, self.c):
      _set_value(layer.bias, _x(layer.bias.shape, seed=11))

  def __call__(self, x):
    return self.c(self.b(self.a(x)))


def _count(fn, x, primitive):
  text = str(jax.make_jaxpr(fn)(x))
  return text.count(f" {primitive}[")


@pytest.mark.skipif(ON_GPU, reason='"auto" is always dense off the GPU only')
def test_dense_fallback_on_cpu_makes_auto_layers_dense_convs():
  """Off the GPU "auto" runs dense: those layers become DenseConvs holding
  their kernel as OHWI (no per-call scatter of the values), or nnx.Convs
  with kernel_layout="HWIO"; the escort one stays, the output does not
  change, and the original keeps its layers."""
  from escort_jax.convert import dense_fallback
  model = _Mixed()
  x = _x((2, 9, 7, 3))
  fast = dense_fallback(model, x)
  assert type(fast.a) is DenseConv and fast.a.activation == "relu"
  assert type(fast.b) is DenseConv
  assert isinstance(fast.c, SparseConv)
  assert all(isinstance(l, SparseConv) for l in (model.a, model.b, model.c))
  chex.assert_trees_all_equal(
      _get_value(fast.b.kernel),
      jnp.transpose(model.b.dense_kernel(), (3, 0, 1, 2)))
  assert_close(fast(x), model(x), F32_BOUND)
  hwio = dense_fallback(model, x, kernel_layout="HWIO")
  assert isinstance(hwio.a, nnx.Sequential)
  assert type(hwio.a.layers[0]) is nnx.Conv
  assert type(hwio.b) is nnx.Conv
  assert isinstance(hwio.c, SparseConv)
  chex.assert_trees_all_equal(_get_value(hwio.b.kernel),
                              model.b.dense_kernel())
  assert_close(hwio(x), model(x), F32_BOUND)
  with pytest.raises(ValueError, match="kernel_layout must be one of"):
    dense_fallback(model, x, kernel_layout="OIHW")
  # The two densifications per call are gone; the escort layer's own
  # kernel remains.
  assert _count(model, x, "scatter") == 2
  assert _count(fast, x, "scatter") == 0
  assert _count(hwio, x, "scatter") == 0
  # sparsify(example_input=...) is the same conversion in one call.
  net, _ = _pruned_net()
  one_call = sparsify(net, warn=False, example_input=_x())
  convs = _convs(one_call)
  assert {type(c) for c in convs.values()} == {DenseConv, nnx.Conv}
  assert type(convs["wrap"]) is nnx.Conv  # CIRCULAR: never converted
  assert_close(one_call(_x()), net(_x()), F32_BOUND)


def test_dense_fallback_follows_the_plan_of_each_layer(plan_dir,
                                                         monkeypatch):
  """As on a GPU with tuned plans: the layer whose plan says dense becomes
  an nnx.Conv, the one whose plan says escort stays sparse; the decision is
  per input shape (another batch size has no plan: cost model)."""
  from escort_jax import ops, plans
  from escort_jax.convert import dense_fallback, probe_calls
  from escort_jax.report import geometry_of
  model = _Mixed()
  x = _x((2, 9, 7, 3))
  monkeypatch.setattr(ops, "on_gpu", lambda: True)
  shapes = {p: c[0].input_shape for p, c in probe_calls(model, x).items()}
  assert list(shapes) == ["a", "b", "c"]
  for name, method in (("a", "escort"), ("b", "dense")):
    layer = getattr(model, name)
    key = plans.plan_key(layer.structure.digest,
                         geometry_of(layer, shapes[name]), jnp.float32,
                         "highest")
    plans.record(key, {"method": method, "config": None},
                 slug=plans.device_slug())
  calls = probe_calls(model, x)
  assert [(p, c[0].choices[0].method, c[0].choices[0].source)
          for p, c in calls.items()] == [("a", "escort", "plan"),
                                         ("b", "dense", "plan"),
                                         ("c", "escort", "caller")]
  other_batch = probe_calls(model, _x((4, 9, 7, 3)))
  assert [c[0].choices[0].source for c in other_batch.values()] == [
      "cost-model", "cost-model", "caller"]
  fast = dense_fallback(model, x)
  assert isinstance(fast.a, SparseConv) and isinstance(fast.c, SparseConv)
  assert type(fast.b) is DenseConv
  monkeypatch.undo()
  assert_close(fast(x), model(x), F32_BOUND)


class _WithHead(nnx.Module):
  """conv -> global mean -> two Linears (one pruned, one dense)."""

  def __init__(self):
    rngs = nnx.Rngs(5)
    self.conv = nnx.Conv(3, 8, (3, 3), precision=HIGHEST, kernel_init=np_init,
                         rngs=rngs)
    self.fc = nnx.Linear(8, 16, precision=HIGHEST, kernel_init=np_init,
                         rngs=rngs)
    self.out = nnx.Linear(16, 4, precision=HIGHEST, kernel_init=np_init,
                          rngs=rngs)
    for layer, sparsity in ((self.conv, 0.7), (self.fc, 0.8)):
      k = _get_value(layer.kernel)
      _set_value(layer.kernel, jnp.where(magnitude_mask(k, sparsity), k, 0))

  def __call__(self, x):
    return self.out(nnx.relu(self.fc(self.conv(x).mean(axis=(1, 2)))))


def test_sparsify_linear_layers():
  """linear=True also turns the selected nnx.Linear layers into
  SparseLinears (by density and name, as convs); the default leaves them;
  the function and the original model do not change; dense_fallback
  turns a SparseLinear's 1x1 conv into a DenseConv where it runs dense."""
  from escort_jax.convert import dense_fallback
  from escort_jax.nnx import SparseLinear
  model = _WithHead()
  x = _x((2, 8, 8, 3))
  plain = sparsify(model, max_density=0.5, warn=False)
  assert type(plain.fc) is nnx.Linear and isinstance(plain.conv, SparseConv)
  sparse = sparsify(model, max_density=0.5, warn=False, linear=True)
  assert isinstance(sparse.fc, SparseLinear)
  assert type(sparse.out) is nnx.Linear  # dense: above max_density
  assert sparse.fc.nnz == np.count_nonzero(_get_value(model.fc.kernel))
  assert type(model.fc) is nnx.Linear
  assert_close(sparse(x), model(x), F32_BOUND)
  only_fc = sparsify(model, filter="^fc$", warn=False, linear=True)
  assert type(only_fc.conv) is nnx.Conv and isinstance(only_fc.fc,
                                                         SparseLinear)
  fast = dense_fallback(sparse, x)
  assert isinstance(fast.fc, SparseLinear)
  if not ON_GPU:  # "auto" runs dense there
    assert type(fast.fc.conv) is DenseConv
  assert_close(fast(x), model(x), F32_BOUND)
