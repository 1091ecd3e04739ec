"""Framed activations (escort_jax.frames): the vector kernel from frame to
frame against lax.conv_general_dilated, chains of layers, the frames' zero
margins, gradients, and the errors.

On the CPU the kernel runs through the Pallas interpreter, which fills the
output with NaN first: a margin the kernel does not write stays NaN and
fails the exact-zero checks. The GPU tests run it compiled on workload
layers.
"""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import (Framed, SparseKernel, VectorConfig, from_frame,
                        sparse_conv, to_frame)
from escort_jax import frames, tune
from escort_jax.conv_geometry import make_geometry
from escort_jax.ops import framed_vector_plan
from pallas_kernels.vector_sparse_conv import (vector_sparse_conv,
                                               vector_sparse_conv_reference)
from tests.conftest import (assert_close, random_array, random_pruned_kernel,
                            random_vector_kernel, reference_conv,
                            requires_gpu)

F32_BOUND = 1e-5


def _margins_are_zero(xf: Framed) -> bool:
  """Whether everything of xf.data outside the activation is exactly 0."""
  f = xf.frame
  (top, _), (left, _) = f.margins
  outside = np.ones(f.shape, bool)
  outside[:f.channels, top:top + f.height, left:left + f.width, :] = False
  return bool(np.all(np.asarray(xf.data)[outside] == 0))


def _vector_sk(rng, r, c, k, sparsity, v, dtype=np.float32):
  kernel = random_vector_kernel(rng, (r, r, c, k), sparsity, v, dtype)
  return kernel, SparseKernel.from_dense(kernel)


# ---------------------------------------------------------------------------
# The layout.


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_to_frame_round_trip(layout):
  rng = np.random.default_rng(0)
  x = random_array(rng, (3, 5, 4, 6))
  x_in = x if layout == "NHWC" else jnp.transpose(x, (0, 3, 1, 2))
  xf = to_frame(x_in, ((1, 2), (3, 0)), layout=layout)
  f = xf.frame
  chex.assert_shape(xf.data, (6 + f.extra_planes, 8, 7, 3))
  assert xf.shape == (3, 5, 4, 6)
  assert _margins_are_zero(xf)
  # data[c, top + h, left + w, n] = x[n, h, w, c]
  np.testing.assert_array_equal(np.asarray(xf.data)[2, 1 + 4, 3 + 1, 0],
                                np.asarray(x)[0, 4, 1, 2])
  chex.assert_trees_all_equal(from_frame(xf, layout=layout), x_in)


def test_frame_has_room_for_reads_past_the_last_plane():
  # A wide row and FRAME_SLACK positions, in whole zero planes.
  for n, hw in ((1, 7), (32, 56), (2, 3)):
    f = frames.frame_of((n, hw, hw, 4), 1)
    assert f.extra_planes * f.plane_len >= (f.plane_w * n
                                           + frames.FRAME_SLACK)
    assert (f.extra_planes - 1) * f.plane_len < (f.plane_w * n
                                                 + frames.FRAME_SLACK)


@pytest.mark.parametrize("kernel_hw, strides, padding, margins", [
    (3, (1, 1), "SAME", ((1, 1), (1, 1))),
    (5, (1, 1), "SAME", ((2, 2), (2, 2))),
    (1, (1, 1), "SAME", ((0, 0), (0, 0))),
    (3, (1, 1), ((2, 0), (0, 2)), ((2, 0), (0, 2))),  # uneven, keeps 7x7
    (3, (2, 2), "SAME", None),
    (3, (1, 1), "VALID", None),
    (1, (1, 1), ((-1, 1), (0, 0)), None),  # keeps the size, crops a row
])
def test_tightest_frame(kernel_hw, strides, padding, margins):
  sk = SparseKernel.from_dense(random_pruned_kernel(
      np.random.default_rng(0), (kernel_hw, kernel_hw, 4, 8), 0.5))
  g = make_geometry((2, 7, 7, 4), sk.structure, strides, padding, (1, 1), 1)
  frame = frames.tightest_frame(g)
  if margins is None:
    assert frame is None
    return
  assert frame.margins == margins and frame.nhwc_shape == (2, 7, 7, 4)
  frames.check_reads(frame, g)  # the convolution reads it


