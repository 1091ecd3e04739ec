"""Probe: the escort convolution on CUDA cores from shared-memory windows
(Mosaic GPU), against the Triton-lowered escort kernel.

  PYTHONPATH=. python benchmarks/window_escort_probe.py [--variant NAME ...]
      [--layers NAME ...] [--batch 32] [--out DIR]
  python benchmarks/window_escort_probe.py --twin     # CPU: the tiling twin

Why. The Triton escort kernel reads, for every nonzero, its shifted strip of
the flat input straight from L2: one 4-byte L2 read per multiply-add, which
bounds it at 3-6 TFLOP/s (benchmarks/NOTES.md). Here a program stages each
input plane's window once in shared memory, with one bulk copy, and every
nonzero of its G output rows that reads that plane takes its strip from
there:

    program (group, q tile):  rows group*G .. +G, positions q0 .. q0 + TQ
    for each chunk of CC planes (double-buffered bulk copies):
        win[ci, :WL] = xw[(chunk*CC + ci) * PL + q0 : + WL]      WL = TQ + Dmax
        for each row g (static), for each of its nonzeros in the chunk:
            acc[g] += value * win[ci * WL + shift : + TQ]

so a window element is read from L2 once per program and from shared memory
once per multiply-add. xw is the stretched flat input (conv_geometry) with
each plane padded to PL elements, so that a window never crosses into the
next plane. Each thread holds TQ / 128 positions of each of the G rows.

The packing (`pack_windows`) is numpy; `twin` runs the kernel's exact loop
in numpy, and --twin checks it against the escort reference on the CPU (the
kernel itself needs an H100). Each variant runs in its own process on the
device (a bad copy can kill the process), is checked against the plain-JAX
reference, then timed with CUPTI (as benchmarks/kernel_sweep.py).

Variants: "G<rows>.Q<positions>.C<planes per chunk>.V<vector width>";
"G8.Q1024.C2.V1" is the best measured (equal to the Triton kernel on
res3a_branch2b, slower on the other layers timed: benchmarks/NOTES.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import probe_runner  # noqa: E402

THREADS = 128  # one warpgroup per program
# A TMA copy moves at most 256 elements along a dimension: windows and
# output tiles are copied as rows of 256 (so they start on a row).
TMA_ROW = 256


@dataclasses.dataclass(frozen=True)
class Variant:
  rows: int          # G, output rows per program
  block_q: int       # TQ, positions per program (a multiple of 128 * vec)
  planes: int        # CC, planes per shared-memory chunk
  vec: int           # elements per thread per shared-memory load

  @classmethod
  def parse(cls, name: str) -> "Variant":
    m = re.fullmatch(r"G(\d+)\.Q(\d+)\.C(\d+)\.V(\d+)", name)
    if not m:
      raise ValueError(f"bad variant {name!r}: expected G<n>.Q<n>.C<n>.V<n>")
    return cls(*(int(v) for v in m.groups()))


@dataclasses.dataclass(frozen=True)
class WindowPack:
  """Static schedule of the window kernel for one (structure, geometry).

  Attributes:
    num_groups, q_tiles, chunks: the grid and the chunk loop's length.
    rows, block_q, planes: G, TQ, CC of the variant.
    window_len: WL, elements of one plane's window (whole TMA rows).
    plane_stride: PL, elements of one padded plane in xw (whole TMA rows).
    num_planes: planes in xw (chunks * CC, the extra ones zero).
    meta: (num_groups * chunks, meta_len) int32, one row per (group,
      chunk), copied to shared memory with the chunk's windows: entries
      0..G hold where each of the G rows' entries start in this row (row r
      runs meta[m, r] .. meta[m, r + 1]); an entry holds its shared-memory
      start ci * WL + shift. At least one spare entry follows the last
      (the loop reads one entry ahead).
    src: (num_groups * chunks, meta_len) int64: the CSR position of each
      entry's value, -1 where the value row holds zero.
  """

  num_groups: int
  q_tiles: int
  chunks: int
  rows: int
  block_q: int
  planes: int
  window_len: int
  plane_stride: int
  num_planes: int
  meta: np.ndarray
  src: np.ndarray

  @property
  def meta_len(self) -> int:
    return self.meta.shape[1]

  def entry_values(self, values, dtype=jnp.float32):
    """(nnz,) CSR values -> (num_groups * chunks, meta_len) in dtype."""
    v = jnp.append(values.astype(dtype), 0.0)
    return v[jnp.asarray(np.where(self.src >= 0, self.src, values.shape[0]))]


META_ROW = 64  # metadata rows are copied as (meta_len / 64, 64) tiles


def pack_windows(problem, g, v: Variant) -> WindowPack:
  """The window schedule of a stretched problem (conv_geometry)."""
  rows = np.asarray(problem.rows, np.int64)
  planes = np.asarray(problem.planes, np.int64)
  shifts = np.asarray(problem.shifts, np.int64)
  G, TQ, CC = v.rows, v.block_q, v.planes
  if TQ % (THREADS * v.vec):
    raise ValueError(f"block_q {TQ} is not a multiple of {THREADS} x {v.vec}")
  if TQ % TMA_ROW:
    raise ValueError(f"block_q {TQ} is not a multiple of {TMA_ROW}")
  num_groups = -(-g.out_channels // G)
  q_tiles = -(-g.out_len // TQ)
  chunks = -(-g.num_planes // CC)
  window_len = -(-(TQ + g.max_shift) // TMA_ROW) * TMA_ROW
  plane_stride = -(-((q_tiles - 1) * TQ + window_len) // TMA_ROW) * TMA_ROW
  grp, row = rows // G, rows % G
  chunk, ci = planes // CC, planes % CC
  m = grp * chunks + chunk
  order = np.argsort(m * G + row, kind="stable")
  per_meta = np.bincount(m, minlength=num_groups * chunks)
  meta_len = -(-(G + 1 + per_meta.max() + 1) // META_ROW) * META_ROW
  meta = np.zeros((num_groups * chunks, meta_len), np.int64)
  src = np.full((num_groups * chunks, meta_len), -1, np.int64)
  counts = np.bincount(m * G + row, minlength=num_groups * chunks * G
                       ).reshape(num_groups * chunks, G)
  meta[:, :G + 1] = G + 1 + np.concatenate(
      [np.zeros((num_groups * chunks, 1), np.int64),
       np.cumsum(counts, axis=1)], axis=1)
  sorted_m = m[order]
  meta_start = np.concatenate([[0], np.cumsum(per_meta)])
  slot = G + 1 + np.arange(order.size) - meta_start[sorted_m]
  meta[sorted_m, slot] = (ci * window_len + shifts)[order]
  src[sorted_m, slot] = order
  smem_bytes = (max(2 * CC * window_len, G * TQ) + 4 * meta_len) * 4
  if smem_bytes > 227 * 1024:
    raise ValueError(f"variant {v} needs {smem_bytes} bytes of shared memory")
  return WindowPack(num_groups=num_groups, q_tiles=q_tiles, chunks=chunks,
                    rows=G, block_q=TQ, planes=CC, window_len=window_len,
                    plane_stride=plane_stride, num_planes=chunks * CC,
                    meta=meta.astype(np.int32), src=src)


def to_window_input(x_flat, g, pk: WindowPack):
  """x_flat (conv_geometry.to_flat_input) -> xw: planes padded to PL, and
  zero planes up to chunks * CC."""
  planes = x_flat[:g.num_planes * g.plane_len].reshape(g.num_planes,
                                                       g.plane_len)
  return jnp.pad(planes, ((0, pk.num_planes - g.num_planes),
                          (0, pk.plane_stride - g.plane_len))).reshape(-1)


def twin(xw, meta_values, pk: WindowPack) -> np.ndarray:
  """The kernel's loop in numpy (float64): (num_groups * G, q_tiles * TQ)."""
  xw = np.asarray(xw, np.float64)
  vals = np.asarray(meta_values, np.float64)
  G, TQ, WL = pk.rows, pk.block_q, pk.window_len
  y = np.zeros((pk.num_groups * G, pk.q_tiles * TQ))
  for grp in range(pk.num_groups):
    for qt in range(pk.q_tiles):
      q0 = qt * TQ
      acc = np.zeros((G, TQ))
      for k in range(pk.chunks):
        win = np.concatenate([
            xw[(k * pk.planes + ci) * pk.plane_stride + q0:][:WL]
            for ci in range(pk.planes)])
        mi, mv = pk.meta[grp * pk.chunks + k], vals[grp * pk.chunks + k]
        for r in range(G):
          for e in range(mi[r], mi[r + 1]):
            acc[r] += mv[e] * win[mi[e]:mi[e] + TQ]
      y[grp * G:(grp + 1) * G, q0:q0 + TQ] = acc
  return y


