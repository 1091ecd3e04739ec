"""Shared helpers and fixtures of the escort-jax test suite.

The helpers are plain functions so that both pytest-style tests and the
chex.TestCase classes can use them (``from tests.conftest import ...``); the
fixtures below hand the same functions to pytest-style tests.

float64 is never switched on globally: tests that need it wrap their body in
``enable_x64()`` (or take the ``x64`` fixture).
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from escort_jax.prune import vector_mask

try:  # jax < 0.10: the experimental context manager.
  from jax.experimental import enable_x64 as _enable_x64  # type: ignore
except ImportError:  # jax >= 0.10: the config state is a context manager.
  _enable_x64 = None

ON_GPU = jax.default_backend() == "gpu"

REPO = Path(__file__).resolve().parents[1]

# Skips a test cleanly where JAX has no GPU backend.
requires_gpu = pytest.mark.skipif(
    not ON_GPU,
    reason=f"needs an NVIDIA GPU (jax.default_backend() is "
    f"{jax.default_backend()!r})")


def enable_x64():
  """A context manager that turns float64 on only inside its block."""
  if _enable_x64 is not None:
    return _enable_x64()
  return jax.enable_x64(True)


def rel_err(y, ref) -> float:
  """Norm-wise relative error ||y - ref|| / ||ref||, in float64 numpy.

  NaN or inf anywhere makes the result NaN or inf, so a bound check fails.
  For an all-zero reference it returns the absolute error ||y||.
  """
  y = np.asarray(y).astype(np.float64)
  ref = np.asarray(ref).astype(np.float64)
  if y.shape != ref.shape:
    raise AssertionError(f"shape mismatch: {y.shape} vs {ref.shape}")
  denom = np.linalg.norm(ref.ravel())
  num = np.linalg.norm((y - ref).ravel())
  if not np.all(np.isfinite(y)) or not np.all(np.isfinite(ref)):
    return float("nan")
  return float(num / denom) if denom > 0 else float(num)


def assert_close(y, ref, bound: float, what: str = "output"):
  """Asserts finiteness, equal shapes and rel_err(y, ref) <= bound."""
  y_np = np.asarray(y).astype(np.float64)
  assert np.all(np.isfinite(y_np)), (
      f"{what}: {np.size(y_np) - np.isfinite(y_np).sum()} non-finite "
      "entries (unwritten outputs are NaN in Pallas interpret mode)")
  assert np.linalg.norm(np.asarray(ref, np.float64).ravel()) > 0, (
      f"{what}: the reference is all zero, the comparison would be vacuous")
  err = rel_err(y, ref)
  assert err <= bound, f"{what}: rel_err {err:.3e} > {bound:.1e}"
  return err


def random_pruned_kernel(rng: np.random.Generator, shape, sparsity: float,
                         dtype=np.float32) -> np.ndarray:
  """A kernel of fresh N(0, 1) values with exactly
  round(size * (1 - sparsity)) nonzeros at uniformly random positions.

  Kept values are never zero (also after rounding to `dtype`).
  """
  size = int(np.prod(shape))
  keep = int(round(size * (1.0 - sparsity)))
  values = rng.standard_normal(keep)
  # Keep clear of zero, also after rounding to a low-precision dtype.
  values = np.where(np.abs(values) < 1e-3, np.copysign(0.5, values), values)
  flat = np.zeros(size, np.float64)
  flat[rng.choice(size, size=keep, replace=False)] = values
  kernel = np.array(jnp.asarray(flat.reshape(shape), dtype))  # writable
  assert np.count_nonzero(kernel) == keep
  return kernel


def random_vector_kernel(rng: np.random.Generator, shape_hwio,
                         sparsity: float, v: int,
                         dtype=np.float32,
                         column_multiple: int = 1) -> np.ndarray:
  """A vector-sparse HWIO kernel of fresh N(0, 1) values: blocks of v
  consecutive output channels share their kept positions
  (escort_jax.prune.vector_mask of the values), round(size / v *
  (1 - sparsity)) whole vectors kept (each block's count rounded to a
  multiple of column_multiple, if given).

  Kept values are never zero (also after rounding to `dtype`), so
  `kernel != 0` is the mask.
  """
  k = rng.standard_normal(shape_hwio)
  k = np.where(np.abs(k) < 1e-3, 0.5, k)
  mask = vector_mask(k, sparsity, v, column_multiple=column_multiple)
  kernel = np.array(jnp.asarray(np.where(mask, k, 0.0), dtype))  # writable
  assert np.count_nonzero(kernel) == np.count_nonzero(mask)
  return kernel


def fake_devices_env(num_devices: int) -> dict:
  """The environment of a subprocess whose JAX sees `num_devices` fake CPU
  devices (XLA_FLAGS must be set before JAX initialises) and imports this
  checkout (escort_jax, tests) first."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                      f"_device_count={num_devices}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
  return env