def test_framed_is_a_pytree_through_jit():
  rng = np.random.default_rng(1)
  xf = to_frame(random_array(rng, (2, 4, 4, 3)), 1)
  yf = jax.jit(lambda t: jax.tree.map(jax.nn.relu, t))(xf)
  assert isinstance(yf, Framed) and yf.frame == xf.frame
  chex.assert_trees_all_equal(from_frame(yf), jax.nn.relu(from_frame(xf)))


# ---------------------------------------------------------------------------
# The kernel's framed output against its twin.


@pytest.mark.parametrize("v,block_q,prefetch,h,margins", [
    (16, 16, 0, 5, ((2, 1), (1, 3))),
    (8, 32, 1, 5, ((2, 1), (1, 3))),
    (32, 64, 0, 5, ((2, 1), (1, 3))),
    # More margin chunks than tiles, and four zero planes.
    (8, 32, 0, 2, ((4, 3), (2, 2)))])
def test_framed_kernel_matches_its_twin(v, block_q, prefetch, h, margins):
  """The kernel's whole frame (data, zero margins, zero planes) equals the
  plain-JAX twin's, on odd shapes and margins wider than the padding."""
  rng = np.random.default_rng([2, v, block_q, h])
  n, w, c = 3, 7, 9
  _, sk = _vector_sk(rng, 3, c, 2 * v, 0.6, v)
  xf = to_frame(random_array(rng, (n, h, w, c)), margins)
  g = make_geometry((n, h, w, c), sk.structure, (1, 1), "SAME", (1, 1), 1)
  plan = framed_vector_plan(sk.structure, g, xf.frame,
                            VectorConfig(block_q=block_q, block_k=16,
                                         prefetch=prefetch))
  bias = random_array(rng, (2 * v,))
  kw = dict(out_len=plan.out_len, bias=bias, relu=True, framed=plan.output)
  y = vector_sparse_conv(xf.data.reshape(-1), sk.values, plan.blocks,
                         block_q=block_q, prefetch=prefetch, interpret=True,
                         **kw)
  ref = vector_sparse_conv_reference(xf.data.reshape(-1), sk.values,
                                     plan.blocks, **kw)
  chex.assert_shape(y, xf.frame.with_channels(2 * v).shape)
  assert np.all(np.isfinite(np.asarray(y))), "unwritten frame entries"
  assert_close(y, ref, F32_BOUND)


@pytest.mark.parametrize("v,prefetch", [(16, 0), (64, 1)])
def test_framed_kernel_lowers_to_triton(v, prefetch):
  """The compiled kernel's Triton lowering, which the interpreter skips,
  runs on the CPU too: exported for CUDA (lowered, not compiled)."""
  from jax import export
  rng = np.random.default_rng([9, v])
  _, sk = _vector_sk(rng, 3, 32, 2 * v, 0.8, v)
  shape = (4, 6, 6, 32)
  frame = frames.frame_of(shape, 1)
  g = make_geometry(shape, sk.structure, (1, 1), "SAME", (1, 1), 1)
  plan = framed_vector_plan(sk.structure, g, frame,
                            VectorConfig(128, 64, 8, 3, prefetch))

  def fn(x, values, bias):
    return vector_sparse_conv(x, values, plan.blocks, out_len=plan.out_len,
                              bias=bias, relu=True, block_q=128, num_warps=8,
                              num_stages=3, prefetch=prefetch,
                              framed=plan.output)

  args = (jax.ShapeDtypeStruct((int(np.prod(frame.shape)),), jnp.bfloat16),
          jax.ShapeDtypeStruct(sk.values.shape, jnp.bfloat16),
          jax.ShapeDtypeStruct((2 * v,), jnp.bfloat16))
  exported = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "__gpu$xla.gpu.triton")])(*args)
  assert "escort_vector_sparse_conv" in exported.mlir_module()


