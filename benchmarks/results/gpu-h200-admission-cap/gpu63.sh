# Call 1: is the TTFT tail at 17 QPS Serve's VLM admission cap (max_ongoing_requests 24) and the
# router's backoff? Control (shipped yaml) at 17, then the cap at 48 (queue 96) up the ladder. PDL on.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
git rev-parse --short HEAD > $R/rev.txt 2>/dev/null
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
run() { name=$1; shift
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( $1 + 40 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json '{"pdl": true}' --seconds "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "^\| continuous" $R/$name/capped-continuous/sweep.md | cut -c1-420
}
run cap24 100 --qps 17
run cap48 330 --qps 17,18,19,20 --config devscratch/gpu-mo48.yaml
