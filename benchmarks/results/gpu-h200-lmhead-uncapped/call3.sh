# Uncapped sweep with the current profile, then capped and uncapped hf-generate (issue 6's "done
# when": ours vs naive, capped and uncapped, in one run). ~9.5 min.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
timeout 560 python3 benchmarks/gpu_sweep.py $R/uncapped --model /tmp/m --uncapped --only uncapped-continuous,capped-hf-generate,uncapped-hf-generate \
  --quantization fp8 --cpus 12 --step 30 --hf-seconds 100 --warmup-load 20 --engine-json '{"pdl": true}' --seconds 540 \
  --config deployments.gpu.yaml --qps 20,22,24 --hf-qps 0.1,0.25 > $R/sweep.log 2>&1
grep -E "app ready|\] open|skip" $R/sweep.log | cut -c1-600
