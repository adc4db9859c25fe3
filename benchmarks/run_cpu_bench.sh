#!/usr/bin/env bash
# `make bench`: a short CPU version of the load benchmark (issue 6) with the embedded demo model.
#
#   benchmarks/run_cpu_bench.sh [OUT_DIR]        (default benchmarks/out/bench-cpu; ~3 minutes)
#
# Starts the whole Serve app in-process (deployments.yaml, tiny model on CPU), runs a short SLO
# sweep with `continuous` then `hf-generate`, and writes OUT_DIR/sweep/{sweep.json,sweep.md,sweep.png}.
# BENCH_AUTOSCALE=1 also runs the autoscaling demo (~4 more minutes) into OUT_DIR/autoscale/.
# CPU workload: the article's mix and prompts, but 640x480..800x600 images, outputs 12/32/48/32
# tokens and greedy sampling, so a 2-core box answers in about a second. Not the GPU figures.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/out/bench-cpu}
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
"$PY" -c "import matplotlib" 2>/dev/null || echo "note: matplotlib is not installed; no PNG (pip install matplotlib)"
CPU=(--model builtin:tiny-qwen3-vl --device cpu --resolutions 640x480,800x600 --temperature 0
     --tokens short_description=12,detail_recognition=32,cross_region_reasoning=48,two_image_comparison=32)
"$PY" -m benchmarks.loadgen sweep "${CPU[@]}" --engines continuous,hf-generate \
  --qps 0.5,1,1.5 --duration 15 --warmup 2 --drain 8 --refine 0 --warmup-requests 2 \
  --title "make bench: CPU demo (tiny model), continuous vs hf-generate" --out "$OUT/sweep"
if [ "${BENCH_AUTOSCALE:-0}" = 1 ]; then
  "$PY" benchmarks/autoscale_run.py "${CPU[@]}" --out "$OUT/autoscale"
fi
echo "results: $OUT"
