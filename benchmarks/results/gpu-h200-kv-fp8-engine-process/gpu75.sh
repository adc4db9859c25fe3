# Next session, call 2 (devscratch/base = main 0946adb): GPU tests of the fp16-math FP8-cache attention, then the decode
# attention probe old vs new (both caches), then engine_bench with kv_cache_dtype fp8 old vs new (PDL)
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_kv_fp8.py tests/test_pdl.py tests/test_fp8.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E " $R/tests.txt | head -20
for side in base new; do
  dir=.; [ $side = base ] && dir=devscratch/base
  (cd $dir && timeout 150 python3 benchmarks/decode_attn_probe.py $R/attn-$side.json 10,16,32,64 1300) > $R/attn-$side.log 2>&1
  echo "== attn $side"; tail -3 $R/attn-$side.log
done
python3 - $R/attn-base.json $R/attn-new.json <<'PY'
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
for k in a:
    ra, rb = a.get(k), b.get(k)
    if isinstance(ra, dict) and isinstance(rb, dict) and "best" in ra:
        print(k, "base best", ra["best"], ra.get(ra["best"], {}).get("us_per_call"), "| new best", rb["best"], rb.get(rb["best"], {}).get("us_per_call"))
PY
wait
for side in base new new base; do
  dir=.; [ $side = base ] && dir=devscratch/base; n=$((n+1))
  (cd $dir && timeout 120 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 1,10,16,32,64 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --engine-json '{"pdl": true, "kv_cache_dtype": "fp8"}' --out $R/bench-$n-$side) > $R/bench-$n-$side.log 2>&1
  echo "== $n $side kv fp8"; grep -E "^decode batch" $R/bench-$n-$side.log | tr '\n' ' '; echo
done