@pytest.mark.parametrize("index", range(len(tune.DEFAULT_VECTOR_CANDIDATES)))
def test_every_vector_tune_candidate_on_a_frame(index):
  """Every vector config that tuning may record: on a frame and NHWC in and
  out against lax, its framed kernel against the twin (interpreted: tile
  sizes and prefetch), and its Triton lowering with its warps and stages
  (exported for CUDA)."""
  from jax import export
  cfg = tune.DEFAULT_VECTOR_CANDIDATES[index]
  rng = np.random.default_rng([10, index])
  kernel, sk = _vector_sk(rng, 3, 24, 64, 0.7, 64)
  shape = (3, 5, 7, 24)
  x = random_array(rng, shape)
  ref = reference_conv(x, kernel, (1, 1), "SAME")
  assert_close(sparse_conv(x, sk, method="vector", config=cfg), ref,
               F32_BOUND)
  xf = to_frame(x, 1)
  assert_close(from_frame(sparse_conv(xf, sk, method="vector", config=cfg)),
               ref, F32_BOUND)
  g = make_geometry(shape, sk.structure, (1, 1), "SAME", (1, 1), 1)
  plan = framed_vector_plan(sk.structure, g, xf.frame, cfg)
  bias = random_array(rng, (64,))
  kw = dict(out_len=plan.out_len, relu=True, framed=plan.output)
  launch = dict(block_q=cfg.block_q, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, prefetch=cfg.prefetch)
  y = vector_sparse_conv(xf.data.reshape(-1), sk.values, plan.blocks,
                         bias=bias, interpret=True, **launch, **kw)
  ref = vector_sparse_conv_reference(xf.data.reshape(-1), sk.values,
                                     plan.blocks, bias=bias, **kw)
  assert np.all(np.isfinite(np.asarray(y))), "unwritten frame entries"
  assert_close(y, ref, F32_BOUND)
  args = (jax.ShapeDtypeStruct(xf.data.reshape(-1).shape, jnp.bfloat16),
          jax.ShapeDtypeStruct(sk.values.shape, jnp.bfloat16),
          jax.ShapeDtypeStruct((64,), jnp.bfloat16))
  exported = export.export(
      jax.jit(lambda x, values, b: vector_sparse_conv(
          x, values, plan.blocks, bias=b, **launch, **kw)),
      platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
              *args)
  assert "escort_vector_sparse_conv" in exported.mlir_module()


# ---------------------------------------------------------------------------
# sparse_conv on frames against lax.


def test_chain_of_framed_layers_matches_lax():
  """3x3 then 5x5 then 3x3 (groups 2), all on one frame of margins 2: each
  output's data against lax, and its margins exactly zero."""
  rng = np.random.default_rng(3)
  n, h, w = 2, 7, 5
  x = random_array(rng, (n, h, w, 16))
  k1, sk1 = _vector_sk(rng, 3, 16, 32, 0.7, 16)
  k2, sk2 = _vector_sk(rng, 5, 32, 16, 0.8, 8)
  k3 = random_vector_kernel(rng, (3, 3, 8, 32), 0.5, 8)
  sk3 = SparseKernel.from_dense(k3)
  b1, b3 = random_array(rng, (32,)), random_array(rng, (32,))
  xf = to_frame(x, 2)
  y1 = sparse_conv(xf, sk1, bias=b1, activation="relu", method="vector")
  y2 = sparse_conv(y1, sk2, padding=((2, 2), (2, 2)), method="vector")
  y3 = jax.jit(lambda t, sk: sparse_conv(
      t, sk, bias=b3, feature_group_count=2, method="vector"))(y2, sk3)
  r1 = reference_conv(x, k1, (1, 1), "SAME", bias=b1, activation="relu")
  r2 = reference_conv(r1, k2, (1, 1), "SAME")
  r3 = reference_conv(r2, k3, (1, 1), "SAME", bias=b3, feature_group_count=2)
  for yf, ref, what in ((y1, r1, "first"), (y2, r2, "second"),
                        (y3, r3, "third")):
    assert isinstance(yf, Framed) and yf.frame.margins == ((2, 2), (2, 2))
    assert _margins_are_zero(yf), f"{what}: nonzero margins"
    assert_close(from_frame(yf), ref, F32_BOUND, what)


