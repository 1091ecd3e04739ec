"""escort-jax: direct sparse convolution for pruned CNNs in JAX.

The public API:
  SparseKernel, SparseStructure  the pruned kernel (values + static structure)
  sparse_conv                    the op, with lax.conv_general_dilated's names
  KernelConfig                   tile parameters of the Pallas kernels
  baselines                      dense and BCOO references with the op's call
"""

from escort_jax.ops import KernelConfig, METHODS, sparse_conv
from escort_jax.structure import SparseKernel, SparseStructure

__all__ = ["KernelConfig", "METHODS", "SparseKernel", "SparseStructure",
           "sparse_conv"]
__version__ = "0.1.0"
