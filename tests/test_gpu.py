"""The 40 benchmark layers (escort_jax/layers.json) on the GPU, compiled.

Each layer runs sparse_conv(method="escort") through Triton at batch 2 in
float32 and bfloat16 and is compared with lax.conv_general_dilated at HIGHEST
precision in float32 (for bfloat16: of the same rounded inputs). A one-line
summary per layer is printed (visible with `pytest -s` or `-rA`), and the last
test prints the largest error per dtype. The vector (tensor-core) kernel runs
on every layer too, with V=16 vector-sparse kernels; and both kernels are
checked for bitwise run-to-run determinism and for where a NaN goes.

Run: python -m pytest -m gpu -rA tests/test_gpu.py
"""

from __future__ import annotations

import json
import pathlib

import chex
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import SparseKernel, sparse_conv, tune
from tests.conftest import (enable_x64, random_array, random_pruned_kernel,
                            random_vector_kernel, rel_err, requires_gpu)

pytestmark = [pytest.mark.gpu, requires_gpu]

BATCH = 2
BOUNDS = {"float32": 1e-5, "bfloat16": 1e-2}
# float16 keeps 11 significant bits (bfloat16 8): its outputs round to ~5e-4.
FLOAT16_BOUND = 2e-3
GRAD_BOUND = 1e-5
DENSE_LAYER_SPARSITY = 0.9  # caffenet conv1 is not pruned in the model

LAYERS = json.loads(
    (pathlib.Path(__file__).resolve().parent.parent / "escort_jax" /
     "layers.json").read_text())["layers"]
GRAD_LAYERS = ("caffenet/conv1", "caffenet/conv2",
               "resnet50/res5a_branch2b")

# (layer name, dtype name) -> relative error; filled by the per-layer tests.
_RESULTS: dict[tuple[str, str], float] = {}


def _name(layer) -> str:
  return f"{layer['net']}/{layer['layer']}"


def _sparsity(layer) -> float:
  return layer["sparsity"] if layer["sparsity"] > 0 else DENSE_LAYER_SPARSITY


