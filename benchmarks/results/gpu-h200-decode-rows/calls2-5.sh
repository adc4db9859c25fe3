# As run on 2026-11-30 (calls 2-5). Call 2: CALL=5 bash calls2-5.sh. Call 3: CALL=4 RATE=21 with the
# step128-300s budget at 420 s (the app started; the 300-s step missed the budget by ~3 s: log kept).
# Calls 4 and 5: CALL=4 RATE=21, then RATE=20, with the budget at 460 s (as below).
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
  5) run rows32d24 '{"pdl": true, "prefill_graph_step": 128, "max_num_seqs": 32, "max_decode_rows": 24}' 240 30 --qps 22,23,24 ;;
  4) run step128-300s '{"pdl": true, "prefill_graph_step": 128}' 460 300 --qps $RATE ;;
esac
