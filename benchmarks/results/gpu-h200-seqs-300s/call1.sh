# As run (session 23, call 1, ~20:57-21:00 UTC, a fresh nvidia-h200 machine; 164 s wall). Printed: 58 passed, 7 skipped; 3 passed; python_loop_3m_s 0.204.
# Session 23, call 1: GPU tests after the review commit 17a5ef0 (prefill_pass._layers picks fused or torch layers in one
# place), with the model build for the next call in the background (kept in /tmp/m while the machine stays warm).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider tests/test_engine_graphs.py tests/test_fp8.py \
  tests/test_fp8_lm_head.py tests/test_kv_fp8.py tests/test_pdl.py tests/test_vision_stream.py > $R/tests.txt 2>&1
rc1=$?
ENGINE_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_engine.py \
  -k "graph or prefill or fp8 or greedy_matches or compact or vision_encoder" > $R/tests-engine.txt 2>&1
rc=$?; tail -n 2 $R/tests.txt; tail -n 2 $R/tests-engine.txt; grep -hE "^FAILED|^ERROR" $R/tests*.txt | head; rc=$((rc + rc1))
wait
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import _host; print(_host.host_speed())"
echo "tests+build $(( $(date +%s) - t0 )) s (rc $rc)"; tail -n 3 $R/build.txt
