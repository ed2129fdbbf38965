#!/usr/bin/env bash
# The GPU checks for a session that is lent a device (see CONTRIBUTING.md): run it there once, from the repository
# root, as `bash scripts/gpu-check.sh tests` and then `bash scripts/gpu-check.sh bench` (two calls, each under the
# device's 600 s per-command limit even if every step ran to its own limit; no argument runs both); results land in
# $OUT (or ./gpu-results). It installs nothing: the device
# image's python3 already has torch, triton, pytest, hypothesis, numpy, rich and matplotlib, so seekstack runs from
# src/ through PYTHONPATH. Every step has its own time limit so one hang cannot eat the whole device budget.
set -uo pipefail
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" SEEKSTACK_BENCH_DIR="$OUT"

PART=${1:-all}
case $PART in tests | bench | all) ;; *) echo "usage: $0 [tests|bench|all]" >&2; exit 2 ;; esac

step() {  # step NAME SECONDS PART COMMAND...: run, keep its output, record its exit status
  local name=$1 limit=$2 part=$3
  shift 3
  [[ $PART == all || $PART == "$part" ]] || return 0
  echo "== $name"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1
  echo "$name exit $?" | tee -a "$OUT/status.txt"
  tail -n 25 "$OUT/$name.txt"
}

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())' \
  >"$OUT/versions.txt" 2>&1
step gpu-tests 240 tests python3 -m pytest -m gpu tests/mla tests/gemm tests/eplb -q -p no:cacheprovider --timeout 120
# EP on CUDA tensors over NCCL (one rank per GPU; a single GPU gives a world of one, two GPUs add a 2-rank world).
step gpu-tests-ep 180 tests python3 -m pytest -m gpu tests/ep -q -p no:cacheprovider --timeout 170
step bench-ep-nccl 90 bench python3 -m seekstack bench ep --backend nccl --repeats 5
step bench-mla 120 bench python3 -m seekstack bench mla --no-reference
step bench-mla-fp8 90 bench python3 -m seekstack bench mla --fp8 --no-reference
step bench-gemm 150 bench python3 -m seekstack bench gemm --full --backend triton
