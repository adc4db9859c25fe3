# Next session, call A (~6 min): decode attention probe with balanced chunks (mixed and equal rows); GPU tests of the
# doubled split count and balanced chunks; engine_bench decode steps: old split rule (devscratch/base3, made by
# mkbase3.sh) / new / new + decode_balance 4, rows of mixed lengths and of equal ones
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
for mix in "--mixed" ""; do
  tag=attn${mix:+-mixed}
  timeout 150 python3 benchmarks/decode_attn_probe.py $R/$tag.json 8,12,16,24,32 1300 $mix --splits-x 1 --balanced 2,4,8 > $R/$tag.log 2>&1
  echo "== $tag"; python3 - $R/$tag.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, v in d.items():
    if isinstance(v, dict) and "best" in v and v["best"]:
        print(k, v["splits"], "best", v["best"], v[v["best"]]["us_per_call"], "| (64, 4)", v["(64, 4)"].get("us_per_call"), "(128, 8)", v["(128, 8)"].get("us_per_call"))
PY
done
ENGINE_TEST_DEVICE=cuda timeout 200 python3 -m pytest -q -s -p no:cacheprovider tests/test_kv_fp8.py tests/test_pdl.py tests/test_engine_graphs.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E " $R/tests.txt | head -20
wait
n=0
for side in base new bal4 bal4 new base; do
  dir=.; ej='{"pdl": true}'; n=$((n+1))
  [ $side = base ] && dir=devscratch/base3
  [ $side = bal4 ] && ej='{"pdl": true, "decode_balance": 4}'
  tag=$n-$side-mixed
  (cd $dir && PYTHONPATH=$PWD:$PYTHONPATH timeout 100 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 1,8,12,16,24,32 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --mixed-context --engine-json "$ej" --out $R/bench-$tag) > $R/bench-$tag.log 2>&1
  echo "== $tag"; grep -E "^decode batch" $R/bench-$tag.log | tr '\n' ' '; echo
done
