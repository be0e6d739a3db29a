#!/usr/bin/env bash
# Benchmark suites on the device machine, each with its own time limit; JSON under
# $OUT/results (copy to benchmarks/results/, then `slimlm bench --report`).
#   bash scripts/gpu_bench.sh SECONDS SUITE [--option k=v ...]
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/results"
limit=$1; suite=$2; shift 2
timeout "$limit" python3 -m slimlm.cli bench "$suite" --out "$OUT/results" "$@" 2>&1 \
    | grep -v -i -E "warn|^W[0-9]{4}|^\s*$" | tail -60
