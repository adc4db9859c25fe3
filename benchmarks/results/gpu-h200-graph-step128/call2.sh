# Call 2 (~9 min): app sweeps, step128 (prefill_graph_step 128) then the shipped profile, same seeded arrivals
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
run() { name=$1; ej=$2; secs=$3; shift 3
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config deployments.gpu.yaml "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-700
}
run step128 '{"pdl": true, "prefill_graph_step": 128}' 240 --qps 20,21,22
run shipped '{"pdl": true}' 200 --qps 20,21
