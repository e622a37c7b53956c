"""The data-parallel step against the plain step, side by side (``fnnet.parallel``).

    pytest benches/test_bench_parallel.py --benchmark-only

One training step of the chapter's CNN on a batch of 128 (Adam, donated, eager), as

* ``plain``: ``make_train_step`` on one device;
* ``dp-1``: the data-parallel step over that one device (the cost of the machinery:
  target <= 1.05x ``plain``);
* ``dp-2`` / ``dp-4``: two and four shards on the CPU (CPU "replicas" share the cores and
  the params: reported, no target);
* CUDA, where present: ``cuda-plain``, ``cuda-dp-2`` (two shards on one GPU) and
  ``mixed`` (``["cuda:0", "cpu"]``), with the bytes copied between devices per step in
  ``extra_info["bytes_copied"]`` (computed from the shapes: the params to each other device,
  its gradients back, its shard of the batch).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fnnet
from fnnet import optim
from fnnet.models import CnnModel

CUDA = torch.cuda.is_available()
NO_CUDA = "no CUDA device here"
VARIANTS = {
    "plain": ("cpu", None),
    "dp-1": ("cpu", ["cpu"]),
    "dp-2": ("cpu", ["cpu", "cpu"]),
    "dp-4": ("cpu", ["cpu"] * 4),
    "cuda-plain": ("cuda:0", None),
    "cuda-dp-2": ("cuda:0", ["cuda:0", "cuda:0"]),
    "mixed": ("cuda:0", ["cuda:0", "cpu"]),
}
BATCH = 128


def _bytes_copied(model: fnnet.Model, devices: list[str] | None) -> int:
    if not devices:
        return 0
    params = sum(p.numel() * p.element_size() for p in model.params.values())
    per_sample = 28 * 28 * 4 + 8  # a float32 image and an int64 label
    sizes = fnnet.parallel.shard_sizes(BATCH, len(devices))
    return sum(2 * params + n * per_sample for d, n in zip(devices, sizes) if torch.device(d) != torch.device(devices[0]))


@pytest.mark.parametrize("variant", [
    pytest.param(v, marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason=NO_CUDA)]) if dev.startswith("cuda")
    else v for v, (dev, _) in VARIANTS.items()])
def test_train_step(benchmark, variant):
    device, devices = VARIANTS[variant]
    torch.manual_seed(0)
    model = fnnet.functional(CnnModel())
    loss_fn = fnnet.supervised_loss(model, F.cross_entropy)
    opt = optim.adam(0.02)
    g = torch.Generator().manual_seed(1)
    batch = fnnet.place((torch.rand(BATCH, 1, 28, 28, generator=g), torch.randint(0, 10, (BATCH,), generator=g)), device)
    step = fnnet.make_train_step(loss_fn, opt, donate=True, devices=devices)
    box = [fnnet.TrainState.create(fnnet.place(model.params, device), opt, key=fnnet.random.key(0))]

    def run():
        box[0], metrics = step(box[0], batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return metrics

    run()  # warm up (first calls allocate)
    benchmark.group = f"data-parallel CNN step, batch {BATCH}"
    benchmark.extra_info.update(variant=variant, devices=devices or [device], bytes_copied=_bytes_copied(model, devices))
    benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=1)
