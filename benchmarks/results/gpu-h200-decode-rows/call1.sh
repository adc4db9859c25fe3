# Next session, call 1 (~9.5 min): GPU test of max_decode_rows; Preprocess pairs on the 16-core host;
# engine A/B at 22 and 23 req/s with the admission-limit shares:
# shipped (step128, 24 rows) / rows32-decode24 / rows28 / rows32-decode20
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 100 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k "first_token_then_wait or admission_blocks or queue_time" > $R/tests.txt 2>&1; tail -1 $R/tests.txt
timeout 60 python3 benchmarks/preprocess_bench.py --pairs --n 20 --out $R/pairs.json > $R/pairs.txt 2>&1; tail -5 $R/pairs.txt
wait
echo "tests+build $(( $(date +%s) - t0 )) s"
timeout $(( 575 - ($(date +%s) - t0) )) python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --variants '{"shipped": {}, "rows32-decode24": {"max_num_seqs": 32, "max_decode_rows": 24}, "rows28": {"max_num_seqs": 28}, "rows32-decode20": {"max_num_seqs": 32, "max_decode_rows": 20}}' \
  --qps 22,23 --seconds 30 --warmup-load 10 > $R/arrivals.log 2>&1
grep -E "^==|^\|" $R/arrivals.log | cut -c1-400; echo "done $(( $(date +%s) - t0 )) s"
