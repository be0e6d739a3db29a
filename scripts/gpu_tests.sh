#!/usr/bin/env bash
# Every GPU-marked test, one file at a time with its own time limit, on the device machine:
#   [PER_FILE_S=240] bash scripts/gpu_tests.sh [TEST_FILE ...]   (log and summary under $OUT)
# The device image has no network: slimlm runs from the working tree via PYTHONPATH.
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
files=("$@")
[ ${#files[@]} -eq 0 ] && files=(tests/test_attention_gpu.py tests/test_quant_gpu.py \
    tests/test_kvcache_gpu.py tests/test_precision.py tests/test_train.py tests/test_bench.py \
    tests/test_lora.py tests/test_hf.py tests/test_generate.py)
for f in "${files[@]}"; do
    echo "== $f" | tee -a "$OUT/gpu-tests.log"
    timeout "${PER_FILE_S:-240}" python3 -m pytest -q -m gpu -p no:logging -p no:cacheprovider "$f" \
        >> "$OUT/gpu-tests.log" 2>&1
    echo "rc=$? $f" | tee -a "$OUT/gpu-tests.log"
    tail -1 "$OUT/gpu-tests.log" | grep -E "passed|failed|error" || true
done
grep -E "^(FAILED|ERROR)" "$OUT/gpu-tests.log" | head -40
