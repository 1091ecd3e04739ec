"""Hypothesis property tests: sparse_conv(method="escort") and
sparse_conv(method="vector") against lax.conv_general_dilated on random
configurations (marker `property`).

    python -m pytest -m property -q

Every example draws a whole convolution: batch 1-3, H and W 1-9, channels
and output channels with feature groups dividing them (depthwise included),
kernels 1-5, strides 1-3, dilation 1-2, padding "SAME" / "SAME_LOWER" /
"VALID" / explicit asymmetric pairs (zero and cropping -1 included),
float32 / bfloat16 / float16, sparsity 0 % ... 100 %, NHWC, NCHW and a mixed
layout, bias and relu on or off. The escort path (the Pallas kernels; the
Pallas interpreter on the CPU) must match lax.conv_general_dilated at
HIGHEST precision: float32 to 1e-5 norm-wise, bfloat16 / float16 to 1e-2
against the float32 convolution of the same rounded inputs. Empty outputs
must have lax's shape.

Compile budget. Every new (input shape, structure, static argument) compiles
the kernels afresh (0.3-1 s on the CPU), so most examples come from POOL: a
fixed, stratified set of bucketed configurations, each with one fixed mask
(SparseStructure), whose compiled programs are reused while the values (input,
kept weights, bias) change from example to example. About a third of the
examples are "fresh": every field drawn freely by hypothesis, shape
included, at the price of a compile each. The run is derandomized (same
examples every time, no example database), and the last test asserts how
many examples were checked (at least MIN_CONV_CASES, MIN_GRAD_CASES,
MIN_VECTOR_CASES and MIN_VECTOR_GRAD_CASES).

The vector path (method="vector", the vector-sparse tensor-core kernel) is
checked the same way on vector-sparse configurations: blocks of V = 8, 16 or
32 consecutive output channels keep the same kernel positions (masks from
escort_jax.prune.vector_mask, so out_channels // groups is a multiple of V and
every block lies within one feature group), sparsity 0 % (every vector kept)
... 100 % (none kept), under the same bounds, from its own bucketed
VECTOR_POOL plus fresh draws; its gradients (values, bias, input; they run the
escort kernels) against those of method="dense" at HIGHEST.

ESCORT_PROPERTY_EXAMPLES / ESCORT_PROPERTY_GRAD_EXAMPLES and
ESCORT_PROPERTY_VECTOR_EXAMPLES / ESCORT_PROPERTY_VECTOR_GRAD_EXAMPLES scale
the run (the minimum asserted scales with them). The last test prints a
one-line summary of the counts per method (with the backend); with
ESCORT_PROPERTY_SUMMARY=path it also writes them there as JSON, so that a GPU
run can report them.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import json
import os
import time

import chex
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax import SparseKernel, sparse_conv
from tests.conftest import random_vector_kernel, reference_conv, rel_err

pytestmark = pytest.mark.property

CONV_EXAMPLES = int(os.environ.get("ESCORT_PROPERTY_EXAMPLES", "330"))
GRAD_EXAMPLES = int(os.environ.get("ESCORT_PROPERTY_GRAD_EXAMPLES", "40"))
# Hypothesis may discard a few draws (assume); the floor leaves room for that.
MIN_CONV_CASES = min(300, CONV_EXAMPLES)
MIN_GRAD_CASES = min(40, GRAD_EXAMPLES)
# A vector example costs about what an escort one does in the interpreter
# (0.2-0.3 s on 2 CPU cores, compile included; a gradient ~0.5 s): these
# defaults add ~2.5 minutes, and the whole property run took ~6 minutes on 2
# CPU cores (budget: 15).
VECTOR_EXAMPLES = int(os.environ.get("ESCORT_PROPERTY_VECTOR_EXAMPLES", "400"))
VECTOR_GRAD_EXAMPLES = int(os.environ.get(
    "ESCORT_PROPERTY_VECTOR_GRAD_EXAMPLES", "60"))
MIN_VECTOR_CASES = min(360, VECTOR_EXAMPLES)
MIN_VECTOR_GRAD_CASES = min(54, VECTOR_GRAD_EXAMPLES)

F32_BOUND = 1e-5
LOW_BOUND = 1e-2
GRAD_BOUND = 1e-5

# (input, kernel, output) layouts: Flax's, PyTorch/Caffe's, and a mixed one.
LAYOUTS = (("NHWC", "HWIO", "NHWC"), ("NCHW", "OIHW", "NCHW"),
           ("NCHW", "HWIO", "NHWC"))
DTYPES = ("float32", "bfloat16", "float16")
SPARSITIES = (0.0, 0.5, 0.8, 0.95, 1.0)

# (N, H, W, C, O, R, S, groups): the shapes of POOL, few enough that their
# compiled programs are reused. Depthwise, 1x1, single pixel, single row,
# kernel larger than the image.
BUCKETS = (
    (2, 7, 9, 4, 6, 3, 3, 1),
    (1, 9, 9, 3, 5, 5, 5, 1),
    (3, 5, 6, 6, 4, 3, 2, 2),
    (2, 8, 7, 4, 8, 3, 3, 4),   # depthwise, channel multiplier 2
    (1, 6, 6, 5, 5, 5, 5, 5),   # depthwise 5x5
    (3, 9, 8, 5, 3, 1, 1, 1),   # 1x1
    (1, 1, 1, 3, 4, 1, 1, 1),   # a single pixel
    (2, 1, 9, 2, 3, 1, 4, 1),   # a single row
    (1, 4, 3, 2, 2, 5, 5, 1),   # kernel larger than the image
    (2, 9, 2, 6, 6, 2, 1, 3),
)

# Vector widths drawn (sparse_conv(method="vector") also takes V = 64).
VECTOR_WIDTHS = (8, 16, 32)

# (N, H, W, C, O, R, S, groups, V): the shapes of VECTOR_POOL; O // groups is
# a multiple of V. Feature groups (depthwise included), several blocks per
# group, 1x1, single pixel, single row, kernel larger than the image, and
# O // V not a power of two.
VECTOR_BUCKETS = (
    (2, 7, 9, 4, 16, 3, 3, 1, 16),
    (1, 9, 9, 3, 8, 5, 5, 1, 8),
    (3, 5, 6, 6, 32, 3, 2, 2, 16),
    (2, 8, 7, 4, 32, 3, 3, 4, 8),    # depthwise, channel multiplier 8
    (3, 9, 8, 5, 32, 1, 1, 1, 32),   # 1x1
    (1, 1, 1, 3, 8, 1, 1, 1, 8),     # a single pixel
    (2, 1, 9, 2, 16, 1, 4, 1, 8),    # a single row, two blocks
    (1, 4, 3, 2, 16, 5, 5, 1, 16),   # kernel larger than the image
    (2, 5, 4, 6, 64, 2, 1, 2, 32),   # groups of one 32-block each
    (1, 6, 5, 4, 48, 3, 3, 1, 16),   # three blocks
)

# Examples checked, by outcome; the last test asserts the totals.
COUNTS: collections.Counter = collections.Counter()
STATIC_KEYS: dict[str, set] = collections.defaultdict(set)
TIMES: collections.Counter = collections.Counter()


@dataclasses.dataclass(frozen=True)
class ConvConfig:
  """Everything static about one call (all but the values)."""

  n: int
  h: int
  w: int
  c: int
  o: int
  r: int
  s: int
  groups: int
  layouts: tuple[str, str, str]
  dtype: str
  strides: tuple[int, int]
  dilation: tuple[int, int]
  padding: object  # str or ((lo, hi), (lo, hi))
  bias: bool
  relu: bool
  sparsity: float
  mask_seed: int
  # V > 0: a vector-sparse mask (blocks of V output channels keep the same
  # positions); 0: unstructured.
  vector_width: int = 0

  @property
  def x_shape(self):
    return (self.n, self.h, self.w, self.c) if self.layouts[0] == "NHWC" else (
        self.n, self.c, self.h, self.w)

  @property
  def kernel_shape(self):
    i = self.c // self.groups
    return (self.r, self.s, i, self.o) if self.layouts[1] == "HWIO" else (
        self.o, i, self.r, self.s)

  def mask(self) -> np.ndarray:
    """The kept positions: exactly round(size * (1 - sparsity)), fixed by
    mask_seed, so that a configuration always has one structure. With
    vector_width V: round(size / V * (1 - sparsity)) whole vectors of V
    output channels (escort_jax.prune.vector_mask of random scores)."""
    size = int(np.prod(self.kernel_shape))
    if self.vector_width:
      hwio = (self.r, self.s, self.c // self.groups, self.o)
      rng = np.random.default_rng([7004, self.mask_seed, size,
                                   self.vector_width])
      mask = random_vector_kernel(rng, hwio, self.sparsity,
                                  self.vector_width) != 0
      return mask if self.layouts[1] == "HWIO" else mask.transpose(3, 2, 0, 1)
    keep = int(round(size * (1.0 - self.sparsity)))
    rng = np.random.default_rng([7001, self.mask_seed, size])
    flat = np.zeros(size, bool)
    flat[rng.choice(size, size=keep, replace=False)] = True
    return flat.reshape(self.kernel_shape)


# --------------------------------------------------------------------------
# Strategies.


def _padding_strategy():
  explicit = st.tuples(
      st.tuples(st.integers(-1, 3), st.integers(-1, 3)),
      st.tuples(st.integers(-1, 3), st.integers(-1, 3)))
  return st.one_of(st.sampled_from(("SAME", "VALID", "SAME_LOWER")),
                   explicit)


@st.composite
def fresh_configs(draw) -> ConvConfig:
  """Every field drawn freely (a new compile per example, as a rule)."""
  groups = draw(st.integers(1, 4))
  return ConvConfig(
      n=draw(st.integers(1, 3)), h=draw(st.integers(1, 9)),
      w=draw(st.integers(1, 9)),
      c=groups * draw(st.integers(1, 3)), o=groups * draw(st.integers(1, 3)),
      r=draw(st.integers(1, 5)), s=draw(st.integers(1, 5)), groups=groups,
      layouts=draw(st.sampled_from(LAYOUTS)),
      dtype=draw(st.sampled_from(DTYPES)),
      strides=(draw(st.integers(1, 3)), draw(st.integers(1, 3))),
      dilation=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
      padding=draw(_padding_strategy()), bias=draw(st.booleans()),
      relu=draw(st.booleans()), sparsity=draw(st.sampled_from(SPARSITIES)),
      mask_seed=draw(st.integers(0, 2**16)))


POOL_PADDINGS = ("SAME", "VALID", "SAME_LOWER", ((0, 0), (0, 0)),
                 ((1, 0), (0, 2)), ((0, 3), (2, 1)), ((2, 2), (1, 1)),
                 ((-1, 1), (1, -1)))


def _make_pool(buckets, seed: int, size: int,
               stagger: bool = False) -> tuple[ConvConfig, ...]:
  """A fixed, stratified set of bucketed configurations: every bucket,
  layout, dtype and sparsity appears several times, and strides, dilation
  and padding vary over the whole range. A bucket of 9 fields ends with a
  vector width. stagger: the i-th configuration takes padding and sparsity
  i + i // (their count), so that they do not repeat with the buckets."""
  rng = np.random.default_rng(seed)

  def cycle(values, i):
    return values[(i + (i // len(values) if stagger else 0)) % len(values)]

  pool = []
  for i in range(size):
    n, h, w, c, o, r, s, g, *v = buckets[i % len(buckets)]
    pool.append(ConvConfig(
        n=n, h=h, w=w, c=c, o=o, r=r, s=s, groups=g,
        layouts=LAYOUTS[i % len(LAYOUTS)],
        dtype=DTYPES[(i // len(LAYOUTS)) % len(DTYPES)],
        strides=tuple(int(x) for x in rng.integers(1, 4, 2)),
        dilation=tuple(int(x) for x in rng.integers(1, 3, 2)),
        padding=cycle(POOL_PADDINGS, i),
        bias=bool(i % 2), relu=bool((i // 2) % 2),
        sparsity=cycle(SPARSITIES, i), mask_seed=i,
        vector_width=v[0] if v else 0))
  return tuple(pool)


POOL = _make_pool(BUCKETS, seed=7000, size=64)


@st.composite
def fresh_vector_configs(draw) -> ConvConfig:
  """A fresh configuration with a vector-sparse mask: V drawn, out channels
  per group a multiple of V."""
  config = draw(fresh_configs())
  v = draw(st.sampled_from(VECTOR_WIDTHS))
  per_group = v * draw(st.integers(1, max(1, 64 // (v * config.groups))))
  return dataclasses.replace(config, o=config.groups * per_group,
                             vector_width=v)


# VECTOR_POOL: as POOL, over VECTOR_BUCKETS (V fixed by the bucket).
VECTOR_POOL = _make_pool(VECTOR_BUCKETS, seed=7005, size=40, stagger=True)


@st.composite
def conv_cases(draw, pool=POOL, fresh_strategy=fresh_configs):
  """(config, value seed, "fresh" or "pool")."""
  fresh = draw(st.integers(0, 2)) == 0
  config = draw(fresh_strategy()) if fresh else draw(st.sampled_from(pool))
  seed = draw(st.integers(0, 2**32 - 1))
  return config, seed, "fresh" if fresh else "pool"


# --------------------------------------------------------------------------
# Data and the two sides of the comparison.


def _make_data(config: ConvConfig, seed: int):
  """Input, dense kernel (zeros at pruned positions), SparseKernel (built
  from the mask, so that the structure never depends on the values), bias;
  all rounded to the config's dtype."""
  dtype = jnp.dtype(config.dtype)
  rng = np.random.default_rng([7002, seed])
  x = jnp.asarray(rng.standard_normal(config.x_shape), dtype)
  mask = config.mask()
  kernel = rng.standard_normal(mask.shape)
  kernel = np.where(np.abs(kernel) < 1e-3, 0.5, kernel) * mask
  kernel = jnp.asarray(kernel, dtype)
  # With vector_width, from_mask checks that the structure is vector-sparse.
  sk = SparseKernel.from_mask(kernel, mask, layout=config.layouts[1],
                              vector_width=config.vector_width or None)
  b = jnp.asarray(rng.standard_normal(config.o), dtype) if config.bias \
      else None
  return x, kernel, sk, b


_STATIC = ("strides", "padding", "dilation", "groups", "dn", "activation")


def _sparse(x, sk, b, *, strides, padding, dilation, groups, dn, activation,
            method, precision=None):
  return sparse_conv(x, sk, strides, padding, rhs_dilation=dilation,
                     feature_group_count=groups, dimension_numbers=dn,
                     bias=b, activation=activation, method=method,
                     precision=precision)


# One jitted function per method for every example: it compiles once per
# input shape, structure and static arguments, so pool examples reuse their
# programs.
SPARSE_JITS = {m: jax.jit(functools.partial(_sparse, method=m),
                          static_argnames=_STATIC)
               for m in ("escort", "vector")}
# COUNTS / STATIC_KEYS / TIMES prefix of each method's forward examples.
PREFIX = {"escort": "conv", "vector": "vector"}


def _static_kwargs(config: ConvConfig) -> dict:
  return dict(strides=config.strides, padding=config.padding,
              dilation=config.dilation, groups=config.groups,
              dn=config.layouts, activation="relu" if config.relu else None)


def _lax_reference(config: ConvConfig, x, kernel, b, prefix: str = ""):
  """reference_conv (float32, HIGHEST) or None where lax rejects the call."""
  kw = _static_kwargs(config)
  try:
    return reference_conv(x, kernel, kw["strides"], kw["padding"],
                          rhs_dilation=kw["dilation"],
                          feature_group_count=kw["groups"],
                          dimension_numbers=kw["dn"], bias=b,
                          activation=kw["activation"])
  except (TypeError, ValueError) as e:
    COUNTS[f"{prefix}lax_rejects"] += 1
    COUNTS[f"{prefix}lax_rejects:{type(e).__name__}"] += 1
    return None


def check_conv_case(config: ConvConfig, seed: int, kind: str,
                    method: str = "escort"):
  p = PREFIX[method]
  x, kernel, sk, b = _make_data(config, seed)
  ref = _lax_reference(config, x, kernel, b,
                       prefix="" if method == "escort" else f"{p}_")
  if ref is None:
    # Not a configuration of lax's; whatever sparse_conv does is not
    # compared (it may raise, or be more lenient).
    assume(False)
  what = f"{method} {kind} {config} seed={seed}"
  t = time.perf_counter()
  try:
    y = SPARSE_JITS[method](x, sk, b, **_static_kwargs(config))
    y = jax.block_until_ready(y)
  except Exception as e:
    raise AssertionError(f"{what}: sparse_conv raised {e!r}") from e
  TIMES[f"{p}_s"] += time.perf_counter() - t
  COUNTS[f"{p}_cases"] += 1
  COUNTS[f"{p}_{kind}"] += 1
  COUNTS[f"{p}_{config.dtype}"] += 1
  COUNTS[f"{p}_sparsity_{config.sparsity}"] += 1
  COUNTS[f"{p}_layout_{config.layouts[0]}"] += 1
  if config.groups == config.c and config.c > 1:
    COUNTS[f"{p}_depthwise"] += 1
  if config.vector_width:
    COUNTS[f"{p}_v{config.vector_width}"] += 1
    if config.groups > 1:
      COUNTS[f"{p}_groups"] += 1
  STATIC_KEYS[p].add((config.n, config.h, config.w, config.c, config.o,
                      config.r, config.s, config.groups, config.layouts,
                      config.dtype, config.strides, config.dilation,
                      repr(config.padding), config.bias, config.relu,
                      config.sparsity, config.mask_seed,
                      config.vector_width))

  assert y.shape == ref.shape, f"{what}: shape {y.shape} != lax {ref.shape}"
  assert jnp.dtype(y.dtype) == jnp.dtype(config.dtype), (
      f"{what}: dtype {y.dtype}")
  if ref.size == 0:
    COUNTS[f"{p}_empty_outputs"] += 1
    return
  y64 = np.asarray(y).astype(np.float64)
  # Pallas interpret mode fills outputs with NaN before the kernel runs: an
  # unwritten output shows up here.
  assert np.all(np.isfinite(y64)), f"{what}: non-finite outputs"
  bound = F32_BOUND if config.dtype == "float32" else LOW_BOUND
  err = rel_err(y64, ref)
  if not np.any(np.asarray(ref)):
    COUNTS[f"{p}_zero_reference"] += 1
  assert err <= bound, f"{what}: rel_err {err:.3e} > {bound:.0e}"
  if config.sparsity == 1.0:
    # Only the bias (through relu) is left, exactly.
    expected = np.zeros(ref.shape) if b is None else np.asarray(
        reference_conv(x, jnp.zeros_like(kernel), config.strides,
                       config.padding, rhs_dilation=config.dilation,
                       feature_group_count=config.groups,
                       dimension_numbers=config.layouts, bias=b,
                       activation="relu" if config.relu else None))
    np.testing.assert_array_equal(y64, expected.astype(np.float64),
                                  err_msg=what)


_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                 suppress_health_check=list(HealthCheck))


@settings(max_examples=CONV_EXAMPLES, **_SETTINGS)
@given(case=conv_cases())
def test_escort_matches_lax_conv(case):
  check_conv_case(*case)


@settings(max_examples=VECTOR_EXAMPLES, **_SETTINGS)
@given(case=conv_cases(pool=VECTOR_POOL,
                       fresh_strategy=fresh_vector_configs))
def test_vector_matches_lax_conv(case):
  check_conv_case(*case, method="vector")


# --------------------------------------------------------------------------
# Gradients (float32; fewer cases, each compiles three kernels): d(values),
# d(bias), d(x) of method="escort" against the masked gradients of a dense
# lax convolution, and of method="vector" (its backward runs the escort
# kernels) against those of method="dense" at HIGHEST, on the same
# SparseKernel.


def _float32_pool(pool, size: int) -> tuple[ConvConfig, ...]:
  return tuple(dataclasses.replace(c, dtype="float32") for c in pool[:size])


GRAD_POOL = _float32_pool(POOL, 10)
GRAD_VECTOR_POOL = _float32_pool(VECTOR_POOL, len(VECTOR_BUCKETS))


@st.composite
def grad_cases(draw, pool=GRAD_POOL, fresh_strategy=fresh_configs):
  """(float32 config, value seed, "fresh" or "pool")."""
  fresh = draw(st.booleans())
  config = draw(fresh_strategy()) if fresh else draw(st.sampled_from(pool))
  config = dataclasses.replace(config, dtype="float32")
  return config, draw(st.integers(0, 2**32 - 1)), "fresh" if fresh else "pool"


def _sparse_loss(values, b, x, ct, sk, **kw):
  y = _sparse(x, sk.with_values(values), b, **kw)
  return jnp.sum(ct * y)


def _grad_jit(method):
  return jax.jit(jax.grad(functools.partial(_sparse_loss, method=method),
                          argnums=(0, 1, 2)), static_argnames=_STATIC)


dense_grad = jax.grad(functools.partial(
    _sparse_loss, method="dense", precision=jax.lax.Precision.HIGHEST),
                      argnums=(0, 1, 2))


def _dense_loss(kernel, b, x, ct, config):
  kw = _static_kwargs(config)
  y = reference_conv(x, kernel, kw["strides"], kw["padding"],
                     rhs_dilation=kw["dilation"],
                     feature_group_count=kw["groups"],
                     dimension_numbers=kw["dn"], bias=b,
                     activation=kw["activation"])
  return jnp.sum(ct * y)


def _masked_lax_grads(config, x, kernel, sk, b, ct):
  """The gradients of the dense lax convolution; the kernel's at the kept
  positions, in the order of sk.values."""
  dk, db, dx = jax.grad(_dense_loss, argnums=(0, 1, 2))(kernel, b, x, ct,
                                                        config)
  return np.asarray(dk)[sk.structure.dense_positions()], db, dx


def _dense_method_grads(config, x, kernel, sk, b, ct):
  del kernel  # the same weights, as sk
  return dense_grad(sk.values, b, x, ct, sk, **_static_kwargs(config))


@dataclasses.dataclass(frozen=True)
class GradCheck:
  """How one method's gradients are checked."""

  grad_jit: object  # (values, b, x, ct, sk, **static) -> the three grads
  reference: object  # (config, x, kernel, sk, b, ct) -> the three expected
  prefix: str  # of its COUNTS / STATIC_KEYS / TIMES keys
  lax_rejects_prefix: str
  ct_seed: int


GRAD_CHECKS = {
    "escort": GradCheck(_grad_jit("escort"), _masked_lax_grads, "grad", "",
                        7003),
    "vector": GradCheck(_grad_jit("vector"), _dense_method_grads,
                        "vector_grad", "vector_grad_", 7006),
}


def check_grad_case(config: ConvConfig, seed: int, kind: str, method: str):
  check = GRAD_CHECKS[method]
  p = check.prefix
  x, kernel, sk, b = _make_data(config, seed)
  ref = _lax_reference(config, x, kernel, b, prefix=check.lax_rejects_prefix)
  assume(ref is not None and ref.size > 0)
  ct = jnp.asarray(np.random.default_rng([check.ct_seed, seed]
                                         ).standard_normal(ref.shape),
                   jnp.float32)
  what = f"{method} {kind} {config} seed={seed}"
  t = time.perf_counter()
  try:
    grads = jax.block_until_ready(check.grad_jit(
        sk.values, b, x, ct, sk, **_static_kwargs(config)))
  except Exception as e:
    raise AssertionError(f"{what}: {method} gradient raised {e!r}") from e
  TIMES[f"{p}_s"] += time.perf_counter() - t
  want = check.reference(config, x, kernel, sk, b, ct)
  COUNTS[f"{p}_cases"] += 1
  COUNTS[f"{p}_{kind}"] += 1
  STATIC_KEYS[p].add((config, kind == "fresh"))

  chex.assert_trees_all_equal_shapes_and_dtypes(grads, (sk.values, b, x))
  for name, got, exp in zip(("d values", "d bias", "d x"), grads, want):
    if got is None:
      continue
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), f"{what}: {name} not finite"
    err = rel_err(got, exp)
    assert err <= GRAD_BOUND, f"{what}: {name} rel_err {err:.3e}"
  if sk.nnz == 0:
    # No kept weight: nothing flows back to the input.
    np.testing.assert_array_equal(np.asarray(grads[2]), 0.0, err_msg=what)


@settings(max_examples=GRAD_EXAMPLES, **_SETTINGS)
@given(case=grad_cases())
def test_escort_gradients_match_masked_dense_gradients(case):
  check_grad_case(*case, method="escort")


@settings(max_examples=VECTOR_GRAD_EXAMPLES, **_SETTINGS)
@given(case=grad_cases(pool=GRAD_VECTOR_POOL,
                       fresh_strategy=fresh_vector_configs))
def test_vector_gradients_match_dense_gradients(case):
  check_grad_case(*case, method="vector")


@pytest.fixture(scope="module", autouse=True)
def _free_executables():
  """Hundreds of compiled programs (~10 MB each in interpret mode; the run
  peaks near 3 GB RSS) are dropped when this module is done."""
  yield
  jax.clear_caches()


# --------------------------------------------------------------------------
# The count (last in the file: it reads what the tests above recorded).


def test_zz_property_case_count(request, capsys):
  names = {item.name for item in request.session.items}
  ran_conv = "test_escort_matches_lax_conv" in names
  ran_grad = "test_escort_gradients_match_masked_dense_gradients" in names
  ran_vector = "test_vector_matches_lax_conv" in names
  ran_vector_grad = "test_vector_gradients_match_dense_gradients" in names
  if not (ran_conv or ran_grad or ran_vector or ran_vector_grad):
    pytest.skip("the property tests were not selected in this session")
  summary = (
      f"property cases ({jax.default_backend()}): "
      f"conv {COUNTS['conv_cases']} "
      f"({COUNTS['conv_pool']} pool, {COUNTS['conv_fresh']} fresh, "
      f"{len(STATIC_KEYS['conv'])} distinct static configurations, "
      f"{COUNTS['conv_empty_outputs']} empty outputs, "
      f"{COUNTS['lax_rejects']} draws lax rejects), "
      f"grad {COUNTS['grad_cases']} ({len(STATIC_KEYS['grad'])} distinct); "
      f"escort compiles+runs {TIMES['conv_s']:.0f} s conv, "
      f"{TIMES['grad_s']:.0f} s grad; "
      f"vector {COUNTS['vector_cases']} "
      f"({COUNTS['vector_pool']} pool, {COUNTS['vector_fresh']} fresh, "
      f"{len(STATIC_KEYS['vector'])} distinct static configurations, "
      f"{COUNTS['vector_empty_outputs']} empty outputs, "
      f"{COUNTS['vector_lax_rejects']} draws lax rejects), "
      f"vector grad {COUNTS['vector_grad_cases']} "
      f"({len(STATIC_KEYS['vector_grad'])} distinct); "
      f"vector compiles+runs {TIMES['vector_s']:.0f} s conv, "
      f"{TIMES['vector_grad_s']:.0f} s grad; "
      + ", ".join(f"{k}={v}" for k, v in sorted(COUNTS.items())
                  if k.startswith(("conv_float", "conv_bfloat", "conv_sp",
                                   "conv_layout", "conv_depthwise",
                                   "vector_float", "vector_bfloat",
                                   "vector_sp", "vector_layout",
                                   "vector_depthwise", "vector_groups",
                                   "vector_v"))))
  with capsys.disabled():
    print("\n" + summary)
  path = os.environ.get("ESCORT_PROPERTY_SUMMARY")
  if path:
    with open(path, "w") as f:
      json.dump(dict(backend=jax.default_backend(), summary=summary,
                     counts=dict(sorted(COUNTS.items())),
                     distinct={k: len(v) for k, v in STATIC_KEYS.items()},
                     seconds={k: round(v, 1) for k, v in TIMES.items()}),
                f, indent=1)
  if ran_conv:
    assert COUNTS["conv_cases"] >= MIN_CONV_CASES, summary
    # Both kinds of example ran, and the pool did reuse compiled programs.
    assert COUNTS["conv_fresh"] > 0 and COUNTS["conv_pool"] > 0, summary
    assert len(STATIC_KEYS["conv"]) < COUNTS["conv_cases"], summary
    # Edge cases the draws must reach.
    for key in ("conv_sparsity_0.0", "conv_sparsity_1.0", "conv_float32",
                "conv_bfloat16", "conv_float16", "conv_layout_NCHW",
                "conv_depthwise", "conv_empty_outputs"):
      assert COUNTS[key] > 0, f"no example reached {key}: {summary}"
  if ran_grad:
    assert COUNTS["grad_cases"] >= MIN_GRAD_CASES, summary
  if ran_vector:
    assert COUNTS["vector_cases"] >= MIN_VECTOR_CASES, summary
    assert COUNTS["vector_fresh"] > 0 and COUNTS["vector_pool"] > 0, summary
    assert len(STATIC_KEYS["vector"]) < COUNTS["vector_cases"], summary
    for key in ("vector_sparsity_0.0", "vector_sparsity_1.0",
                "vector_float32", "vector_bfloat16", "vector_float16",
                "vector_layout_NCHW", "vector_depthwise", "vector_groups",
                "vector_v8", "vector_v16", "vector_v32",
                "vector_empty_outputs"):
      assert COUNTS[key] > 0, f"no example reached {key}: {summary}"
  if ran_vector_grad:
    assert COUNTS["vector_grad_cases"] >= MIN_VECTOR_GRAD_CASES, summary
