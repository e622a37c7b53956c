"""fnnet.strategy: strategies as objects, their shorthands, and the old flags they replace (one process;
the rank strategies' numbers are checked under torchrun in test_distributed.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fnnet
from fnnet import distributed, optim, parallel
from fnnet.step import TrainStep
from fnnet.strategy import SingleDevice, StepOptions, Strategy


def setup():
    torch.manual_seed(0)
    model = fnnet.functional(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double())
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64))
               for _ in range(3)]
    return model, (lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1])), batches


def run(step, model, opt, batches):
    state = fnnet.TrainState.create(model.params, opt)
    for batch in batches:
        state, _ = step(state, batch)
    return state


def test_a_strategy_object_and_its_shorthand_give_the_old_flags_step_bit_for_bit():
    model, loss_fn, batches = setup()
    opt = optim.adam(0.01)
    for new, old in ((dict(strategy=parallel.Replicate(["cpu", "cpu"])), dict(devices=["cpu", "cpu"])),
                     (dict(strategy="single"), dict()), (dict(strategy=SingleDevice()), dict())):
        a = run(fnnet.make_train_step(loss_fn, opt, **new), model, opt, batches)
        b = run(fnnet.make_train_step(loss_fn, opt, **old), model, opt, batches)
        for k in a.params:
            assert torch.equal(a.params[k], b.params[k]), (new, k)
    step = fnnet.make_train_step(loss_fn, opt, strategy=parallel.Replicate(["cpu", "cpu"]), accumulate=2)
    assert isinstance(step, TrainStep) and isinstance(step.strategy, parallel.Replicate)
    assert step.accumulate == 2 and step.precision == "32" and step.gather_state(5) == 5  # nothing to gather


def test_the_trainer_takes_a_strategy():
    torch.manual_seed(0)
    x, y = torch.randn(20, 3, dtype=torch.float64), torch.randn(20, 2, dtype=torch.float64)
    results = []
    for kwargs in (dict(strategy=parallel.Replicate(["cpu", "cpu"])), dict(devices=["cpu", "cpu"])):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(3, 2)).double()
        trainer = fnnet.Trainer(net, F.mse_loss, optim.sgd(0.1), **kwargs)
        trainer.fit(fnnet.ArrayLoader((x, y), 8), epochs=1, verbose=0)
        results.append(trainer)
    assert results[0].devices == results[1].devices
    for k in results[1].state.params:
        assert torch.equal(results[0].state.params[k], results[1].state.params[k])
    with pytest.raises(ValueError, match="names its devices"):
        fnnet.Trainer(torch.nn.Linear(3, 2), F.mse_loss, optim.sgd(0.1), devices="cpu",
                      strategy=parallel.Replicate(["cpu", "cpu"]))


def test_strategies_say_clearly_what_is_wrong():
    model, loss_fn, _ = setup()
    opt = optim.sgd(0.1)
    with pytest.raises(NotImplementedError, match="parameter sharding is its own issue"):
        distributed.ZeRO(stage=3)
    with pytest.raises(NotImplementedError, match="stages 1 and 2"):
        fnnet.make_train_step(loss_fn, opt, strategy="zero3")
    with pytest.raises(ValueError, match="takes 1 or 2"):
        distributed.ZeRO(stage=4)
    with pytest.raises(ValueError, match="pass one or the other"):
        fnnet.make_train_step(loss_fn, opt, strategy="ddp", distributed=True)
    with pytest.raises(ValueError, match="the shorthands are"):
        fnnet.make_train_step(loss_fn, opt, strategy="fsdp")
    with pytest.raises(TypeError, match="fnnet.strategy.Strategy"):
        fnnet.make_train_step(loss_fn, opt, strategy=object())
    with pytest.raises(ValueError, match="mesh_dim_names=\\('replicate', 'shard'\\)"):
        distributed.HSDP(object())
    with pytest.raises(RuntimeError, match="needs a process group"):
        fnnet.make_train_step(loss_fn, opt, strategy="ddp")
    with pytest.raises(TypeError, match="reduction must be a callable"):
        distributed.DDP(reduction=3)


def test_a_strategy_of_your_own_builds_on_the_skeleton():
    """The base class's contract: build(loss_fn, optimizer, StepOptions) -> TrainStep."""

    class Halved(Strategy):
        name = "halved"

        def build(self, loss_fn, optimizer, options: StepOptions) -> TrainStep:
            return SingleDevice().build(lambda p, b: loss_fn(p, b) / 2, optimizer, options)

    model, loss_fn, batches = setup()
    opt = optim.sgd(0.1)
    a = run(fnnet.make_train_step(loss_fn, opt, strategy=Halved()), model, opt, batches)
    b = run(fnnet.make_train_step(loss_fn, optim.sgd(0.05)), model, optim.sgd(0.05), batches)
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=1e-12, atol=1e-12)
