# 5 minutes at RATE QPS (default 22) with the shipped profile plus the FP8 LM head.
# with 50-ms engine TTFT buckets: how much of the app's TTFT P95 the engine makes.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 475 python3 benchmarks/gpu_sweep.py $R/headfp8-300s-at${RATE:-22} --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json '{"pdl": true, "lm_head_quantization": "fp8"}' --seconds 460 --config deployments.gpu.yaml --qps ${RATE:-22} > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