def valid_positions(g, length: int) -> np.ndarray:
  """Mask of the wide output positions below `length` that are real
  outputs (not cropped columns, not past out_len)."""
  q = np.arange(length)
  return (q < g.out_len) & (q % g.valid_period < g.valid_len)


def window_escort_conv(xw, meta_values, pk: WindowPack, vec: int):
  """-> (num_groups * G, q_tiles * TQ) float32 wide output rows."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  G, TQ, CC, WL, PL = (pk.rows, pk.block_q, pk.planes, pk.window_len,
                       pk.plane_stride)
  chunks, ML = pk.chunks, pk.meta_len
  R, MR = TMA_ROW, META_ROW
  nr = WL // R
  layout = plgpu.Layout.WG_STRIDED((TQ,), vec_size=vec)

  def body(x_g, mi_g, mv_g, y_g, smem, mi_views, mv_views, bars):
    grp = lax.axis_index("g")
    qt = lax.axis_index("q")
    win_rows, win, out_smem, out_rows = smem
    mi_rows, mi = mi_views
    mv_rows, mv = mv_views

    def issue(k, slot):
      m = grp * chunks + k
      b = bars.at[slot]
      plgpu.copy_gmem_to_smem(mi_g.at[m], mi_rows.at[slot], b)
      plgpu.copy_gmem_to_smem(mv_g.at[m], mv_rows.at[slot], b)
      for ci in range(CC):
        row = (k * CC + ci) * (PL // R) + qt * (TQ // R)
        plgpu.copy_gmem_to_smem(x_g.at[pl.ds(row, nr)],
                                win_rows.at[slot, ci], b)

    issue(0, 0)
    zero = plgpu.layout_cast(jnp.zeros((TQ,), jnp.float32), layout)

    def chunk(k, accs):
      slot = k % 2

      @pl.when(k + 1 < chunks)
      def _():
        # Every thread is done with the other slot (read last chunk).
        plgpu.commit_smem()
        issue(k + 1, 1 - slot)

      plgpu.barrier_wait(bars.at[slot])
      bounds = [mi[slot, r] for r in range(G + 1)]
      out = []
      for r in range(G):
        def step(e, carry):
          a, i, v = carry
          x = plgpu.load(win.at[slot, pl.ds(i, TQ)], (), layout=layout)
          # The next entry's offset and value load under this one's FMAs.
          return a + v * x, mi[slot, e + 1], mv[slot, e + 1]
        first = bounds[r]
        a, _, _ = lax.fori_loop(first, bounds[r + 1], step,
                                (accs[r], mi[slot, first], mv[slot, first]))
        out.append(a)
      return tuple(out)

    accs = lax.fori_loop(0, chunks, chunk, (zero,) * G)
    plgpu.commit_smem()  # the windows' memory becomes the output tile
    for r in range(G):
      out_smem[r, :] = accs[r]
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(
        out_rows, y_g.at[pl.ds(grp * G, G), pl.ds(qt * (TQ // R), TQ // R)])
    plgpu.wait_smem_to_gmem(0)

  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct(
          (pk.num_groups * G, pk.q_tiles * TQ // R, R), jnp.float32),
      scratch_types=[
          plgpu.RefUnion(plgpu.SMEM((2, CC, nr, R), jnp.float32),
                         plgpu.SMEM((2, CC * WL), jnp.float32),
                         plgpu.SMEM((G, TQ), jnp.float32),
                         plgpu.SMEM((G, TQ // R, R), jnp.float32)),
          plgpu.RefUnion(plgpu.SMEM((2, ML // MR, MR), jnp.int32),
                         plgpu.SMEM((2, ML), jnp.int32)),
          plgpu.RefUnion(plgpu.SMEM((2, ML // MR, MR), jnp.float32),
                         plgpu.SMEM((2, ML), jnp.float32)),
          plgpu.Barrier(num_arrivals=CC + 2, num_barriers=2),
      ],
      grid=(pk.num_groups, pk.q_tiles), grid_names=("g", "q"),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=plgpu.LoweringSemantics.Lane))
  n = pk.num_groups * chunks
  y = kernel(xw.reshape(-1, R),
             jnp.asarray(pk.meta).reshape(n, ML // MR, MR),
             meta_values.reshape(n, ML // MR, MR))
  return y.reshape(pk.num_groups * G, pk.q_tiles * TQ)


def prepare(layer_name, batch, variant: Variant, dtype=jnp.float32):
  from kernel_sweep import LAYERS, make_case
  import escort_jax as ej
  from escort_jax import conv_geometry as cg
  layer = next(l for l in LAYERS if l["layer"] == layer_name)
  x, w, args = make_case(layer, batch, dtype)
  sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
  sk = sk.with_values(sk.values.astype(dtype))
  g = cg.make_geometry(x.shape, sk.structure, args["window_strides"],
                       args["padding"], 1, args.get("feature_group_count", 1))
  problem = cg.stretched_problem(sk.structure, g)
  pk = pack_windows(problem, g, variant)
  x_flat = cg.to_flat_input(x, g)
  xw = to_window_input(x_flat, g, pk)
  return dict(x=x, w=w, args=args, sk=sk, g=g, problem=problem, pk=pk,
              x_flat=x_flat, xw=xw, meta_values=pk.entry_values(sk.values))


def run_twin():
  """CPU: the twin's loop against the escort reference on small layers."""
  from escort_jax import conv_geometry as cg
  from escort_jax import workload as wl
  import escort_jax as ej
  from pallas_kernels.direct_sparse_conv import direct_sparse_conv_reference
  jax.config.update("jax_enable_x64", True)
  # (caffenet/conv1: stride 4, 12 phase planes; inception_3a/5x5 at G = 5:
  # a partial last row group; caffenet/conv4: two feature groups.)
  cases = [("resnet50/res5a_branch2b", 2, Variant(8, 256, 4, 2)),
           ("googlenet/inception_3a/5x5", 1, Variant(5, 768, 3, 1)),
           ("caffenet/conv1", 1, Variant(8, 1024, 4, 1)),
           ("caffenet/conv4", 2, Variant(8, 256, 8, 2)),
           ("resnet50/res4a_branch2b", 1, Variant(8, 256, 2, 1))]
  for name, batch, v in cases:
    l = wl.get_layer(name)
    w = jnp.asarray(wl.make_kernel(l, None, dtype=jnp.float64))
    x = wl.make_input(l, batch, seed=1, dtype=jnp.float64)
    sk = ej.SparseKernel.from_dense(np.asarray(w))
    args = l.conv_kwargs()
    g = cg.make_geometry(x.shape, sk.structure, args["window_strides"],
                         args["padding"], 1,
                         args.get("feature_group_count", 1))
    problem = cg.stretched_problem(sk.structure, g)
    pk = pack_windows(problem, g, v)
    x_flat = cg.to_flat_input(x, g)
    xw = to_window_input(x_flat, g, pk)
    got = twin(xw, pk.entry_values(sk.values, jnp.float64), pk)
    ref = np.asarray(direct_sparse_conv_reference(
        x_flat, sk.values, problem.rows, problem.offsets,
        num_rows=g.out_channels, out_len=g.out_len))
    mask = valid_positions(g, g.out_len)
    got = got[:g.out_channels, :g.out_len]
    err = np.abs(got - ref)[:, mask].max() / np.abs(ref[:, mask]).max()
    y = cg.from_wide_output(jnp.asarray(got), g)
    lax_ref = lax.conv_general_dilated(
        x, w, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        precision=lax.Precision.HIGHEST, **args)
    err_lax = float(jnp.abs(y - lax_ref).max() / jnp.abs(lax_ref).max())
    print(f"twin {name} {v}: max rel err vs reference {err:.1e}, "
          f"vs lax {err_lax:.1e}")
    assert err < 1e-12 and err_lax < 1e-12, (err, err_lax)


