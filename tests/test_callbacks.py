"""fnnet.callbacks: ReduceLROnPlateau and torch schedulers against torch, TensorBoard event files, checkpoint folders."""

from __future__ import annotations

import math
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn
from torch.optim import lr_scheduler as L

import fnnet
from fnnet import optim
from fnnet.callbacks import (HOOKS, CallbackList, LearningRateSchedule, ModelCheckpoint, ReduceLROnPlateau,
                             TensorBoardLogger, from_torch_scheduler)
from fnnet.state import TrainState


def fake_trainer(optimizer):
    """What a callback sees of a trainer: ``state`` (with its optimizer state) and ``stop_training``."""
    return types.SimpleNamespace(state=TrainState.create({"w": torch.zeros(2)}, optimizer), stop_training=False)


def lr_of(trainer) -> float:
    return float(optim.get_learning_rate(trainer.state.opt_state))


def quiet_from_torch(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optim.TorchConversionWarning)
        return optim.from_torch(*args, **kwargs)


# -- ReduceLROnPlateau: torch's rule on the same sequence of monitored values ---------------------------


def run_both(values, lr=1.0, **kwargs):
    """The learning rate after each epoch: (fnnet's callback, torch's scheduler), fed the same values."""
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    torch_sched = L.ReduceLROnPlateau(torch_opt, **kwargs)
    trainer = fake_trainer(optim.sgd(lr))
    cb = ReduceLROnPlateau("val_loss", **kwargs)
    cb.on_fit_start(trainer)
    ours, theirs = [], []
    for epoch, value in enumerate(values):
        torch_sched.step(value)
        cb.on_epoch_end(trainer, epoch, {"loss": 0.0, "val_loss": value})
        ours.append(lr_of(trainer))
        theirs.append(torch_opt.param_groups[0]["lr"])
        assert (cb.best, cb.num_bad_epochs, cb.cooldown_counter) == pytest.approx(
            (torch_sched.best, torch_sched.num_bad_epochs, torch_sched.cooldown_counter), nan_ok=True)
    return ours, theirs


@settings(max_examples=60, deadline=None)
@given(
    # few distinct values, so plateaus (repeats) and small changes under the threshold are common
    values=st.lists(st.one_of(st.sampled_from([1.0, 0.99995, 0.9, 0.8, 1.5, 0.5, 0.49]), st.just(math.nan),
                              st.floats(0.1, 2.0)), min_size=1, max_size=40),
    mode=st.sampled_from(["min", "max"]),
    threshold_mode=st.sampled_from(["rel", "abs"]),
    threshold=st.sampled_from([0.0, 1e-4, 0.05]),
    factor=st.sampled_from([0.1, 0.5, 0.9]),
    patience=st.integers(0, 4),
    cooldown=st.integers(0, 3),
    min_lr=st.sampled_from([0.0, 0.01, 0.3]),
    eps=st.sampled_from([1e-8, 0.05]),
)
def test_reduce_lr_on_plateau_equals_torch(values, mode, threshold_mode, threshold, factor, patience, cooldown,
                                           min_lr, eps):
    ours, theirs = run_both(values, mode=mode, threshold_mode=threshold_mode, threshold=threshold, factor=factor,
                            patience=patience, cooldown=cooldown, min_lr=min_lr, eps=eps)
    assert ours == theirs  # the same float64 arithmetic: exactly equal


def test_reduce_lr_on_plateau_plateaus_cooldown_and_min_lr():
    # a plateau of 4 epochs after the best, cooldown 2, then min_lr caps the decay
    values = [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4, 0.4]
    ours, theirs = run_both(values, lr=1.0, factor=0.5, patience=1, cooldown=2, min_lr=0.2)
    assert ours == theirs
    assert min(ours) == 0.2 and len(set(ours)) >= 3  # reduced several times, down to min_lr
    # with cooldown the reductions are further apart than without
    no_cooldown, _ = run_both(values, lr=1.0, factor=0.5, patience=1, cooldown=0, min_lr=0.0)
    assert ours != no_cooldown


