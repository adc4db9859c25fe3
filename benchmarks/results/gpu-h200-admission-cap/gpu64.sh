# Call 2: VLM cap 48 (queue 96) on main with the engine's TTFT/e2e buckets, ladder 16.5,17,17.5;
# top samples every 5 s say which processes are hot (proxy, Ingress, VLM, the load generator).
R=$OUT/r; mkdir -p $R
trap 'pkill -f "top -b"; tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
(top -b -c -w 250 -d 5 -n 100 | awk '/^top/ || ($9+0 >= 20) {print; fflush()}' > $R/top.txt) &
timeout 500 python3 benchmarks/gpu_sweep.py $R/cap48 --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json '{"pdl": true}' --seconds 400 --qps 16.5,17,17.5,18 --config devscratch/gpu-mo48.yaml > $R/sweep-cap48.log 2>&1
echo "== cap48 ($(( $(date +%s) - t0 )) s)"; grep -E "^\| continuous" $R/cap48/capped-continuous/sweep.md | cut -c1-460
grep -E "continuous\] open" $R/sweep-cap48.log | cut -c1-500
