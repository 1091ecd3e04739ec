"""Train, prune, fine-tune and sparsify a small CNN on scikit-learn's digits.

    python examples/prune_finetune_digits.py            # under a minute on a CPU
    python examples/prune_finetune_digits.py --quick    # fewer epochs (tests)

Needs scikit-learn (the 8x8 digits data set ships with it; nothing is
downloaded).

1. Trains a 3-conv NNX CNN (NHWC, 8x8x1 images) with optax's Adam and
   reports its test accuracy.
2. Prunes every conv kernel to 90 % sparsity by magnitude
   (escort_jax.prune.prune_model), reports the accuracy, then fine-tunes with
   the mask fixed (escort_jax.prune.masked_finetune: pruned weights get no
   update and stay exactly zero) and reports it again.
3. The same from the dense model with vector-wise pruning: 90 % of the
   V = 8-wide output-channel vectors are pruned (escort_jax.prune.vector_mask,
   the pattern in which one input value feeds V outputs), then fine-tuned.
4. Converts both fine-tuned models with escort_jax.sparsify (their convs
   become SparseConvs holding only the kept weights) and checks that the
   sparse models predict exactly what the dense-pruned ones do: with
   method="auto" (a dense convolution of the densified kernel off the GPU)
   on the whole test set, and with method="escort" (the Pallas kernels; in
   the Pallas interpreter on a CPU, a few seconds for the 450 test images;
   --escort-images N checks the first N only).

Every seed is fixed; all forward passes run at fp32 "highest" precision, so
that the dense reference is exact on GPUs too (TF32 otherwise).
"""

from __future__ import annotations

import argparse
import functools
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
import optax

from escort_jax import prune
from escort_jax.nnx import SparseConv

SPARSITY = 0.9
VECTOR_WIDTH = 8


class DigitsCNN(nnx.Module):
  """(N, 8, 8, 1) -> (N, 10) logits.

  conv1 3x3 (1 -> 32) -> conv2 3x3 (32 -> 64) -> 2x2 max pool ->
  conv3 3x3 (64 -> 64) -> flatten (4 * 4 * 64) -> dense head. ReLU after
  every conv; "SAME" padding.
  """

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 32, (3, 3), padding="SAME", rngs=rngs)
    self.conv2 = nnx.Conv(32, 64, (3, 3), padding="SAME", rngs=rngs)
    self.conv3 = nnx.Conv(64, 64, (3, 3), padding="SAME", rngs=rngs)
    self.head = nnx.Linear(4 * 4 * 64, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.conv1(x))
    x = nnx.relu(self.conv2(x))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = nnx.relu(self.conv3(x))
    return self.head(x.reshape(x.shape[0], -1))


def load_data(seed: int):
  """Digits as NHWC float32 in [0, 1]: (x_train, y_train, x_test, y_test)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  x = (digits.images / 16.0).astype(np.float32)[..., None]  # (1797, 8, 8, 1)
  y = digits.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=0.25, random_state=seed, stratify=y)
  return x_tr, y_tr, x_te, y_te


def epoch_batches(x, y, batch: int, epochs: int, seed: int):
  """Shuffled (x, y) batches of `batch` images (the remainder dropped, so
  that every step has one shape), `epochs` passes, as one list."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      idx = order[i:i + batch]
      out.append((jnp.asarray(x[idx]), jnp.asarray(y[idx])))
  return out


def loss_fn(model, batch):
  x, y = batch
  with jax.default_matmul_precision("highest"):
    logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train(model, batches, lr: float):
  """Plain Adam training of every nnx.Param of `model`, in place."""
  tx = optax.adam(lr)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(
        lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for batch in batches:
    params, opt_state, _ = step(params, opt_state, batch)
  nnx.update(model, params)
  return model


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, x):
  with jax.default_matmul_precision("highest"):
    return nnx.merge(graphdef, state)(x)


def logits(model, x) -> np.ndarray:
  graphdef, state = nnx.split(model)
  return np.asarray(_logits(graphdef, state, jnp.asarray(x)))


def accuracy(model, x, y) -> float:
  return float(np.mean(logits(model, x).argmax(-1) == y))


def _value(var):
  # flax >= 0.12 reads Variables with get_value(); older versions .value.
  return var.get_value() if hasattr(var, "get_value") else var.value


def conv_kernels(model) -> dict[str, np.ndarray]:
  """Dotted path -> HWIO kernel of every nnx.Conv."""
  return {prune.path_str(p): np.asarray(_value(n.kernel))
          for p, n in nnx.iter_graph(model) if isinstance(n, nnx.Conv)}


