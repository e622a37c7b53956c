import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import optim, recipes
from conftest import requires_cuda
from models import bn_net, chapter_cnn


def clone_tree(t):
    return fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)


def mlp_setup(seed=0):
    torch.manual_seed(seed)
    model = fnnet.functional(nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)))
    x = torch.randn(32, 3)
    y = x.sum(1, keepdim=True)

    def loss_fn(params, batch):
        xb, yb = batch
        return F.mse_loss(model.apply(params, xb), yb)

    return model, loss_fn, (x, y)


def test_step_trains_and_reports_loss_on_device():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.05)
    state = fnnet.TrainState.create(model.params, opt)
    step = fnnet.make_train_step(loss_fn, opt)
    first = None
    for _ in range(50):
        state, metrics = step(state, batch)
        first = first if first is not None else float(metrics["loss"])
    assert state.step == 50
    assert isinstance(metrics["loss"], torch.Tensor) and metrics["loss"].ndim == 0
    assert float(metrics["loss"]) < 0.2 * first


def test_step_matches_hand_written_torch_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    model = fnnet.functional(net)
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 1, dtype=torch.float64)
    torch_opt = torch.optim.Adam(net.parameters(), lr=0.01, foreach=False)
    opt = optim.adam(0.01)
    state = fnnet.TrainState.create(model.params, opt)
    step = fnnet.make_train_step(lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]), opt)
    for _ in range(20):
        torch_opt.zero_grad()
        F.mse_loss(net(x), y).backward()
        torch_opt.step()
        state, _ = step(state, (x, y))
    for name, p in net.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-10, atol=1e-12)


def test_step_is_pure_without_donation():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.1)
    state = fnnet.TrainState.create(model.params, opt)
    state, _ = fnnet.make_train_step(loss_fn, opt)(state, batch)  # a non-trivial opt_state
    before = clone_tree(state)
    batch_before = clone_tree(batch)
    new_state, _ = fnnet.make_train_step(loss_fn, opt)(state, batch)
    assert fnnet.tree.all_equal(state, before)
    assert fnnet.tree.all_equal(batch, batch_before)
    assert not fnnet.tree.all_equal(new_state.params, before.params)


def test_donated_step_reuses_buffers_and_matches_pure_step():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.1)
    pure = fnnet.make_train_step(loss_fn, opt)
    donated = fnnet.make_train_step(loss_fn, opt, donate=True)
    s1 = fnnet.TrainState.create(model.params, opt)
    s2 = fnnet.TrainState.create(clone_tree(model.params), opt)
    for _ in range(3):
        s1, _ = pure(s1, batch)
        ptrs = {k: v.data_ptr() for k, v in s2.params.items()}
        s2, _ = donated(s2, batch)
        assert {k: v.data_ptr() for k, v in s2.params.items()} == ptrs  # written in place
    for k in s1.params:
        torch.testing.assert_close(s1.params[k], s2.params[k], rtol=1e-6, atol=1e-7)


def test_aux_metrics_and_return_forms():
    model, _, batch = mlp_setup()
    opt = optim.sgd(0.1)

    def with_aux(params, b):
        out = model.apply(params, b[0])
        return F.mse_loss(out, b[1]), {"mae": (out - b[1]).abs().mean(), "n": 32}

    state = fnnet.TrainState.create(model.params, opt)
    _, metrics = fnnet.make_train_step(with_aux, opt)(state, batch)
    assert set(metrics) == {"loss", "mae", "n"} and int(metrics["n"]) == 32

    with pytest.raises(TypeError, match="scalar"):
        fnnet.make_train_step(lambda p, b: model.apply(p, b[0]), opt)(state, batch)
    with pytest.raises(TypeError, match="length 3"):
        fnnet.make_train_step(lambda p, b: (1, 2, 3), opt)(state, batch)
    with pytest.raises(ValueError, match="'loss'"):
        fnnet.make_train_step(lambda p, b: (F.mse_loss(model.apply(p, b[0]), b[1]), {"loss": 1}), opt)(state, batch)
    with pytest.raises(TypeError, match="TrainState"):
        fnnet.make_train_step(with_aux, opt)({"params": 1}, batch)
    with pytest.raises(ValueError, match="precision"):
        fnnet.make_train_step(with_aux, opt, precision="8")