def test_reduce_lr_on_plateau_in_the_trainer_and_its_errors():
    torch.manual_seed(0)
    x, y = torch.randn(64, 3), torch.randn(64, 1)
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    trainer = fnnet.Trainer(nn.Linear(3, 1), F.mse_loss, optim.sgd(0.01), devices="cpu")
    # a loss must drop by 20% to count: the slow SGD makes plateaus
    cb = ReduceLROnPlateau("loss", factor=0.5, patience=1, threshold=0.2)
    history = trainer.fit(data, epochs=8, callbacks=[cb], verbose=0)
    torch_opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.01)
    torch_sched = L.ReduceLROnPlateau(torch_opt, factor=0.5, patience=1, threshold=0.2)
    expected = []
    for loss in history["loss"]:
        expected.append(torch_opt.param_groups[0]["lr"])  # the lr this epoch trained with
        torch_sched.step(loss)
    assert history["lr"] == expected
    assert len(set(expected)) > 2
    scheduled = fnnet.Trainer(nn.Linear(3, 1), F.mse_loss, optim.sgd(optim.step_lr(0.1, 1)), devices="cpu")
    with pytest.raises(ValueError, match="ReduceLROnPlateau needs a constant learning rate.*schedule"):
        scheduled.fit(data, epochs=1, callbacks=[ReduceLROnPlateau("loss")], verbose=0)
    with pytest.raises(ValueError, match=r"monitor='val_loss' is not among the epoch's logs.*val_data"):
        trainer.fit(data, epochs=1, callbacks=[ReduceLROnPlateau()], verbose=0)
    for bad in (dict(factor=1.0), dict(patience=-1), dict(cooldown=1.5), dict(min_lr=-1.0), dict(mode="up"),
                dict(threshold_mode="pct"), dict(eps=math.nan)):
        with pytest.raises(ValueError):
            ReduceLROnPlateau(**bad)


# -- torch schedulers in callbacks= --------------------------------------------------------------------


def regression_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64) + 0.1 * torch.randn(40, 1, generator=g,
                                                                                          dtype=torch.float64)
    return [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]  # 5 steps per epoch, always in this order


def torch_loop(net, opt, sched, data, epochs, per_step):
    """The chapter's loop; returns the learning rate of each epoch's last update and the final weights."""
    lrs = []
    for _ in range(epochs):
        for x, y in data:
            opt.zero_grad()
            F.mse_loss(net(x), y).backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            if per_step:
                sched.step()
        lrs.append(lr)
        if not per_step:
            sched.step()
    return lrs, {k: v.detach() for k, v in net.named_parameters()}


SCHEDULERS = [
    ("StepLR", lambda o: L.StepLR(o, step_size=1, gamma=0.9), False),
    ("MultiStepLR", lambda o: L.MultiStepLR(o, milestones=[1, 3], gamma=0.3), False),
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, T_max=2, eta_min=0.001), False),
    ("OneCycleLR", lambda o: L.OneCycleLR(o, max_lr=0.05, total_steps=20, cycle_momentum=False), True),
]


@pytest.mark.parametrize("name, make_sched, per_step", SCHEDULERS, ids=[s[0] for s in SCHEDULERS])
def test_a_torch_scheduler_in_callbacks_trains_as_torch(name, make_sched, per_step):
    data, epochs = regression_data(), 4
    torch.manual_seed(0)
    reference = nn.Linear(3, 1).double()
    net = nn.Linear(3, 1).double()
    net.load_state_dict(reference.state_dict())
    ref_opt = torch.optim.Adam(reference.parameters(), lr=0.02)
    expected_lrs, expected = torch_loop(reference, ref_opt, make_sched(ref_opt), data, epochs, per_step)

    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    sched = make_sched(opt)
    trainer = fnnet.Trainer(net, F.mse_loss, quiet_from_torch(opt, module=net), devices="cpu")
    history = trainer.fit(data, epochs=epochs, callbacks=[sched], verbose=0)  # the torch object, as Lightning takes it
    assert history["lr"] == pytest.approx(expected_lrs, rel=1e-12)
    for k, v in trainer.state.params.items():
        torch.testing.assert_close(v, expected[k], rtol=1e-10, atol=1e-10)


