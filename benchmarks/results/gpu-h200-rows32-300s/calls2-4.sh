# As run on 2026-11-30: call 2 with RATE unset (21; the file was next7.sh, same command), calls 3 and 4 with RATE=22.
# 5 minutes at 21 QPS in the app with max_num_seqs 32 / max_decode_rows 24 (engine A/B best), vs shipped 461 ms.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 475 python3 benchmarks/gpu_sweep.py $R/rows32d24-300s-at${RATE:-21} --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json '{"pdl": true, "prefill_graph_step": 128, "max_num_seqs": 32, "max_decode_rows": 24}' --seconds 460 --config deployments.gpu.yaml --qps ${RATE:-21} > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
