# Calls 3-5 (the app sweeps), as run: CALL=N bash gpu83-85.sh. Each call ran this preamble and
# its run lines: 3 = doubled split count at 17.75/17.5, the engine process with cap 48 +
# max_num_seqs 24 vs shipped in-process; 4 = the former above 17.75; 5 = it at 19.5/19 (repeat).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
run() { name=$1; cfg=$2; ej=$3; secs=$4; shift 4
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config $cfg "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-700
}
case $CALL in
  3) run sep-cap48-seqs24 devscratch/gpu-mo48.yaml '{"pdl": true, "separate_process": true, "max_num_seqs": 24}' 220 --qps 17.75,17.5
     run shipped deployments.gpu.yaml '{"pdl": true}' 200 --qps 17.75,17.5 ;;
  4) run sep-cap48-seqs24 devscratch/gpu-mo48.yaml '{"pdl": true, "separate_process": true, "max_num_seqs": 24}' 220 --qps 19,18.5
     run sep-cap48-seqs24-b devscratch/gpu-mo48.yaml '{"pdl": true, "separate_process": true, "max_num_seqs": 24}' 220 --qps 18.25,18 ;;
  5) run sep-cap48-seqs24-c devscratch/gpu-mo48.yaml '{"pdl": true, "separate_process": true, "max_num_seqs": 24}' 200 --qps 19.5,19 ;;
esac
