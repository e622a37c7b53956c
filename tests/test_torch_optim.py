"""fnnet.optim.from_torch / schedule_from_torch: torch.optim objects become fnnet transforms with torch's numbers.

Every comparison runs the real torch optimizer and scheduler next to the converted fnnet one,
on the same float64 gradients, and compares the learning rate of every update and the
parameter trajectories.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L

import fnnet.optim as O
from fnnet import tree

EPOCHS, SPE = 7, 4  # several epochs of several steps: epoch boundaries are where per-epoch stepping shows
TOL = 1e-10


def grad_of(p: torch.Tensor, step: int) -> torch.Tensor:
    """A gradient that depends on the parameter (trajectories feed back) and on the step."""
    return p - math.sin(0.3 * step) + 0.1 * torch.sin(3.0 * p + step)


def make_params(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "b": torch.randn(2, generator=g, dtype=torch.float64)}


def convert(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", O.TorchConversionWarning)
        return O.from_torch(*args, **kwargs)


def torch_run(make, params, epochs=EPOCHS, spe=SPE, per_step=False):
    """torch's loop: ``opt.step()`` per batch, ``sched.step()`` per epoch (per batch with ``per_step``).

    Returns the learning rate each update used and the parameters after each update.
    """
    leaves, spec = tree.flatten(params)
    ps = [nn.Parameter(p.clone()) for p in leaves]
    opt, sched = make(ps)
    lrs, traj, step = [], [], 0
    for _ in range(epochs):
        for _ in range(spe):
            for p in ps:
                p.grad = grad_of(p.detach(), step)
            group = opt.param_groups[0]
            # Adagrad's lr_decay is torch's clr = lr / (1 + (step - 1) * lr_decay), part of fnnet's schedule
            lrs.append(float(group["lr"]) / (1 + step * group.get("lr_decay", 0)))
            opt.step()
            if sched is not None and per_step:
                sched.step()
            traj.append(tree.unflatten(spec, [p.detach().clone() for p in ps]))
            step += 1
        if sched is not None and not per_step:
            sched.step()
    return lrs, traj


def fnnet_run(tx, params, steps):
    """The same loop through an fnnet transform: learning rate of each update (read from the state) and params."""
    state = tx.init(params)
    lrs, traj = [], []
    for step in range(steps):
        grads = tree.map(lambda p: grad_of(p, step), params)
        updates, state = tx.update(grads, state, params)
        lrs.append(float(O.get_learning_rate(state)))
        params = O.apply_updates(params, updates)
        traj.append(params)
    return lrs, traj


def assert_same_run(ours, theirs):
    (lr_a, traj_a), (lr_b, traj_b) = ours, theirs
    assert len(lr_a) == len(lr_b) and len(traj_a) == len(traj_b)
    for i, (a, b) in enumerate(zip(lr_a, lr_b)):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-15), f"learning rate of update {i}: fnnet {a}, torch {b}"
    for i, (a, b) in enumerate(zip(traj_a, traj_b)):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=TOL, atol=TOL, msg=lambda m: f"update {i}, '{key}': {m}")


# (name, optimizer factory, scheduler factory, stepped per update)
SCHEDULED = [
    ("chapter: Adam + StepLR(1, 0.9)", lambda ps: torch.optim.Adam(ps, lr=0.02),
     lambda o: L.StepLR(o, step_size=1, gamma=0.9), False),
    ("SGD nesterov + StepLR(2, 0.5)", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
     lambda o: L.StepLR(o, step_size=2, gamma=0.5), False),
    ("AdamW + ExponentialLR", lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
     lambda o: L.ExponentialLR(o, gamma=0.8), False),
    ("RMSprop centered + MultiStepLR with a repeated milestone",
     lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
     lambda o: L.MultiStepLR(o, milestones=[1, 3, 3, 5], gamma=0.5), False),
    ("Adagrad lr_decay + CosineAnnealingLR past T_max", lambda ps: torch.optim.Adagrad(ps, lr=0.3, lr_decay=0.01),
     lambda o: L.CosineAnnealingLR(o, T_max=3, eta_min=0.01), False),
    ("SGD + CosineAnnealingLR eta_min=0", lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.5),
     lambda o: L.CosineAnnealingLR(o, T_max=4), False),
    ("Adam + LambdaLR", lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
     lambda o: L.LambdaLR(o, lambda e: 1.0 / (e + 1) if e < 4 else 0.05 * e), False),
    ("SGD + OneCycleLR cos", lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
     lambda o: L.OneCycleLR(o, max_lr=0.5, total_steps=EPOCHS * SPE, cycle_momentum=False), True),
    ("Adam + OneCycleLR linear, three phases", lambda ps: torch.optim.Adam(ps, lr=0.1),
     lambda o: L.OneCycleLR(o, max_lr=0.05, epochs=EPOCHS, steps_per_epoch=SPE, pct_start=0.25,
                            anneal_strategy="linear", three_phase=True, cycle_momentum=False), True),
]


@pytest.mark.parametrize("name, make_opt, make_sched, per_step", SCHEDULED, ids=[c[0] for c in SCHEDULED])
def test_optimizer_with_scheduler_equals_torch_at_every_step(name, make_opt, make_sched, per_step):
    params = make_params()

    def make(ps):
        opt = make_opt(ps)
        return opt, make_sched(opt)

    expected = torch_run(make, params, per_step=per_step)
    opt, sched = make([nn.Parameter(p.clone()) for p in tree.leaves(params)])
    tx = convert(opt, scheduler=sched, steps_per_epoch=SPE)
    assert_same_run(fnnet_run(tx, params, EPOCHS * SPE), expected)
    # the learning rate really changes (the test would see a scheduler ignored)
    assert len({round(lr, 14) for lr in expected[0]}) > 2


@pytest.mark.parametrize("name, make_opt, make_sched, per_step", SCHEDULED, ids=[c[0] for c in SCHEDULED])
def test_schedule_from_torch_per_epoch_and_per_call(name, make_opt, make_sched, per_step):
    """The schedule counted in scheduler.step() calls, as ints and as tensors, is torch's lr after each call."""
    opt = make_opt([nn.Parameter(torch.zeros(2, dtype=torch.float64))])
    sched = make_sched(opt)
    schedule = O.schedule_from_torch(make_sched(make_opt([nn.Parameter(torch.zeros(2, dtype=torch.float64))])))
    calls = EPOCHS * SPE if per_step else EPOCHS
    for k in range(calls):
        expected = opt.param_groups[0]["lr"]
        assert schedule(k) == pytest.approx(expected, rel=1e-12, abs=1e-15), f"after {k} scheduler steps"
        as_tensor = schedule(torch.tensor(k))
        assert as_tensor.dtype == torch.float64 and as_tensor.ndim == 0 and float(as_tensor) == schedule(k)
        opt.step()
        sched.step()
    # with steps_per_epoch: per_epoch for epoch schedulers, unchanged (per update) for OneCycleLR
    stepped = O.schedule_from_torch(make_sched(make_opt([nn.Parameter(torch.zeros(2))])), steps_per_epoch=SPE)
    for step in range(EPOCHS * SPE):
        assert stepped(step) == schedule(step if per_step else step // SPE)


OPTIMIZERS = [
    ("SGD", lambda ps: torch.optim.SGD(ps, lr=0.1)),
    ("SGD momentum nesterov wd", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.01)),
    ("Adam", lambda ps: torch.optim.Adam(ps, lr=0.02, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.01)),
    ("Adam decoupled", lambda ps: torch.optim.Adam(ps, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True)),
    ("AdamW", lambda ps: torch.optim.AdamW(ps, lr=0.02, betas=(0.85, 0.995))),
    ("AdamW tensor lr", lambda ps: torch.optim.AdamW(ps, lr=torch.tensor(0.02, dtype=torch.float64), weight_decay=0.3)),
    ("RMSprop", lambda ps: torch.optim.RMSprop(ps, lr=0.01, alpha=0.9, eps=1e-6, weight_decay=0.01)),
    ("RMSprop centered momentum", lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9, centered=True)),
    ("Adagrad", lambda ps: torch.optim.Adagrad(ps, lr=0.1, lr_decay=0.05, weight_decay=0.01,
                                               initial_accumulator_value=0.1, eps=1e-8)),
    ("Adam maximize", lambda ps: torch.optim.Adam(ps, lr=0.01, maximize=True)),
    ("SGD maximize wd", lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.5, weight_decay=0.1, maximize=True)),
    ("Adam foreach=False", lambda ps: torch.optim.Adam(ps, lr=0.01, foreach=False)),
    ("two groups, same options", lambda ps: torch.optim.Adam([{"params": ps[:1]}, {"params": ps[1:]}], lr=0.03)),
]


