# As run on 2026-11-30, call 1 (15:08 UTC).
# Next session, call 1 (~9 min): GPU tests of stream_priority "decode"; engine A/B at 21 and 23 req/s:
# shipped / decode-first (stream_priority decode) / rows32-decode24 / both
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_vision_stream.py -k "decode_first or (side_streams and prefill_stream)" > $R/tests.txt 2>&1; tail -1 $R/tests.txt
wait
echo "tests+build $(( $(date +%s) - t0 )) s"
timeout $(( 575 - ($(date +%s) - t0) )) python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --variants '{"shipped": {}, "decode-first": {"stream_priority": "decode"}, "rows32-decode24": {"max_num_seqs": 32, "max_decode_rows": 24}, "both": {"stream_priority": "decode", "max_num_seqs": 32, "max_decode_rows": 24}}' \
  --qps 21,23 --seconds 30 --warmup-load 10 > $R/arrivals.log 2>&1
grep -E "^==|^\|" $R/arrivals.log | cut -c1-400; echo "done $(( $(date +%s) - t0 )) s"
