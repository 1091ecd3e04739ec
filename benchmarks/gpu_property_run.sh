#!/usr/bin/env bash
# The property tests on the GPU, four test functions in parallel processes
# (compiles are CPU-bound; the GPU is shared), each writing its own summary.
#   bash benchmarks/gpu_property_run.sh OUTDIR CONV GRAD VECTOR VECTOR_GRAD
set -u
out=$1; mkdir -p "$out"
export PYTHONPATH=. XLA_PYTHON_CLIENT_PREALLOCATE=false
export ESCORT_PROPERTY_EXAMPLES=$2 ESCORT_PROPERTY_GRAD_EXAMPLES=$3
export ESCORT_PROPERTY_VECTOR_EXAMPLES=$4 ESCORT_PROPERTY_VECTOR_GRAD_EXAMPLES=$5
run() {
  ESCORT_PROPERTY_SUMMARY="$out/$1.json" timeout "${LIMIT:-560}" \
    python -m pytest -m property -q -p no:cacheprovider \
    tests/test_properties.py -k "$2 or zz" > "$out/$1.log" 2>&1
  echo "$1 rc=$? $(tail -1 "$out/$1.log")"
}
run escort_conv test_escort_matches_lax_conv &
run escort_grad test_escort_gradients &
run vector_conv test_vector_matches_lax_conv &
run vector_grad test_vector_gradients &
wait
grep -h "property cases" "$out"/*.log
