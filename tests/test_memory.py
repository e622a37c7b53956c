"""fnnet.memory_report: exact bytes for a model sized by hand; remat's activations; purity; errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fnnet
from fnnet import optim

sys.path.insert(0, str(Path(__file__).parent))
import _remat_worker as W  # noqa: E402


def _mlp_step(donate: bool = False, jit: bool = False):
    torch.manual_seed(0)
    model = fnnet.functional(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)))
    opt = optim.adam(1e-3)
    state = fnnet.TrainState.create(model.params, opt)
    step = fnnet.make_train_step(lambda p, b: ((model.apply(p, b[0]) - b[1]) ** 2).mean(), opt, donate=donate, jit=jit)
    return step, state, (torch.randn(5, 8), torch.randn(5, 4))


@pytest.mark.parametrize("donate", [False, True])
def test_exact_for_a_model_sized_by_hand_and_the_state_is_untouched(donate):
    step, state, batch = _mlp_step(donate)
    before = fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
    report = fnnet.memory_report(step, state, batch)
    weights = (16 * 8 + 16 + 4 * 16 + 4) * 4  # float32 Linear(8, 16) and Linear(16, 4): 848 bytes
    assert report.params == weights and report.counts["params"] == 4
    assert report.grads == weights and report.counts["grads"] == 4  # one gradient per parameter
    # Adam: mu and nu like the params, two int64 counts and the float64 learning rate
    assert report.opt_state == 2 * weights + 8 + 8 + 8 and report.counts["opt_state"] == 11
    # saved for the backward pass: ReLU's output (5x16, kept by ReLU's backward), out - y (5x4, kept by
    # the square's backward), the loss (4 bytes) and torch.autograd.grad's seed, ones_like(loss) (4 bytes);
    # the first layer's output and the head's output die in the forward pass; x, y and the weights were given
    assert report.activations == 5 * 16 * 4 + 5 * 4 * 4 + 4 + 4 and report.counts["activations"] == 4
    assert report.total == report.params + report.grads + report.opt_state + report.activations
    text = str(report)
    for row in ("parameters", "gradients", "optimizer state", "saved activations", "total", "1,720"):
        assert row in text
    for a, b in zip(fnnet.tree.leaves(before), fnnet.tree.leaves(state)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


def test_remat_policies_keep_fewer_activations():
    """A 3-block transformer: nothing_saveable keeps the blocks' inputs only, dots_saveable also the
    matmul/attention outputs, everything_saveable as much as no remat; params and grads unchanged."""
    reports = {}
    for policy in (None, "nothing_saveable", "dots_saveable", "everything_saveable"):
        net = W.gpt(torch.float32, dim=16, seq=8)
        if policy:
            net = W.with_remat(net, policy)
        model = fnnet.functional(net)
        opt = optim.sgd(0.1)
        step = fnnet.make_train_step(W.lm_loss(model), opt)
        state = fnnet.TrainState.create(model.params, opt, key=fnnet.random.key(0))
        reports[policy] = fnnet.memory_report(step, state, W.tokens(0, n=4, seq=8))
    plain = reports[None]
    assert reports["everything_saveable"].activations == plain.activations
    assert reports["nothing_saveable"].activations < reports["dots_saveable"].activations < plain.activations
    assert all((r.params, r.grads) == (plain.params, plain.grads) for r in reports.values())


def test_a_compiled_step_is_refused():
    step, state, batch = _mlp_step(jit=True)
    with pytest.raises(ValueError, match="jit=False"):
        fnnet.memory_report(step, state, batch)
