#!/usr/bin/env bash
# Reads the hardware counters of the escort and vector kernels with Nsight
# Compute on the device machine, one process per case; writes $OUT/ncu/*.csv
# and prints benchmarks/ncu_profile.py's summary.
#   bash benchmarks/ncu_run.sh [CASE...]   (cases as in ncu_profile.py)
set -u
export PYTHONPATH=.
# Without it XLA holds most of the GPU memory, which ncu saves and restores
# around every replay pass.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
OUTDIR=${OUT:-/tmp}/ncu
mkdir -p "$OUTDIR"
CASES=("$@")
if [ ${#CASES[@]} -eq 0 ]; then
  CASES=(
    escort:res3a_branch2b:32:float32
    escort:res3a_branch2b:32:bfloat16
    escort:res5a_branch2b:32:float32
    escort:res3a_branch2b:1:float32
    vector:res3a_branch2b:32:bfloat16::16
    vector:res3a_branch2b:32:bfloat16:0.75:64
  )
fi
METRICS=$(python benchmarks/ncu_profile.py --list)
i=0
for c in "${CASES[@]}"; do
  i=$((i + 1))
  f="$OUTDIR/$(printf %02d $i)-$(echo "$c" | tr ':/,' '__-').csv"
  timeout 120 "$NCU" --kernel-name regex:escort_ --csv --page raw \
      --metrics "$METRICS" --log-file "$f" \
      python benchmarks/ncu_profile.py "$c" > "$f.stdout" 2>&1
  echo "rc=$? $c"
done
python benchmarks/ncu_profile.py --summarize "$OUTDIR"/*.csv
