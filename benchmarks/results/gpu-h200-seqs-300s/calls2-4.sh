# As run in calls 2-4 (21:00:49-21:21:39 UTC, the machine of call 1 held warm, /tmp/m built by call 1): RATE=22 SEQS=40, then RATE=22 SEQS=36 twice.
# Next session: 5 minutes at RATE QPS (default 22) with SEQS admitted rows (default 40; shipped 32) and 24 decoding.
# Why: in the burst minutes of the 22-QPS runs the engine's queue waited for a free row (rows held 14 %), and that
# wait is most of the TTFT tail (engine queue P95 <= 300 ms). Admitted past the 24 decoding rows, a request has its
# prompt work done and its first token sent while it waits for a decode row, so the wait moves from TTFT to the gap
# before the second token. 24 -> 32 admitted cut TTFT P95 at 21 QPS from 461 to 299 ms for +0.04 s of e2e P95.
# e2e P95 at 22 is 1.82 s (limit 1.86): watch it. Same arrivals (seed 0) as the four earlier 22-QPS runs.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 480 python3 benchmarks/gpu_sweep.py $R/seqs${SEQS:-40}-300s-at${RATE:-22} --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 300 --hf-seconds 0 --warmup-load 20 \
  --engine-json "{\"pdl\": true, \"max_num_seqs\": ${SEQS:-40}}" --seconds 460 --config deployments.gpu.yaml --qps ${RATE:-22} > $R/sweep.log 2>&1
grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
