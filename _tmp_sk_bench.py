import sys, time, torch, triton
sys.path.insert(0, '.')
from serve_app.engine._private import sampling_kernel as sk
from serve_app.engine._private.sampler import SamplingBatch, sample_torch
dev = 'cuda'
V = 151936
mode = sys.argv[1]

def args(b, spread=3.0, p=0.95, t=0.7, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    x = torch.randn(b, V, device=dev, generator=g) * spread
    return (x, torch.full((b,), t, device=dev), torch.full((b,), p, device=dev),
            torch.full((b,), float('-inf'), device=dev), torch.arange(b, device=dev) * 7 + 1, torch.arange(b, device=dev))

def gpu_ms(fn, a, iters=50):
    fn(*a); torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s): fn(*a)
    torch.cuda.current_stream().wait_stream(s); torch.cuda.synchronize()
    with torch.cuda.graph(g):
        fn(*a)
    g.replay(); torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(True), torch.cuda.Event(True)
    e0.record()
    for _ in range(iters): g.replay()
    e1.record(); torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters

def wall_ms(fn, a, iters=50):
    fn(*a); torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters): fn(*a)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000 / iters

if mode == 'time':
    for b in [1, 4, 16, 32, 64, 128, 256]:
        a = args(b)
        r = [gpu_ms(sk.sample_rows, a), wall_ms(sk.sample_rows, a)]
        if b in (1, 64): r += [gpu_ms(sk.sample_rows_single, a)]
        a1 = args(b, p=1.0)
        r += [gpu_ms(sk.sample_rows, a1)]
        print(f"B={b} S={sk._splits(b, V, torch.device(dev))} graph ms {r[0]:.4f} wall ms {r[1]:.4f} top_p=1 graph {r[-1]:.4f}" + (f" single graph {r[2]:.4f}" if len(r) == 4 else ""), flush=True)
if mode == 'sweep':
    for blk in [512, 1024, 2048]:
        for waves in [2, 4, 8]:
            for warps in [4, 8]:
                sk._BLOCK, sk._WAVES, sk._WARPS = blk, waves, warps
                out = []
                for b in [1, 16, 64, 256]:
                    out.append(f"{gpu_ms(sk.sample_rows, args(b)):.4f}")
                print(f"BLOCK {blk} waves {waves} warps {warps}: B=1,16,64,256 ms", out, flush=True)
if mode == 'prof':
    from torch.profiler import profile, ProfilerActivity
    for b in [1, 64]:
        a = args(b)
        sk.sample_rows(*a); torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20): sk.sample_rows(*a)
            torch.cuda.synchronize()
        print(f"B={b}"); print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12))
if mode == 'check':
    for b in [1, 3, 64, 256]:
        for spread in [0.5, 3.0, 10.0]:
            x, t, p, k, sd, st = args(b, spread, seed=b)
            t = torch.tensor([0.0, 0.7, 1.0, 1.5] * b, device=dev)[:b]
            p = torch.tensor([1.0, 0.95, 0.5, 0.9, 0.3, 0.99] * b, device=dev)[:b]
            new, single = sk.sample_rows(x, t, p, k, sd, st), sk.sample_rows_single(x, t, p, k, sd, st)
            again = sk.sample_rows(x, t, p, k, sd, st)
            batch = SamplingBatch(t, p, torch.zeros(b, dtype=torch.long, device=dev), torch.ones(b, device=dev), sd, st, None, False, True, False)
            ref = sample_torch(x, batch, sort_nucleus=True)
            print(f"B={b} spread={spread}: new==single {(new==single).float().mean().item():.4f} new==ref {(new==ref).float().mean().item():.4f} single==ref {(single==ref).float().mean().item():.4f} deterministic {(new==again).all().item()} greedy {(new[t<=0]==x[t<=0].argmax(-1)).all().item()}", flush=True)
