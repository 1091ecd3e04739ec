"""escort-jax: direct sparse convolution for pruned CNNs in JAX.

The public API:
  SparseKernel, SparseStructure  the pruned kernel (values + static structure)
  sparse_conv                    the op (method "auto", "escort", "vector",
                                 "dense")
  KernelConfig, VectorConfig     tile parameters of the escort and the vector
                                 (tensor-core) kernels
  sparsify                       an NNX model with every Conv made sparse
  save_sparse, load_sparse       checkpoints of sparse NNX models
  to_frame, from_frame, Framed   channel-major activations that chains of
                                 sparse layers pass on with no layout pass
                                 (escort_jax.frames)
Submodules: nnx and linen (SparseConv layers), prune, models, baselines,
tune, bench, sharding (batch data parallelism of sparse_conv), and the rest
of _LAZY_SUBMODULES.
They load on first use.
"""

import importlib

from escort_jax.frames import Framed, from_frame, to_frame
from escort_jax.ops import KernelConfig, METHODS, VectorConfig, sparse_conv
from escort_jax.structure import SparseKernel, SparseStructure

_LAZY_SUBMODULES = ("nnx", "linen", "prune", "models", "baselines", "tune",
                    "bench", "bench_network", "bench_sharded", "convert",
                    "checkpoint", "workload", "plans", "dispatch", "report",
                    "demo", "sharding")
_LAZY_NAMES = {"sparsify": "convert", "save_sparse": "checkpoint",
               "load_sparse": "checkpoint"}

__all__ = ["Framed", "KernelConfig", "METHODS", "SparseKernel",
           "SparseStructure", "VectorConfig", "from_frame", "sparse_conv",
           "to_frame", *_LAZY_NAMES, *_LAZY_SUBMODULES]
__version__ = "0.1.0"


def __getattr__(name):
  # Flax and the harness are imported only when used, so `import escort_jax`
  # stays light for code that only needs the op.
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"escort_jax.{name}")
  if name in _LAZY_NAMES:
    return getattr(importlib.import_module(
        f"escort_jax.{_LAZY_NAMES[name]}"), name)
  raise AttributeError(f"module 'escort_jax' has no attribute {name!r}")
