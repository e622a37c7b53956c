"""Gradient accumulation (``make_train_step(..., accumulate=k)``) against one step on the concatenated batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fnnet
from fnnet import optim


def setup(seed: int = 0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    model = fnnet.functional(net)
    g = torch.Generator().manual_seed(seed + 1)
    X, Y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(40, 2, generator=g, dtype=torch.float64)
    return model, (lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1])), X, Y


OPTIMIZERS = {
    "adam": lambda: optim.adam(0.01),
    "sgd-momentum": lambda: optim.sgd(0.1, momentum=0.9, nesterov=True),
    "clip+adamw": lambda: optim.chain(optim.clip_by_global_norm(0.05), optim.adamw(0.01, weight_decay=0.1)),
}


def micro_batches(X, Y, sizes):
    out, lo = [], 0
    for s in sizes:
        out.append((X[lo:lo + s], Y[lo:lo + s]))
        lo += s
    return out


def reference(model, loss_fn, opt, windows):
    """One ordinary step per window, on the window's micro-batches concatenated."""
    step = fnnet.make_train_step(loss_fn, opt)
    state = fnnet.TrainState.create(model.params, opt)
    losses = []
    for window in windows:
        whole = tuple(torch.cat([b[i] for b in window]) for i in range(2))
        state, metrics = step(state, whole)
        losses.append(float(metrics["loss"]))
    return state, losses


def assert_params_close(a, b, tol=1e-10):
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("k", [2, 4])  # (k = 1 would run the reference's own code: no test)
@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]])
def test_accumulating_k_micro_batches_is_one_step_on_their_concatenation(name, k, devices):
    model, loss_fn, X, Y = setup()
    sizes = [5, 3, 6, 2, 7, 1, 4, 4][:2 * k]  # uneven micro-batches
    batches = micro_batches(X, Y, sizes)
    windows = [batches[i:i + k] for i in range(0, len(batches), k)]
    opt = OPTIMIZERS[name]()
    expected, losses = reference(model, loss_fn, opt, windows)
    for donate in (False, True):
        step = fnnet.make_train_step(loss_fn, opt, accumulate=k, devices=devices, donate=donate)
        state = fnnet.TrainState.create(fnnet.tree.map(torch.clone, model.params), opt)
        updated = []
        for batch in batches:
            state, metrics = step(state, batch)
            updated.append(metrics.get("updated", True))
        assert updated == ([False] * (k - 1) + [True]) * len(windows)
        assert state.step == len(windows) and state.accum is None
        assert float(metrics["loss"]) == pytest.approx(losses[-1], rel=1e-6)  # the true mean (float32)
        assert_params_close(state.params, expected.params)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=5), k=st.integers(2, 4))
def test_any_micro_batch_sizes_accumulate_exactly_and_flush_applies_the_rest(sizes, k):
    model, loss_fn, X, Y = setup()
    batches = micro_batches(X, Y, sizes)
    windows = [batches[i:i + k] for i in range(0, len(batches), k)]
    opt = optim.adam(0.01)
    expected, _ = reference(model, loss_fn, opt, windows)
    step = fnnet.make_train_step(loss_fn, opt, accumulate=k)
    state = fnnet.TrainState.create(model.params, opt)
    for batch in batches:
        state, _ = step(state, batch)
    flushed = step.flush(state)
    if len(batches) % k:
        state, metrics = flushed
        assert metrics["updated"] and "batch_loss" not in metrics
    else:
        assert flushed is None
    assert state.step == len(windows) and state.accum is None
    assert_params_close(state.params, expected.params)


def test_accumulation_is_pure_without_donation_and_the_window_survives_a_checkpoint(tmp_path):
    model, loss_fn, X, Y = setup()
    opt = optim.adam(0.01)
    step = fnnet.make_train_step(loss_fn, opt, accumulate=3)
    state = fnnet.TrainState.create(model.params, opt)
    batches = micro_batches(X, Y, [4, 5, 6])
    state, _ = step(state, batches[0])
    state, _ = step(state, batches[1])
    before = fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, state)
    after, _ = step(state, batches[2])
    assert fnnet.tree.all_equal(state, before)  # the input state, its window included, is untouched
    # the window in progress saves and loads (without like=: Accumulation is fnnet's own type)
    fnnet.save(tmp_path / "mid.safetensors", state)
    loaded = fnnet.load(tmp_path / "mid.safetensors")
    assert isinstance(loaded.accum, fnnet.state.Accumulation) and loaded.accum.micro == 2
    resumed, _ = step(loaded, batches[2])
    assert fnnet.tree.all_equal(resumed.params, after.params)


