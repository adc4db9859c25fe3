# As run in session 22: call 1 with RATE=22 (18:52-18:59 UTC), call 2 with RATE=21 (19:03-19:10 UTC), each on a fresh
# nvidia-h200 machine (the recipe's env line first, then `RATE=Q bash calls1-2.sh`).
# Next session: 5 minutes at RATE QPS (default 22) with the shipped profile, which now resizes images in bands on
# 4 threads (images.resize_threads): does the serving layer's cut (P95 108 -> 71 ms, paced) carry into the app?
# Compare with the three earlier 22-QPS runs (TTFT P95 406 / 418 / 425 ms). Same arrivals (seed 0).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 480 python3 benchmarks/gpu_sweep.py $R/bands-300s-at${RATE:-22} --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json '{"pdl": true}' --seconds 460 --config deployments.gpu.yaml --qps ${RATE:-22} > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
