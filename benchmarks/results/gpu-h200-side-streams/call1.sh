# Next session, call A (~8 min): GPU tests of engine.vision_stream / prefill_stream (+ vision graphs);
# engine-level A/B of the side streams with benchmarks/engine_arrivals.py (same seeded arrivals)
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -s -p no:cacheprovider tests/test_vision_stream.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E " $R/tests.txt | head -20
wait
echo "tests+build $(( $(date +%s) - t0 )) s"
timeout 460 python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --variants '{"shipped": {}, "vision_stream": {"vision_stream": true}, "prefill_stream": {"prefill_stream": true}}' \
  --qps 19,23 --seconds 30 --warmup-load 10 > $R/arrivals.log 2>&1
grep -E "^==|/s: |^\|" $R/arrivals.log | cut -c1-400; echo "done $(( $(date +%s) - t0 )) s"
