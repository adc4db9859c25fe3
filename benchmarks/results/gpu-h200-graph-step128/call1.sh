# Call 1 (~9 min) as run: GPU tests of the side streams (incl. prefill_stream_depth 2); engine-level A/B at 21 and 23 req/s:
# shipped (prefill_stream, depth 1) / depth2 / seqs32 / step128, the same seeded arrivals
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -s -p no:cacheprovider tests/test_vision_stream.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E " $R/tests.txt | head -20
wait
echo "tests+build $(( $(date +%s) - t0 )) s"
timeout $(( 570 - ($(date +%s) - t0) )) python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --variants '{"shipped": {}, "depth2": {"prefill_stream_depth": 2}, "seqs32": {"max_num_seqs": 32}, "step128": {"prefill_graph_step": 128}}' \
  --qps 21,23 --seconds 30 --warmup-load 10 > $R/arrivals.log 2>&1
grep -E "^==|/s: |^\|" $R/arrivals.log | cut -c1-400; echo "done $(( $(date +%s) - t0 )) s"
