"""fnnet.Precision: named policies, bfloat16 params with float32 master weights (the trajectory of a
hand-built reference, FSDP2's mixed-precision test), memory, sharding of the master weights on 2 gloo
ranks and the refusal of 16-bit reductions on gloo."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fnnet
from fnnet import optim

sys.path.insert(0, str(Path(__file__).parent))
import _remat_worker as W  # noqa: E402

BF16 = fnnet.Precision(param_dtype=torch.bfloat16, compute_dtype=torch.bfloat16)


def test_named_policies_and_errors():
    assert fnnet.Precision.resolve("bf16-mixed") == fnnet.Precision(compute_dtype=torch.bfloat16)
    assert fnnet.Precision.resolve("16-mixed").loss_scaled and not fnnet.Precision.resolve("32").loss_scaled
    assert fnnet.Precision.resolve(BF16) is BF16 and BF16.keeps_master and BF16.reduce_dtype == torch.float32
    assert fnnet.Precision(param_dtype=torch.float16).loss_scaled  # float16 keeps its loss scale
    with pytest.raises(ValueError, match="bf16-mixed"):
        fnnet.Precision.resolve("bf16-true")
    with pytest.raises(TypeError, match="param_dtype"):
        fnnet.Precision(param_dtype=torch.int8)


def _tokens(i):  # small batches: bfloat16 kernels are slow on this CPU
    return W.tokens(i, n=2, seq=4)


def _reference(net, steps, lr):
    """The hand-built reference: a bfloat16 copy of the model for forward and backward (under the same
    autocast), float32 gradients, AdamW on the float32 master weights, cast back into the copy."""
    ref = copy.deepcopy(net).to(torch.bfloat16)
    master = {k: v.detach().clone() for k, v in net.named_parameters()}
    tx = optim.adamw(lr)
    tx_state = tx.init(master)
    torch_master = {k: v.clone().requires_grad_(True) for k, v in master.items()}
    torch_adamw = torch.optim.AdamW(list(torch_master.values()), lr=lr)
    out = []
    for i in range(steps):
        x, y = _tokens(i)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = ref(x)
        ref.zero_grad()
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
        grads = {k: p.grad.float() for k, p in ref.named_parameters()}
        updates, tx_state = tx.update(grads, tx_state, master)
        master = optim.apply_updates(master, updates)
        for k, p in torch_master.items():
            p.grad = grads[k]
        torch_adamw.step()
        with torch.no_grad():
            for k, p in ref.named_parameters():
                p.copy_(master[k])
        out.append(({k: p.detach().clone() for k, p in ref.named_parameters()}, master))
    return out, torch_master


def test_bf16_params_with_float32_master_weights_follow_the_hand_built_reference_exactly():
    net = W.gpt(torch.float32, dropout=0.0, depth=1)  # one block: bfloat16 matmuls are slow on this CPU
    model = fnnet.functional(net)
    opt = optim.adamw(1e-2)
    state = fnnet.TrainState.create(model.params, opt)  # float32 params: the first step makes them the master
    step = fnnet.make_train_step(W.lm_loss(model), opt, precision=BF16)
    expected, torch_master = _reference(net, 20, 1e-2)
    for i, (params, master) in enumerate(expected):
        state, _ = step(state, _tokens(i))
        for k in params:
            assert state.params[k].dtype == torch.bfloat16 and state.opt_state.master[k].dtype == torch.float32
            assert torch.equal(state.params[k], params[k]), (i, k)
            assert torch.equal(state.opt_state.master[k], master[k]), (i, k)
    for k, v in torch_master.items():  # and torch.optim.AdamW on the master agrees to float32 rounding
        torch.testing.assert_close(state.opt_state.master[k], v.detach(), rtol=1e-5, atol=1e-5)
    # the master weights matter: AdamW applied to the bfloat16 params themselves ends elsewhere
    plain = fnnet.TrainState.create(BF16.cast_params(model.params), opt)
    bf16_step = fnnet.make_train_step(W.lm_loss(model), opt, precision="bf16-mixed")
    for i in range(5):
        plain, _ = bf16_step(plain, _tokens(i))
    assert any(not torch.equal(plain.params[k], expected[4][0][k]) for k in plain.params)


def test_bf16_params_halve_parameter_bytes_and_the_master_weights_are_in_the_optimizer_state():
    reports = {}
    for name, precision in (("32", "32"), ("bf16", BF16)):
        model = fnnet.functional(W.gpt(torch.float32, dropout=0.0))
        opt = optim.adamw(1e-2)
        state = fnnet.Precision.resolve(precision).prepare(fnnet.TrainState.create(model.params, opt))
        step = fnnet.make_train_step(W.lm_loss(model), opt, precision=precision)
        reports[name] = fnnet.memory_report(step, state, W.tokens(0))
    full, half = reports["32"], reports["bf16"]
    assert half.params * 2 == full.params
    assert half.opt_state == full.opt_state + full.params  # + the float32 master weights
    assert half.grads * 2 == full.grads  # gradients in the params' dtype, cast to float32 in the update


def test_a_master_weights_state_saves_loads_and_continues_exactly(tmp_path):
    model = fnnet.functional(W.gpt(torch.float32, dropout=0.0, depth=1))
    opt = optim.adamw(1e-2)
    step = fnnet.make_train_step(W.lm_loss(model), opt, precision=BF16)
    state, _ = step(fnnet.TrainState.create(model.params, opt), _tokens(0))
    fnnet.save(tmp_path / "mixed.safetensors", state)
    back = fnnet.load(tmp_path / "mixed.safetensors")  # no like=: MasterWeightsState is one of fnnet's types
    assert isinstance(back.opt_state, optim.MasterWeightsState)
    one, _ = step(state, _tokens(1))
    two, _ = step(back, _tokens(1))
    for k in one.params:
        assert torch.equal(one.params[k], two.params[k]) and torch.equal(one.opt_state.master[k], two.opt_state.master[k])


@pytest.mark.extended
def test_the_trainer_takes_a_precision_policy():
    """Trainer(precision=fnnet.Precision(...)): its state's params in bfloat16, the master weights in
    float32, and the module trained (its weights bfloat16 too)."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    trainer = fnnet.Trainer(net, F.cross_entropy, optim.adam(1e-2), precision=BF16, devices="cpu")
    history = trainer.fit((x, y), epochs=3, batch_size=16, verbose=0).to_pandas()
    assert history["loss"].iloc[-1] < history["loss"].iloc[0]
    assert trainer.state.params["0.weight"].dtype == torch.bfloat16
    assert trainer.state.opt_state.master["0.weight"].dtype == torch.float32
    assert trainer.predict(x[:2]).dtype == torch.float32 and net[0].weight.dtype == torch.bfloat16
