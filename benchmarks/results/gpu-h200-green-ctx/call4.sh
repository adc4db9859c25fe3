# Session 21, call 4: the serving layer's share of TTFT on the H200 host at 22 QPS with Preprocess's banded resize
# (images.resize_threads 4, the new default; call 3 ran before it existed: one thread per image).
R=$OUT/r; mkdir -p $R
trap 'tar -C $OUT --exclude=*.json.gz -czf $OUT/r.tgz r' EXIT
ray stop --force >/dev/null 2>&1; rm -rf /tmp/ray
timeout 250 python3 benchmarks/serving_overhead.py --qps 22 --seconds 45 --idle-seconds 10 --cpus 12 --tpot-ms 6 --out $R/overhead-22-bands > $R/overhead-22-bands.log 2>&1
grep -E "paced\] open|TTFT over|^\|" $R/overhead-22-bands.log
