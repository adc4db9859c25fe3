# As run (19:31-19:35 UTC, fresh nvidia-h200 machine; 325 s of device time were left): measured nothing, the app was
# ready after 105 s and the sweep's own time check skipped the step (gpu_sweep.py START_S is now 110 s).
# Session 22, call 4 (the last ~355 s of device time): the first 90 s of the 22-QPS arrivals (seed 0, the same as the
# 5-minute runs' first 90 s) with 40 admitted rows (shipped 32), 24 decoding. Compare its first 60-s slice with the
# 5-minute runs' first slice (TTFT P95 457-497 ms, e2e P95 1.90 s). An indication for next19.sh, not a verdict.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 250 python3 benchmarks/gpu_sweep.py $R/seqs40-90s-at22 --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 90 --hf-seconds 0 --warmup-load 10 \
  --engine-json '{"pdl": true, "max_num_seqs": 40}' --seconds 235 --config deployments.gpu.yaml --qps 22 > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-900
