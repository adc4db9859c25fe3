# Call 3: gc_freeze off vs on (VLM cap 48, PDL), same machine; GC pauses and engine e2e buckets
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
run() { name=$1; ej=$2; secs=$3; shift 3
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 30 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config devscratch/gpu-mo48.yaml "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-600
}
run nofreeze '{"pdl": true, "gc_freeze": false}' 170 --qps 17
run freeze '{"pdl": true}' 290 --qps 17,18,19
