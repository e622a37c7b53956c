"""fnnet.remat: gradients equal to no remat bit for bit (float64, dropout under a key), inside
fnnet.functional's swap, under jit=True, with accumulation, on 2 gloo ranks (DDP and ZeRO-2);
state_dict keys unchanged; clear errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fnnet
from fnnet import optim

sys.path.insert(0, str(Path(__file__).parent))
import _remat_worker as W  # noqa: E402

POLICIES = ["nothing_saveable", "dots_saveable", "everything_saveable",
            lambda ctx, op, *args, **kwargs: op is torch.ops.aten.addmm.default]


def _grads(net: nn.Module, key: int = 3):
    model = fnnet.functional(net)
    return fnnet.make_grad_fn(W.lm_loss(model))(model.params, W.tokens(0), key=fnnet.random.key(key)).grads


@pytest.mark.parametrize("policy", POLICIES, ids=["nothing", "dots", "everything", "callable"])
def test_gradients_equal_no_remat_bit_for_bit_with_dropout_under_a_key(policy):
    net = W.gpt()
    expected = _grads(net)
    got = _grads(W.with_remat(net, policy))
    assert got.keys() == expected.keys()
    for k in expected:
        assert torch.equal(got[k], expected[k]), k
    # dropout really draws (another key, other gradients): the recomputation had masks to reproduce
    assert any(not torch.equal(a, b) for a, b in zip(_grads(net, key=4).values(), expected.values()))


def test_torch_checkpoint_fails_inside_the_swap_and_remat_does_not():
    """The bug remat fixes: a plain torch checkpoint recomputes, in the backward pass, with the
    meta tensors Model.apply put back into the slots."""

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.utils.checkpoint.checkpoint(lambda t: self.lin(t).tanh(), x, use_reentrant=False)

    x = torch.randn(3, 4)
    model = fnnet.functional(Checkpointed())
    with pytest.raises(RuntimeError, match="meta"):
        fnnet.make_grad_fn(lambda p, b: model.apply(p, b).sum())(model.params, x)
    plain = fnnet.functional(nn.Sequential(nn.Linear(4, 4), nn.Tanh()))
    remat = fnnet.functional(fnnet.remat(nn.Sequential(nn.Linear(4, 4), nn.Tanh())))
    got = fnnet.make_grad_fn(lambda p, b: remat.apply(p, b).sum())(plain.params, x).grads
    want = fnnet.make_grad_fn(lambda p, b: plain.apply(p, b).sum())(plain.params, x).grads
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("options", [pytest.param(dict(jit=True), marks=pytest.mark.extended, id="jit"),
                                     pytest.param(dict(accumulate=2), id="accumulate"),
                                     pytest.param(dict(accumulate=2, donate=True), marks=pytest.mark.extended,
                                                  id="accumulate-donate")])
def test_training_with_remat_equals_training_without(options):
    """AdamW with dropout under the state's key (4 micro-batches, or 2 compiled steps). Under jit=True fnnet compiles forward
    and backward as one graph (torch.func.grad inside torch.compile): remat there runs the block as
    is (nothing is recomputed), so the result is the same bits, not float noise (extended: two
    compilations take about a minute on 2 shared cores)."""
    steps = 2 if options.get("jit") else 4
    plain = W.train(W.gpt(), steps, W.tokens, **options)
    remat = W.train(W.with_remat(W.gpt(), "nothing_saveable"), steps, W.tokens, **options)
    assert remat.step == plain.step == steps // options.get("accumulate", 1)
    for k in plain.params:
        assert torch.equal(remat.params[k], plain.params[k]), k


def test_state_dict_keys_are_unchanged_and_checkpoints_move_both_ways(tmp_path):
    net = W.gpt()
    remat = W.with_remat(net, "dots_saveable")
    assert list(remat.state_dict()) == list(net.state_dict())
    assert isinstance(remat.blocks[0], W.Block) and type(remat.blocks[0]).__name__ == "RematBlock"
    trained = W.train(remat, 2, W.tokens)
    fnnet.save(tmp_path / "remat.safetensors", trained.params)
    plain = W.gpt()
    plain.load_state_dict(fnnet.load(tmp_path / "remat.safetensors"))  # remat -> plain
    back = W.with_remat(W.gpt(), "nothing_saveable")
    back.load_state_dict(plain.state_dict())  # plain -> remat
    for k, v in trained.params.items():
        assert torch.equal(back.state_dict()[k], v)
    # the module given to remat is left as it was: same class, own slots
    assert type(net.blocks[0]) is W.Block
    remat.blocks[0].extra = nn.Parameter(torch.zeros(1))
    assert "extra" not in dict(net.blocks[0].named_parameters())
    shared = nn.Linear(2, 2)
    assert fnnet.remat(shared).weight is shared.weight  # the same tensors, no copy
    again = fnnet.remat(fnnet.remat(shared), "dots_saveable")  # a new policy, not a second wrapper
    assert type(again) is type(fnnet.remat(shared)) and type(again).__bases__[1] is nn.Linear


def test_clear_errors():
    with pytest.raises(ValueError, match="policy must be one of"):
        fnnet.remat(nn.Linear(2, 2), "dots")
    with pytest.raises(TypeError, match="before fnnet.functional"):
        fnnet.remat(fnnet.functional(nn.Linear(2, 2)))
    model = fnnet.functional(fnnet.remat(nn.Linear(2, 2)))
    with pytest.raises(RuntimeError, match="torch.func"):
        fnnet.grad(lambda p: model.apply(p, torch.ones(1, 2)).sum())(model.params)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_remat_and_master_weights_on_two_gloo_ranks(tmp_path):
    """One launch for this issue's multi-process checks: remat (nothing/dots) equals no remat bit for
    bit on every rank, under distributed=True, with accumulate=2, and with shard_optimizer=True
    (float64, dropout); bfloat16 params with float32 master weights: the gradients reduced in
    float32, ZeRO-2 holds half of the master weights on each rank (1-D float32 parts) and equals
    DDP bit for bit; reduce_dtype=bfloat16 on gloo refused."""
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(Path(__file__).with_name("_remat_worker.py")), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"remat{rank}.json").read_text())
        for name in ("ddp-accumulate", "zero2"):
            assert report[name] == {"nothing_saveable": True, "dots_saveable": True, "moved": True}, (rank, name)
        mp = json.loads((tmp_path / f"precision{rank}.json").read_text())
        assert mp["master_dtypes"] == ["torch.float32"] and mp["master_ndim"] == [1]
        assert mp["param_dtypes"] == ["torch.bfloat16"] and mp["reduced_in"] == ["torch.float32"]
        assert mp["master_numel"] * 2 == mp["params_numel"]  # an even number of parameters: an even split
        assert mp["zero2_equals_ddp"] and mp["moved"]
        assert "reduce_dtype=bfloat16 on the gloo backend" in mp["refused"] and "torch.float32" in mp["refused"]
