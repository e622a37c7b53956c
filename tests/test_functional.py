import pytest
import torch
from torch import nn
import torch.nn.functional as F

import fnnet
from conftest import requires_cuda
from models import bn_net, chapter_cnn


def clone_all(d):
    return {k: v.clone() for k, v in d.items()}


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_params_keyed_like_state_dict_and_load_back():
    torch.manual_seed(0)
    net = chapter_cnn()
    model = fnnet.functional(net)
    assert set(model.params) | set(model.buffers) == set(net.state_dict())
    fresh = chapter_cnn()
    fresh.load_state_dict({**model.params, **model.buffers})
    for (k, v), (_, w) in zip(fresh.state_dict().items(), net.state_dict().items()):
        assert torch.equal(v, w), k


def test_cnn_apply_equals_module_eval_and_is_pure():
    torch.manual_seed(0)
    net = chapter_cnn().eval()
    model = fnnet.functional(net)
    x = torch.randn(5, 1, 28, 28)
    params_before, x_before = clone_all(model.params), x.clone()
    out = model.apply(model.params, x)
    assert torch.allclose(out, net(x), atol=1e-6, rtol=1e-5)
    assert_bit_identical(model.params, params_before)
    assert torch.equal(x, x_before)
    # the template holds no weights: it lives on the meta device
    assert all(p.is_meta for p in model._eval_template.parameters())


@pytest.mark.parametrize("train", [False, True])
def test_batchnorm_both_modes_match_module_and_leave_inputs_untouched(train):
    torch.manual_seed(0)
    net = bn_net()
    model = fnnet.functional(net)
    x = torch.randn(16, 4)
    params_before, buffers_before = clone_all(model.params), clone_all(model.buffers)
    out, new_buffers = model.apply(model.params, x, train=train, return_buffers=True)
    net.train(train)
    expected = net(x)
    assert torch.allclose(out, expected, atol=1e-6)
    # the returned buffers are the module's buffers after the same forward
    for k, v in net.state_dict().items():
        if k in new_buffers:
            assert torch.allclose(new_buffers[k].float(), v.float()), k
    if train:
        assert new_buffers["1.num_batches_tracked"].item() == 1
        assert not torch.equal(new_buffers["1.running_mean"], buffers_before["1.running_mean"])
    assert_bit_identical(model.params, params_before)
    assert_bit_identical(model.buffers, buffers_before)


def test_grad_matches_autograd():
    torch.manual_seed(0)
    net = chapter_cnn().eval()
    model = fnnet.functional(net)
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 3, 4])

    def loss(params):
        return nn.functional.cross_entropy(model.apply(params, x), y)

    g = fnnet.grad(loss)(model.params)
    net.zero_grad()
    nn.functional.cross_entropy(net(x), y).backward()
    for name, p in net.named_parameters():
        assert torch.allclose(g[name], p.grad, atol=1e-6, rtol=1e-5), name
    value, g2 = fnnet.value_and_grad(loss)(model.params)
    assert torch.allclose(value, loss(model.params))
    assert all(torch.equal(g[k], g2[k]) for k in g)


def test_value_and_grad_has_aux_order_is_jax_like():
    f = lambda p: ((p["a"] ** 2).sum(), {"n": torch.tensor(1)})
    (value, aux), grads = fnnet.value_and_grad(f, has_aux=True)({"a": torch.tensor([3.0])})
    assert value.item() == 9.0 and aux["n"].item() == 1 and grads["a"].item() == 6.0


def test_init_is_deterministic_under_a_key():
    model = fnnet.functional(chapter_cnn())
    k = fnnet.random.key(0)
    a, b = model.init(k), model.init(k)
    c = model.init(fnnet.random.key(1))
    assert_bit_identical(a, b)
    assert all(not torch.equal(a[n], c[n]) for n in a if n.endswith("weight"))
    assert {n: v.shape for n, v in a.items()} == {n: v.shape for n, v in model.params.items()}
    state = torch.random.get_rng_state()
    model.init(k)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_init_fn_is_used():
    model = fnnet.functional(nn.Linear(2, 1), init_fn=lambda key, p: {k: torch.zeros_like(v) for k, v in p.items()})
    assert all((v == 0).all() for v in model.init(fnnet.random.key(0)).values())


