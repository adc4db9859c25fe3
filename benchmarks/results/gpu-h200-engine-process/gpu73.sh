# engine.separate_process with LoopChannel I/O + the engine loop's own timers, then in-process; one 30-s step at 16.5 each
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
t0=$(date +%s)
(test -f /tmp/m/config.json || python3 -m serve_app.models build qwen3-vl-4b-random --out /tmp/m) > $R/build.txt 2>&1
echo "build $(( $(date +%s) - t0 )) s"
run() { name=$1; cfg=$2; ej=$3; secs=$4; shift 4
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray; sleep 2
  timeout $(( secs + 15 )) python3 benchmarks/gpu_sweep.py $R/$name --model /tmp/m --only capped-continuous --quantization fp8 --cpus 12 --step 30 --hf-seconds 0 --warmup-load 20 --engine-json "$ej" --seconds $secs --config $cfg "$@" > $R/sweep-$name.log 2>&1
  echo "== $name ($(( $(date +%s) - t0 )) s)"; grep -E "app ready|continuous\] open" $R/sweep-$name.log | cut -c1-400
  python3 - $R/$name/capped-continuous/sweep.json <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print("no sweep.json", e); sys.exit()
for st in d["sweeps"][0]["steps"]:
    e = st.get("engine_time") or {}
    print(st["spec"]["qps"], {k: e.get(k) for k in ("other_pct", "host_busy_pct", "host_cpu_pct", "host_idle_pct", "host_inbox_pct", "host_tick_pct", "host_emit_pct", "host_gap_pct", "decode_ms_per_step", "mean_decode_batch")}, "gpu util", st["resources"].get("gpu_util_mean_pct"))
PY
}
run sepproc-loopchan deployments.gpu.yaml '{"pdl": true, "separate_process": true}' 130 --qps 16.5
run inproc deployments.gpu.yaml '{"pdl": true}' 120 --qps 16.5