def test_nonfinite_loss_is_reported_not_hidden():
    model, _, (x, y) = mlp_setup()
    opt = optim.sgd(0.1)
    state = fnnet.TrainState.create(model.params, opt)
    step = fnnet.make_train_step(lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]), opt)
    _, metrics = step(state, (x, torch.full_like(y, float("nan"))))
    assert not torch.isfinite(metrics["loss"])


def test_buffers_and_keys_reach_the_loss():
    torch.manual_seed(0)
    model = fnnet.functional(bn_net())
    opt = optim.sgd(0.1)
    loss_fn = fnnet.supervised_loss(model, F.cross_entropy)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    state = fnnet.TrainState.create(model.params, opt, buffers=model.buffers)
    before = clone_tree(state.buffers)
    state, metrics = fnnet.make_train_step(loss_fn, opt)(state, (x, y))
    assert int(state.buffers["1.num_batches_tracked"]) == 1
    assert not torch.equal(state.buffers["1.running_mean"], before["1.running_mean"])
    assert metrics["outputs"].shape == (16, 3)

    def plain(params, batch):
        return F.cross_entropy(model.apply(params, batch[0]), batch[1])

    with pytest.raises(TypeError, match="buffers"):
        fnnet.make_train_step(plain, opt)(state, (x, y))


def test_dropout_under_the_state_key_is_reproducible():
    torch.manual_seed(0)
    model = fnnet.functional(chapter_cnn())
    opt = optim.adam(1e-3)
    loss_fn = fnnet.supervised_loss(model, F.cross_entropy)
    batch = (torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)))
    step = fnnet.make_train_step(loss_fn, opt)
    runs = []
    for seed in (0, 0, 1):
        state = fnnet.TrainState.create(model.params, opt, key=fnnet.random.key(seed))
        for _ in range(2):
            state, m = step(state, batch)
        runs.append(state)
    assert fnnet.tree.all_equal(runs[0].params, runs[1].params)
    assert not fnnet.tree.all_equal(runs[0].params, runs[2].params)
    assert runs[0].key == runs[1].key != fnnet.random.key(0)
    with pytest.raises(ValueError, match="needs key"):
        step(fnnet.TrainState.create(model.params, opt), batch)


def test_eval_step_does_not_update():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.1)
    state = fnnet.TrainState.create(model.params, opt)
    before = clone_tree(state)
    metrics = fnnet.make_eval_step(loss_fn)(state, batch)
    assert fnnet.tree.all_equal(state, before)
    torch.testing.assert_close(metrics["loss"], loss_fn(model.params, batch))


@pytest.mark.parametrize("precision, low", [("bf16", torch.bfloat16), ("16-mixed", torch.float16),
                                             ("32", torch.float32)])
def test_precision_autocasts_inside_the_step_and_keeps_float32_master_params(precision, low):
    model, _, batch = mlp_setup()
    seen = []

    def loss_fn(params, b):
        out = model.apply(params, b[0])
        seen.append(out.dtype)  # the activation's dtype, inside the step
        return F.mse_loss(out.float(), b[1])

    opt = optim.adam(0.05)
    state = fnnet.TrainState.create(model.params, opt)
    step = fnnet.make_train_step(loss_fn, opt, precision=precision)
    grads = fnnet.make_grad_fn(loss_fn, precision=precision)(state.params, batch).grads
    first = None
    for _ in range(30):
        state, m = step(state, batch)
        first = first if first is not None else float(m["loss"])
    assert set(seen) == {low}  # autocast really ran the forward in the low precision
    assert all(g.dtype == torch.float32 for g in grads.values())  # gradients reach the master dtype
    assert all(v.dtype == torch.float32 for v in state.params.values())
    assert all(v.dtype == torch.float32 for v in fnnet.tree.leaves(state.opt_state[0].mu))
    assert m["loss"].dtype == torch.float32
    assert float(m["loss"]) < first


