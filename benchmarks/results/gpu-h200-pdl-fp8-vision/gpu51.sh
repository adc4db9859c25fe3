# Next session, call 1 (branch wip/next = main + wip/decode-attn-configs + wip/fp8-vision + wip/pdl; devscratch/base = main):
# the GPU tests of all three and the decode-attention probe; the tower and the decode step (engine bench): gpu51b.sh
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1 &
ENGINE_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -s -p no:cacheprovider tests/test_pdl.py tests/test_fp8_vision.py tests/test_kv_fp8.py tests/test_fp8.py tests/test_engine_graphs.py > $R/tests.txt 2>&1; tail -2 $R/tests.txt; grep -E "^FAILED|^E |relative error|graphs:" $R/tests.txt | head -20
wait
timeout 240 python3 benchmarks/decode_attn_probe.py $R/decode_attn.json 1,10,32,64 1300 > $R/decode_attn.log 2>&1
python3 - $R/decode_attn.json <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for k, row in d.items():
    if not isinstance(row, dict) or "splits" not in row: continue
    cells = [f"{c} {row[c].get('us_per_call', row[c].get('error', '?'))}us {row[c].get('gb_per_s', '')}GB/s" for c in row if c.startswith("(")]
    print(k, "splits", row["splits"], "GB/step", row["kv_gb_per_step"], "best", row["best"]); print("   ", " | ".join(cells))
PY
