# As run (19:15-19:20 UTC, fresh nvidia-h200 machine). Its `tail -2 A B` printed "option used in invalid context"
# (harmless: the counts are in tests.txt / tests-engine.txt).
# Session 22, call 3: GPU tests after moving the prompt passes out of runner.py (prefill_pass.py, a mixin; no
# change of logic), then the real 4B-random model through the engine at 12 req/s for 20 s (prefill graphs, FP8).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_engine_graphs.py tests/test_fp8.py \
  tests/test_fp8_lm_head.py tests/test_kv_fp8.py tests/test_pdl.py tests/test_vision_stream.py > $R/tests.txt 2>&1
rc1=$?
ENGINE_TEST_DEVICE=cuda timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  -k "graph or prefill or fp8 or greedy_matches or compact or vision_encoder" > $R/tests-engine.txt 2>&1
rc=$?; tail -2 $R/tests.txt $R/tests-engine.txt; grep -hE "^FAILED|^ERROR" $R/tests*.txt | head; rc=$((rc + rc1))
wait
echo "tests+build $(( $(date +%s) - t0 )) s (rc $rc)"
timeout $(( 560 - ($(date +%s) - t0) )) python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --qps 12 --seconds 20 --warmup-load 5 > $R/arrivals.log 2>&1
echo "arrivals rc $?"; grep -E "^\|" $R/arrivals.log | cut -c1-300 | head -5; echo "done $(( $(date +%s) - t0 )) s"
