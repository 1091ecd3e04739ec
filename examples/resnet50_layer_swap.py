"""Swap the pruned convolutions of ResNet-50 for sparse ones, and compare.

    python examples/resnet50_layer_swap.py                  # CPU: 64x64 inputs
    python examples/resnet50_layer_swap.py --size 224 --batch 32   # on a GPU

1. Builds Caffe's ResNet-50 in Flax NNX with random weights, magnitude-pruned
   to the per-layer sparsities of SkimCaffe's pruned model
   (build_model("resnet50", pruned=True)).
2. `escort_jax.sparsify(model, max_density=0.5)` returns a copy in which every
   nnx.Conv with at most half of its weights left becomes a SparseConv; the
   layers that the profile keeps dense stay nnx.Conv (dense convolutions are
   faster for them).
3. Jits inference of both models, compares the logits at
   jax.default_matmul_precision("highest") and times both (wall-clock median
   of several blocking calls, host overhead included).

On the CPU, method="auto" runs every SparseConv as a dense convolution of its
densified kernel, so this shows the model surgery and the numerics, not a
speed-up; method="escort" runs the Pallas kernels in the (slow) interpreter.
On an NVIDIA GPU, "auto" follows the layers' tuned plans (or a cost model),
"escort" forces the sparse kernels; `escort-jax bench --network resnet50`
measures the device time of the kernels too.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

try:
  import escort_jax as ej
except ImportError:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
  import escort_jax as ej

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from escort_jax.models import INPUT_SHAPES, build_model
from escort_jax.nnx import SparseConv
from escort_jax.prune import path_str

# Convert only the layers the profile pruned; it leaves the others dense.
MAX_DENSITY = 0.5


def parse_args(argv=None):
  on_gpu = jax.default_backend() == "gpu"
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=32 if on_gpu else 2,
                 help="images per batch (default: 32 on a GPU, 2 on CPU)")
  p.add_argument("--size", type=int, default=224 if on_gpu else 64,
                 help="input height and width (default: 224 on a GPU, 64 "
                 "elsewhere, which runs in a minute or two on a CPU)")
  p.add_argument("--method", default="auto", choices=ej.METHODS,
                 help="SparseConv method of the converted layers (default "
                 "auto; 'escort' on the CPU runs the Pallas interpreter: "
                 "use a small --size)")
  p.add_argument("--calls", type=int, default=20 if on_gpu else 5,
                 help="timed calls per model (the median is reported)")
  p.add_argument("--seed", type=int, default=0)
  return p.parse_args(argv)


def forward(model):
  """A jitted (state, x) -> logits of `model` at fp32 "highest" precision.

  The state is an argument, not a closed-over constant: baked into the
  executable, ResNet-50's 100 MB of weights would make compiling slow.
  """
  graphdef, state = nnx.split(model)

  @jax.jit
  def f(state, x):
    with jax.default_matmul_precision("highest"):
      return nnx.merge(graphdef, state)(x)

  return lambda x: f(state, x)


def wall_ms(fn, x, calls: int) -> tuple[float, float]:
  """(first call incl. compilation, median of `calls` later calls), ms."""
  t0 = time.perf_counter()
  jax.block_until_ready(fn(x))
  first = (time.perf_counter() - t0) * 1e3
  samples = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x))
    samples.append((time.perf_counter() - t0) * 1e3)
  return first, statistics.median(samples)


def main(argv=None) -> int:
  args = parse_args(argv)
  dev = jax.devices()[0]
  print(f"device: {getattr(dev, 'device_kind', dev.platform)} "
        f"({jax.default_backend()}), jax {jax.__version__}")

  t0 = time.perf_counter()
  model = build_model("resnet50", pruned=True, seed=args.seed)
  t_build = time.perf_counter() - t0
  t0 = time.perf_counter()
  sparse = ej.sparsify(model, max_density=MAX_DENSITY, method=args.method)
  t_sparsify = time.perf_counter() - t0
  print(f"built SkimCaffe-pruned ResNet-50 in {t_build:.1f} s, sparsified "
        f"in {t_sparsify:.1f} s")

  convs = [(path_str(p), n) for p, n in nnx.iter_graph(model)
           if isinstance(n, nnx.Conv)]
  converted = [(path_str(p), n) for p, n in nnx.iter_graph(sparse)
               if isinstance(n, SparseConv)]
  still_dense = [(path_str(p), n) for p, n in nnx.iter_graph(sparse)
                 if isinstance(n, nnx.Conv)]
  assert len(converted) + len(still_dense) == len(convs)
  print(f"\nconverted {len(converted)} of {len(convs)} convolutions to "
        f"SparseConv (max_density={MAX_DENSITY}); {len(still_dense)} stay "
        "dense nnx.Conv")
  print(f"  {'path':<18} {'caffe layer':<18} {'kernel (HWIO)':<18} "
        f"{'sparsity':>8} {'nnz':>9}")
  for path, layer in converted:
    shape = "x".join(str(d) for d in layer.kernel_shape)
    print(f"  {path:<18} {getattr(layer, 'caffe_name', ''):<18} "
          f"{shape:<18} {1.0 - layer.density:>8.3f} {layer.nnz:>9}")
  total = sum(int(np.prod(n.kernel_shape)) for _, n in converted)
  kept = sum(n.nnz for _, n in converted)
  print(f"  converted layers together: {1.0 - kept / max(total, 1):.3f} "
        f"sparse ({kept} of {total} weights kept)")

  h, w, c = INPUT_SHAPES["resnet50"]
  h = w = args.size
  x = jnp.asarray(np.random.default_rng(args.seed).standard_normal(
      (args.batch, h, w, c)), jnp.float32)
  f_dense, f_sparse = forward(model), forward(sparse)
  first_dense, ms_dense = wall_ms(f_dense, x, args.calls)
  first_sparse, ms_sparse = wall_ms(f_sparse, x, args.calls)

  y_dense = np.asarray(f_dense(x), np.float64)
  y_sparse = np.asarray(f_sparse(x), np.float64)
  err = float(np.linalg.norm(y_sparse - y_dense) /
              max(np.linalg.norm(y_dense), 1e-30))
  top1 = float(np.mean(y_sparse.argmax(-1) == y_dense.argmax(-1)))

  print(f"\ninput ({args.batch}, {h}, {w}, {c}) float32, method="
        f"{args.method!r}, precision 'highest'")
  print(f"  {'model':<8} {'first call (compile)':>21} "
        f"{'median of ' + str(args.calls) + ' calls':>20}")
  print(f"  {'dense':<8} {first_dense:>18.0f} ms {ms_dense:>17.1f} ms")
  print(f"  {'sparse':<8} {first_sparse:>18.0f} ms {ms_sparse:>17.1f} ms")
  print(f"\nsummary: {len(converted)}/{len(convs)} convs converted; "
        f"relative error of the logits {err:.2e}; top-1 agreement "
        f"{top1:.3f}; wall-clock speed-up {ms_dense / ms_sparse:.2f}x "
        f"(dense {ms_dense:.1f} ms, sparse {ms_sparse:.1f} ms)")
  if jax.default_backend() == "gpu":
    cmd = f"escort-jax bench --network resnet50 --batch {args.batch}"
    if args.size != 224:
      cmd += f" --max-hw {args.size}"
    print("wall-clock includes host dispatch; for device (kernel) time, "
          f"run: {cmd}")
  elif args.method == "escort":
    print("(not a GPU: the converted layers ran the Pallas kernels in the "
          "interpreter; these times say nothing about GPU speed)")
  else:
    print(f"(not a GPU: method={args.method!r} runs the converted layers as "
          "dense convolutions, after densifying their kernels in every call, "
          "so the sparse model is no faster here)")
  ok = np.isfinite(err) and err < 1e-4
  print(f"sparse model matches dense: {ok}")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
