# Next session, call 3 (wip/next, same held machine): the app with PDL and the FP8 vision tower (drop either that gpu51 shows slower)
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
EJ='{"pdl": true, "vision_quantization": "fp8"}'; [ -n "$ENGINE_JSON" ] && EJ=$ENGINE_JSON
timeout 330 python3 benchmarks/gpu_sweep.py $R/next --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --seconds 300 --step 30 --qps 16,17,18 --hf-seconds 0 --warmup-load 20 --engine-json "$EJ" > $R/sweep-next.log 2>&1
echo "== wip/next $EJ"; grep -E "^\| continuous" $R/next/capped-continuous/sweep.md | cut -c1-420