def random_array(rng: np.random.Generator, shape, dtype=np.float32):
  """Standard normal values, rounded to `dtype`, as a jax array."""
  return jnp.asarray(rng.standard_normal(shape), dtype)


def hwio_shape(kernel_hw, in_channels: int, out_channels: int, groups: int = 1,
               layout: str = "HWIO"):
  """The kernel shape of a convolution in `layout`."""
  r, s = kernel_hw
  i = in_channels // groups
  return (r, s, i, out_channels) if layout == "HWIO" else (out_channels, i, r,
                                                           s)


def reference_conv(x, kernel, window_strides, padding, *, rhs_dilation=(1, 1),
                   feature_group_count=1,
                   dimension_numbers=("NHWC", "HWIO", "NHWC"), bias=None,
                   activation=None, dtype=jnp.float32):
  """lax.conv_general_dilated at HIGHEST precision in `dtype`, of the inputs
  as given (already rounded to their own dtype), plus bias and relu."""
  x = jnp.asarray(x).astype(dtype)
  kernel = jnp.asarray(kernel).astype(dtype)
  y = lax.conv_general_dilated(
      x, kernel, window_strides, padding, rhs_dilation=rhs_dilation,
      dimension_numbers=tuple(dimension_numbers),
      feature_group_count=feature_group_count,
      precision=lax.Precision.HIGHEST)
  if bias is not None:
    out_spec = dimension_numbers[2]
    shape = [1] * 4
    shape[out_spec.index("C")] = -1
    y = y + jnp.asarray(bias).astype(dtype).reshape(shape)
  if activation == "relu":
    y = jnp.maximum(y, 0)
  return y


def pytest_collection_modifyitems(config, items):
  """Every test marked `gpu` is skipped without a GPU, wherever it lives."""
  if ON_GPU:
    return
  skip = pytest.mark.skip(reason="needs an NVIDIA GPU (no gpu backend)")
  for item in items:
    if "gpu" in item.keywords:
      item.add_marker(skip)


@pytest.fixture
def plan_dir(tmp_path, monkeypatch):
  """An empty $ESCORT_JAX_PLAN_DIR for the test, with the plan cache cleared
  before and after."""
  from escort_jax import plans
  monkeypatch.setenv("ESCORT_JAX_PLAN_DIR", str(tmp_path))
  plans.clear_cache()
  yield tmp_path
  plans.clear_cache()


@pytest.fixture
def x64():
  """float64 on, for this test only."""
  with enable_x64():
    yield


@pytest.fixture(name="rel_err")
def rel_err_fixture():
  return rel_err


@pytest.fixture(name="random_pruned_kernel")
def random_pruned_kernel_fixture():
  return random_pruned_kernel


@pytest.fixture(autouse=True)
def _x64_stays_off():
  """float64 must never leak out of a test (it is enabled only locally)."""
  assert not jax.config.jax_enable_x64, "float64 was left on globally"
  yield
  assert not jax.config.jax_enable_x64, "this test left float64 on"


def np_init(key, shape, dtype=jnp.float32):
  """A kernel initialiser drawing from numpy, seeded by the key (XLA on the
  CPU takes seconds to compile jax.random's normal for each new shape)."""
  if isinstance(key, jax.core.Tracer):  # eval_shape: only the shape counts
    return jnp.zeros(shape, dtype)
  seed = int(np.asarray(jax.random.key_data(key)).sum())
  w = np.random.default_rng(seed).standard_normal(shape)
  return jnp.asarray(w / np.sqrt(np.prod(shape[:-1])), dtype)


def random_row_problem(rng, num_rows, nnz, out_len, empty_rows, slack=13):
  """(rows, offsets, in_len) of a random sparse row problem: nnz entries on
  all rows (or, with empty_rows, half of them), offsets up to 3 * out_len + 5
  and an input long enough for every offset + q, q < out_len."""
  active = np.arange(num_rows)
  if empty_rows:
    active = rng.choice(num_rows, size=max(1, num_rows // 2), replace=False)
  rows = rng.choice(active, size=nnz).astype(np.int64)
  max_offset = 3 * out_len + 5
  offsets = rng.integers(0, max_offset + 1, size=nnz).astype(np.int64)
  in_len = max_offset + out_len + slack
  return rows, offsets, in_len


def poison_unread(x_flat: np.ndarray, offsets, span: np.ndarray):
  """NaN at every position of x_flat that no entry reads at `span`."""
  read = np.zeros(x_flat.shape[0], bool)
  for off in np.asarray(offsets):
    read[off + span] = True
  x = x_flat.copy()
  x[~read] = np.nan
  return x, int((~read).sum())


def signed_bias(rng, num_rows: int) -> jax.Array:
  """(num_rows,) float32 N(0, 1) bias whose first entry is positive and
  last negative, so that a relu after it has work to do on both sides."""
  b = rng.standard_normal(num_rows)
  b[0], b[-1] = abs(b[0]) + 0.1, -abs(b[-1]) - 0.1
  return jnp.asarray(b, jnp.float32)