@pytest.mark.parametrize("name, make_opt", OPTIMIZERS, ids=[c[0] for c in OPTIMIZERS])
def test_optimizer_alone_equals_torch(name, make_opt):
    params = make_params(1)
    expected = torch_run(lambda ps: (make_opt(ps), None), params, epochs=3, spe=10)
    tx = convert(make_opt([nn.Parameter(p.clone()) for p in tree.leaves(params)]))
    assert_same_run(fnnet_run(tx, params, 30), expected)


def test_the_conversion_is_announced_once_with_both_sides():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.warns(O.TorchConversionWarning) as record:
        O.from_torch(torch.optim.Adam(p, lr=0.02))
    assert len(record) == 1
    assert str(record[0].message) == ("fnnet: torch.optim.Adam(lr=0.02, betas=(0.9, 0.999), eps=1e-08, weight_decay=0) "
                                      "-> fnnet.optim.adam(0.02, b1=0.9, b2=0.999, eps=1e-08, weight_decay=0)")
    opt = torch.optim.Adam(p, lr=0.02)
    with pytest.warns(O.TorchConversionWarning, match=r"with StepLR stepped once per epoch of 5 updates -> "
                      r"fnnet.optim.adam\(per_epoch\(step_lr\(0.02, 1, 0.9\), 5\)"):
        O.from_torch(opt, scheduler=L.StepLR(opt, 1, 0.9), steps_per_epoch=5)
    with pytest.warns(O.TorchConversionWarning, match=r"maximize=True\) -> chain\(scale\(-1.0\), fnnet.optim.sgd"):
        O.from_torch(torch.optim.SGD(p, lr=0.1, maximize=True))