def test_fp16_loss_scaling_skips_overflowing_steps():
    params = {"p": torch.ones(3)}
    opt = optim.sgd(0.1)

    def huge(params, batch):
        return (params["p"] * batch).sum()

    step = fnnet.make_train_step(huge, opt, precision="16-mixed")
    state = fnnet.TrainState.create(params, opt, loss_scale=fnnet.DynamicScale.create(period=2))
    # 1e36 * scale 32768 overflows float32: the step is skipped and the scale halves
    state, _ = step(state, torch.full((3,), 1e36))
    assert torch.equal(state.params["p"], torch.ones(3))
    assert float(state.loss_scale.scale) == 2.0**14
    # finite steps apply the unscaled gradient; after `period` good steps the scale doubles
    state, _ = step(state, torch.ones(3))
    torch.testing.assert_close(state.params["p"], torch.full((3,), 0.9))
    state, _ = step(state, torch.ones(3))
    assert float(state.loss_scale.scale) == 2.0**15
    assert int(state.loss_scale.good_steps) == 0


def test_jit_matches_eager_and_compiles_once_per_shape():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model, loss_fn, (x, y) = mlp_setup()
    opt = optim.adam(0.05)
    eager = fnnet.make_train_step(loss_fn, opt)
    jitted = fnnet.make_train_step(loss_fn, opt, jit=True, donate=True)
    s_eager = fnnet.TrainState.create(model.params, opt)
    s_jit = fnnet.TrainState.create(clone_tree(model.params), opt)
    frames = counters["stats"]["unique_graphs"]
    for _ in range(4):
        s_eager, m_eager = eager(s_eager, (x, y))
        s_jit, m_jit = jitted(s_jit, (x, y))
    after_full = counters["stats"]["unique_graphs"]
    for k in s_eager.params:
        torch.testing.assert_close(s_jit.params[k], s_eager.params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m_jit["loss"], m_eager["loss"], rtol=1e-5, atol=1e-6)
    # the last, smaller batch of an epoch compiles once more; then both shapes are reused
    s_jit, _ = jitted(s_jit, (x[:10], y[:10]))
    after_small = counters["stats"]["unique_graphs"]
    for _ in range(2):
        s_jit, _ = jitted(s_jit, (x, y))
        s_jit, _ = jitted(s_jit, (x[:10], y[:10]))
    assert after_full - frames >= 1
    assert counters["stats"]["unique_graphs"] == after_small
    assert after_small - after_full <= after_full - frames


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.cuda, requires_cuda])])
def test_chapter_linear_regression_recovers_w_and_b(device, tmp_path):
    result = recipes.train_linreg(n=1_000_000, epochs=500, device=device, verbose=0, out=tmp_path)
    assert abs(result["w"][0] - 2.0) < 0.05 and abs(result["w"][1] + 3.0) < 0.05
    assert abs(result["b"] - 10.0) < 0.05
    assert abs(result["loss"] - 4.0) < 0.05
    # --out is honoured: the final state, the loss per epoch and its plot
    state = fnnet.load(tmp_path / "linreg.safetensors")
    assert torch.equal(state.params["w"].flatten(), torch.tensor(result["w"]))
    rows = (tmp_path / "history.csv").read_text().strip().splitlines()
    assert rows[0] == "epoch,loss" and len(rows) == 501 and float(rows[-1].split(",")[1]) == pytest.approx(result["loss"])
    assert (tmp_path / "history.png").stat().st_size > 0


@pytest.mark.cuda
@requires_cuda
def test_cuda_step_keeps_everything_on_device_and_matches_cpu():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.05)
    step = fnnet.make_train_step(loss_fn, opt, donate=True)
    s_cpu = fnnet.TrainState.create(clone_tree(model.params), opt)
    s_gpu = fnnet.TrainState.create(fnnet.place(model.params, "cuda"), opt)
    gb = fnnet.place(batch, "cuda")
    for _ in range(5):
        s_cpu, _ = step(s_cpu, batch)
        s_gpu, m = step(s_gpu, gb)
    assert m["loss"].is_cuda
    assert all(t.is_cuda for t in fnnet.tree.leaves(s_gpu.opt_state) if isinstance(t, torch.Tensor))
    for k in s_cpu.params:
        torch.testing.assert_close(s_gpu.params[k].cpu(), s_cpu.params[k], rtol=1e-4, atol=1e-5)


