#!/usr/bin/env bash
# Nsight Compute reports of the kernels whose speed the issues ask about, one text file per
# probe, packed into $OUT/ncu.tar.gz (needs a machine whose runtime lets ncu read counters: Firecracker).
#   bash scripts/ncu_probes.sh [NAME ...]   (default: all probes below)
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/ncu"
SECTIONS="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats \
--section Occupancy --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis"
declare -A P=(
  [gemv4]="qmm_gemv|gemv --bits 4"
  [gemv2]="qmm_gemv|gemv --bits 2 --group 64"
  [gemv8]="qmm|gemv --bits 8"
  [gemv4_4k]="qmm_gemv|gemv --bits 4 --n 4096 --k 4096"
  [linear]="gemv|linear"
  [kivi4]="_decode_split|kivi --bits 4 --b 8"
  [kivi2]="_decode_split|kivi --bits 2 --b 8"
  [sdpa]="flash|sdpa-decode --b 8"
  [flash128]="attn|flash --b 4 --t 4096 --d 128 --causal"
)
names=("$@"); [ ${#names[@]} -eq 0 ] && names=(gemv4 gemv2 gemv8 gemv4_4k linear kivi4 kivi2 sdpa flash128)
for n in "${names[@]}"; do
  spec=${P[$n]}; kern=${spec%%|*}; args=${spec#*|}
  echo "== ncu $n ($kern): $args"
  timeout 90 ncu --clock-control none -k "regex:$kern" -s 3 -c 1 $SECTIONS \
    python3 scripts/kernel_probe.py $args > "$OUT/ncu/$n.txt" 2>&1
  echo "rc=$? $(grep -E 'Duration|Memory Throughput|DRAM Throughput' "$OUT/ncu/$n.txt" | head -3 | tr -s ' ' | tr '\n' ';')"
done
# one file back (the device tool returns at most 8 files per call)
tar -C "$OUT" -czf "$OUT/ncu.tar.gz" ncu && rm -rf "$OUT/ncu"
