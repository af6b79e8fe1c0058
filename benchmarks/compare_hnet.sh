#!/usr/bin/env bash
# The original reference's comparison table: flat HGRN-Bit vs 1-stage vs 2-stage H-Net, the same wall-clock
# budget each on the bundled TinyStories (CPU). Usage: benchmarks/compare_hnet.sh [seconds] [outdir]
set -euo pipefail
cd "$(dirname "$0")/.."
budget=${1:-300}
out=${2:-runs/compare_hnet}
for name in flat 1stage 2stage; do
  .venv/bin/slm train --config "configs/training_${name}_tinystories.json" --output_dir "$out/$name" \
    --set train.time_limit_s="$budget" --set train.progress=false --set train.loggers='["csv"]'
done
.venv/bin/python scripts/analyze_training.py --run_dir "$out/flat" --compare "$out/1stage" "$out/2stage" --out "$out/plots"
