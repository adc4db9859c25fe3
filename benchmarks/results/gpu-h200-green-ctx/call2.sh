# Session 21, call 2: 5 minutes at 22 QPS with the shipped profile plus the FP8 LM head and FP8 vision linears
# (both FP8 options that cut GPU work; their numerics need a check on trained weights).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 480 python3 benchmarks/gpu_sweep.py $R/fp8all-300s-at22 --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json '{"pdl": true, "lm_head_quantization": "fp8", "vision_quantization": "fp8"}' --seconds 460 --config deployments.gpu.yaml --qps 22 > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
