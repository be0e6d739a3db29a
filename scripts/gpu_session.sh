#!/usr/bin/env bash
# One device call that runs a list of steps, each under its own time limit, so a GPU
# session spends its minutes measuring rather than starting machines:
#   bash scripts/gpu_session.sh STEP [STEP ...]
# A STEP is "SECONDS:tests:FILE[,FILE...]" (GPU-marked tests of those files) or
# "SECONDS:bench:SUITE[:k=v[;k=v...]]" (a benchmark suite, JSON under $OUT/results) or
# "SECONDS:cmd:SHELL COMMAND" (anything else, e.g. ncu on scripts/kernel_probe.py).
# Example (about 9 minutes):
#   bash scripts/gpu_session.sh "240:tests:tests/test_precision.py,tests/test_kvcache_gpu.py" \
#       "150:bench:quant:decode=true;decode_modes=[\"eager\",\"cuda-graph\",\"reduce-overhead\"]" \
#       "120:bench:kvcache:sections=kernel;autotune=1"
# Copy $OUT/results/*.json to benchmarks/results/ (scripts/merge_results.py for partial
# reruns), then `slimlm bench --report`.
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/results"
for step in "$@"; do
    limit=${step%%:*}; rest=${step#*:}; kind=${rest%%:*}; rest=${rest#*:}
    echo "== [$limit s] $kind $rest" | tee -a "$OUT/session.log"
    if [ "$kind" = tests ]; then
        IFS=, read -ra files <<< "$rest"
        timeout "$limit" python3 -m pytest -q -m gpu -p no:cacheprovider "${files[@]}" \
            >> "$OUT/session.log" 2>&1
        echo "rc=$?" | tee -a "$OUT/session.log"
        grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/session.log" | tail -8
    elif [ "$kind" = bench ]; then
        suite=${rest%%:*}; opts=()
        if [ "$suite" != "$rest" ]; then
            IFS=';' read -ra kvs <<< "${rest#*:}"
            for kv in "${kvs[@]}"; do opts+=(--option "$kv"); done
        fi
        timeout "$limit" python3 -m slimlm.cli bench "$suite" --out "$OUT/results" \
            "${opts[@]}" >> "$OUT/session.log" 2>&1
        echo "rc=$?" | tee -a "$OUT/session.log"
        grep -v -i -E "warn|^W[0-9]{4}|^\s*$" "$OUT/session.log" | tail -12
    elif [ "$kind" = cmd ]; then
        timeout "$limit" bash -c "$rest" >> "$OUT/session.log" 2>&1
        echo "rc=$?" | tee -a "$OUT/session.log"
        tail -6 "$OUT/session.log"
    else
        echo "unknown step kind '$kind' in '$step': expected tests, bench or cmd" | tee -a "$OUT/session.log"
    fi
done
