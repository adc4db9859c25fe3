# This session, call 5 (wip/next): where the FP8 tower's "other" time goes, and the decode step again in a new order
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
timeout 100 python3 benchmarks/fp8_probe.py passes $R/passes-fp8v.json /tmp/m fp8+vision 1250 46x80 > $R/passes-fp8v.log 2>&1
python3 - $R/passes-fp8v.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d.items():
    if isinstance(v, dict) and "top" in v and k.startswith("vision"):
        for name, t in v["top"].items(): print(k, t, name[:150])
PY
for side in next-pdl main next; do
  dir=.; [ $side = main ] && dir=devscratch/base; ej='{}'; [ $side = next-pdl ] && ej='{"pdl": true}'
  (cd $dir && timeout 150 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 1,10,16,32,64 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --engine-json "$ej" --out $R/bench2-$side) > $R/bench2-$side.log 2>&1
  echo "== $side"; grep -E "^decode batch" $R/bench2-$side.log | tr '\n' ' '; echo
done