def test_float16_unscales_the_window_once_and_a_nonfinite_micro_batch_skips_the_whole_update():
    model, loss_fn, X, Y = setup()
    opt = optim.sgd(0.1)
    batches = micro_batches(X, Y, [6, 6])
    step = fnnet.make_train_step(loss_fn, opt, accumulate=2, precision="16-mixed")
    one = fnnet.make_train_step(loss_fn, opt, precision="16-mixed")
    state = fnnet.TrainState.create(model.params, opt)
    ref = fnnet.TrainState.create(model.params, opt)
    for batch in batches:
        state, metrics = step(state, batch)
    ref, _ = one(ref, tuple(torch.cat([b[i] for b in batches]) for i in range(2)))
    assert bool(metrics["finite"])
    assert_params_close(state.params, ref.params, tol=2e-3)  # float16 compute: the same step, to fp16 rounding
    moved = max(float((state.params[k] - model.params[k]).abs().max()) for k in model.params)
    assert moved > 1e-3
    scale = float(state.loss_scale.scale)
    # a window with one non-finite micro-batch: no update at all, the window is dropped, the scale halves
    bad = (batches[0][0].clone(), batches[0][1].clone())
    bad[0][0, 0] = float("inf")
    before = fnnet.tree.map(torch.clone, state.params)
    state, _ = step(state, batches[1])
    state, metrics = step(state, bad)
    assert not bool(metrics["finite"]) and metrics["updated"] and state.accum is None
    assert fnnet.tree.all_equal(state.params, before)
    assert float(state.loss_scale.scale) == scale / 2
    state, metrics = step(state, batches[0])  # the next window starts clean
    assert state.accum.micro == 1 and not metrics["updated"]


def test_accumulate_must_be_a_positive_int():
    model, loss_fn, _, _ = setup()
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="accumulate must be a positive int"):
            fnnet.make_train_step(loss_fn, optim.sgd(0.1), accumulate=bad)


class _UpdateLog(fnnet.callbacks.Callback):
    """The learning rate of every optimizer update, read from the state after it."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, step, metrics):
        if metrics.get("updated", True):
            self.lrs.append(float(optim.get_learning_rate(trainer.state.opt_state)))


def test_trainer_accumulating_4_batches_of_32_equals_batches_of_128():
    g = torch.Generator().manual_seed(5)
    X, y = torch.randn(300, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (300,), generator=g)
    runs = {}
    for batch, k in ((128, 1), (32, 4)):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
        trainer = fnnet.Trainer(net, F.cross_entropy, optim.adam(0.01), devices="cpu", accumulate_grad_batches=k,
                                metrics={"accuracy": fnnet.metrics.accuracy})
        log = _UpdateLog()
        schedule = fnnet.callbacks.LearningRateSchedule(lambda step: 0.01 * 0.9 ** step, interval="step")
        # 300 samples: batches of 128 end with 44; batches of 32 end with 12, the epoch's last window (32 + 12)
        history = trainer.fit(fnnet.ArrayLoader((X, y), batch, shuffle=True, key=fnnet.random.key(3)), epochs=2,
                              callbacks=[schedule, log], verbose=0)
        runs[k] = (trainer, log.lrs, history)
    (big, big_lrs, big_history), (acc, acc_lrs, acc_history) = runs[1], runs[4]
    assert acc.state.step == big.state.step == 6 and acc.state.accum is None
    assert acc_lrs == big_lrs and len(acc_lrs) == 6
    for k in big.state.params:
        torch.testing.assert_close(acc.state.params[k], big.state.params[k], rtol=1e-10, atol=1e-10)
    assert acc_history["accuracy"] == big_history["accuracy"]
    assert acc_history["loss"] == pytest.approx(big_history["loss"], rel=1e-6)
    assert acc_history["lr"] == big_history["lr"]


@pytest.mark.parametrize("devices", [None, ["cpu", "cpu"]])
def test_a_skipped_window_keeps_the_buffers_of_its_start(devices):
    """A NaN sample in a window's first micro-batch: the window's update is skipped and BatchNorm's
    running statistics stay as they were when the window started, as for a skipped step without
    accumulation (issue 34 item 3; the rank strategies are checked in test_distributed.py)."""
    torch.manual_seed(1)
    bn = fnnet.functional(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Tanh(),
                                              torch.nn.Linear(4, 2)).double())
    loss_fn = fnnet.supervised_loss(bn, F.mse_loss, return_outputs=False)
    _, _, X, Y = setup()
    x = X[:6].clone()
    x[0, 0] = float("nan")
    opt = optim.sgd(0.1)
    for donate in (False, True):
        step = fnnet.make_train_step(loss_fn, opt, accumulate=3, devices=devices, skip_nonfinite=True, donate=donate)
        state = fnnet.TrainState.create(fnnet.tree.map(torch.clone, bn.params), opt,
                                        buffers=fnnet.tree.map(torch.clone, bn.buffers))
        for batch in ((x, Y[:6]), (X[6:12], Y[6:12]), (X[12:18], Y[12:18])):
            state, metrics = step(state, batch)
        assert metrics["updated"] and not bool(metrics["finite"])
        for k in bn.buffers:
            assert torch.equal(state.buffers[k], bn.buffers[k]), (devices, donate, k)
        for k in bn.params:
            assert torch.equal(state.params[k], bn.params[k]), (devices, donate, k)
        state, metrics = step(state, (X[:6], Y[:6]))  # the next window starts from those buffers and trains
        assert bool(torch.isfinite(state.buffers["1.running_mean"]).all())
