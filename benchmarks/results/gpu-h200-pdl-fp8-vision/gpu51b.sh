# Next session, call 2 (wip/next, same held machine): the tower's kernels with and without FP8 linears, and the
# decode step (engine bench) of main, wip/next, wip/next + PDL
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
for q in fp8 fp8+vision; do timeout 100 python3 benchmarks/fp8_probe.py passes $R/passes-$q.json /tmp/m $q 1250 46x80,68x120 > $R/passes-$q.log 2>&1; echo "== passes $q"; grep -E "^vision|^prefill" $R/passes-$q.log | cut -c1-200; done
for side in main next next-pdl; do
  dir=.; [ $side = main ] && dir=devscratch/base; ej='{}'; [ $side = next-pdl ] && ej='{"pdl": true}'
  (cd $dir && timeout 150 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 1,10,16,32,64 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --engine-json "$ej" --out $R/bench-$side) > $R/bench-$side.log 2>&1
  echo "== $side"; grep -E "^decode batch" $R/bench-$side.log | tr '\n' ' '; echo; grep -o '"fp8_decode_plan": {[^}]*}' $R/bench-$side.log | head -1 | cut -c1-400
done