def test_tiny_map_at_batch_one():
  """A 2x2 map of one image: its frame has more zero planes (65) than the
  kernel has lanes."""
  rng = np.random.default_rng(10)
  x = random_array(rng, (1, 2, 2, 8))
  kernel, sk = _vector_sk(rng, 3, 8, 16, 0.5, 16)
  xf = to_frame(x, 1)
  assert xf.frame.extra_planes > 16
  yf = sparse_conv(xf, sk, method="vector")
  assert _margins_are_zero(yf)
  assert_close(from_frame(yf), reference_conv(x, kernel, (1, 1), "SAME"),
               F32_BOUND)


def test_framed_padding_columns_do_not_read_the_data():
  """Channel 0 of the input is NaN and no kept weight reads it: padding
  columns of the packing (blocks whose kept count is not a multiple of
  block_k) read somewhere in the frame, and must be masked."""
  rng = np.random.default_rng(4)
  x = np.asarray(random_array(rng, (2, 4, 6, 8))).copy()
  kernel = random_vector_kernel(rng, (3, 3, 8, 16), 0.5, 16)
  kernel[:, :, 0, :] = 0
  sk = SparseKernel.from_dense(kernel)
  ref = reference_conv(x, kernel, (1, 1), "SAME")
  x[..., 0] = np.nan
  yf = sparse_conv(to_frame(jnp.asarray(x), 1), sk, method="vector",
                   config=VectorConfig(block_q=32, block_k=16))
  assert_close(from_frame(yf), ref, F32_BOUND)


def test_framed_gradients_match_lax():
  rng = np.random.default_rng(5)
  x = random_array(rng, (2, 5, 4, 8))
  kernel, sk = _vector_sk(rng, 3, 8, 16, 0.6, 8)
  bias = random_array(rng, (16,))
  frame = frames.frame_of(x.shape, 1)
  cot = random_array(rng, (2, 5, 4, 16))

  def framed(values, b, data):
    yf = sparse_conv(Framed(data, frame), sk.with_values(values), bias=b,
                     activation="relu", method="vector")
    return jnp.sum(from_frame(yf) * cot)

  def dense(values, b, x):
    k = sk.with_values(values).todense()
    return jnp.sum(reference_conv(x, k, (1, 1), "SAME", bias=b,
                                  activation="relu") * cot)

  gv, gb, gd = jax.grad(framed, (0, 1, 2))(sk.values, bias,
                                           frames.frame_data(x, frame))
  rv, rb, rx = jax.grad(dense, (0, 1, 2))(sk.values, bias, x)
  assert_close(gv, rv, 1e-4, "values")
  assert_close(gb, rb, 1e-4, "bias")
  assert_close(frames.unframe_data(gd, frame), rx, 1e-4, "input")
  assert _margins_are_zero(Framed(gd, frame)), "input gradient margins"


def test_framed_input_of_other_methods_goes_through_nhwc():
  """An unstructured kernel (method "escort", and "auto" on the CPU) reads
  the frame through NHWC and returns a frame."""
  rng = np.random.default_rng(6)
  x = random_array(rng, (2, 5, 5, 4))
  kernel = random_pruned_kernel(rng, (3, 3, 4, 6), 0.7)
  sk = SparseKernel.from_dense(kernel)
  ref = reference_conv(x, kernel, (1, 1), "SAME")
  for method in ("escort", "auto"):
    yf = sparse_conv(to_frame(x, 1), sk, method=method)
    assert isinstance(yf, Framed) and _margins_are_zero(yf)
    assert_close(from_frame(yf), ref, F32_BOUND, method)