def is_vector_sparse(model, v: int) -> bool:
  """Whether every conv kernel's zeros come in whole blocks of v output
  channels (o = b*v .. b*v + v - 1) at each (r, s, c)."""
  for k in conv_kernels(model).values():
    nz = (k != 0).reshape(k.shape[:3] + (k.shape[3] // v, v))
    if not np.all(nz.all(-1) | ~nz.any(-1)):
      return False
  return True


def conv_sparsity(model) -> float:
  """Fraction of zeros over all conv kernels together."""
  zeros = size = 0
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Conv):
      k = np.asarray(_value(node.kernel))
      zeros, size = zeros + int(np.sum(k == 0)), size + k.size
    elif isinstance(node, SparseConv):
      zeros += node.structure.size - node.nnz
      size += node.structure.size
  return zeros / max(size, 1)


def compare(dense_model, sparse_model, x, what: str):
  """Prints whether both models' argmax agree on every image; returns that
  and the sparse model's predictions."""
  a, b = logits(dense_model, x), logits(sparse_model, x)
  same = int(np.sum(a.argmax(-1) == b.argmax(-1)))
  identical = same == len(x)
  print(f"  {what}: identical predictions: {identical} ({same}/{len(x)} "
        f"test images, max |logit diff| {np.max(np.abs(a - b)):.1e})")
  return identical, b.argmax(-1)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--epochs", type=int, default=30,
                 help="epochs of dense training (default 30)")
  p.add_argument("--finetune-epochs", type=int, default=15,
                 help="epochs of mask-fixed fine-tuning per pruned model "
                 "(default 15)")
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--lr", type=float, default=2e-3,
                 help="Adam learning rate of training (fine-tuning: half)")
  p.add_argument("--escort-images", type=int, default=None,
                 help="test images for the method='escort' check (default: "
                 "all 450; the Pallas interpreter on a CPU takes a few "
                 "seconds for them; 0 skips it)")
  p.add_argument("--quick", action="store_true",
                 help="few epochs (10 + 5): for tests and a first look")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.quick:
    args.epochs, args.finetune_epochs = 10, 5
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  t_start = time.perf_counter()
  x_tr, y_tr, x_te, y_te = load_data(args.seed)
  print(f"digits: {len(x_tr)} train / {len(x_te)} test images, 8x8x1; "
        f"jax {jax.__version__} on {jax.default_backend()}")
  rows = []  # (model, conv sparsity, test accuracy)

  # 1. Dense training.
  dense = DigitsCNN(rngs=nnx.Rngs(args.seed))
  train(dense, epoch_batches(x_tr, y_tr, args.batch, args.epochs, args.seed),
        args.lr)
  rows.append(("dense", conv_sparsity(dense), accuracy(dense, x_te, y_te)))

  # 2, 3. Prune (per element / per V-vector), then fine-tune with the mask
  # fixed. prune_model prunes a copy; linear layers stay dense.
  finetune_batches = epoch_batches(x_tr, y_tr, args.batch,
                                   args.finetune_epochs, args.seed + 1)
  pruned = {}
  for kind, vector_width in (("magnitude", None), ("vector V=8", VECTOR_WIDTH)):
    model, masks = prune.prune_model(dense, sparsity=SPARSITY,
                                     vector_width=vector_width)
    rows.append((f"pruned 90% {kind}", conv_sparsity(model),
                 accuracy(model, x_te, y_te)))
    prune.masked_finetune(model, masks, optax.adam(args.lr / 2), loss_fn,
                          finetune_batches)
    rows.append(("  + fine-tuned (mask fixed)", conv_sparsity(model),
                 accuracy(model, x_te, y_te)))
    pruned[kind] = model
  print(f"vector-pruned model: every kept conv weight lies in a whole "
        f"V={VECTOR_WIDTH} output-channel vector: "
        f"{is_vector_sparse(pruned['vector V=8'], VECTOR_WIDTH)}")

  # 4. Sparsify and check that the predictions do not change.
  ok = True
  n_escort = len(x_te) if args.escort_images is None else min(
      args.escort_images, len(x_te))
  for kind, model in pruned.items():
    print(f"\n{kind} pruning, fine-tuned: dense-pruned vs escort_jax.sparsify")
    for method, n in (("auto", len(x_te)), ("escort", n_escort)):
      if n == 0:
        continue
      sparse = ej.sparsify(model, method=method)
      n_sparse = sum(isinstance(m, SparseConv)
                     for _, m in nnx.iter_graph(sparse))
      t0 = time.perf_counter()
      same, pred = compare(model, sparse, x_te[:n],
                           f"method={method!r} ({n_sparse} SparseConvs)")
      dt = time.perf_counter() - t0
      ok &= same
      label = f"sparse ({kind}), {method}"
      if n < len(x_te):
        label += f", first {n}"
      rows.append((label, conv_sparsity(sparse),
                   float(np.mean(pred == y_te[:n]))))
      if method == "escort":
        where = ("" if jax.default_backend() == "gpu"
                 else " in the Pallas interpreter")
        print(f"  (both forward passes of {n} images{where}: {dt:.1f} s)")

  print(f"\n{'model':<38} {'conv sparsity':>13} {'test accuracy':>14}")
  for name, sparsity, acc in rows:
    print(f"{name:<38} {sparsity:>13.3f} {acc:>14.4f}")
  print(f"\ndense accuracy: {rows[0][2]:.4f}")
  print(f"all identical predictions: {ok}")
  print(f"total time: {time.perf_counter() - t_start:.0f} s")
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
