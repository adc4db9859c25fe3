"""Does a small host->device copy make the host wait for GPU work already queued?

Queues ~40 ms of GPU work (``torch.cuda._sleep``), then times on the host one 16-element upload
per variant. A variant whose host time is ~40 ms waited for the queue (a stream sync). The
engine's per-step uploads (``serve_app/engine/_private/transfer.py``) follow the result.

    python benchmarks/copy_sync_probe.py
"""
import time
import torch

torch.empty(1, device="cuda")
small = list(range(16))
variants = {
    "pageable non_blocking": lambda: torch.tensor(small).to("cuda", non_blocking=True),
    "pinned non_blocking": lambda: torch.tensor(small).pin_memory().to("cuda", non_blocking=True),
    "torch.tensor(device=cuda)": lambda: torch.tensor(small, device="cuda"),
    "blocking .to": lambda: torch.tensor(small).to("cuda"),
}
for rep in range(3):
    for name, fn in variants.items():
        torch.cuda.synchronize()
        torch.cuda._sleep(int(40e-3 * 1.98e9))      # ~40 ms of queued GPU work
        t0 = time.perf_counter(); fn(); t1 = time.perf_counter()
        torch.cuda.synchronize(); t2 = time.perf_counter()
        print(f"rep {rep} {name:28s} host {1e3*(t1-t0):7.3f} ms  (queue drained after {1e3*(t2-t0):6.1f} ms)")
