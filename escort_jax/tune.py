"""The autotuner: measures a layer's candidate kernel configs and dense
lax.conv of the same dtype and precision, and records the fastest as its plan.

Tuning is explicit (this API, or `escort-jax bench --tune`); nothing tunes
inside SparseKernel.from_dense or at trace time. Times are device kernel
times (escort_jax.bench.device_time_us), layout passes included.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from escort_jax import dispatch, plans
from escort_jax.ops import KernelConfig, make_spec, sparse_conv
from escort_jax.structure import SparseKernel

# Candidates from the H100 tile sweeps of 2026-11-24
# (benchmarks/results/*tile-sweep*): the configs that won on some layer.
DEFAULT_CANDIDATES = (
    KernelConfig(4, 128, 4, 1, 4),
    KernelConfig(4, 128, 4, 1, 4, q_major=True),
    KernelConfig(2, 256, 4, 1, 4),
    KernelConfig(8, 256, 4, 1, 1),
)


def config_label(cfg: KernelConfig) -> str:
  """'rows_per_program=4,block_q=128,...': the key of a config's time."""
  return ",".join(f"{k}={v}" for k, v in dataclasses.asdict(cfg).items())


def tune_layer(x_shape: Sequence[int], sk: SparseKernel,
               window_strides=(1, 1), padding="SAME", *,
               rhs_dilation=(1, 1), feature_group_count: int = 1,
               dimension_numbers=("NHWC", "HWIO", "NHWC"), dtype=jnp.float32,
               precision=None,
               candidates: Sequence[KernelConfig] = DEFAULT_CANDIDATES,
               num_inputs: int = 10, seed: int = 0, save: bool = True,
               directory=None) -> dict:
  """Times the candidates on random inputs and records the winner.

  Args:
    x_shape: the input shape in dimension_numbers[0] layout.
    sk: the SparseKernel (its values are cast to `dtype`).
    dtype: the input dtype to tune for.
    precision: the precision of the dense alternative (and of the plan key).
    candidates: escort kernel configs to try.
    save: record the plan (escort_jax.plans.record).

  Returns:
    The plan entry: method, config, times_us of every candidate, device,
    date.
  """
  from escort_jax.bench import device_time_us  # heavy imports; tuning only
  rng = np.random.default_rng(seed)
  inputs = [jnp.asarray(rng.standard_normal(tuple(x_shape)), dtype)
            for _ in range(num_inputs)]
  skd = sk.with_values(jnp.asarray(sk.values, dtype))
  conv = dict(rhs_dilation=rhs_dilation,
              feature_group_count=feature_group_count,
              dimension_numbers=dimension_numbers, precision=precision)
  spec = make_spec(inputs[0], skd, window_strides, padding, bias=None,
                   activation=None, method="escort", lhs_dilation=None,
                   preferred_element_type=None, **{
                       k: v for k, v in conv.items() if k != "precision"})
  times: dict[str, float] = {}
  dense = jax.jit(lambda x: sparse_conv(x, skd, window_strides, padding,
                                        method="dense", **conv))
  times["dense"] = device_time_us(dense, inputs).median_us
  best_cfg, best_t = None, float("inf")
  for cfg in candidates:
    f = jax.jit(lambda x, cfg=cfg: sparse_conv(
        x, skd, window_strides, padding, method="escort", config=cfg, **conv))
    label = config_label(cfg)
    try:
      t = device_time_us(f, inputs).median_us
    except Exception as e:  # pylint: disable=broad-except
      # A config the compiler rejects (e.g. out of registers) is no candidate.
      times[label] = float("nan")
      print(f"tune: {label} failed: {type(e).__name__}: {str(e)[:200]}")
      continue
    times[label] = t
    if t < best_t:
      best_cfg, best_t = cfg, t
  method = "escort" if best_t < times["dense"] else "dense"
  entry = {
      "method": method,
      "config": dataclasses.asdict(best_cfg) if best_cfg else {},
      "times_us": times,
      "device": jax.devices()[0].device_kind,
      "jax_version": jax.__version__,
      "date": datetime.date.today().isoformat(),
  }
  if save:
    key = plans.plan_key(sk.structure.digest, spec.geometry,
                         spec.compute_dtype,
                         dispatch.precision_name(precision))
    plans.record(key, entry, directory=directory)
  return entry
