# Next session, call 1 (~8 min): GPU tests of the FP8 LM head; engine A/B at 21 and 23 req/s: shipped (32/24) vs
# lm_head_quantization fp8 (startup plan printed in the log).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_fp8_lm_head.py tests/test_fp8.py -k "gpu or kernel or plan or head" > $R/tests.txt 2>&1; tail -1 $R/tests.txt
wait
echo "tests+build $(( $(date +%s) - t0 )) s"
timeout $(( 575 - ($(date +%s) - t0) )) python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --variants '{"shipped": {}, "lm-head-fp8": {"lm_head_quantization": "fp8"}}' \
  --qps 21,23 --seconds 30 --warmup-load 10 > $R/arrivals.log 2>&1
grep -E "^==|^\||lm_head@" $R/arrivals.log | cut -c1-400; echo "done $(( $(date +%s) - t0 )) s"
