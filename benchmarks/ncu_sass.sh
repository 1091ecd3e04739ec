#!/usr/bin/env bash
# The escort kernel's SASS with per-instruction execution counts (Nsight
# Compute's source page), one file per case under $OUT/sass/.
#   [KERNEL=regex] bash benchmarks/ncu_sass.sh CASE...   (cases as in
#   ncu_profile.py; KERNEL picks the kernel, default escort_direct)
set -u
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
mkdir -p "$OUT/sass"
for c in "$@"; do
  f="$OUT/sass/$(echo "$c" | tr ':/,' '__-').csv"
  timeout 150 "$NCU" --kernel-name regex:${KERNEL:-escort_direct} --launch-skip 1 \
      --launch-count 1 --section SourceCounters --page source \
      --print-source sass --csv python benchmarks/ncu_profile.py "$c" \
      > "$f" 2> "$f.stderr"
  echo "rc=$? $c $(wc -l < "$f") lines"
done
