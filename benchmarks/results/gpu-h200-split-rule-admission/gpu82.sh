# Next session, call B (same machine, warm, ~8 min): the app with the doubled split count against the old rule
# (devscratch/base3), same arrivals; add decode_balance if call A favours it
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
run() { name=$1; dir=$2; ej=$3; secs=$4; shift 4
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  (cd $dir && PYTHONPATH=$PWD:$PYTHONPATH timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config deployments.gpu.yaml "$@") > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-700
}
run splits2x . '{"pdl": true}' 215 --qps 17.5,17.25
run base devscratch/base3 '{"pdl": true}' 200 --qps 17.5,17.25