def test_a_constant_learning_rate_stays_settable():
    tx = convert(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1, momentum=0.9))
    state = O.set_learning_rate(tx.init({"w": torch.zeros(2)}), 0.05)
    assert float(O.get_learning_rate(state)) == 0.05


def test_module_restricts_the_update_to_the_parameters_the_optimizer_holds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    reference = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    reference.load_state_dict(net.state_dict())
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    torch_opt = torch.optim.Adam(reference[2].parameters(), lr=0.05, weight_decay=0.1)  # the head only
    with pytest.warns(O.TorchConversionWarning, match="on the 2 of 4 parameter tensors it holds"):
        tx = O.from_torch(torch.optim.Adam(net[2].parameters(), lr=0.05, weight_decay=0.1), module=net)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    state = tx.init(params)
    for _ in range(5):
        torch_opt.zero_grad()
        nn.functional.mse_loss(reference(x), y).backward()
        torch_opt.step()  # torch.optim never touches reference[0]: it does not hold it
        grads = torch.func.grad(lambda p: nn.functional.mse_loss(torch.func.functional_call(net, p, (x,)), y))(params)
        updates, state = tx.update(grads, state, params)
        params = O.apply_updates(params, updates)
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name], p.detach(), rtol=TOL, atol=TOL)
    assert torch.equal(params["0.weight"], net[0].weight.detach())  # frozen, as in torch
    assert not torch.equal(params["2.weight"], net[2].weight.detach())
    with pytest.raises(ValueError, match="not parameters of the Linear"):
        convert(torch.optim.Adam(net.parameters()), module=net[0])
    with pytest.raises(TypeError, match="module must be an nn.Module"):
        convert(torch.optim.Adam(net.parameters()), module={"w": 1})


