# Calls 1-4 as run (2026-11-30 23:23-23:52 UTC, one nvidia-h200 machine held warm): RATE=23 SEED=0 POOL=2,
# then RATE=23 SEED=1 POOL=2, then RATE=24 SEED=0 POOL=2, then ENGINE_JSON='{"pdl": true, "kv_cache_dtype": "fp8"}' TAG=kvfp8 RATE=24 SEED=0 POOL=2, each after
# mkdir -p /tmp/site && (test -d /tmp/site/ray || tar -C /tmp/site -xJf .devsite/site.tar.xz) && export PYTHONPATH=/tmp/site:$PYTHONPATH PATH=/tmp/site/bin:$PATH; export SERVE_APP_CACHE=/tmp/models PYTHONUNBUFFERED=1 RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 LOADGEN_NO_PLOT=1
# Next session: 5 minutes at RATE QPS (default 23) on the image pool at the workload's expectation (--pool-seed 2,
# +0.3 % image tokens per request; pool 0 is +4.1 %, pool 1 -3.9 %: benchmarks/pool_spread.py), arrivals SEED (0 or 1).
# ENGINE_JSON (default {"pdl": true}) and TAG name a variant, e.g. ENGINE_JSON='{"pdl": true, "kv_cache_dtype": "fp8"}' TAG=kvfp8.
# Why: 23 held on pool 1 (TTFT P95 279 ms) and missed on pool 0 (605 ms); 24 on pool 1 missed by 2 ms in 200 s.
R=$OUT/r; mkdir -p $R
EJ='{"pdl": true}'; [ -n "$ENGINE_JSON" ] && EJ=$ENGINE_JSON
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 480 python3 benchmarks/gpu_sweep.py $R/${TAG:-shipped}-pool${POOL:-2}-seed${SEED:-0}-300s-at${RATE:-23} --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json "$EJ" --seconds 460 --config deployments.gpu.yaml --qps ${RATE:-23} --seed ${SEED:-0} --pool-seed ${POOL:-2} > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
