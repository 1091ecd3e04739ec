"""Probe: can a Mosaic GPU (TMA + wgmma) kernel run the vector-sparse
convolution, and how fast is it against the Triton-lowered one?

  PYTHONPATH=. python benchmarks/mosaic_vector_probe.py [--variant NAME]
      [--layers NAME ...] [--v 16] [--sparsity published|0.9] [--out DIR]

The kernel under test (one warpgroup per program, grid (blocks, q tiles)):

    acc (64, BQ) += Wt (64, BK) @ S (BK, BQ)

  Wt: block b's weights transposed, V rows (zero rows up to wgmma's M = 64),
      packed once per call by XLA from the CSR values.
  S:  row j is the strip x_flat[offset_j + q0 : offset_j + q0 + BQ], one
      TMA copy of BQ = 64 bf16 (128 bytes) per kept column, into a
      128-byte-swizzled shared-memory tile that wgmma reads as its B operand.

Two stages of (Wt, S) tiles; the weight tile and the strips complete on
barriers of their own. Variants ("+"-joined options: mosaic_vector_conv's
docstring) differ in how the strip copies name their rows and are issued;
"swz+nb+warps" is the one that works best (benchmarks/NOTES.md).
Each variant runs in its own process (a bad TMA can kill the process) and is
checked against the plain-JAX reference before it is timed (CUPTI, as
benchmarks/kernel_sweep.py). Results go to OUT/mosaic_probe.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import probe_runner  # noqa: E402

BQ = 64   # 128 bytes of bf16: one swizzle row
BK = 64   # kept columns per step (128 bytes of Wt per row)
M = 64    # wgmma's M per warpgroup
WARPS = 4  # per warpgroup


def prepare(layer_name, batch, v, sparsity_name):
  """The layer's vector-sparse case, packed for the probe kernel."""
  from kernel_sweep import LAYERS, make_case
  import escort_jax as ej
  from escort_jax import conv_geometry as cg
  from pallas_kernels.vector_sparse_conv import pack_vector_blocks
  layer = next(l for l in LAYERS if l["layer"] == layer_name)
  sparsity = (layer["sparsity"] or 0.9) if sparsity_name == "published" \
      else float(sparsity_name)
  x, w, args = make_case(layer, batch, jnp.bfloat16, sparsity=sparsity,
                         vector_width=v)
  sk = ej.SparseKernel.from_dense(np.asarray(w.astype(jnp.float32)))
  values = sk.values.astype(jnp.bfloat16)
  g = cg.make_geometry(x.shape, sk.structure, args["window_strides"],
                       args["padding"], 1, args.get("feature_group_count", 1))
  problem = cg.stretched_problem(sk.structure, g)
  blocks = pack_vector_blocks(problem.rows, problem.offsets, g.out_channels,
                              v, BK, zeros_offset=g.num_planes * g.plane_len)
  q_tiles = -(-g.out_len // BQ)
  tail = q_tiles * BQ + g.max_shift
  x_flat = cg.to_flat_input(x, g, tail)
  x_flat = jnp.pad(x_flat, (0, -x_flat.shape[0] % 8))
  nb, cols = blocks.num_blocks, blocks.padded_cols
  offsets = (blocks.offsets.astype(np.int64) * blocks.offset_unit).astype(
      np.int32)
  tiles = blocks.gather_values(values).reshape(nb, cols, blocks.lanes)[:, :, :v]
  wt = jnp.zeros((nb, M, cols), jnp.bfloat16).at[:, :v, :].set(
      tiles.transpose(0, 2, 1))
  # The Triton kernel as ops.py runs it by default (VectorConfig()).
  triton_blocks = pack_vector_blocks(
      problem.rows, problem.offsets, g.out_channels, v, 32,
      zeros_offset=g.num_planes * g.plane_len)
  return dict(x=x, w=w, args=args, sk=sk, values=values, g=g, blocks=blocks,
              triton_blocks=triton_blocks,
              x_flat=x_flat, offsets=jnp.asarray(offsets),
              steps=jnp.asarray(blocks.steps), wt=wt, q_tiles=q_tiles,
              sparsity=sparsity)


def mosaic_vector_conv(x_flat, wt, offsets, steps, *, v, q_tiles, variant,
                       align, semantics="Lane"):
  """-> (nb * v, q_tiles * BQ) in x_flat's dtype: the output channels at the
  wide positions (rows v..63 of each block's product are wgmma's padding and
  are not stored). Every offset is a multiple of `align` (which divides BQ).

  variant: "+"-joined options.
    union  copies write through a second view (1, 64)-tiled (see below);
    swz    ... swizzled but untiled instead (the GMEM side then stays
           untiled, and a strip may start at any aligned offset; tiled
           (1, 64), Mosaic tiles the GMEM view too, and a strip that starts
           mid-tile reads zeros past the tile's end);
    sync   no prefetch: each step loads its own slot and waits;
    warps  each warp issues a quarter of a step's strips on its own barrier;
    nb     no automatic warpgroup barrier before every copy
           (unsafe_no_auto_barriers), one fence + barrier per step instead;
    smemoff  the block's offsets are copied to shared memory once;
    batchoff a step's offsets are all loaded before its copies are issued.
  """
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import mosaic_gpu as plgpu
  opts = set(variant.split("+"))
  nb, _, cols = wt.shape
  read_len = q_tiles * BQ
  swz = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
  x2 = x_flat.reshape(1, -1)

  def body(steps_g, offs_g, wt_g, x_g, y_g, a_smem, b_views, bar, out_smem,
           offs_smem, obar, wbar):
    b = lax.axis_index("b")
    q0 = pl.multiple_of(lax.axis_index("q") * BQ, BQ)
    n = steps_g[b]
    b_rows, b_mma = b_views
    if "smemoff" in opts:
      plgpu.copy_gmem_to_smem(offs_g.at[b], offs_smem, obar.at[0])
      plgpu.barrier_wait(obar.at[0])
      offs = offs_smem
    else:
      offs = offs_g.at[b]

    def issue(t, slot):
      if "nb" in opts:
        # The slot was last read by the previous wgmma (waited for).
        plgpu.commit_smem()
      # (A static step needs no proof of alignment; multiple_of rejects it.)
      start = t * BK if isinstance(t, int) else pl.multiple_of(t * BK, BK)
      plgpu.copy_gmem_to_smem(wt_g.at[b, :, pl.ds(start, BK)],
                              a_smem.at[slot], wbar.at[slot])
      if "warps" in opts:
        # Each of the four warps issues a quarter of the strips, on its own
        # barrier: four issuers, and a copy arrives from 32 threads, not 128.
        def per_warp(w):
          first = t * BK + w * (BK // WARPS)
          starts = [offs[first + j] for j in range(BK // WARPS)]
          for j in range(BK // WARPS):
            # (multiple_of has no warp-level lowering; Lane lowering does not
            # need it.)
            off = starts[j] + q0
            plgpu.copy_gmem_to_smem(
                x_g.at[pl.ds(0, 1), pl.ds(off, BQ)],
                b_rows.at[slot, pl.ds(w * (BK // WARPS) + j, 1)],
                bar.at[slot * WARPS + w])
        plgpu.warp_map(per_warp)
        return
      if "batchoff" in opts:
        starts = [offs[t * BK + j] for j in range(BK)]
      for j in range(BK):
        o = starts[j] if "batchoff" in opts else offs[t * BK + j]
        off = pl.multiple_of(o + q0, align)
        plgpu.copy_gmem_to_smem(
            x_g.at[pl.ds(0, 1), pl.ds(off, BQ)],
            b_rows.at[slot, pl.ds(j, 1)], bar.at[slot * WARPS])

    def scope(acc):
      @pl.when(n > 0)
      def _():
        issue(0, 0)

      def step(t, carry):
        slot = t % 2
        if "sync" in opts:
          @pl.when(t > 0)
          def _():
            issue(t, slot)
        else:
          @pl.when(t + 1 < n)
          def _():
            issue(t + 1, 1 - slot)
        plgpu.barrier_wait(wbar.at[slot])
        for w in range(WARPS if "warps" in opts else 1):
          plgpu.barrier_wait(bar.at[slot * WARPS + w])
        plgpu.wgmma(acc, a_smem.at[slot], b_mma.at[slot])
        plgpu.wgmma_wait(0)
        return carry

      lax.fori_loop(0, n, step, 0)
      return acc[...]

    res = pl.run_scoped(scope, plgpu.ACC((M, BQ), jnp.float32))
    out_smem[...] = res.astype(out_smem.dtype)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_smem.at[pl.ds(0, v)],
                            y_g.at[pl.ds(b * v, v), pl.ds(q0, BQ)])
    plgpu.wait_smem_to_gmem(0)

  row_transforms = ((plgpu.SwizzleTransform(128),) if "swz" in opts else
                    (plgpu.TilingTransform((1, 64)),
                     plgpu.SwizzleTransform(128)))
  b_views = plgpu.RefUnion(
      plgpu.SMEM((2, BK, BQ), jnp.bfloat16, transforms=row_transforms),
      plgpu.SMEM((2, BK, BQ), jnp.bfloat16, transforms=swz))
  kernel = plgpu.kernel(
      body,
      out_type=jax.ShapeDtypeStruct((nb * v, read_len), x_flat.dtype),
      scratch_types=[
          plgpu.SMEM((2, M, BK), jnp.bfloat16, transforms=swz),
          b_views,
          # (slot, warp): the strips' copies; with "warps" each warp's own.
          plgpu.Barrier(num_arrivals=BK // WARPS if "warps" in opts else BK,
                        num_barriers=2 * WARPS),
          plgpu.SMEM((M, BQ), x_flat.dtype),
          plgpu.SMEM((cols,), jnp.int32),
          plgpu.Barrier(num_arrivals=1, num_barriers=1),
          plgpu.Barrier(num_arrivals=1, num_barriers=2),  # weight tiles
      ],
      grid=(nb, q_tiles), grid_names=("b", "q"),
      compiler_params=plgpu.CompilerParams(
          lowering_semantics=getattr(plgpu.LoweringSemantics, semantics),
          unsafe_no_auto_barriers="nb" in opts))
  return kernel(steps, offsets, wt, x2)


def run_variant(variant, layer, batch, v, sparsity_name, semantics):
  from kernel_sweep import cupti_us
  from pallas_kernels.vector_sparse_conv import (
      vector_sparse_conv, vector_sparse_conv_reference)
  c = prepare(layer, batch, v, sparsity_name)
  g, blocks = c["g"], c["blocks"]
  row = dict(variant=variant, semantics=semantics, layer=layer, batch=batch,
             v=v,
             sparsity=c["sparsity"], blocks=blocks.num_blocks,
             kept_columns=blocks.kept_columns, q_tiles=c["q_tiles"],
             steps=int(np.asarray(c["steps"]).sum()))
  ref = vector_sparse_conv_reference(c["x_flat"], c["values"], blocks,
                                     out_len=g.out_len,
                                     out_dtype=jnp.float32)
  f = jax.jit(lambda x, wt, o, s: mosaic_vector_conv(
      x, wt, o, s, v=v, q_tiles=c["q_tiles"], variant=variant,
      align=int(np.gcd(blocks.offset_unit, BQ)), semantics=semantics))
  t0 = time.time()
  y = f(c["x_flat"], c["wt"], c["offsets"], c["steps"])
  y = np.asarray(jax.block_until_ready(y))
  row["compile_s"] = time.time() - t0
  got = y[:, :g.out_len].astype(np.float32)
  ref = np.asarray(ref, np.float32)
  err = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
  row["rel_err"] = err
  per_row = np.linalg.norm(got - ref, axis=1) / np.linalg.norm(ref, axis=1)
  row["err_per_block"] = [float(e) for e in per_row.reshape(-1, v).max(1)]
  tiles = -(-g.out_len // BQ)
  pad = tiles * BQ - g.out_len
  d = np.pad(got - ref, ((0, 0), (0, pad))).reshape(-1, tiles, BQ)
  r = np.pad(ref, ((0, 0), (0, pad))).reshape(-1, tiles, BQ)
  per_tile = np.linalg.norm(d, axis=(0, 2)) / np.linalg.norm(r, axis=(0, 2))
  row["err_per_tile_sample"] = [float(e) for e in per_tile[::max(1, tiles // 16)]]
  per_lane = np.linalg.norm(d, axis=(0, 1)) / np.linalg.norm(r, axis=(0, 1))
  row["err_per_position_in_tile"] = [round(float(e), 3) for e in per_lane]
  y2 = np.asarray(f(c["x_flat"], c["wt"], c["offsets"], c["steps"]))
  row["repeatable"] = bool(np.array_equal(y, y2))
  row["finite"] = bool(np.isfinite(got).all())
  print(f"{variant}: rel err {err:.2e}", flush=True)
  if not (err < 1e-2):
    row["status"] = "wrong"
    return row
  row["status"] = "ok"
  row["mosaic_us"], row["mosaic_spread"] = cupti_us(
      f, c["x_flat"], c["wt"], c["offsets"], c["steps"])
  triton = jax.jit(lambda x, vals: vector_sparse_conv(
      x, vals, c["triton_blocks"], out_len=g.out_len, block_q=128,
      num_warps=4, num_stages=3))
  row["triton_wide_us"], _ = cupti_us(triton, c["x_flat"], c["values"])
  dn = ("NHWC", "HWIO", "NHWC")
  lax_bf16 = jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, dimension_numbers=dn, **c["args"]))
  row["lax_bf16_us"], _ = cupti_us(lax_bf16, c["x"],
                                   c["w"].astype(jnp.bfloat16))
  useful = 2.0 * blocks.kept_columns * v * g.batch * g.out_h * g.out_w
  row["mosaic_tflops"] = useful / row["mosaic_us"] / 1e6
  row["triton_tflops"] = useful / row["triton_wide_us"] / 1e6
  print(f"{variant} {layer}: mosaic {row['mosaic_us']:.1f} us, triton (wide "
        f"out) {row['triton_wide_us']:.1f} us, lax bf16 "
        f"{row['lax_bf16_us']:.1f} us", flush=True)
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--variant", nargs="+", default=["swz+nb+warps"])
  p.add_argument("--layers", nargs="+", default=["res3a_branch2b"])
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--v", type=int, default=16)
  p.add_argument("--sparsity", default="published")
  p.add_argument("--out", default=os.environ.get("OUT", "."))
  p.add_argument("--semantics", default="Lane", choices=["Lane", "Warpgroup"])
  p.add_argument("--child", action="store_true")
  a = p.parse_args()
  if a.child:
    probe_runner.child(a.variant[0], a.layers[0], lambda: run_variant(
        a.variant[0], a.layers[0], a.batch, a.v, a.sparsity, a.semantics))
    return
  rows = probe_runner.run_children(
      __file__, a.layers, a.variant,
      ["--batch", str(a.batch), "--v", str(a.v), "--sparsity", a.sparsity,
       "--semantics", a.semantics],
      os.path.join(a.out, "mosaic_probe.json"))
  for r in rows:
    print({k: r.get(k) for k in ("variant", "layer", "status", "rel_err",
                                 "mosaic_us", "triton_wide_us",
                                 "lax_bf16_us")})


if __name__ == "__main__":
  main()
