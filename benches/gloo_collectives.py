"""gloo collectives side by side on 100 MB: torchrun --nproc-per-node W benches/gloo_collectives.py (rank 0 prints)."""
import os, time, torch, torch.distributed as dist, statistics
dist.init_process_group("gloo")
r, w = dist.get_rank(), dist.get_world_size()
n = 25_000_000 // w * w
x = torch.randn(n); out = torch.empty(n // w); full = torch.empty(n)
rs = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
ag = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
res = {"all_reduce": [], "reduce_scatter": [], "all_gather": [], "broadcast_chunks": []}
def bcast():
    works = [dist.broadcast(full[k * (n // w):(k + 1) * (n // w)], src=k, async_op=True) for k in range(w)]
    for wk in works: wk.wait()
for i in range(6):
    for name, fn in (("all_reduce", lambda: dist.all_reduce(x)), ("reduce_scatter", lambda: rs(out, x)), ("all_gather", lambda: ag(full, out)), ("broadcast_chunks", bcast)):
        dist.barrier(); t = time.perf_counter(); fn(); dt = time.perf_counter() - t
        if i: res[name].append(dt)
if r == 0: print({k: round(statistics.median(v), 3) for k, v in res.items()}, flush=True)
dist.barrier(); os._exit(0)