def _layer_problem(layer, seed):
  rng = np.random.default_rng(seed)
  c, o, g, k = (layer["in_channels"], layer["out_channels"], layer["groups"],
                layer["kernel"])
  hw = layer["in_hw"]
  x = random_array(rng, (BATCH, hw, hw, c))
  kernel = random_pruned_kernel(rng, (k, k, c // g, o), _sparsity(layer))
  bias = random_array(rng, (o,))
  conv = dict(window_strides=(layer["stride"],) * 2,
              padding=((layer["padding"],) * 2,) * 2,
              feature_group_count=g)
  return rng, x, kernel, bias, conv


def _lax_conv(x, kernel, bias, conv, dtype=jnp.float32):
  y = lax.conv_general_dilated(
      x.astype(dtype), jnp.asarray(kernel).astype(dtype),
      conv["window_strides"], conv["padding"],
      feature_group_count=conv["feature_group_count"],
      dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=lax.Precision.HIGHEST)
  return y + bias.astype(dtype)


def _forward_errors(name, x, kernel, bias, conv, method, vector_width=None,
                    activation=None):
  """Runs sparse_conv(method=...) in float32 and bfloat16 against _lax_conv
  of the same rounded inputs; records and returns {dtype name: rel_err}
  (NaN where an output is not finite), the SparseKernel and the output."""
  assert jax.default_backend() == "gpu"
  errors = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    dt = jnp.dtype(dtype).name
    xd, kd, bd = x.astype(dtype), jnp.asarray(kernel, dtype), bias.astype(
        dtype)
    sk = SparseKernel.from_dense(np.asarray(kd), vector_width=vector_width)
    f = jax.jit(lambda x, sk, b: sparse_conv(
        x, sk, bias=b, activation=activation, method=method, **conv))
    y = f(xd, sk, bd)
    ref = _lax_conv(xd, kd, bd, conv)  # float32 of the rounded inputs
    if activation == "relu":
      ref = jnp.maximum(ref, 0)
    chex.assert_shape(y, ref.shape)
    chex.assert_type(y, dtype)
    finite = bool(jnp.all(jnp.isfinite(y)))
    errors[dt] = rel_err(y, ref) if finite else float("nan")
    _RESULTS[(name, dt)] = errors[dt]
  return errors, sk, y


def _check_relu_conv(what, x, kernel, bias, conv, dtype, bound,
                     vector_width=None, **sparse_kw):
  """sparse_conv(..., activation="relu", **sparse_kw), jitted, on x, kernel
  and bias rounded to `dtype`, against lax at HIGHEST on the same rounded
  inputs: shape, dtype, finite, and rel_err <= bound."""
  xd, kd, bd = x.astype(dtype), jnp.asarray(kernel, dtype), bias.astype(dtype)
  sk = SparseKernel.from_dense(np.asarray(kd), vector_width=vector_width)
  y = jax.jit(lambda x, sk, b: sparse_conv(
      x, sk, bias=b, activation="relu", **sparse_kw, **conv))(xd, sk, bd)
  ref = jnp.maximum(_lax_conv(xd, kd, bd, conv), 0)
  chex.assert_shape(y, ref.shape)
  chex.assert_type(y, dtype)
  assert bool(jnp.all(jnp.isfinite(y))), f"{what}: non-finite output"
  err = rel_err(y, ref)
  assert err <= bound, f"{what} {jnp.dtype(dtype).name}: {err:.3e}"


def _assert_within_bounds(name, errors):
  for dt, err in errors.items():
    assert err <= BOUNDS[dt], f"{name} {dt}: rel_err {err:.3e}"


@pytest.mark.parametrize("layer", LAYERS, ids=[_name(l) for l in LAYERS])
def test_layer_forward(layer):
  name = _name(layer)
  _, x, kernel, bias, conv = _layer_problem(layer, [601, LAYERS.index(layer)])
  errors, sk, y = _forward_errors(name, x, kernel, bias, conv, "escort")
  kh = layer["kernel"]
  print(f"\n[escort-gpu] {name:28s} x=({BATCH},{layer['in_hw']},"
        f"{layer['in_hw']},{layer['in_channels']}) "
        f"k=({kh},{kh},{layer['in_channels'] // layer['groups']},"
        f"{layer['out_channels']}) s={layer['stride']} p={layer['padding']} "
        f"g={layer['groups']} sparsity={_sparsity(layer):.3f} nnz={sk.nnz} "
        f"out={tuple(y.shape)} f32_err={errors['float32']:.2e} "
        f"bf16_err={errors['bfloat16']:.2e}")
  _assert_within_bounds(name, errors)


@pytest.mark.parametrize("batch", [2, 32])
@pytest.mark.parametrize("method", ["escort", "vector"])
@pytest.mark.parametrize("name", ["resnet50/res3a_branch2b", "caffenet/conv2",
                                  "googlenet/inception_3a/5x5"])
def test_float16_layers(name, method, batch):
  """float16 inputs, compiled (the CPU tests interpret them): the escort
  kernel's unpacked multiply-add path and the vector kernel, at a small batch
  and at batch 32 (the 2-byte large-grid config and the layout pass's byte
  blocks), against lax at HIGHEST on the same rounded inputs."""
  layer = next(l for l in LAYERS if _name(l) == name)
  rng, x, kernel, bias, conv = _layer_problem(layer, [608, batch])
  if batch != BATCH:
    x = random_array(rng, (batch,) + x.shape[1:])
  if method == "vector":
    kernel = _vector_kernel(rng, layer, column_multiple=8)
  _check_relu_conv(f"{name} {method} batch {batch}", x, kernel, bias, conv,
                   jnp.float16, FLOAT16_BOUND,
                   vector_width=16 if method == "vector" else None,
                   method=method)


@pytest.mark.parametrize("column_multiple", [1, 8])
@pytest.mark.parametrize("name", ["resnet50/res3a_branch2b",
                                  "googlenet/inception_4a/3x3"])
@pytest.mark.parametrize("index", range(len(tune.DEFAULT_VECTOR_CANDIDATES)))
def test_every_vector_tune_candidate(index, name, column_multiple):
  """Every vector config that tuning may record computes the convolution
  (bias and relu fused) at an odd batch, in bfloat16 and float32, with
  blocks of any number of columns and with multiples of 8 (whose weight
  rows the kernel loads aligned)."""
  cfg = tune.DEFAULT_VECTOR_CANDIDATES[index]
  layer = next(l for l in LAYERS if _name(l) == name)
  rng, x, _, bias, conv = _layer_problem(layer, [607, index])
  x = jnp.concatenate([x, x[:1] * -0.5])
  kernel = _vector_kernel(rng, layer, column_multiple=column_multiple)
  for dtype in (jnp.bfloat16, jnp.float32):
    _check_relu_conv(f"{name} {cfg}", x, kernel, bias, conv, dtype,
                     BOUNDS[jnp.dtype(dtype).name], vector_width=16,
                     method="vector", config=cfg)


@pytest.mark.parametrize("method", ["escort", "vector"])
@pytest.mark.parametrize("name", GRAD_LAYERS)
def test_layer_gradients(name, method):
  """float32 gradients of values, bias and input against float64 lax; for
  "vector" on a V=16 vector-sparse kernel (its weight gradient is the
  tensor-core kernel, its input gradient the escort kernel)."""
  layer = next(l for l in LAYERS if _name(l) == name)
  rng, x, kernel, bias, conv = _layer_problem(layer,
                                              [602, LAYERS.index(layer)])
  if method == "vector":
    if (layer["out_channels"] // layer["groups"]) % 16:
      pytest.skip(f"{name}: output channels per group not a multiple of 16")
    kernel = _vector_kernel(rng, layer)
  sk = SparseKernel.from_dense(kernel)
  y_shape = jax.eval_shape(
      lambda: _lax_conv(x, kernel, bias, conv)).shape
  ct = random_array(rng, y_shape)

  @jax.jit
  def escort_grads(values, b, x):
    return jax.grad(lambda v, bb, xx: jnp.sum(ct * sparse_conv(
        xx, sk.with_values(v), bias=bb, activation="relu", method=method,
        **conv)), argnums=(0, 1, 2))(values, b, x)

  def dense_grads(k, b, x):
    def loss(kk, bb, xx):
      y = jnp.maximum(_lax_conv(xx, kk, bb, conv, kk.dtype), 0)
      return jnp.sum(ct.astype(kk.dtype) * y)
    return jax.grad(loss, argnums=(0, 1, 2))(k, b, x)

  dv, db, dx = escort_grads(sk.values, bias, x)
  # The reference is float64: XLA's float32 kernel gradient of a grouped
  # convolution on the GPU is only ~6e-4 accurate even at HIGHEST precision
  # (seen for caffenet/conv2 on an H100, jax 0.11.2), while escort's is ~1e-7.
  with enable_x64():
    dk, db_ref, dx_ref = (np.asarray(a) for a in jax.jit(dense_grads)(
        jnp.asarray(kernel, jnp.float64), bias.astype(jnp.float64),
        x.astype(jnp.float64)))
  pos = sk.structure.dense_positions()
  errs = {"values": rel_err(dv, np.asarray(dk)[pos]),
          "bias": rel_err(db, db_ref), "x": rel_err(dx, dx_ref)}
  dk_sparse = np.asarray(sk.with_values(dv).todense())
  print(f"\n[{method}-gpu-grad] {name:28s} nnz={sk.nnz} " + " ".join(
      f"d{k}_err={v:.2e}" for k, v in errs.items()))
  assert np.all(dk_sparse[np.asarray(kernel) == 0] == 0)
  for what, err in errs.items():
    assert err <= GRAD_BOUND, f"{name} d{what}: rel_err {err:.3e}"


def _vector_kernel(rng, layer, v=16, column_multiple=1):
  c, o, g, k = (layer["in_channels"], layer["out_channels"], layer["groups"],
                layer["kernel"])
  return random_vector_kernel(rng, (k, k, c // g, o), _sparsity(layer), v,
                              column_multiple=column_multiple)


@pytest.mark.parametrize("layer", LAYERS, ids=[_name(l) for l in LAYERS])
def test_layer_forward_vector(layer):
  name = _name(layer)
  if (layer["out_channels"] // layer["groups"]) % 16:
    pytest.skip(f"{name}: output channels per group not a multiple of 16")
  rng, x, _, bias, conv = _layer_problem(layer, [603, LAYERS.index(layer)])
  kernel = _vector_kernel(rng, layer)
  errors, _, _ = _forward_errors(name + "[vector]", x, kernel, bias, conv,
                                 "vector", vector_width=16,
                                 activation="relu")
  print(f"\n[vector-gpu] {name:28s} V=16 sparsity={_sparsity(layer):.3f} "
        f"f32_err={errors['float32']:.2e} bf16_err={errors['bfloat16']:.2e}")
  _assert_within_bounds(name + "[vector]", errors)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["resnet50/res2a_branch2b",
                                  "resnet50/res5a_branch2b",
                                  "caffenet/conv2"])
@pytest.mark.parametrize("index", range(len(tune.DEFAULT_CANDIDATES)))
def test_every_tune_candidate(index, name, batch):
  """Every escort config that tuning may record into a plan computes the
  convolution (with bias and relu, which the split configs apply after the
  parts' sum), at batch 1 and an odd batch."""
  cfg = tune.DEFAULT_CANDIDATES[index]
  layer = next(l for l in LAYERS if _name(l) == name)
  _, x, kernel, bias, conv = _layer_problem(layer, [606, index, batch])
  x = x[:1] if batch == 1 else jnp.concatenate([x, x[:1] * -0.5])
  for dtype in (jnp.float32, jnp.bfloat16):
    _check_relu_conv(f"{name} batch {batch} {cfg}", x, kernel, bias, conv,
                     dtype, BOUNDS[jnp.dtype(dtype).name], method="escort",
                     config=cfg)


@pytest.mark.parametrize("method", ["escort", "vector"])
@pytest.mark.parametrize("name", ["resnet50/res3a_branch2b",
                                  "googlenet/inception_3a/3x3"])
def test_bitwise_determinism(name, method):
  """Forward and both gradients give identical bits over repeated runs: no
  atomics, no split reductions, fixed summation order."""
  layer = next(l for l in LAYERS if _name(l) == name)
  rng, x, kernel, bias, conv = _layer_problem(layer, [604, 0])
  if method == "vector":
    kernel = _vector_kernel(rng, layer)
  sk = SparseKernel.from_dense(kernel)
  x = x.astype(jnp.bfloat16) if method == "vector" else x
  sk = sk.with_values(sk.values.astype(x.dtype))
  b = bias.astype(x.dtype)

  @jax.jit
  def run(values, x):
    def f(v, xx):
      return sparse_conv(xx, sk.with_values(v), bias=b, activation="relu",
                         method=method, **conv)
    y, vjp = jax.vjp(f, values, x)
    return (y,) + vjp(jnp.cos(y.astype(jnp.float32)).astype(y.dtype))

  first = [np.asarray(a) for a in run(sk.values, x)]
  for _ in range(4):
    again = run(sk.values, x)
    for a, b_ in zip(first, again):
      assert a.tobytes() == np.asarray(b_).tobytes(), (
          f"{name} {method}: a result changed between runs")
  print(f"\n[determinism-gpu] {name} {method}: 5 runs bitwise identical")


@pytest.mark.parametrize("method", ["escort", "vector"])
def test_nan_reaches_exactly_the_outputs_of_kept_weights(method):
  """A NaN input pixel makes NaN exactly the outputs it reaches through a
  kept weight, also through the fused relu; pruned weights do not spread it.
  """
  layer = next(l for l in LAYERS if _name(l) == "resnet50/res5a_branch2b")
  rng, x, kernel, bias, conv = _layer_problem(layer, [605, 0])
  if method == "vector":
    kernel = _vector_kernel(rng, layer)
  sk = SparseKernel.from_dense(kernel)
  x = np.array(x)
  x[1, 3, 4, 7] = np.nan
  y = jax.jit(lambda x: sparse_conv(x, sk, bias=bias, activation="relu",
                                    method=method, **conv))(jnp.asarray(x))
  # Reached: outputs whose window covers (3, 4) with a kept weight on
  # channel 7.
  hit = lax.conv_general_dilated(
      jnp.asarray(np.isnan(x), jnp.float32),
      jnp.asarray(kernel != 0, jnp.float32), conv["window_strides"],
      conv["padding"], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=conv["feature_group_count"]) > 0
  assert np.asarray(hit).any()
  np.testing.assert_array_equal(np.isnan(np.asarray(y)), np.asarray(hit))


@pytest.mark.parametrize("method", ["escort", "vector"])
def test_static_tables_stay_constants(method):
  """Blocks that keep equal numbers of columns give tables that XLA would
  rewrite into broadcasts and iotas, each then its own fusion kernel per
  call (pallas_kernels/static_tables.py); the compiled program has none."""
  import re  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(606)
  v, per_block = 16, 24
  mask = np.zeros((3 * 3 * 32, 64), bool)
  for b in range(64 // v):
    mask[rng.choice(mask.shape[0], per_block, replace=False),
         b * v:(b + 1) * v] = True
  kernel = np.where(mask, rng.standard_normal(mask.shape), 0.0).reshape(
      3, 3, 32, 64)
  sk = SparseKernel.from_dense(jnp.asarray(kernel, jnp.bfloat16))
  x = random_array(rng, (32, 14, 14, 32)).astype(jnp.bfloat16)
  fn = jax.jit(lambda x, sk: sparse_conv(x, sk, padding="SAME",
                                         method=method))
  hlo = fn.lower(x, sk).compile().as_text()
  made = re.findall(r"= s32\[\d+\]\{0\} (?:fusion|broadcast|iota|multiply)\(",
                    hlo)
  assert not made, f"{method}: int32 tables computed per call: {made}"
  assert "custom-call" in hlo  # the kernel is in this program


def test_zz_summary():
  """Prints the largest error per dtype over the layers that ran."""
  if not _RESULTS:
    pytest.skip("no layer ran in this session")
  lines = []
  for dt in ("float32", "bfloat16"):
    errs = {n: e for (n, d), e in _RESULTS.items() if d == dt}
    worst = max(errs, key=lambda n: (np.nan_to_num(errs[n], nan=np.inf)))
    lines.append(f"[escort-gpu] {dt}: {len(errs)} layers, max rel_err "
                 f"{errs[worst]:.2e} ({worst}), bound {BOUNDS[dt]:.0e}")
  print("\n" + "\n".join(lines))
  for dt in ("float32", "bfloat16"):
    worst = max(np.nan_to_num(e, nan=np.inf)
                for (n, d), e in _RESULTS.items() if d == dt)
    assert worst <= BOUNDS[dt], f"{dt}: max rel_err {worst:.3e}"


@pytest.mark.parametrize("b_dtype", ["float32", "bfloat16"])
def test_fused_multiply_add_rounds_once(b_dtype):
  """The escort kernel's compiled multiply-add is one fma.rn.f32: equal, bit
  for bit, to a * b + c computed in float64 and rounded once to float32
  (a multiply and an add, each rounded, differ on a fraction of elements).
  With bfloat16 b, the asm unpacks b two elements at a time."""
  from jax.experimental import pallas as pl  # pylint: disable=g-import-not-at-top
  from pallas_kernels.direct_sparse_conv import multiply_add
  rng = np.random.default_rng(7)
  a, b, c = (jnp.asarray(rng.standard_normal(1024), jnp.float32)
             for _ in range(3))
  b = b.astype(b_dtype)

  def kernel(a_ref, b_ref, c_ref, o_ref):
    o_ref[...] = multiply_add(a_ref[...], b_ref[...], c_ref[...], fused=True,
                              packed_bf16=True)

  out = pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((1024,), jnp.float32))(a, b, c)
  a64, b64, c64 = (np.asarray(v.astype(jnp.float32), np.float64)
                   for v in (a, b, c))
  once = (a64 * b64 + c64).astype(np.float32)
  twice = ((a64 * b64).astype(np.float32).astype(np.float64)
           + c64).astype(np.float32)
  assert np.any(once != twice), "inputs too tame to tell the two apart"
  np.testing.assert_array_equal(np.asarray(out), once)
