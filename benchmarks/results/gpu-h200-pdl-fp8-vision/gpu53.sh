# Next session, call 4 (same held machine): main (devscratch/base, REV) on the ladder 16,17,18 - the baseline for gpu52's sweep (same machine, run between)
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 5
(cd devscratch/base && timeout 300 python3 benchmarks/gpu_sweep.py $R/base --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --seconds 280 --step 30 --qps 16,17,18 --hf-seconds 0 --warmup-load 20) > $R/sweep-base.log 2>&1
echo "== main $(cat devscratch/base/REV)"; grep -E "^\| continuous" $R/base/capped-continuous/sweep.md | cut -c1-420
