# Calls 2-5 (the app sweeps): CALL=2 bash calls2-5.sh; CALL=3 ...; CALL=4 RATE=22 ...; call 5 ran
# CALL=4 RATE=21 after `sed -i 's/420 300 --qps/235 120 --qps/; s/step128-300s/step128-120s/'`
# (a 120-s window at 21; its 235-s budget was too short for the app's start, the warm-up and
# 120 + 15 s of step, so the step did not start - log kept).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
run() { name=$1; ej=$2; secs=$3; step=$4; shift 4
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step $step --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config deployments.gpu.yaml "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-700
}
case $CALL in
  2) run step128 '{"pdl": true, "prefill_graph_step": 128}' 240 30 --qps 20,21,22   # then the 256-token buckets,
     run shipped '{"pdl": true}' 200 30 --qps 20,21                               # same seeded arrivals
     ;;
  3) run step128 '{"pdl": true, "prefill_graph_step": 128}' 180 30 --qps 23,24 ;;
  4) run step128-300s '{"pdl": true, "prefill_graph_step": 128}' 420 300 --qps $RATE ;;
esac