def test_dropout_needs_key_and_is_reproducible():
    model = fnnet.functional(chapter_cnn())
    x = torch.randn(8, 1, 28, 28)
    with pytest.raises(ValueError, match="needs key"):
        model.apply(model.params, x, train=True)
    k = fnnet.random.key(5)
    a = model.apply(model.params, x, train=True, key=k)
    b = model.apply(model.params, x, train=True, key=k)
    c = model.apply(model.params, x, train=True, key=fnnet.random.key(6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_bad_params_name_keys_and_shapes():
    model = fnnet.functional(nn.Linear(3, 2))
    x = torch.randn(1, 3)
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        model.apply({"weight": model.params["weight"]}, x)
    with pytest.raises(ValueError, match=r"params\['weight'\] has shape \(3, 3\).*\(2, 3\)"):
        model.apply({"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, x)
    with pytest.raises(TypeError):
        model.apply([1, 2], x)
    with pytest.raises(TypeError):
        fnnet.functional("not a module")


def test_to_module_roundtrip():
    net = nn.Linear(3, 2)
    model = fnnet.functional(net)
    back = model.to_module()
    x = torch.randn(4, 3)
    assert torch.allclose(back(x), net(x))


def test_vmap_and_jit_wrappers():
    f = lambda x: (x ** 2).sum()
    xs = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(fnnet.vmap(f)(xs), (xs ** 2).sum(1))
    # compiled with dynamo's eager backend: what is tested is the wrapper, not inductor
    assert torch.equal(fnnet.jit(f, backend="eager")(xs), f(xs))
    assert torch.equal(fnnet.jit(backend="eager")(f)(xs), f(xs))


@pytest.mark.cuda
@requires_cuda
def test_apply_on_cuda_params():
    torch.manual_seed(0)
    net = chapter_cnn().eval()
    model = fnnet.functional(net)
    params = fnnet.place(model.params, "cuda")
    x = torch.randn(3, 1, 28, 28)
    out = model.apply(params, x.cuda())
    assert out.is_cuda
    assert torch.allclose(out.cpu(), net(x), atol=1e-4, rtol=1e-4)
    k = fnnet.random.key(0)
    a = model.apply(params, x.cuda(), train=True, key=k)
    b = model.apply(params, x.cuda(), train=True, key=k)
    assert torch.equal(a, b)


class _Tied(nn.Module):
    """An embedding and an output layer sharing one weight (one state_dict key per name)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.out = nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)))


def test_tied_weights_share_one_key_and_sum_both_gradients():
    torch.manual_seed(0)
    module = _Tied()
    model = fnnet.functional(module)
    assert list(model.params) == ["emb.weight"]
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(model.apply(model.params, idx), module(idx), rtol=0, atol=0)
    grads = fnnet.grad(lambda p: model.apply(p, idx).square().sum())(model.params)
    module(idx).square().sum().backward()
    torch.testing.assert_close(grads["emb.weight"], module.emb.weight.grad)


def test_parametrized_module_matches_and_template_is_restored_after_an_error():
    torch.manual_seed(0)
    module = nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))
    model = fnnet.functional(module)
    x = torch.randn(5, 3)
    torch.testing.assert_close(model.apply(model.params, x), module(x))
    with pytest.raises(RuntimeError):
        model.apply(model.params, torch.randn(5, 4))  # wrong input width: fails inside the forward
    # the meta template holds its own (meta) tensors again, and the next call works
    assert all(t.device.type == "meta" for t in model._eval_template.parameters())
    torch.testing.assert_close(model.apply(model.params, x), module(x))


def test_buffers_with_wrong_keys_are_named():
    torch.manual_seed(0)
    model = fnnet.functional(nn.BatchNorm1d(3))
    bufs = dict(model.buffers)
    bufs["extra"] = bufs.pop("running_var")
    with pytest.raises(ValueError, match=r"missing keys \['running_var'\], unexpected keys \['extra'\]"):
        model.apply(model.params, torch.randn(4, 3), buffers=bufs)
    with pytest.raises(TypeError, match="buffers must be a dict"):
        model.apply(model.params, torch.randn(4, 3), buffers=[1])


def test_tied_model_goes_back_to_a_tied_module_and_inits_one_key():
    torch.manual_seed(0)
    model = fnnet.functional(_Tied())
    module = model.to_module()
    assert module.emb.weight is module.out.weight and module.emb.weight.requires_grad
    assert torch.equal(module.emb.weight, model.params["emb.weight"])
    fresh = model.init(fnnet.random.key(1))
    assert list(fresh) == ["emb.weight"] and not torch.equal(fresh["emb.weight"], model.params["emb.weight"])
    assert torch.equal(fresh["emb.weight"], model.init(fnnet.random.key(1))["emb.weight"])


def test_buffers_with_wrong_shapes_are_named():
    model = fnnet.functional(nn.BatchNorm1d(3))
    bufs = {**model.buffers, "running_mean": torch.zeros(4)}
    with pytest.raises(ValueError, match=r"buffers\['running_mean'\] has shape \(4,\), the module expects \(3,\)"):
        model.apply(model.params, torch.randn(4, 3), buffers=bufs)
    with pytest.raises(ValueError, match="running_mean"):
        model.to_module(buffers=bufs)


def test_tied_model_trains_the_same_eager_and_compiled():
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = fnnet.functional(_Tied())
    batch = (torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.tensor([[2, 3, 4], [5, 6, 0]]))

    def loss_fn(params, batch):
        idx, target = batch
        return F.cross_entropy(model.apply(params, idx).flatten(0, 1), target.flatten())

    opt = fnnet.optim.sgd(0.1)
    state = fnnet.TrainState.create(model.params, opt)
    eager, _ = fnnet.make_train_step(loss_fn, opt)(state, batch)
    torch._dynamo.reset()
    jitted, _ = fnnet.make_train_step(loss_fn, opt, jit=True)(state, batch)
    assert not torch.equal(eager.params["emb.weight"], state.params["emb.weight"])
    torch.testing.assert_close(jitted.params["emb.weight"], eager.params["emb.weight"], rtol=1e-5, atol=1e-6)


def test_model_survives_deepcopy_and_pickle():
    import copy
    import pickle

    torch.manual_seed(0)
    model = fnnet.functional(_Tied())
    idx = torch.tensor([[1, 2, 3]])
    want = model.apply(model.params, idx)
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(other.apply(other.params, idx), want, rtol=0, atol=0)
        # the copy's template is its own (not the original's), and it holds no weights
        assert other._eval_template is not model._eval_template
        assert all(t.device.type == "meta" for t in other._eval_template.parameters())
        assert all(store is not orig for (_, store, _), (_, orig, _) in zip(other._eval_slots, model._eval_slots))
        torch.testing.assert_close(other.apply(model.params, idx, train=True), want, rtol=0, atol=0)


def test_non_tensor_buffer_is_a_type_error():
    model = fnnet.functional(nn.BatchNorm1d(3))
    with pytest.raises(TypeError, match=r"buffers\['running_mean'\] must be a tensor, got int"):
        model.apply(model.params, torch.randn(4, 3), buffers={**model.buffers, "running_mean": 0})


# -- purity under abuse: in-place writes, hidden randomness, frozen parameters -----------------------


class _CountsCalls(nn.Module):
    """Writes into a buffer in every forward, even in eval mode."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("n", torch.zeros(()))

    def forward(self, x):
        self.n += 1
        return self.lin(x)


class _ClampsWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        with torch.no_grad():
            self.lin.weight.clamp_(-0.1, 0.1)
        return self.lin(x)


def test_an_in_place_write_into_the_callers_tensors_is_an_error_naming_it():
    x = torch.randn(4, 3)
    counts = fnnet.functional(_CountsCalls())
    with pytest.raises(ValueError, match=r"_CountsCalls's forward wrote in place into buffers\['n'\]"):
        counts.apply(counts.params, x)
    # with return_buffers the forward works on copies and the new value comes back as data
    before = counts.buffers["n"].clone()
    _, new = counts.apply(counts.params, x, return_buffers=True)
    assert float(new["n"]) == float(before) + 1 and torch.equal(counts.buffers["n"], before)

    clamps = fnnet.functional(_ClampsWeights())
    params = {k: v * 10 for k, v in clamps.params.items()}
    with pytest.raises(ValueError, match=r"wrote in place into params\['lin.weight'\].*out of place"):
        clamps.apply(params, x)
    # the same check guards the input state of a pure training step and the Trainer's evaluate
    step = fnnet.make_train_step(lambda p, b: clamps.apply(p, b).sum(), fnnet.optim.sgd(0.1))
    with pytest.raises(ValueError, match="wrote in place"):
        step(fnnet.TrainState.create({k: v * 10 for k, v in clamps.params.items()}, fnnet.optim.sgd(0.1)), x)
    trainer = fnnet.Trainer(fnnet.functional(_ClampsWeights()), lambda out, y: out.sum(), fnnet.optim.sgd(0.1),
                            devices="cpu")
    with pytest.raises(ValueError, match="wrote in place"):
        trainer.evaluate([(x, torch.zeros(4))])


def test_batchnorm_writes_go_to_copies_and_raise_nothing():
    model = fnnet.functional(bn_net())
    buffers = {k: v.clone() for k, v in model.buffers.items()}
    _, new = model.apply(model.params, torch.randn(8, 4), buffers=buffers, train=True, return_buffers=True)
    assert fnnet.tree.all_equal(buffers, model.buffers) and not torch.equal(new["1.running_mean"], buffers["1.running_mean"])


class _FunctionalDropout(nn.Module):
    """Draws randomness through torch.nn.functional, not an nn.Dropout layer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.RReLU()

    def forward(self, x):
        return self.act(nn.functional.dropout(self.lin(x), 0.5, training=self.training))


def test_randomness_drawn_through_torch_functional_is_keyed_or_an_error():
    model = fnnet.functional(_FunctionalDropout())
    assert not model.stochastic  # no dropout layer to see: only the forward tells
    x = torch.randn(16, 8)
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match="drew random numbers from torch's global RNG.*needs key="):
        model.apply(model.params, x, train=True)
    assert torch.equal(torch.random.get_rng_state(), state)  # restored
    a = model.apply(model.params, x, train=True, key=fnnet.random.key(1))
    b = model.apply(model.params, x, train=True, key=fnnet.random.key(1))
    c = model.apply(model.params, x, train=True, key=fnnet.random.key(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG never moved
    torch.testing.assert_close(model.apply(model.params, x), model.to_module()(x))  # eval: deterministic


def test_frozen_parameters_stay_frozen():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[0].weight.requires_grad_(False)
    model = fnnet.functional(net)
    assert model.trainable == {"0.weight": False, "0.bias": True, "2.weight": True, "2.bias": True}
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    grads = fnnet.make_grad_fn(lambda p, b: F.mse_loss(model.apply(p, b[0]), b[1]))(model.params, (x, y)).grads
    assert torch.count_nonzero(grads["0.weight"]) == 0 and torch.count_nonzero(grads["2.weight"]) > 0
    # the Trainer masks them out of the optimizer: weight decay (adamw) does not move them either
    frozen, trained = net[0].weight.detach().clone(), net[2].weight.detach().clone()
    trainer = fnnet.Trainer(net, F.mse_loss, fnnet.optim.adamw(0.1, weight_decay=0.5), devices="cpu")
    trainer.fit([(x, y)] * 4, epochs=2, verbose=0)
    assert torch.equal(trainer.state.params["0.weight"], frozen) and torch.equal(net[0].weight, frozen)
    assert not torch.equal(net[2].weight, trained)  # the rest trained (the module itself, in place)
    # unfreezing: a new trainer (a new optimizer state) for the module with requires_grad back on
    net[0].weight.requires_grad_(True)
    fnnet.Trainer(net, F.mse_loss, fnnet.optim.adam(0.1), devices="cpu").fit([(x, y)], verbose=0)
    assert not torch.equal(net[0].weight, frozen)
