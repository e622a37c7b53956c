"""fnnet.parallel: scatter/replicate/gather/reduce_mean laws, and the data-parallel step equal to one device.

On a CPU-only machine the devices repeat (``["cpu", "cpu", "cpu"]``): every code path runs
but the copies between devices, which the CUDA-marked tests cover where a GPU exists.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fnnet
from fnnet import optim, parallel
from conftest import requires_cuda

CPU3 = ["cpu", "cpu", "cpu"]


# -- the primitives -----------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), k=st.integers(1, 6), width=st.integers(1, 4), layout=st.sampled_from(["tuple", "dict", "nested"]))
def test_scatter_splits_into_contiguous_near_equal_shards_and_gather_undoes_it(n, k, width, layout):
    g = torch.Generator().manual_seed(n * 7 + k)
    x, y = torch.randn(n, width, generator=g), torch.randint(0, 5, (n,), generator=g)
    batch = {"tuple": (x, y), "dict": {"x": x, "y": y, "tag": "keep"}, "nested": {"in": [x, {"z": x * 2}], "y": y}}[layout]
    shards = parallel.scatter(batch, ["cpu"] * k)
    sizes = [len(fnnet.tree.leaves(s)[-1]) for s in shards]  # the y leaf (sorted last or at the end)
    assert len(shards) == min(n, k) and sum(sizes) == n and max(sizes) - min(sizes) <= 1 and min(sizes) >= 1
    assert sizes == parallel.shard_sizes(n, k)
    assert all(fnnet.tree.structure(s) == fnnet.tree.structure(batch) for s in shards)
    if layout == "dict":  # a leaf that is not a tensor goes to every shard as it is
        assert all(s["tag"] == "keep" for s in shards)
        shards = [{"x": s["x"], "y": s["y"]} for s in shards]
        batch = {"x": x, "y": y}
    assert fnnet.tree.all_equal(parallel.gather(shards, "cpu"), batch)


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.integers(1, 9), min_size=1, max_size=5), seed=st.integers(0, 99))
def test_reduce_mean_is_the_weighted_mean(weights, seed):
    g = torch.Generator().manual_seed(seed)
    trees = [{"w": torch.randn(3, 2, generator=g, dtype=torch.float64), "n": torch.tensor(4)} for _ in weights]
    before = fnnet.tree.map(torch.clone, trees)
    out = parallel.reduce_mean(trees, weights, "cpu")
    assert fnnet.tree.all_equal(trees, before)  # pure unless donated
    expected = sum(w * t["w"] for w, t in zip(weights, trees)) / sum(weights)
    torch.testing.assert_close(out["w"], expected, rtol=1e-14, atol=1e-14)
    donated = parallel.reduce_mean(trees, weights, "cpu", donate=True)
    assert donated["w"] is trees[0]["w"] and torch.equal(donated["w"], out["w"])  # written into the first tree
    assert int(out["n"]) == 4  # non-floating leaves come from the first tree
    assert [r for r in parallel.replicate(trees[0], ["cpu", "cpu"])][0]["w"] is trees[0]["w"]  # no copy where it lives


def test_scatter_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match=r"same first dimension.*'0': 4, '1': 3"):
        parallel.scatter((torch.zeros(4, 2), torch.zeros(3)), CPU3)
    with pytest.raises(ValueError, match="empty"):
        parallel.scatter((torch.zeros(0, 2),), CPU3)
    with pytest.raises(ValueError, match="no tensor"):
        parallel.scatter({"a": "text"}, CPU3)
    with pytest.raises(ValueError, match="devices here"):
        parallel.scatter((torch.zeros(4),), ["cpu", "tpu:0"])


def test_device_requests():
    assert [str(d) for d in fnnet.parse_devices(["cpu", "cpu"])] == ["cpu", "cpu"]  # names may repeat
    with pytest.raises(ValueError, match="devices here"):
        fnnet.parse_devices(["cpu", "cuda:7"])
    with pytest.raises(ValueError, match="must be a non-empty list"):
        parallel.make_train_step(lambda p, b: b.sum(), optim.sgd(0.1), "cpu")


# -- the data-parallel step equals the single-device step ----------------------------------------------


def _mlp(dtype):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).to(dtype)


def _run(model, opt, batches, devices, **kw):
    loss = lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1])  # noqa: E731
    state = fnnet.TrainState.create(fnnet.tree.map(torch.clone, model.params), opt)
    step = fnnet.make_train_step(loss, opt, devices=devices, **kw)
    losses = []
    for b in batches:
        state, metrics = step(state, b)
        losses.append(metrics["loss"])
    return state, losses


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("make_opt", [lambda: optim.adam(0.01), lambda: optim.sgd(0.05, momentum=0.9)], ids=["adam", "sgd"])
@pytest.mark.parametrize("donate", [False, True])
def test_data_parallel_step_equals_one_device(dtype, tol, make_opt, donate):
    model = fnnet.functional(_mlp(dtype))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, generator=g, dtype=dtype), torch.randn(n, 2, generator=g, dtype=dtype))
               for n in (17, 12, 2, 30, 1, 9)]  # uneven, smaller than the device count, a single sample
    single, single_losses = _run(model, make_opt(), batches, None, donate=donate)
    dp, dp_losses = _run(model, make_opt(), batches, CPU3, donate=donate)
    for k in single.params:
        torch.testing.assert_close(dp.params[k], single.params[k], rtol=tol, atol=tol)
    # the reported loss is float32 whatever the params' dtype (as on one device)
    torch.testing.assert_close(torch.stack(dp_losses), torch.stack(single_losses), rtol=1e-6, atol=1e-6)
    assert dp.step == single.step == len(batches)
    assert fnnet.tree.structure(dp) == fnnet.tree.structure(single)


def test_batchnorm_shards_normalise_alone_and_the_running_mean_is_the_whole_batchs():
    torch.manual_seed(0)
    model = fnnet.functional(nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2)).double())
    loss_fn = fnnet.supervised_loss(model, F.mse_loss)
    opt = optim.adam(0.01)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(11, 3, generator=g, dtype=torch.float64), torch.randn(11, 2, generator=g, dtype=torch.float64)
    dp = fnnet.make_train_step(loss_fn, opt, devices=CPU3)
    state = fnnet.TrainState.create(model.params, opt, buffers=model.buffers)
    new, metrics = dp(state, (x, y))
    # reference: each shard on one device, on its own (what nn.DataParallel and DDP do), weighted by size
    grad_fn = fnnet.make_grad_fn(loss_fn)
    sizes = parallel.shard_sizes(11, 3)
    parts, start = [], 0
    for n in sizes:
        parts.append(grad_fn(model.params, (x[start:start + n], y[start:start + n]), model.buffers))
        start += n
    grads = parallel.reduce_mean([p.grads for p in parts], sizes, "cpu")
    expected = state.apply_gradients(grads, opt, buffers=parallel.reduce_mean([p.buffers for p in parts], sizes, "cpu"))
    for k in new.params:
        torch.testing.assert_close(new.params[k], expected.params[k], rtol=1e-12, atol=1e-12)
    for k in new.buffers:
        torch.testing.assert_close(new.buffers[k], expected.buffers[k], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(metrics["outputs"], torch.cat([p.aux["outputs"] for p in parts]))
    # the running mean is the whole batch's, exactly as on one device
    whole = grad_fn(model.params, (x, y), model.buffers).buffers
    torch.testing.assert_close(new.buffers["1.running_mean"], whole["1.running_mean"], rtol=1e-12, atol=1e-12)
    assert int(new.buffers["1.num_batches_tracked"]) == 1


def test_dropout_keys_differ_per_shard_and_the_same_key_repeats_the_run():
    torch.manual_seed(0)
    model = fnnet.functional(nn.Sequential(nn.Linear(4, 32), nn.Dropout(0.5), nn.Linear(32, 1)))
    loss_fn = fnnet.supervised_loss(model, F.mse_loss)
    x, y = torch.ones(8, 4), torch.zeros(8, 1)  # identical samples: only the dropout masks tell shards apart
    step = fnnet.make_train_step(loss_fn, optim.sgd(0.1), devices=["cpu", "cpu"])
    runs = []
    for _ in range(2):
        state = fnnet.TrainState.create(model.params, optim.sgd(0.1), key=fnnet.random.key(7))
        state, m = step(state, (x, y))
        runs.append((state, m))
    assert fnnet.tree.all_equal(runs[0][0].params, runs[1][0].params)
    out = runs[0][1]["outputs"]
    assert not torch.equal(out[:4], out[4:])  # shard 0 and shard 1 drew different masks
    other = fnnet.TrainState.create(model.params, optim.sgd(0.1), key=fnnet.random.key(8))
    assert not fnnet.tree.all_equal(step(other, (x, y))[0].params, runs[0][0].params)


def test_eval_and_predict_over_devices_gather_in_batch_order():
    model = fnnet.functional(_mlp(torch.float32))
    loss_fn = fnnet.supervised_loss(model, F.mse_loss)
    state = fnnet.TrainState.create(model.params, optim.sgd(0.1))
    x, y = torch.randn(10, 3), torch.randn(10, 2)
    one = fnnet.make_eval_step(loss_fn)(state, (x, y))
    many = fnnet.make_eval_step(loss_fn, devices=CPU3)(state, (x, y))
    torch.testing.assert_close(many["loss"], one["loss"])
    torch.testing.assert_close(many["outputs"], one["outputs"])
    predict = fnnet.make_predict_step(lambda p, b: model.apply(p, b), devices=CPU3)
    torch.testing.assert_close(predict(state, x), model.apply(model.params, x))


def test_trainer_on_several_devices_equals_one_device_and_checkpoints_move_between_them(tmp_path):
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(70, 3, generator=g), torch.randint(0, 2, (70,), generator=g)

    def trainer(devices):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 2)).double()
        return fnnet.Trainer(net, F.cross_entropy, optim.adam(0.05), devices=devices,
                             metrics={"accuracy": fnnet.metrics.accuracy})

    data = lambda: fnnet.ArrayLoader((x.double(), y), 16, shuffle=True, key=fnnet.random.key(1))  # noqa: E731
    one, three = trainer("cpu"), trainer(CPU3)
    h1 = one.fit(data(), data(), epochs=3, verbose=0)
    h3 = three.fit(data(), data(), epochs=3, verbose=0)
    for k in ("accuracy", "val_accuracy"):  # exact: the same predictions, counted the same way
        assert h3[k] == h1[k], k
    for k in ("loss", "val_loss"):  # float32 losses, averaged by shard size
        assert h3[k] == pytest.approx(h1[k], rel=1e-6), k
    for k in one.state.params:
        torch.testing.assert_close(three.state.params[k], one.state.params[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(three.predict(x.double()), one.predict(x.double()), rtol=1e-10, atol=1e-12)
    three.save(tmp_path / "dp.safetensors")
    back = trainer("cpu").load(tmp_path / "dp.safetensors")
    assert fnnet.tree.all_equal(back.state, three.state) and back.epoch == 3
    one.save(tmp_path / "one.safetensors")
    assert fnnet.tree.all_equal(trainer(CPU3).load(tmp_path / "one.safetensors").state, one.state)


def test_shards_in_threads_are_deterministic():
    model = fnnet.functional(_mlp(torch.float32))
    x, y = torch.randn(64, 3), torch.randn(64, 2)
    results = [_run(model, optim.adam(0.01), [(x, y)] * 3, ["cpu"] * 4)[0] for _ in range(3)]
    assert all(fnnet.tree.all_equal(r.params, results[0].params) for r in results)


def test_load_state_dict_strips_the_data_parallel_prefix(tmp_path):
    net = _mlp(torch.float32)
    torch.save(nn.DataParallel(net).state_dict(), tmp_path / "dp.pt")  # the chapter's mistake: keys "module.0.weight"
    with pytest.warns(UserWarning, match="module.*stripped"):
        sd = fnnet.load_state_dict(tmp_path / "dp.pt")
    assert set(sd) == set(net.state_dict())
    fresh = _mlp(torch.float32)
    fresh.load_state_dict(sd)


# -- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("devices", [["cuda:0", "cuda:0"], ["cpu", "cuda:0"], ["cuda:0", "cpu"], "all"])
def test_data_parallel_on_gpus_equals_one_device(devices):
    if devices == "all":
        devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] * (2 if torch.cuda.device_count() == 1 else 1)
    model = fnnet.functional(_mlp(torch.float64))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randn(n, 2, generator=g, dtype=torch.float64))
               for n in (17, 12, 3)]
    primary = torch.device(devices[0])
    model_on = fnnet.functional(_mlp(torch.float64).to(primary))
    single, _ = _run(model_on, optim.adam(0.01), [fnnet.place(b, primary) for b in batches], None)
    dp, _ = _run(model_on, optim.adam(0.01), [fnnet.place(b, primary) for b in batches], devices, donate=True)
    for k in single.params:
        assert dp.params[k].device == primary
        torch.testing.assert_close(dp.params[k], single.params[k], rtol=1e-10, atol=1e-10)
    assert model  # built on the CPU too


def test_a_per_batch_scalar_aux_is_weighted_by_shard_size_on_an_uneven_batch():
    """A scalar aux (a per-batch mean) over shards of 3, 2 and 2 samples equals the one-device value."""
    model = fnnet.functional(_mlp(torch.float64))

    def loss_fn(p, b):
        out = model.apply(p, b[0])
        per_sample = ((out - b[1]) ** 2).mean(dim=1)
        return per_sample.mean(), {"abs_mean": out.abs().mean(), "first_out": out[:, 0]}

    g = torch.Generator().manual_seed(7)
    batch = (torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randn(7, 2, generator=g, dtype=torch.float64))
    opt = optim.sgd(0.1)
    one = fnnet.make_train_step(loss_fn, opt)
    three = fnnet.make_train_step(loss_fn, opt, devices=["cpu", "cpu", "cpu"])
    _, m1 = one(fnnet.TrainState.create(model.params, opt), batch)
    _, m3 = three(fnnet.TrainState.create(model.params, opt), batch)
    torch.testing.assert_close(m3["abs_mean"], m1["abs_mean"], rtol=1e-12, atol=1e-12)  # weighted 3/7, 2/7, 2/7
    torch.testing.assert_close(m3["first_out"], m1["first_out"], rtol=1e-12, atol=1e-12)  # gathered in order
    torch.testing.assert_close(m3["loss"], m1["loss"], rtol=1e-6, atol=1e-7)  # the step reports a float32 loss


def test_a_sharded_state_is_cut_by_key_path_when_two_parameters_share_a_shape():
    """``weight`` and ``a.weight``, the same shape: each optimizer-state leaf gets the range of its own
    parameter (the longer name is matched first), on every rank of a layout."""
    from fnnet import shard

    params = {"weight": torch.arange(4.0), "a.weight": torch.arange(4.0) + 10}
    opt = optim.adam(0.1)
    whole = opt.init(params)
    whole = (whole[0]._replace(mu=fnnet.tree.map(lambda x: x + 100, params), nu=fnnet.tree.map(lambda x: x + 200, params)),
             whole[1])
    for rank in (0, 1):
        lay = shard.layout(params, 2, rank, 25.0)
        cut = shard.shard_opt_state(whole, params, lay)
        for field, offset in (("mu", 100), ("nu", 200)):
            want = lay.part(fnnet.tree.map(lambda x: x + offset, params))
            for k in params:
                assert torch.equal(getattr(cut[0], field)[k], want[k]), (rank, field, k)
        assert sum(getattr(cut[0], "mu")[k].numel() for k in params) == 4  # half of 8 elements on each rank
