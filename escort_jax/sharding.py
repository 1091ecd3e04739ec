"""Data parallelism over the batch for the escort path of `sparse_conv`.

The escort kernels work on a flat layout with the batch innermost
(conv_geometry), and a pallas_call is opaque to XLA's partitioners. Left to
themselves, GSPMD and Shardy therefore gather a batch-sharded input and run
the whole batch on every device, and the type rules of explicit sharding
reject the reshape that merges a sharded batch into the flat layout. Yet the
convolution is independent per image: every device can run the same kernels
on its own images. `batch_parallel` does that for a function written for one
device's images, choosing the mechanism from where it is traced:

  local        inside jax.shard_map (manual mesh axes), or on one device: the
               function already sees the local batch and runs as it is.
  explicit     the input's type says that its batch dimension is sharded over
               Explicit mesh axes (jax.sharding.AxisType.Explicit, the default
               of jax.make_mesh): jax.shard_map over those axes.
  partitioned  any other trace in a process with several devices (jax.jit with
               NamedShardings on a mesh of Auto axes, nnx.jit, ...):
               jax.experimental.custom_partitioning. The partitioner (Shardy,
               or GSPMD) tells the function which mesh axes the batch is
               sharded over and the function runs on the per-device shapes.
               Where the compiled program runs on one device the partitioner
               is not involved and the function is inlined.

In every case the other dimensions and the replicated arguments (kernel
values, bias) are gathered first if they were sharded, a batch that the
shards do not divide is computed replicated, and outputs that are sums over
the batch (gradients of the weights) are summed over the shards with a psum.
The outputs of the per-image computation stay sharded over the batch, so
under jit the result of a batch-sharded input is batch-sharded.

`kernel_call` runs a Pallas kernel builder so that it also works under
jax.shard_map(..., check_vma=True): pallas_call requires its out_shape to
state how the output varies over the manual mesh axes, which the kernel
builders (pallas_kernels/) do not; the output varies over every axis that an
input varies over.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

try:  # The switch that jax.shard_map(check_vma=...) sets while tracing.
  from jax._src.config import _check_vma as _CHECK_VMA
except ImportError:  # pragma: no cover - other jax versions
  _CHECK_VMA = None

# fn(*replicated, *batched) -> (summed, per_image): two pytrees of arrays.
BatchFn = Callable[..., tuple[Any, Any]]


def batch_parallel(fn: BatchFn, replicated: Sequence[jax.Array],
                   batched: Sequence[jax.Array]) -> tuple[Any, Any]:
  """Runs `fn` on each device's share of the batch.

  Args:
    fn: fn(*replicated, *batched) -> (summed, per_image), written for any
      batch size: `summed` is a pytree of sums over the batch it was given
      (no batch dimension), `per_image` a pytree of arrays whose leading
      dimension is that batch.
    replicated: arguments that every device needs whole (weights).
    batched: arguments whose leading dimension is the batch (the same size
      for all).

  Returns:
    (summed, per_image) of the whole batch: `summed` summed over the shards,
    `per_image` sharded over the batch as the input was.
  """
  replicated, batched = tuple(replicated), tuple(batched)
  mode = parallel_mode(batched[0])
  if mode == "explicit":
    return _explicit(fn, replicated, batched)
  if mode == "partitioned":
    return _partitioned(fn, replicated, batched)
  return fn(*replicated, *batched)


def parallel_mode(x: jax.Array) -> str:
  """"local", "explicit" or "partitioned" for a batched argument `x` (see
  the module docstring)."""
  context = jax.sharding.get_abstract_mesh()
  if not context.empty and context.manual_axes:
    return "local"
  mesh = jax.typeof(x).sharding.mesh
  if not mesh.empty and AxisType.Explicit in mesh.axis_types:
    return "explicit"
  return "partitioned" if jax.device_count() > 1 else "local"


def _axes_of(entry) -> tuple:
  """The mesh axes of one PartitionSpec entry, as a tuple."""
  if entry is None or entry is P.UNCONSTRAINED:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def _batch_axes(spec, batch: int, mesh) -> tuple:
  """The mesh axes that shard the batch dimension, or () if the batch is not
  sharded or its shards would be uneven."""
  axes = _axes_of(spec[0]) if spec is not None and len(spec) else ()
  size = math.prod(mesh.shape[a] for a in axes)
  return axes if axes and batch % size == 0 else ()


def _sum_over(summed, axes: tuple):
  return jax.tree.map(lambda s: jax.lax.psum(s, axes), summed) if axes else (
      summed)


# --------------------------------------------------------------------------
# Explicit mesh axes: shard_map over the axes of the batch.


def _explicit(fn: BatchFn, replicated, batched):
  sharding = jax.typeof(batched[0]).sharding
  mesh = sharding.mesh
  axes = _batch_axes(sharding.spec, batched[0].shape[0], mesh)
  batch_spec = _spec(axes)
  replicated = tuple(_reshard(a, mesh, P()) for a in replicated)
  batched = tuple(_reshard(a, mesh, batch_spec) for a in batched)

  # Also with an unsharded batch: inside shard_map the per-image function
  # sees plain local arrays, whatever the mesh.
  def local(*args):
    summed, per_image = fn(*args)
    return _sum_over(summed, axes), per_image

  return jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(),) * len(replicated) + (batch_spec,) * len(batched),
      out_specs=(P(), batch_spec))(*replicated, *batched)


def _spec(axes: tuple) -> P:
  """P over `axes` for the leading dimension (P() for none)."""
  if not axes:
    return P()
  return P(axes[0] if len(axes) == 1 else axes)


def _reshard(a, mesh, spec: P):
  """`a` with sharding `spec` on `mesh` (Explicit axes), moved if needed."""
  s = jax.typeof(a).sharding
  target = tuple(spec) + (None,) * (a.ndim - len(spec))
  if s.mesh.empty or tuple(s.spec) == target:
    return a
  return jax.sharding.reshard(a, NamedSharding(mesh, spec))


# --------------------------------------------------------------------------
# Auto mesh axes: custom_partitioning, so that the partitioner runs `fn` on
# the per-device shapes.


def _partitioned(fn: BatchFn, replicated, batched):
  num_replicated = len(replicated)

  @jax.custom_batching.custom_vmap
  def call(*args):
    return _custom_partitioned(fn, num_replicated)(*args)

  @call.def_vmap
  def _vmap_rule(axis_size, in_batched, *args):
    # The partitioner needs the batch leading: vmap `fn` inside it over an
    # axis behind the batch (the outputs keep the mapped axis there too).
    in_axes = tuple(
        (1 if i >= num_replicated else 0) if b else None
        for i, b in enumerate(in_batched))
    moved = tuple(jax.numpy.moveaxis(a, 0, 1) if ax == 1 else a
                  for a, ax in zip(args, in_axes))

    def mapped(*a):
      return jax.vmap(fn, in_axes=in_axes, out_axes=(0, 1),
                      axis_size=axis_size)(*a)

    summed, per_image = batch_parallel(mapped, moved[:num_replicated],
                                       moved[num_replicated:])
    per_image = jax.tree.map(lambda a: jax.numpy.moveaxis(a, 1, 0),
                             per_image)
    out = (summed, per_image)
    return out, jax.tree.map(lambda _: True, out)

  return call(*replicated, *batched)


def _custom_partitioned(fn: BatchFn, num_replicated: int):
  structure = {}

  def whole(*args):
    summed, per_image = fn(*args)
    structure["summed"] = len(jax.tree.leaves(summed))
    return summed, per_image

  def shardings(mesh, arg_shapes, result_shape):
    first = arg_shapes[num_replicated]
    axes = _batch_axes(getattr(first.sharding, "spec", None),
                       first.shape[0], mesh)
    replicated = NamedSharding(mesh, P())
    batch = NamedSharding(mesh, _spec(axes))
    args = tuple(replicated if i < num_replicated else batch
                 for i in range(len(arg_shapes)))
    summed, per_image = result_shape
    result = (jax.tree.map(lambda _: replicated, summed),
              jax.tree.map(lambda _: batch, per_image))
    return axes, args, result

  def partition(mesh, arg_shapes, result_shape):
    axes, args, result = shardings(mesh, arg_shapes, result_shape)

    def lower(*a):
      summed, per_image = fn(*a)
      return _sum_over(summed, axes), per_image

    return mesh, lower, result, args

  def infer_sharding_from_operands(mesh, arg_shapes, result_shape):
    return shardings(mesh, arg_shapes, result_shape)[2]

  def sharding_rule(mesh, operand_types, result_types):
    # Shardy: the batch is factor "n" of the batched operands and of the
    # per-image results; every other dimension must stay replicated.
    del mesh
    factors = []

    def dims(ty, batched):
      rank = len(ty.shape)
      names = []
      for d in range(rank):
        if batched and d == 0:
          names.append("n")
        else:
          factors.append(f"f{len(factors)}")
          names.append(factors[-1])
      return " ".join(names)

    ins = [dims(t, i >= num_replicated) for i, t in enumerate(operand_types)]
    outs = [dims(t, i >= structure["summed"])
            for i, t in enumerate(result_types)]
    rule = ", ".join(ins) + " -> " + ", ".join(outs)
    return rule, {"need_replication_factors": tuple(factors)}

  # Under jax.jit the kernels' static metadata stays inside the call's own
  # jaxpr: custom_partitioning accepts no closed-over constants.
  cp = custom_partitioning(jax.jit(whole))
  cp.def_partition(partition,
                   infer_sharding_from_operands=infer_sharding_from_operands,
                   sharding_rule=sharding_rule)
  return cp


# --------------------------------------------------------------------------
# Pallas calls under jax.shard_map(check_vma=True).


def _varying(a) -> frozenset:
  mat = getattr(jax.typeof(a), "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", ()))


def _invariant_copy(a: jax.Array) -> jax.Array:
  """An elementwise identity; traced without the vma check (see kernel_call)
  its output is typed invariant. XLA folds it away."""
  one = jax.numpy.ones((), a.dtype)
  return jax.lax.mul(a, one) if jax.numpy.issubdtype(
      a.dtype, jax.numpy.inexact) else jax.lax.add(a, one - one)


def kernel_call(builder: Callable[..., jax.Array], *args, **kwargs
                ) -> jax.Array:
  """builder(*args, **kwargs), a function that ends in a pallas_call, made
  to work where shard_map checks how values vary (check_vma=True).

  pallas_call needs its out_shape to say over which manual axes the output
  varies, and its interpreter (the CPU path) cannot mix varying and
  invariant operands: its loop starts from invariant output buffers. So the
  kernel is traced without the check on operands retyped as invariant (the
  values are unchanged: each device still runs on its own data), and its
  output is typed as varying over every manual axis that an array argument
  varies over. Without the check this is builder(*args, **kwargs).
  """
  if _CHECK_VMA is None or not _CHECK_VMA.value:
    return builder(*args, **kwargs)
  leaves, tree = jax.tree.flatten((args, kwargs))
  is_array = [isinstance(a, jax.Array) for a in leaves]
  varying = frozenset().union(*(_varying(a) for a, arr in
                                zip(leaves, is_array) if arr))
  with _CHECK_VMA(False):
    leaves = [_invariant_copy(a) if arr and _varying(a) else a
              for a, arr in zip(leaves, is_array)]
    args, kwargs = jax.tree.unflatten(tree, leaves)
    y = builder(*args, **kwargs)
  missing = tuple(sorted(varying - _varying(y)))
  return jax.lax.pcast(y, missing, to="varying") if missing else y


def as_cotangent(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A gradient from batch_parallel, typed as the cotangent of `primal`
  (what a custom_vjp must return): under shard_map with check_vma=True,
  summed over the manual axes that `ct` varies over and `primal` does not
  (the transpose of the implicit broadcast of an invariant weight); on
  Explicit axes, resharded as `primal` is; elsewhere `ct` itself."""
  extra = tuple(sorted(_varying(ct) - _varying(primal)))
  if extra:
    ct = jax.lax.psum(ct, extra)
  s = jax.typeof(primal).sharding
  if (not s.mesh.empty and AxisType.Explicit in s.mesh.axis_types and
      jax.typeof(ct).sharding.spec != s.spec):
    ct = jax.sharding.reshard(ct, s)
  return ct