RESUME = textwrap.dedent(
    """
    import sys, torch, torch.nn.functional as F
    import fnnet
    from fnnet import optim
    mode, path = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    model = fnnet.functional(fnnet.models.CnnModel())
    g = torch.Generator().manual_seed(1)
    X, y = torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g)
    loader = fnnet.ArrayLoader((X, y), 16, shuffle=True, key=fnnet.random.key(3))
    opt = optim.adam(1e-3)
    step = fnnet.make_train_step(fnnet.supervised_loss(model, F.cross_entropy), opt)
    state = fnnet.TrainState.create(model.params, opt, key=fnnet.random.key(4))

    def run(state, epochs):
        for _ in range(epochs):
            loader.set_epoch(state.step // len(loader))
            for batch in loader:
                state, _ = step(state, batch)
        return state

    if mode == "full":
        state = run(state, 4)
    elif mode == "first":
        state = run(state, 2)
    else:
        state = fnnet.load(path, like=state)
        state = run(state, 2)
    fnnet.save(path if mode == "first" else path + "." + mode, state)
    """
)


def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    script = tmp_path / "resume.py"
    script.write_text(RESUME)
    ckpt = str(tmp_path / "state.safetensors")
    for mode in ("full", "first", "second"):
        subprocess.run([sys.executable, str(script), mode, ckpt], check=True, timeout=300)
    full = fnnet.load(ckpt + ".full")
    resumed = fnnet.load(ckpt + ".second")
    assert full.step == resumed.step == 12
    assert fnnet.tree.all_equal(full, resumed)


# -- the seam: the gradient function and the update ------------------------------------------------


def test_grad_fn_then_apply_gradients_is_the_train_step():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.05)
    grad_fn = fnnet.make_grad_fn(loss_fn)
    by_hand = fnnet.TrainState.create(model.params, opt)
    state = fnnet.TrainState.create(model.params, opt)
    step = fnnet.make_train_step(loss_fn, opt)
    for _ in range(5):
        grads, loss, aux, buffers = grad_fn(by_hand.params, batch)
        by_hand = by_hand.apply_gradients(grads, opt, buffers=buffers)
        state, metrics = step(state, batch)
        assert torch.equal(loss, metrics["loss"]) and aux == {} and buffers is None
    assert fnnet.tree.all_equal(by_hand, state)  # bit for bit: the step is exactly the composition
    # the gradients are torch's
    out = grad_fn(state.params, batch)
    assert isinstance(out, fnnet.GradResult)
    params = {k: v.clone().requires_grad_(True) for k, v in state.params.items()}
    expected = torch.autograd.grad(loss_fn(params, batch), list(params.values()))
    for g, e in zip(out.grads.values(), expected):
        torch.testing.assert_close(g, e)


def test_grad_fn_returns_unscaled_gradients_under_a_loss_scale():
    model, loss_fn, batch = mlp_setup()
    grad_fn = fnnet.make_grad_fn(loss_fn)
    plain = grad_fn(model.params, batch).grads
    scaled = grad_fn(model.params, batch, loss_scale=fnnet.DynamicScale.create(initial_scale=1024.0)).grads
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=1e-6, atol=1e-7)


def test_apply_gradients_skips_a_nonfinite_update_and_still_counts_the_step():
    model, loss_fn, batch = mlp_setup()
    opt = optim.adam(0.05)
    for donate in (False, True):
        state = fnnet.TrainState.create(clone_tree(model.params), opt)
        state, _ = fnnet.make_train_step(loss_fn, opt)(state, batch)
        before = clone_tree(state)
        grads = fnnet.tree.map(lambda p: torch.full_like(p, float("nan")), state.params)
        finite = fnnet.all_finite(grads)
        assert finite.dtype == torch.bool and not bool(finite)
        new = state.apply_gradients(grads, opt, finite=finite, donate=donate)
        assert new.step == before.step + 1
        assert fnnet.tree.all_equal(new.params, before.params) and fnnet.tree.all_equal(new.opt_state, before.opt_state)
        good = fnnet.tree.map(torch.ones_like, state.params)
        moved = new.apply_gradients(good, opt, finite=fnnet.all_finite(good), donate=donate)
        assert not fnnet.tree.all_equal(moved.params, before.params)


