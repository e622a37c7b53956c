"""How far training in channels-last (NHWC) drifts from training in NCHW, fnnet and plain torch.

    python benches/layout_drift.py [--epochs 10] [--json out.json]

The chapter's CNN on the embedded digits, Adam lr 0.01, batch 128, the same initial weights
and the same batches in the same order for every run. Two pairs of runs, each differing only
in the memory layout of the convolutions' inputs and weights:

* fnnet: ``Trainer(memory_format="channels_last")`` (the CPU default) against
  ``Trainer(memory_format="contiguous")``, same keys (same dropout masks);
* torch: the chapter's loop with ``net.to(memory_format=torch.channels_last)`` and NHWC
  batches, against the same loop in NCHW, same seeds.

Prints the largest absolute parameter difference of each pair after every epoch: the float
rounding of two convolution algorithms, amplified by training. Values are the same in every
layout; the arithmetic order is not.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

import fnnet
from fnnet import optim
from fnnet.models import CnnModel


def fnnet_runs(epochs: int, X: torch.Tensor, y: torch.Tensor) -> list[float]:
    trainers = []
    for fmt in ("channels_last", "contiguous"):
        torch.manual_seed(0)
        trainers.append(fnnet.Trainer(CnnModel(), F.cross_entropy, optim.adam(0.01), devices="cpu", key=1,
                                      memory_format=fmt))
    gaps = []
    for epoch in range(epochs):
        for t in trainers:
            t.fit(fnnet.ArrayLoader((X, y), 128, shuffle=True, key=fnnet.random.key(2)), epochs=1, verbose=0)
        a, b = (t.state.params for t in trainers)
        gaps.append(max(float((a[k] - b[k]).abs().max()) for k in a))
    return gaps


def torch_runs(epochs: int, X: torch.Tensor, y: torch.Tensor) -> list[float]:
    nets, opts = [], []
    for channels_last in (True, False):
        torch.manual_seed(0)
        net = CnnModel()
        if channels_last:
            net = net.to(memory_format=torch.channels_last)
        nets.append(net)
        opts.append(torch.optim.Adam(net.parameters(), lr=0.01))
    gaps = []
    for epoch in range(epochs):
        order = torch.randperm(len(X), generator=torch.Generator().manual_seed(epoch))
        for i, (net, opt, channels_last) in enumerate(zip(nets, opts, (True, False))):
            torch.manual_seed(1000 + epoch)  # the same dropout draws in both runs
            for start in range(0, len(X), 128):
                idx = order[start:start + 128]
                xb = X[idx].contiguous(memory_format=torch.channels_last) if channels_last else X[idx]
                opt.zero_grad()
                F.cross_entropy(net(xb), y[idx]).backward()
                opt.step()
        a, b = ({k: v.detach() for k, v in n.named_parameters()} for n in nets)
        gaps.append(max(float((a[k] - b[k]).abs().max()) for k in a))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--json")
    args = parser.parse_args()
    (X, y), _ = fnnet.load_digits()
    result = {"epochs": args.epochs, "fnnet": fnnet_runs(args.epochs, X, y), "torch": torch_runs(args.epochs, X, y)}
    for name in ("fnnet", "torch"):
        print(f"{name:5s} channels-last vs NCHW, largest parameter difference per epoch: "
              + " ".join(f"{g:.1e}" for g in result[name]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
