# This session, call 6 (wip/next with the fused bias): FP8 tower test + passes, fp8 vs fp8+vision
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ENGINE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_fp8_vision.py tests/test_fp8.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E |relative error" $R/tests.txt | head -20
for q in fp8 fp8+vision; do n=${q/+/_}; timeout 100 python3 benchmarks/fp8_probe.py passes $R/passes-$n.json /tmp/m $q 1250 46x80,68x120 > $R/passes-$n.log 2>&1; echo "== passes $q"; grep -E "^vision" $R/passes-$n.log | cut -c1-300; done