# ---------------------------------------------------------------------------
# Errors.


def test_framed_errors():
  rng = np.random.default_rng(7)
  x = random_array(rng, (2, 6, 6, 8))
  _, sk = _vector_sk(rng, 3, 8, 16, 0.6, 8)
  _, sk5 = _vector_sk(rng, 5, 8, 16, 0.6, 8)
  xf = to_frame(x, 1)
  with pytest.raises(ValueError, match="keeps the map's size"):
    sparse_conv(xf, sk, (2, 2), method="vector")
  with pytest.raises(ValueError, match="keeps the map's size"):
    sparse_conv(xf, sk, padding="VALID", method="vector")
  with pytest.raises(ValueError, match="more than the frame's margins"):
    sparse_conv(xf, sk5, padding="SAME", method="vector")
  with pytest.raises(ValueError, match="input and output layouts must be "
                     "'NHWC'"):
    sparse_conv(xf, sk, dimension_numbers=("NCHW", "HWIO", "NCHW"),
                method="vector")
  with pytest.raises(ValueError, match="needs a vector-sparse kernel"):
    unstructured = SparseKernel.from_dense(
        random_pruned_kernel(rng, (3, 3, 8, 16), 0.7))
    sparse_conv(xf, unstructured, method="vector")
  with pytest.raises(ValueError, match="takes block_q up to"):
    sparse_conv(xf, sk, method="vector", config=VectorConfig(block_q=2048))
  with pytest.raises(ValueError, match="has shape"):
    Framed(xf.data[:, 1:], xf.frame)
  with pytest.raises(ValueError, match="margins must be non-negative"):
    to_frame(x, -1)
  with pytest.raises(ValueError, match="rank 4"):
    to_frame(x[0], 1)
  with pytest.raises(TypeError, match="takes a Framed"):
    from_frame(x)


# ---------------------------------------------------------------------------
# Compiled, on workload layers.

LAYERS = {f"{l['net']}/{l['layer']}": l for l in json.loads(
    (pathlib.Path(__file__).resolve().parent.parent / "escort_jax" /
     "layers.json").read_text())["layers"]}


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("v", [16, 64])
@pytest.mark.parametrize("name", ["resnet50/res2a_branch2b",
                                  "resnet50/res4a_branch2b",
                                  "caffenet/conv2",
                                  "googlenet/inception_5b/5x5"])
