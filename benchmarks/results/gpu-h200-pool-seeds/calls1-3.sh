# Calls 1-3 as run: RATE=22 SEED=1, then RATE=23 SEED=0, then RATE=23 SEED=1, each after
# mkdir -p /tmp/site && (test -d /tmp/site/ray || tar -C /tmp/site -xJf .devsite/site.tar.xz) && export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH; export SERVE_APP_CACHE=/tmp/models PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LOADGEN_NO_PLOT=1
# Next session: 5 minutes at RATE QPS (default 23) with SEED (default 0; 1 = fresh arrivals) and the shipped profile
# (36 admitted, 24 decoding since 6a58021). Why: 36 held 22 QPS twice on one machine with seed-0 arrivals (TTFT P95
# 338/322 ms, e2e P95 1.82/1.80 s). Confirm 22 on fresh arrivals (RATE=22 SEED=1), then try 23 (e2e is the close limit).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 480 python3 benchmarks/gpu_sweep.py $R/seed${SEED:-0}-300s-at${RATE:-23} --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json '{"pdl": true}' --seconds 460 --config deployments.gpu.yaml --qps ${RATE:-23} --seed ${SEED:-0} > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
