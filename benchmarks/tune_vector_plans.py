"""Tunes the vector-sparse (V=16) workload kernels at batch 32 in bf16 on the
GPU: the default escort config, the vector candidates and dense lax.conv;
records each layer's fastest as its plan (in --plan-dir).

  PYTHONPATH=. python benchmarks/tune_vector_plans.py --plan-dir DIR
"""

from __future__ import annotations

import argparse
import pathlib

import jax.numpy as jnp

from escort_jax import tune, workload as wl
from escort_jax.ops import KernelConfig
from escort_jax.structure import SparseKernel


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--plan-dir", required=True)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--vector-width", type=int, default=16)
  a = p.parse_args()
  for layer in wl.pruned_layers():
    sk = SparseKernel.from_dense(wl.make_kernel(
        layer, vector_width=a.vector_width))
    conv = layer.conv_kwargs()
    e = tune.tune_layer(layer.input_shape(a.batch), sk,
                        conv["window_strides"], conv["padding"],
                        feature_group_count=conv["feature_group_count"],
                        dtype=jnp.bfloat16, candidates=(KernelConfig(),),
                        directory=pathlib.Path(a.plan_dir))
    print(layer.name, e["method"], {k: round(v, 1) for k, v in
                                    e["times_us"].items()}, flush=True)


if __name__ == "__main__":
  main()
