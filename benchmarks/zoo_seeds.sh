#!/usr/bin/env bash
# Build the zoo preset on several seeds at once and write each seed's report (lata.zoo.report):
#   benchmarks/zoo_seeds.sh OUT_DIR DEVICE PRESET SEED...
# e.g. benchmarks/zoo_seeds.sh outputs/zoo_seeds cuda small 0 1 2 (on one GPU the seeds share it).
# Each seed writes OUT_DIR/seedN.log (the report's table) and OUT_DIR/seedN.json (the report).
set -u
out=$1 device=$2 preset=$3; shift 3
mkdir -p "$out"
py=${PYTHON:-python3}
for seed in "$@"; do
  (
    start=$(date +%s)
    $py -m lata.zoo --preset "$preset" --seed "$seed" --device "$device" --quiet > "$out/seed$seed.log" 2>&1
    rc=$?
    echo "exit $rc after $(( $(date +%s) - start )) s" >> "$out/seed$seed.log"
    report=$(sed -n 's/^report: //p' "$out/seed$seed.log")
    [ -n "$report" ] && cp "$(dirname "$report")/zoo_report.json" "$out/seed$seed.json"
  ) &
done
wait
tail -n 3 "$out"/seed*.log
