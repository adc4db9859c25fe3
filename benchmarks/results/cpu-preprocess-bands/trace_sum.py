"""Summarise a trace: python trace_sum.py RUN_JSON TRACE_DIR (the jsonl files trace_patch.py's
instrumentation writes to /tmp/trace, one per process). Stage times in ms, mean / P50 / P95."""
import json, glob, numpy as np, sys
recs=[json.loads(l) for f in glob.glob(sys.argv[2] + '/*.jsonl') for l in open(f)]
ing={r['rid']:r for r in recs if r['c']=='ing'}; ing1={r['rid']:r for r in recs if r['c']=='ing1'}; vlm={r['rid']:r for r in recs if r['c']=='vlm'}
pre=[r for r in recs if r['c']=='pre']
rows=[]
for rid,a in ing.items():
    if rid in ing1 and rid in vlm:
        v=vlm[rid]; rows.append(dict(in_to_gen=v['t_gen']-a['t_in'], build=v['t_built']-v['t_gen'], gen_to_first=v['t_first']-v['t_built'],
            first_vlm_to_ing=ing1[rid]['t']-v['t_first'], in_to_acc=a['t_acc']-a['t_in'], total_ing=ing1[rid]['t']-a['t_in']))
def st(x): x=np.array(x)*1000; return f"mean {x.mean():.1f} p50 {np.percentile(x,50):.1f} p95 {np.percentile(x,95):.1f}"
print(len(rows), "requests")
for k in rows[0]: print(f"{k:18s}", st([r[k] for r in rows]))
print("preprocess dur     ", st([p['dur'] for p in pre if p['n']]))
run=json.load(open(sys.argv[1])); tt=[r['ttft'] for r in run['requests'] if r['error'] is None]
print("client ttft        ", st(tt))
pres=sorted([p for p in pre if p['n']], key=lambda p: p['t_start'])
import bisect
starts=[p['t_start'] for p in pres]
d1,d2,d3=[],[],[]
for rid,a in ing.items():
    if a.get('t_pre') and rid in vlm:
        i=bisect.bisect_left(starts,a['t_pre'])
        if i<len(pres) and pres[i]['t_start']-a['t_pre']<0.5:
            p=pres[i]; d1.append(p['t_start']-a['t_pre']); d2.append(p['dur']); d3.append(vlm[rid]['t_gen']-p['t_end'])
            d0=a['t_pre']-a['t_in']
print("ingress->pre start ", st(d1)); print("pre dur            ", st(d2)); print("pre end->vlm gen   ", st(d3))
print("ing entry->pre call", st([a['t_pre']-a['t_in'] for a in ing.values() if a.get('t_pre')]))
