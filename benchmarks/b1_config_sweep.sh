#!/usr/bin/env bash
# One device call: escort configs on workload layers at batch 1, each layer's
# kernel time per config in one table, beside TF32 and bf16 lax.conv.
# Usage: bash benchmarks/b1_config_sweep.sh LAYERS DTYPES CONFIG...
#   e.g. bash benchmarks/b1_config_sweep.sh res3a_branch2b float32 \
#          "rpp=8,bq=64,nw=4,nzl=4,nhwc_out=1"
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
layers=$1; dtypes=$2; shift 2
args=()
for c in "$@"; do args+=(--config "$c"); done
timeout 560 python -m escort_jax bench --batch 1 --dtype $dtypes \
  --method escort --baselines lax_default lax_bf16 --layers "$layers" \
  --inputs 2 --repeats 3 "${args[@]}" --out "$OUT/sweep.json" --no-report \
  > "$OUT/sweep.log" 2>&1
echo "bench rc=$?"
python - <<'PY'
import collections, json, os
rows = json.load(open(os.environ["OUT"] + "/sweep.json"))["rows"]
by = collections.defaultdict(list)
for r in rows:
  by[(r["layer"], r["dtype"])].append(r)
for (layer, dtype), rs in by.items():
  base = {k: round(v, 2) for k, v in rs[0]["baselines_us"].items() if v}
  print(layer, dtype, base)
  for r in sorted(rs, key=lambda r: r["time_us"] or 1e9):
    label = r["method"].replace("escort[", "").rstrip("]")
    if r["time_us"] is None:
      print(f"   failed  {label}: {r.get('error', '')[:150]}")
      continue
    kern = sum(v for k, v in r["kernels_us"].items() if "layout" not in k)
    print(f"   {r['time_us']:7.2f} (kernel {kern:6.2f}, err {r['rel_err']:.1e})"
          f"  {label}")
PY