def test_from_torch_scheduler_picks_the_callback_and_interval():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1, momentum=0.9)
    plateau = from_torch_scheduler(L.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3, threshold=0.01,
                                                       threshold_mode="abs", cooldown=2, min_lr=1e-4, eps=1e-9),
                                   monitor="val_accuracy")
    assert isinstance(plateau, ReduceLROnPlateau)
    assert (plateau.monitor, plateau.mode, plateau.factor, plateau.patience, plateau.threshold, plateau.threshold_mode,
            plateau.cooldown, plateau.min_lr, plateau.eps) == ("val_accuracy", "max", 0.5, 3, 0.01, "abs", 2, 1e-4, 1e-9)
    step = from_torch_scheduler(L.StepLR(opt, 2, 0.5))
    assert isinstance(step, LearningRateSchedule) and step.interval == "epoch"
    assert [step.schedule(e) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert from_torch_scheduler(L.StepLR(opt, 2, 0.5), interval="step").interval == "step"
    one_cycle = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    assert from_torch_scheduler(L.OneCycleLR(one_cycle, 1.0, total_steps=10, cycle_momentum=False)).interval == "step"
    converted = CallbackList([L.ExponentialLR(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 0.5)])
    assert isinstance(converted.callbacks[0], LearningRateSchedule)
    with pytest.raises(TypeError, match="expected a torch.optim.lr_scheduler"):
        from_torch_scheduler(optim.step_lr(0.1, 1))
    with pytest.raises(ValueError, match="interval"):
        from_torch_scheduler(L.StepLR(opt, 2), interval="batch")
    two = torch.optim.SGD([{"params": [nn.Parameter(torch.zeros(1))]}, {"params": [nn.Parameter(torch.zeros(1))]}],
                          lr=0.1)
    with pytest.raises(ValueError, match="min_lr per param group"):
        from_torch_scheduler(L.ReduceLROnPlateau(two, min_lr=[0.0, 0.1]))


# -- TensorBoardLogger ---------------------------------------------------------------------------------


def small_fit(callbacks, epochs=3):
    torch.manual_seed(0)
    x, y = torch.randn(48, 3), torch.randn(48, 1)
    train = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]  # 5 steps per epoch
    val = [(x[40:], y[40:])]
    trainer = fnnet.Trainer(nn.Linear(3, 1), F.mse_loss, optim.sgd(0.05), devices="cpu",
                            metrics={"mae": lambda o, t: (o - t).abs().mean()})
    return trainer, trainer.fit(train, val, epochs=epochs, callbacks=callbacks, verbose=0)


def test_tensorboard_logger_writes_every_epoch_log_and_step_losses(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = {}

    class StepLosses:
        def on_train_batch_end(self, trainer, step, metrics):
            losses[step] = float(metrics["loss"])

    logger = TensorBoardLogger(tmp_path / "tb", every_n_steps=2)
    trainer, history = small_fit([logger, StepLosses()])
    assert logger.writer is None  # closed at on_fit_end
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "mae", "val_loss", "val_mae", "lr", "time", "loss_step"} <= tags
    for key in ("loss", "mae", "val_loss", "val_mae", "lr", "time"):
        scalars = events.Scalars(key)
        assert [s.step for s in scalars] == [1, 2, 3]  # epochs counted from 1, as History
        assert [s.value for s in scalars] == pytest.approx(history[key], rel=1e-6)  # stored as float32
    step_scalars = events.Scalars("loss_step")
    assert [s.step for s in step_scalars] == [2, 4, 6, 8, 10, 12, 14]  # every 2nd of 15 steps
    assert [s.value for s in step_scalars] == pytest.approx([losses[s.step] for s in step_scalars], rel=1e-6)


def test_tensorboard_logger_without_tensorboard_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package looks like
    with pytest.raises(ImportError, match=r"pip install tensorboard.*fnnet\[tensorboard\]"):
        TensorBoardLogger(tmp_path)


def test_tensorboard_logger_validates_every_n_steps(tmp_path):
    pytest.importorskip("tensorboard")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="every_n_steps"):
            TensorBoardLogger(tmp_path, every_n_steps=bad)


# -- ModelCheckpoint: another run's checkpoints in the folder ---------------------------------------------


