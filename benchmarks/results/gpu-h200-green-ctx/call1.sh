# Session 21, call 1 (~9 min): GPU tests of engine.prompt_sms (green-context prompt stream); engine A/B at 22 and 24
# req/s: shipped vs prompt work held to 112 / 96 / 72 SMs (of 132).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
nvidia-smi -q | grep -iE "driver version|cuda version" > $R/driver.txt 2>&1
ENGINE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_vision_stream.py -k "prompt_sms or sm_limited or side_streams" > $R/tests.txt 2>&1
rc=$?; grep -E "GEMM ms|passed|failed|Error" $R/tests.txt | tail -8
wait
echo "tests+build $(( $(date +%s) - t0 )) s (rc $rc)"
if [ $rc -ne 0 ]; then exit 0; fi
timeout $(( 580 - ($(date +%s) - t0) )) python3 benchmarks/engine_arrivals.py $R/arrivals --model /tmp/m --quantization fp8 --engine-json '{"pdl": true}' \
  --variants '{"shipped": {}, "sms112": {"prompt_sms": 112}, "sms96": {"prompt_sms": 96}, "sms72": {"prompt_sms": 72}}' \
  --qps 22,24 --seconds 30 --warmup-load 10 > $R/arrivals.log 2>&1
grep -E "^==|^\||prompt_sms" $R/arrivals.log | grep -v "engine ready" | cut -c1-400; grep -o "'prompt_sms': [0-9None]*" $R/arrivals.log; echo "done $(( $(date +%s) - t0 )) s"
