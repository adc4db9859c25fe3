#!/usr/bin/env bash
# SLO sweep of the whole Serve app over HTTP: `continuous`, then naive `hf-generate`, one process.
#
#   benchmarks/run_sweep.sh OUT_DIR [more `python -m benchmarks.loadgen sweep` flags]
#
# Defaults are the GPU run of issue 6: builtin:qwen3-vl-4b-random, VLM memory capped at 24 GB (an
# A10's worth), the article's workload and SLO, ~9 minutes in all (--time-budget 540). Later flags
# win, e.g. uncapped: `--max-gpu-memory-gb 0`; CPU smoke run with the tiny model:
#   benchmarks/run_sweep.sh /tmp/sweep --model builtin:tiny-qwen3-vl --device cpu \
#       --qps 0.25,0.5 --loads-for 'hf-generate=0.25' --duration 10 --resolutions 640x480
# Needs ray[serve], httpx, nvidia-ml-py and the serve_app deps; scikit-image (real photos; without it
# the images are all generated) and matplotlib (PNG; else `python -m benchmarks.loadgen plot DIR`
# later) are optional. Built-in models are built on first use into $SERVE_APP_CACHE.
# Writes OUT_DIR/sweep.json, sweep.md, sweep.png (also after every step).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: benchmarks/run_sweep.sh OUT_DIR [flags]}
shift
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3 || command -v python)
exec "$PY" -m benchmarks.loadgen sweep \
  --engines continuous,hf-generate \
  --model builtin:qwen3-vl-4b-random --max-gpu-memory-gb 24 \
  --qps 2,4,6,8,10,12,16,20,24,28,32,40 --loads-for 'hf-generate=0.1,0.2,0.4' \
  --duration 20 --warmup 3 --drain 15 --refine 1 --warmup-requests 2 --time-budget 540 \
  --title "SLO sweep: qwen3-vl-4b-random, continuous vs hf-generate" \
  --out "$OUT" "$@"
