#!/usr/bin/env bash
# The device loan (DESIGN.md §11; benchmarks/gpu_loan.py says what each part runs and brings back).
#   bash benchmarks/gpu_loan.sh a            on the device: $OUT is set by the run tool; then part b at once
#   bash benchmarks/gpu_loan.sh b
#   bash benchmarks/gpu_loan.sh --rehearse   on a CPU: both parts, dry-run sizes, on a bare copy of the tree
# Nothing is installed and nothing is fetched: the tree goes on PYTHONPATH. setup.py installs kernels/ as
# tte_flash.kernels (package_dir); an uninstalled copy lacks that name, so a link tte_flash/kernels -> ../kernels
# is made in the copy when it has none, and removed at the end (the env job records where tte_flash.kernels came
# from and fails if not from this tree).
set -u
export LOAN_T0="${LOAN_T0:-$(date +%s.%N)}"
cd "$(dirname "$0")/.." || exit 2
PY="${PYTHON:-python3}"
if [ "${1:-}" = "--rehearse" ]; then
    shift
    exec "$PY" benchmarks/gpu_loan.py --rehearse "$@"
fi
PART="${1:?usage: bash benchmarks/gpu_loan.sh a|b  (or --rehearse)}"
shift
: "${OUT:?OUT must name the folder that comes back (the run tool sets it)}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_DEFAULT_FP_FUSION=1 TRITON_CACHE_DIR="${TRITON_CACHE_DIR:-/tmp/tte-loan-triton-cache}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -e tte_flash/kernels ]; then
    export TTE_LOAN_INSTALL="PYTHONPATH=$PWD (tte_flash/kernels already there)"
elif ln -s ../kernels tte_flash/kernels; then
    export TTE_LOAN_INSTALL="PYTHONPATH=$PWD + link tte_flash/kernels -> ../kernels"
    trap 'rm -f tte_flash/kernels' EXIT  # removed when the part ends: a checkout is left as it was
else
    echo "gpu_loan.sh: cannot link tte_flash/kernels -> ../kernels in $PWD" | tee -a "$OUT/$PART-console.log" >&2
    exit 2
fi
echo "gpu_loan.sh: part $PART, $TTE_LOAN_INSTALL, python $("$PY" -c 'import sys; print(sys.executable)')" \
    | tee -a "$OUT/$PART-console.log"
"$PY" benchmarks/gpu_loan.py "$PART" --out "$OUT" "$@" 2>&1 | tee -a "$OUT/$PART-console.log"
exit "${PIPESTATUS[0]}"