class MyAdam(torch.optim.Adam):
    pass


def test_optimizers_fnnet_cannot_express_are_errors_that_say_what_to_write():
    p = [nn.Parameter(torch.zeros(2))]
    for opt in (torch.optim.LBFGS(p), torch.optim.Adamax(p)):
        with pytest.raises(TypeError, match=rf"no equivalent of torch.optim.{type(opt).__name__}.*building blocks"):
            O.from_torch(opt)
    with pytest.raises(TypeError, match="a subclass of torch.optim.Adam"):
        O.from_torch(MyAdam(p))
    with pytest.raises(TypeError, match="expected a torch.optim.Optimizer"):
        O.from_torch(O.adam(0.1))
    with pytest.raises(ValueError, match=r"Adam\(amsgrad=True\) has no fnnet equivalent.*amsgrad=False"):
        O.from_torch(torch.optim.Adam(p, amsgrad=True))
    with pytest.raises(ValueError, match=r"AdamW\(amsgrad=True\)"):
        O.from_torch(torch.optim.AdamW(p, amsgrad=True))
    with pytest.raises(ValueError, match=r"SGD\(dampening=0.5\) has no fnnet equivalent.*dampening=0"):
        O.from_torch(torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5))
    q = [nn.Parameter(torch.zeros(3))]
    groups = torch.optim.SGD([{"params": p}, {"params": q, "lr": 0.01}], lr=0.1)
    with pytest.raises(ValueError, match=r"param groups 0 and 1 .* differ \(lr: 0.1 vs 0.01\).*masked"):
        O.from_torch(groups)


