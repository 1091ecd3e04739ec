#!/usr/bin/env bash
# One device call: CUPTI times of escort tiles with more rows per program
# (cross-row reuse of input strips in L1), then their ncu counters on res3a.
set -u
export PYTHONPATH=.
C="4,128,4,1,4,1,0,1,0,1;8,128,4,1,4,1,0,1,0,1;16,128,4,1,4,1,0,1,0,1;32,128,8,1,4,1,0,1,0,1;16,64,4,1,4,1,0,1,0,1;32,64,4,1,4,1,0,1,0,1;8,256,4,1,4,1,0,1,0,1;16,128,8,1,4,1,0,1,0,1"
timeout 250 python benchmarks/kernel_sweep.py --time --batch 32 --bf16-configs 8 \
  --layers res3a_branch2b res2a_branch2b res4a_branch2b conv3 \
  --configs "$C" --out "$OUT" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"; grep -v "^\[" "$OUT/sweep.log" | cut -c1-120 | tail -70
cases=()
for cfg in 4,128,4,1,4,1,0,1,0,1 16,128,4,1,4,1,0,1,0,1 32,128,8,1,4,1,0,1,0,1 32,64,4,1,4,1,0,1,0,1; do
  cases+=(escort:res3a_branch2b:32:float32:::$cfg)
done
cases+=(escort:res3a_branch2b:32:bfloat16:::8,256,4,1,4,1,0,1,0,1 escort:res3a_branch2b:32:bfloat16:::32,128,8,1,4,1,0,1,0,1)
timeout 300 bash benchmarks/ncu_run.sh "${cases[@]}" 2>&1 | cut -c1-400
