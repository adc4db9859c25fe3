# This session, call 8 (wip/next after merging the decode-config pick): its GPU tests, and the decode step over an FP8 cache
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 170 python3 -m pytest -q -s -p no:cacheprovider tests/test_kv_fp8.py tests/test_pdl.py tests/test_fp8_vision.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E " $R/tests.txt | head -20
wait
timeout 90 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 32,64 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --engine-json '{"pdl": true, "kv_cache_dtype": "fp8"}' --out $R/bench-kvfp8 > $R/bench-kvfp8.log 2>&1
grep -E "^decode batch" $R/bench-kvfp8.log | tr '\n' ' '
