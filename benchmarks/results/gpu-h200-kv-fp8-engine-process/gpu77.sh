# Call 2: decode step bf16 vs fp8 KV (fp16-math kernel, fixed 2-split pick), then app sweeps kv fp8 vs shipped, same machine
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
for kv in auto fp8; do
  timeout 80 python3 benchmarks/engine_bench.py --model /tmp/m --skip-hf --quantization fp8 --decode-batches 1,10,16,24,32,64 --prefill-counts 1 --requests 16 --output-tokens 32 --context 1300 --engine-json "{\"pdl\": true, \"kv_cache_dtype\": \"$kv\"}" --out $R/bench-kv-$kv > $R/bench-kv-$kv.log 2>&1
  echo "== kv $kv ($(( $(date +%s) - t0 )) s)"; grep -E "^decode batch" $R/bench-kv-$kv.log | tr '\n' ' '; echo
done
run() { name=$1; cfg=$2; ej=$3; secs=$4; shift 4
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config $cfg "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-600
}
run kvfp8 deployments.gpu.yaml '{"pdl": true, "kv_cache_dtype": "fp8"}' 225 --qps 17,17.5
run shipped deployments.gpu.yaml '{"pdl": true}' 190 --qps 17,17.5
