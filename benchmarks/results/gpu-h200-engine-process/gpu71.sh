# branch wip/merge-quant: GPU tests of the fused merge + quantise, then decode step main vs branch (PDL), alternating
# then the decode step of main and the branch, both with PDL, twice in alternating order
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_fp8.py tests/test_kv_fp8.py tests/test_pdl.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E " $R/tests.txt | head -20
wait
for side in main branch branch main; do
  dir=.; [ $side = main ] && dir=devscratch/base; n=$((n+1))
  (cd $dir && timeout 120 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 1,10,16,32,64 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --engine-json '{"pdl": true}' --out $R/bench-$n-$side) > $R/bench-$n-$side.log 2>&1
  echo "== $n $side"; grep -E "^decode batch" $R/bench-$n-$side.log | tr '\n' ' '; echo
done
