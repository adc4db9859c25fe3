# Calls 2-5 (the app sweeps), as run: CALL=N SIDE=prefill_stream bash calls2-5.sh. Each call ran
# this preamble and its two run lines (call 2's and 4's shipped budgets were too short for a step).
SIDE=${SIDE:-prefill_stream}
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
run() { name=$1; ej=$2; secs=$3; shift 3
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config deployments.gpu.yaml "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-700
}
case $CALL in
  2) run side '{"pdl": true, "'$SIDE'": true}' 200 --qps 23,21,19.5
     run shipped '{"pdl": true}' 130 --qps 21 ;;
  3) run side '{"pdl": true, "'$SIDE'": true}' 170 --qps 19.5,19
     run shipped '{"pdl": true}' 170 --qps 19.5,19 ;;
  4) run side '{"pdl": true, "'$SIDE'": true}' 185 --qps 20.5,20
     run shipped '{"pdl": true}' 140 --qps 19 ;;
  5) run side '{"pdl": true, "'$SIDE'": true}' 170 --qps 20
     run shipped '{"pdl": true}' 170 --qps 19 ;;
esac