@pytest.mark.slow
def test_compiled_step_skips_nonfinite_updates_on_the_device_with_donation():
    """Inside torch.compile the skip is a select on the device (the path accelerators take)."""
    model, _, (x, y) = mlp_setup()

    def loss_fn(params, batch):
        xb, yb, poison = batch
        # finite loss; with poison = 0 the weight's gradient is 0 * inf = nan (d sqrt(x) at 0), as in the issue
        return F.mse_loss(model.apply(params, xb), yb) + 0.0 * torch.sqrt((params["0.weight"] * poison).abs()).sum()

    opt = optim.adam(0.05)
    compiled = fnnet.make_train_step(loss_fn, opt, jit=True, donate=True, skip_nonfinite=True)
    eager = fnnet.make_train_step(loss_fn, opt, donate=True, skip_nonfinite=True)
    states = [fnnet.TrainState.create(clone_tree(model.params), opt) for _ in range(2)]
    ok, bad = torch.ones(1), torch.zeros(1)
    for poison in (ok, bad, ok, bad, bad, ok):
        ptrs = {k: v.data_ptr() for k, v in states[0].params.items()}
        states[0], m0 = compiled(states[0], (x, y, poison))
        states[1], m1 = eager(states[1], (x, y, poison))
        assert bool(m0["finite"]) == bool(m1["finite"]) == (poison is ok)
        assert {k: v.data_ptr() for k, v in states[0].params.items()} == ptrs  # donated: in place
        assert bool(fnnet.all_finite(states[0])) and bool(fnnet.all_finite(states[1]))
    for k in states[0].params:
        torch.testing.assert_close(states[0].params[k], states[1].params[k], rtol=1e-5, atol=1e-6)
    assert int(states[0].opt_state[0].count) == int(states[1].opt_state[0].count) == 3  # three real updates


def test_predict_step_runs_in_eval_mode_and_precision():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5))
    model = fnnet.functional(net)
    state = fnnet.TrainState.create(model.params, optim.sgd(0.1), buffers=model.buffers)
    x = torch.randn(8, 3)
    predict = fnnet.make_predict_step(lambda p, b, buffers=None: model.apply(p, b, buffers=buffers))
    torch.testing.assert_close(predict(state, x), net.eval()(x))
    bf16 = fnnet.make_predict_step(lambda p, b, buffers=None: model.apply(p, b, buffers=buffers), precision="bf16")
    out = bf16(state, x)
    assert out.dtype == torch.float32  # computed in bfloat16, returned as float32
    torch.testing.assert_close(out, net(x), rtol=2e-2, atol=2e-2)
    with pytest.raises(TypeError, match="TrainState"):
        predict(state.params, x)


def test_a_subclass_of_train_state_survives_every_step():
    import dataclasses

    @fnnet.tree.register_dataclass
    @dataclasses.dataclass(frozen=True)
    class MyState(fnnet.TrainState):
        note: str = "mine"

    model, loss_fn, batch = mlp_setup()
    opt = optim.sgd(0.1)
    start = MyState(model.params, opt.init(model.params), note="kept")
    for step, updates in ((fnnet.make_train_step(loss_fn, opt), 2),
                          (fnnet.make_train_step(loss_fn, opt, devices=["cpu", "cpu"]), 2),
                          (fnnet.make_train_step(loss_fn, opt, accumulate=2), 1)):
        state = start
        for _ in range(2):
            state, _ = step(state, batch)
        assert type(state) is MyState and state.note == "kept" and state.step == updates
    grads = fnnet.make_grad_fn(loss_fn)(start.params, batch).grads
    applied = start.apply_gradients(grads, opt)
    assert type(applied) is MyState and applied.note == "kept" and applied.step == 1


def test_train_state_replace_matches_dataclasses_replace_and_leaves_the_state_alone():
    import dataclasses

    params, opt = {"w": torch.ones(2)}, optim.sgd(0.1)
    state = fnnet.TrainState.create(params, opt, key=fnnet.random.key(0))
    for changes in ({}, {"step": 3}, {"params": {"w": torch.zeros(2)}, "buffers": {"b": torch.ones(1)}},
                    {"key": None, "accum": None, "loss_scale": None, "opt_state": ()}):
        new = state.replace(**changes)
        ref = dataclasses.replace(state, **changes)
        assert type(new) is fnnet.TrainState
        assert all(getattr(new, f.name) is getattr(ref, f.name) for f in dataclasses.fields(ref))
    assert state.step == 0 and state.params is params  # the input is untouched
    with pytest.raises(TypeError, match="bogus"):
        state.replace(bogus=1)