def test_scheduler_errors_name_the_fix():
    p = [nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(p, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"steps_per_epoch=len\(train_loader\).*callbacks="):
        convert(opt, scheduler=L.StepLR(opt, 1))
    with pytest.raises(ValueError, match="another optimizer"):
        convert(torch.optim.SGD(p, lr=0.1), scheduler=L.StepLR(opt, 1), steps_per_epoch=3)
    with pytest.raises(ValueError, match="only used with a scheduler"):
        convert(opt, steps_per_epoch=3)
    stepped = L.ExponentialLR(opt, 0.9)
    opt.step()
    stepped.step()
    with pytest.raises(ValueError, match="stepped 1 time"):
        O.schedule_from_torch(stepped)
    with pytest.raises(TypeError, match="ReduceLROnPlateau.*fnnet.callbacks.ReduceLROnPlateau"):
        O.schedule_from_torch(L.ReduceLROnPlateau(torch.optim.SGD(p, lr=0.1)))
    with pytest.raises(TypeError, match="LinearLR.*linear_schedule"):
        O.schedule_from_torch(L.LinearLR(torch.optim.SGD(p, lr=0.1)))
    with pytest.raises(TypeError, match="expected a torch.optim.lr_scheduler"):
        O.schedule_from_torch(O.step_lr(0.1, 1))
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        O.schedule_from_torch(L.OneCycleLR(torch.optim.SGD(p, lr=0.1, momentum=0.9), max_lr=1.0, total_steps=10))
    q = [nn.Parameter(torch.zeros(3))]
    two = torch.optim.SGD([{"params": p}, {"params": q, "lr": 0.01}], lr=0.1)
    with pytest.raises(ValueError, match="different initial learning rates"):
        O.schedule_from_torch(L.StepLR(two, 1))
    with pytest.raises(ValueError, match="steps_per_epoch must be an int >= 1"):
        O.schedule_from_torch(L.StepLR(torch.optim.SGD(p, lr=0.1), 1), steps_per_epoch=0)


# -- composite schedulers: SequentialLR and ChainedScheduler ------------------------------------------

COMPOSITES = [
    ("SequentialLR(StepLR, ExponentialLR)",
     lambda o: L.SequentialLR(o, [L.StepLR(o, 2, 0.5), L.ExponentialLR(o, 0.8)], milestones=[5])),
    ("SequentialLR(MultiStepLR, CosineAnnealingLR, LambdaLR)",
     lambda o: L.SequentialLR(o, [L.MultiStepLR(o, [1, 2], 0.5), L.CosineAnnealingLR(o, T_max=4, eta_min=0.01),
                                  L.LambdaLR(o, lambda e: 1.0 / (e + 1))], milestones=[3, 12])),
    ("SequentialLR(CosineAnnealingLR, StepLR) at milestone 1",
     lambda o: L.SequentialLR(o, [L.CosineAnnealingLR(o, T_max=3), L.StepLR(o, 3, 0.1)], milestones=[1])),
    ("ChainedScheduler(StepLR, ExponentialLR, MultiStepLR)",
     lambda o: L.ChainedScheduler([L.StepLR(o, 3, 0.5), L.ExponentialLR(o, 0.9), L.MultiStepLR(o, [4, 4, 9], 0.7)])),
    ("ChainedScheduler(CosineAnnealingLR) alone",
     lambda o: L.ChainedScheduler([L.CosineAnnealingLR(o, T_max=5, eta_min=0.02)])),
]


@pytest.mark.parametrize("name, make_sched", COMPOSITES, ids=[c[0] for c in COMPOSITES])
def test_composite_schedulers_equal_torch_for_many_steps(name, make_sched):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2, dtype=torch.float64))], lr=0.3)
    sched = make_sched(opt)
    schedule = O.schedule_from_torch(make_sched(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.3)))
    seen = []
    for k in range(30):
        expected = opt.param_groups[0]["lr"]
        seen.append(expected)
        assert schedule(k) == pytest.approx(expected, rel=1e-12, abs=1e-15), f"after {k} scheduler steps"
        assert float(schedule(torch.tensor(k))) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # SequentialLR's milestone step(0) is deprecated in torch
            sched.step()
    assert len({round(lr, 12) for lr in seen}) > 3


@pytest.mark.parametrize("name, make_sched", COMPOSITES[:2] + COMPOSITES[3:4], ids=[c[0] for c in COMPOSITES[:2] + COMPOSITES[3:4]])
def test_from_torch_with_a_composite_scheduler_trains_as_torch(name, make_sched):
    params = make_params(2)

    def make(ps):
        opt = torch.optim.Adam(ps, lr=0.05)
        return opt, make_sched(opt)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = torch_run(make, params, epochs=14, spe=3)
    opt, sched = make([nn.Parameter(p.clone()) for p in tree.leaves(params)])
    tx = convert(opt, scheduler=sched, steps_per_epoch=3)
    assert_same_run(fnnet_run(tx, params, 14 * 3), expected)


