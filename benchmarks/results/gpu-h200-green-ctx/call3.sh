# Session 21, call 3: the serving layer's share of TTFT on the H200 host (paced engine: first token at 150 ms,
# 6-ms steps; everything else deployments.gpu.yaml) at 22 and 11 QPS.
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
for q in 22 11; do
  ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
  timeout 250 python3 benchmarks/serving_overhead.py --qps $q --seconds 45 --idle-seconds 10 --cpus 12 --tpot-ms 6 --out $R/overhead-$q > $R/overhead-$q.log 2>&1
  grep -E "paced\] open|TTFT over|^\|" $R/overhead-$q.log
done
