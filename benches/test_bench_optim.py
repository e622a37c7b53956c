"""One Adam step (update + apply) on 200 tensors: fnnet.optim against torch.optim.Adam.

The tree is 100 tensors of 256x256 and 100 of 256 (6.6 M float32 parameters, the
parameter count of a small CNN split the way real models are: few big weights, many small
biases). Every variant runs in the same session on the same data::

    pytest benches/test_bench_optim.py --benchmark-only

* ``torch-default``: ``torch.optim.Adam(params, lr)``, default settings (on CPU torch picks
  its per-parameter for-loop; on CUDA its ``foreach`` implementation).
* ``torch-foreach`` / ``torch-loop``: the same with ``foreach=True`` / ``foreach=False``.
* ``fnnet-pure``: ``opt.update`` + ``apply_updates`` with new tensors for everything.
* ``fnnet-donated``: the same with ``donate=True`` (state and params updated in place).
* ``fnnet-donated-whole-lists``: the donated path with every foreach op over all 200
  tensors at once. On CPU fnnet runs each stage's ops on cache-sized chunks of the leaf
  lists instead (``fnnet.optim._foreach.CPU_CHUNK_BYTES``); on GPUs it never chunks, so
  there this variant is ``fnnet-donated`` again.
* ``fnnet-donated-loop``: fnnet's donated math written as a Python loop over leaves, one
  op per tensor (the update loop, then the apply loop): the per-leaf way the foreach ops
  replace. ``tests/test_benches.py`` checks (in CI) that it computes what fnnet computes.

Targets (issue 3): on CPU, fnnet-donated <= 1.1x and fnnet-pure <= 1.5x torch-default.
Ratios: divide the medians of the table pytest-benchmark prints.
"""

from __future__ import annotations

import pytest
import torch

import fnnet.optim as O
from fnnet import tree
from fnnet.optim import _foreach as F

LR = 1e-3
VARIANTS = [
    "torch-default",
    "torch-foreach",
    "torch-loop",
    "fnnet-pure",
    "fnnet-donated",
    "fnnet-donated-whole-lists",
    "fnnet-donated-loop",
]


def make_tree(device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    leaves = {f"w{i:03d}": torch.randn(256, 256, generator=g) for i in range(100)}
    leaves.update({f"b{i:03d}": torch.randn(256, generator=g) for i in range(100)})
    return {k: v.to(device) for k, v in leaves.items()}


def _loop_adam_donated(params, grads, state, b1=0.9, b2=0.999, eps=1e-8):
    """fnnet's donated Adam on CPU (update with the learning rate folded into the denominator,
    then apply), one tensor at a time."""
    adam_state, lr_state = state
    count = adam_state.count + 1
    t = count.to(torch.float64)
    inv_sqrt_bc2 = (1.0 / (1.0 - b2**t)).sqrt().float()
    out_scale = (-lr_state.learning_rate / (1.0 - b1**t)).float()
    updates = []
    for g, m, v in zip(tree.leaves(grads), tree.leaves(adam_state.mu), tree.leaves(adam_state.nu)):
        m.lerp_(g, 1.0 - b1)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        d = v.sqrt().mul_(inv_sqrt_bc2 / out_scale).add_(eps / out_scale)
        updates.append(torch.div(m, d, out=g))
    for p, u in zip(tree.leaves(params), updates):
        p.add_(u)
    return params, (adam_state._replace(count=count), lr_state._replace(count=lr_state.count + 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(variant: str, device: torch.device):
    """``(run, fresh_grads, current)``: ``run(grads)`` does one optimizer step of ``variant``.

    Set-up is untimed; ``current()`` gives the parameters now, as a list (for the check in
    ``tests/test_benches.py`` that every variant takes the same step).

    Every variant gets new gradient tensors for every step (``fresh_grads()``, untimed), as a
    backward pass makes them: a donated fnnet update consumes its gradients (the updates are
    written into their buffers), and torch.optim reads ``p.grad``.
    """
    params, grads = make_tree(device, 0), make_tree(device, 1)

    def fresh_grads():
        return (tree.map(torch.clone, grads),), {}

    if variant.startswith("torch"):
        ps = [torch.nn.Parameter(p) for p in params.values()]
        foreach = {"torch-default": None, "torch-foreach": True, "torch-loop": False}[variant]
        opt = torch.optim.Adam(ps, lr=LR, foreach=foreach)

        def run(g):
            for p, gi in zip(ps, g.values()):
                p.grad = gi
            opt.step()
            _sync(device)

        return run, fresh_grads, lambda: [p.detach() for p in ps]

    opt = O.adam(LR)
    box = {"params": params, "state": opt.init(params)}
    if variant == "fnnet-pure":

        def run(g):
            updates, new_state = opt.update(g, box["state"], box["params"])
            box["params"], box["state"] = O.apply_updates(box["params"], updates), new_state
            _sync(device)

    elif variant == "fnnet-donated":

        def run(g):
            updates, box["state"] = opt.update(g, box["state"], box["params"], donate=True)
            box["params"] = O.apply_updates(box["params"], updates, donate=True)
            _sync(device)

    elif variant == "fnnet-donated-whole-lists":

        def run(g):
            saved, F.CPU_CHUNK_BYTES = F.CPU_CHUNK_BYTES, 1 << 62  # for this variant only
            try:
                updates, box["state"] = opt.update(g, box["state"], box["params"], donate=True)
                box["params"] = O.apply_updates(box["params"], updates, donate=True)
            finally:
                F.CPU_CHUNK_BYTES = saved
            _sync(device)

    else:

        def run(g):
            box["params"], box["state"] = _loop_adam_donated(box["params"], g, box["state"])
            _sync(device)

    return run, fresh_grads, lambda: list(box["params"].values())


@pytest.fixture(autouse=True)
def _restore_chunk_size():
    saved = F.CPU_CHUNK_BYTES
    yield
    F.CPU_CHUNK_BYTES = saved


@pytest.mark.parametrize("variant", VARIANTS)
def test_adam_step_200_tensors(benchmark, device, variant):
    run, fresh_grads, _ = build(variant, device)
    benchmark.group = f"adam step, 200 tensors (6.6M params), {device.type}"
    benchmark.extra_info.update(variant=variant, device=str(device), tensors=200, parameters=100 * 256 * 256 + 100 * 256)
    benchmark.pedantic(run, setup=fresh_grads, rounds=40, warmup_rounds=5, iterations=1)