def test_composite_schedulers_fnnet_cannot_express_are_type_errors_naming_the_part():
    o = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1)
    with pytest.raises(TypeError, match=r"SequentialLR.*part 1 .*LinearLR.*linear_schedule"):
        O.schedule_from_torch(L.SequentialLR(o, [L.StepLR(o, 2), L.LinearLR(o)], milestones=[3]))
    with pytest.raises(TypeError, match=r"ChainedScheduler.*CosineAnnealingLR.*StepLR, MultiStepLR, ExponentialLR"):
        O.schedule_from_torch(L.ChainedScheduler([L.CosineAnnealingLR(o, 4), L.StepLR(o, 2)]))
    inner = L.ChainedScheduler([L.StepLR(o, 2), L.ExponentialLR(o, 0.9)])
    with pytest.raises(TypeError, match=r"ChainedScheduler inside a SequentialLR"):
        O.schedule_from_torch(L.SequentialLR(o, [L.ExponentialLR(o, 0.5), inner], milestones=[2]))
    chained = L.ChainedScheduler([L.StepLR(o, 2), L.ExponentialLR(o, 0.9)])
    o.step()
    chained.step()
    with pytest.raises(ValueError, match="stepped 1 time"):
        O.schedule_from_torch(chained)


def test_a_list_of_schedulers_is_a_type_error_that_names_the_combinators():
    p = [nn.Parameter(torch.zeros(2))]
    opt = torch.optim.SGD(p, lr=0.1)
    a, b = L.StepLR(opt, 2), L.ExponentialLR(opt, 0.9)
    with pytest.raises(TypeError, match=r"one torch scheduler, got a list of 2.*SequentialLR.*ChainedScheduler"):
        convert(opt, scheduler=[a, b], steps_per_epoch=3)
    with pytest.raises(TypeError, match=r"expected a torch.optim.lr_scheduler object.*got function"):
        convert(opt, scheduler=O.step_lr(0.1, 1), steps_per_epoch=3)


# -- from_torch without module=: the optimizer must hold every parameter it is used on -------------------


def test_without_module_an_optimizer_on_some_parameters_is_refused_at_init():
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    tx = convert(torch.optim.Adam(net[0].parameters(), lr=0.01))
    with pytest.raises(ValueError, match=r"holds 2 parameter tensors.*initialised with 4.*module=net"):
        tx.init(params)
    # the whole net, or the part it holds, is fine
    convert(torch.optim.Adam(net.parameters(), lr=0.01)).init(params)
    convert(torch.optim.Adam(net[0].parameters(), lr=0.01)).init({"w": params["0.weight"], "b": params["0.bias"]})
    with pytest.raises(ValueError, match=r"shapes"):
        convert(torch.optim.Adam(net[2].parameters(), lr=0.01)).init({"w": params["0.weight"], "b": params["0.bias"]})


# -- the aliases' errors for torch.optim's own arguments -----------------------------------------------


def test_torch_only_arguments_to_an_alias_say_what_fnnet_takes():
    with pytest.raises(TypeError, match=r"adam: maximize= is torch.optim's.*chain\(scale\(-1.0\), adam\(.*\)\)"):
        O.adam(0.01, maximize=True)
    with pytest.raises(TypeError, match=r"adam: betas= is torch.optim's.*b1=0.9, b2=0.99"):
        O.adam(0.01, betas=(0.9, 0.99))
    with pytest.raises(TypeError, match=r"sgd: lr= is torch.optim's.*first argument, learning_rate"):
        O.sgd(lr=0.1)
    with pytest.raises(TypeError, match=r"adamw: foreach= is torch.optim's"):
        O.adamw(0.01, foreach=False)
    with pytest.raises(TypeError, match=r"adam: b1 must be a Python number.*tensor.*float\(b1\)"):
        O.adam(0.01, b1=torch.tensor(0.9))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'nonsense'"):
        O.adam(0.01, nonsense=1)


# -- warnings name the user's line ---------------------------------------------------------------------


def test_the_conversion_warning_points_at_the_callers_line():
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        O.from_torch(torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=0.1))
        import fnnet

        net = nn.Linear(2, 1)
        fnnet.Trainer(net, nn.functional.mse_loss, torch.optim.SGD(net.parameters(), lr=0.1), devices="cpu")
    converted = [w for w in record if issubclass(w.category, O.TorchConversionWarning)]
    assert len(converted) == 2
    assert [w.filename for w in converted] == [__file__, __file__]