def test_gpu_framed_layer_twice(name, v):
  """A workload layer run twice in a chain on frames (its output fed back
  in where the channels match, else a second layer of its output's
  channels), float32 and bfloat16 at batch 5, against lax."""
  layer = LAYERS[name]
  rng = np.random.default_rng([8, v, len(name)])
  c, o, k, p, g = (layer["in_channels"], layer["out_channels"],
                   layer["kernel"], layer["padding"], layer["groups"])
  if (o // g) % v:
    pytest.skip(f"{name}: V={v} does not divide the output channels")
  hw = layer["in_hw"]
  x = random_array(rng, (5, hw, hw, c))
  k1 = random_vector_kernel(rng, (k, k, c // g, o), 0.8, v)
  k2 = random_vector_kernel(rng, (k, k, o // g, o), 0.9, v)
  b1, b2 = random_array(rng, (o,)), random_array(rng, (o,))
  conv = dict(padding=((p, p), (p, p)), feature_group_count=g)
  for dtype, bound in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
    xd = x.astype(dtype)
    sks = [SparseKernel.from_dense(np.asarray(jnp.asarray(kk, dtype)))
           for kk in (k1, k2)]

    @jax.jit
    def chain(data, sk1, sk2):
      xf = Framed(data, frames.frame_of(x.shape, p))
      y1 = sparse_conv(xf, sk1, bias=b1.astype(dtype), activation="relu",
                       method="vector", **conv)
      return y1, sparse_conv(y1, sk2, bias=b2.astype(dtype), **conv)

    y1, y2 = chain(frames.frame_data(xd, frames.frame_of(x.shape, p)), *sks)
    r1 = reference_conv(xd, jnp.asarray(k1, dtype), (1, 1), conv["padding"],
                        bias=b1.astype(dtype), activation="relu",
                        feature_group_count=g)
    assert _margins_are_zero(y1) and _margins_are_zero(y2)
    assert_close(from_frame(y1), r1, bound, f"{name} first")
    # The second layer's reference starts from the first's rounded output.
    r2 = reference_conv(from_frame(y1), jnp.asarray(k2, dtype), (1, 1),
                        conv["padding"], bias=b2.astype(dtype),
                        feature_group_count=g)
    assert_close(from_frame(y2), r2, bound, f"{name} second")


# ---------------------------------------------------------------------------
# Flax.


def test_nnx_sparse_conv_takes_frames():
  """Two nnx SparseConv layers (vector method, ReLU) on a frame give what
  they give on NHWC, in one jitted model; a frame of the wrong channel
  count is refused."""
  from flax import nnx
  from escort_jax.nnx import SparseConv
  rng = np.random.default_rng(11)
  masks = [random_vector_kernel(rng, (3, 3, 8, 16), 0.6, 8) != 0,
           random_vector_kernel(rng, (3, 3, 16, 16), 0.7, 16) != 0]
  layers = [SparseConv(8, 16, (3, 3), mask=masks[0], activation="relu",
                       method="vector", rngs=nnx.Rngs(0)),
            SparseConv(16, 16, (3, 3), mask=masks[1], method="vector",
                       rngs=nnx.Rngs(1))]
  x = random_array(rng, (2, 5, 6, 8))

  @nnx.jit
  def run(layers, x):
    xf = to_frame(x, 1)
    for layer in layers:
      xf = layer(xf)
    return from_frame(xf)

  nhwc = layers[1](layers[0](x))
  assert_close(run(layers, x), nhwc, F32_BOUND)
  with pytest.raises(ValueError, match="the frame holds 8 channels"):
    layers[1](to_frame(x, 1))


def test_linen_sparse_conv_and_dense_conv_take_frames():
  """linen.SparseConv (vector method) runs frame to frame; nnx.DenseConv
  (a dense fallback layer) takes a frame through NHWC; both give what they
  give on NHWC, and return frames with the input's margins."""
  from flax import nnx
  from escort_jax import linen as esl
  from escort_jax.nnx import SparseConv
  rng = np.random.default_rng(12)
  x = random_array(rng, (2, 5, 6, 8))
  kernel = random_vector_kernel(rng, (3, 3, 8, 16), 0.6, 8)
  sk = SparseKernel.from_dense(kernel)
  layer = esl.SparseConv(16, (3, 3), structure=sk.structure,
                         method="vector")
  params = {"params": {"values": sk.values,
                       "bias": random_array(rng, (16,))}}
  yf = layer.apply(params, to_frame(x, 2))
  assert isinstance(yf, Framed) and yf.frame.margins == ((2, 2), (2, 2))
  assert _margins_are_zero(yf)
  assert_close(from_frame(yf), layer.apply(params, x), F32_BOUND)

  dense = SparseConv(8, 16, (3, 3), mask=kernel != 0, method="dense",
                     rngs=nnx.Rngs(0)).to_dense_conv()
  yf = dense(to_frame(x, 1))
  assert isinstance(yf, Framed) and _margins_are_zero(yf)
  assert_close(from_frame(yf), dense(x), F32_BOUND)