def test_model_checkpoint_warns_once_about_checkpoints_it_did_not_write(tmp_path):
    folder = tmp_path / "ckpt"
    first = ModelCheckpoint(folder, monitor="val_loss", save_top_k=2, save_last=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # an empty (missing) folder: no warning
        small_fit([first])
        small_fit([first])  # its own files from the first fit: no warning either
    n = len(list(folder.glob("*.safetensors")))
    assert n >= 2  # last.safetensors and the best

    second = ModelCheckpoint(folder, monitor="val_loss")
    with pytest.warns(UserWarning, match=rf"already holds {n} checkpoint\(s\) this callback did not write") as record:
        small_fit([second], epochs=1)
    foreign = [w for w in record if issubclass(w.category, UserWarning) and "did not write" in str(w.message)]
    assert len(foreign) == 1
    assert foreign[0].filename == __file__  # the user's fit() line (small_fit's), not fnnet's
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        small_fit([second], epochs=1)  # once per callback


# -- torch schedulers in callbacks= must be built on the Trainer's optimizer --------------------------------


def test_a_torch_scheduler_on_another_optimizer_is_refused_in_callbacks():
    data = regression_data()
    net = nn.Linear(3, 1).double()
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    other = torch.optim.SGD(net.parameters(), lr=0.5)
    trainer = fnnet.Trainer(net, F.mse_loss, quiet_from_torch(opt, module=net), devices="cpu")
    before = fnnet.tree.map(torch.clone, trainer.state.params)
    for sched in (L.StepLR(other, 1, 0.9), L.ReduceLROnPlateau(other)):
        with pytest.raises(ValueError, match=rf"{type(sched).__name__} in callbacks= was built on another torch "
                                             r"optimizer than the one the Trainer's optimizer was converted from"):
            trainer.fit(data, epochs=1, callbacks=[sched], verbose=0)
    assert fnnet.tree.all_equal(trainer.state.params, before)  # refused before any training
    native = fnnet.Trainer(net, F.mse_loss, optim.adam(0.02), devices="cpu")
    with pytest.raises(ValueError, match=r"not converted from a torch optimizer.*LearningRateSchedule"):
        native.fit(data, epochs=1, callbacks=[L.StepLR(other, 1, 0.9)], verbose=0)
    # the scheduler of the Trainer's own torch optimizer, also through the Trainer's own conversion
    # and under the mask of frozen parameters
    frozen = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1)).double()
    frozen[0].requires_grad_(False)
    own = torch.optim.Adam(frozen[1].parameters(), lr=0.02)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optim.TorchConversionWarning)
        history = fnnet.Trainer(frozen, F.mse_loss, own, devices="cpu").fit(
            data, epochs=3, callbacks=[L.StepLR(own, 1, 0.5)], verbose=0)
    assert history["lr"] == pytest.approx([0.02, 0.01, 0.005])


@pytest.mark.parametrize("name, make_sched", [
    ("SequentialLR", lambda o: L.SequentialLR(o, [L.ExponentialLR(o, 0.5), L.StepLR(o, 2, 0.3)], milestones=[2])),
    ("ChainedScheduler", lambda o: L.ChainedScheduler([L.ExponentialLR(o, 0.9), L.MultiStepLR(o, [1, 3], 0.5)])),
])
def test_a_composite_torch_scheduler_in_callbacks_trains_as_torch(name, make_sched):
    test_a_torch_scheduler_in_callbacks_trains_as_torch(name, make_sched, False)


# -- ReduceLROnPlateau: the threshold, just inside and just outside, in every mode --------------------------

THRESHOLD_CASES = [
    # (mode, threshold_mode, second value inside the threshold (no improvement), just outside (an improvement))
    ("min", "rel", 0.91, 0.89),  # best 1.0, threshold 0.1: improves below 0.9
    ("min", "abs", 0.91, 0.89),
    ("max", "rel", 1.09, 1.11),  # improves above 1.1
    ("max", "abs", 1.09, 1.11),
]


@pytest.mark.parametrize("mode, threshold_mode, inside, outside", THRESHOLD_CASES,
                         ids=[f"{m}-{t}" for m, t, _, _ in THRESHOLD_CASES])
def test_reduce_lr_on_plateau_threshold_just_inside_and_outside(mode, threshold_mode, inside, outside):
    kwargs = dict(mode=mode, threshold_mode=threshold_mode, threshold=0.1, patience=0, factor=0.5)
    ours, theirs = run_both([1.0, inside], **kwargs)
    assert ours == theirs == [1.0, 0.5]  # inside the threshold: a bad epoch, reduced at once (patience 0)
    ours, theirs = run_both([1.0, outside], **kwargs)
    assert ours == theirs == [1.0, 1.0]  # outside: an improvement


def test_a_callback_with_only_lightnings_hook_names_is_refused_naming_fnnets():
    class LightningStyle:
        def on_train_epoch_end(self, trainer, pl_module): ...

    with pytest.raises(TypeError, match="on_epoch_end") as e:
        CallbackList([LightningStyle()])
    assert all(hook in str(e.value) for hook in HOOKS)
