# Calls 4 and 5 as run (one command line each, after the line that unpacks .devsite and sets the
# environment, as in calls1-3.sh's header). Call 4 was refused by gpu_sweep's budget check (a 240-s
# step does not fit 380 s); call 5 ran a 200-s step at 24 QPS on the seed-1 arrivals and pool with
# the ~430 s of device time left, --no-budget-check.
# call 4:
R=$OUT/r; mkdir -p $R; trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT; ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; test -f /tmp/m/config.json || exit 3; timeout 390 python3 benchmarks/gpu_sweep.py $R/seed1-240s-at24 --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 240 --hf-seconds 0 --warmup-load 20 --engine-json '{"pdl": true}' --seconds 380 --config deployments.gpu.yaml --qps 24 --seed 1 > $R/sweep.log 2>&1; grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
# call 5:
R=$OUT/r; mkdir -p $R; trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT; ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; test -f /tmp/m/config.json || exit 3; timeout 385 python3 benchmarks/gpu_sweep.py $R/seed1-200s-at24 --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 200 --hf-seconds 0 --warmup-load 20 --engine-json '{"pdl": true}' --seconds 380 --config deployments.gpu.yaml --qps 24 --seed 1 --no-budget-check > $R/sweep.log 2>&1; grep -E "app ready|continuous\] open" $R/sweep.log | cut -c1-800