def run_variant(name, layer, batch):
  from kernel_sweep import cupti_us
  import escort_jax as ej
  from jax.experimental.mosaic.gpu import profiler
  from pallas_kernels.direct_sparse_conv import direct_sparse_conv_reference
  v = Variant.parse(name)
  c = prepare(layer, batch, v)
  g, pk = c["g"], c["pk"]
  row = dict(variant=name, layer=layer, batch=batch, groups=pk.num_groups,
             q_tiles=pk.q_tiles, chunks=pk.chunks, window_len=pk.window_len,
             meta_len=pk.meta_len, nnz=int((pk.src >= 0).sum()))
  ref = np.asarray(direct_sparse_conv_reference(
      c["x_flat"], c["sk"].values, c["problem"].rows, c["problem"].offsets,
      num_rows=g.out_channels, out_len=g.out_len, out_dtype=jnp.float32))
  f = jax.jit(lambda xw, mv: window_escort_conv(xw, mv, pk, v.vec))
  t0 = time.time()
  y = np.asarray(jax.block_until_ready(f(c["xw"], c["meta_values"])))
  row["compile_s"] = time.time() - t0
  mask = valid_positions(g, g.out_len)
  got = y[:g.out_channels, :g.out_len]
  err = float(np.abs(got - ref)[:, mask].max() / np.abs(ref[:, mask]).max())
  row["rel_err"] = err
  print(f"{name} {layer}: max rel err {err:.2e}", flush=True)
  if not err < 1e-4:
    row["status"] = "wrong"
    return row
  row["status"] = "ok"
  row["window_us"], row["window_spread"] = cupti_us(f, c["xw"],
                                                   c["meta_values"])
  escort = jax.jit(lambda x, sk: ej.sparse_conv(x, sk, method="escort",
                                                **c["args"]))
  row["escort_op_us"], _ = cupti_us(escort, c["x"], c["sk"])
  escort(c["x"], c["sk"])
  _, kernels = profiler.measure(escort, aggregate=False)(c["x"], c["sk"])
  row["escort_kernels_us"] = {k[:60]: ms * 1e3 for k, ms in kernels}
  dn = ("NHWC", "HWIO", "NHWC")
  highest = jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, dimension_numbers=dn, precision=lax.Precision.HIGHEST,
      **c["args"]))
  row["lax_fp32_highest_us"], _ = cupti_us(highest, c["x"], c["w"])
  useful = 2.0 * row["nnz"] * g.batch * g.out_h * g.out_w
  row["window_tflops"] = useful / row["window_us"] / 1e6
  row["escort_kernel_us"] = sum(
      t for k, t in row["escort_kernels_us"].items() if "escort" in k)
  print(f"{name} {layer}: window {row['window_us']:.1f} us "
        f"({row['window_tflops']:.1f} TFLOP/s), escort kernel "
        f"{row['escort_kernel_us']:.1f} us (op {row['escort_op_us']:.1f}), "
        f"lax fp32 HIGHEST {row['lax_fp32_highest_us']:.1f} us", flush=True)
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", nargs="+", default=["G8.Q1024.C2.V1"])
  p.add_argument("--layers", nargs="+", default=["res3a_branch2b"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--twin", action="store_true")
  p.add_argument("--child", action="store_true")
  p.add_argument("--timeout", type=int, default=240)
  a = p.parse_args()
  if a.twin:
    run_twin()
    return
  if a.child:
    probe_runner.child(a.variant[0], a.layers[0], lambda: run_variant(
        a.variant[0], a.layers[0], a.batch))
    return
  rows = probe_runner.run_children(
      __file__, a.layers, a.variant, ["--batch", str(a.batch)],
      os.path.join(a.out, "window_probe.json"), a.timeout, batch=a.batch)
  for r in rows:
    print({k: r.get(k) for k in ("variant", "layer", "status", "rel_err",
                                 "window_us", "escort_kernel_us",
                                 "escort_op_us", "lax_fp32_highest_us")})


if __name__ == "__main__":
  main()
