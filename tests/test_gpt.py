"""The GPT (fnnet.models.GPT), sampling (fnnet.random.categorical, fnnet.generate) and the LM loss."""

import math

import pytest
import torch
import torch.nn.functional as F

import fnnet
from fnnet.models import GPT

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run on one thread


CFG = dict(block_size=8, n_layer=2, n_head=2, n_embd=16)
V = 11


def _ln(x, w, b):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * w + b


def reference_forward(p, idx, n_layer, n_head, wte_out=None):
    """GPT-2's forward written out: embeddings, per block ln -> causal attention -> residual, ln -> 4x GELU MLP ->
    residual, final ln, logits against the token embedding (``wte_out``: another copy of it, to split gradients)."""
    B, T = idx.shape
    C = p["wte.weight"].shape[1]
    D = C // n_head
    x = p["wte.weight"][idx] + p["wpe.weight"][:T]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    for i in range(n_layer):
        q = f"blocks.{i}."
        h = _ln(x, p[q + "ln_1.weight"], p[q + "ln_1.bias"])
        qkv = h @ p[q + "attn.c_attn.weight"].T + p[q + "attn.c_attn.bias"]
        qh, kh, vh = (t.reshape(B, T, n_head, D).transpose(1, 2) for t in qkv.split(C, dim=-1))
        att = (qh @ kh.transpose(-1, -2)) / math.sqrt(D)
        att = torch.softmax(att.masked_fill(~causal, float("-inf")), dim=-1)
        y = (att @ vh).transpose(1, 2).reshape(B, T, C)
        x = x + y @ p[q + "attn.c_proj.weight"].T + p[q + "attn.c_proj.bias"]
        h = _ln(x, p[q + "ln_2.weight"], p[q + "ln_2.bias"])
        h = h @ p[q + "mlp.c_fc.weight"].T + p[q + "mlp.c_fc.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        x = x + h @ p[q + "mlp.c_proj.weight"].T + p[q + "mlp.c_proj.bias"]
    x = _ln(x, p["ln_f.weight"], p["ln_f.bias"])
    return x @ (p["wte.weight"] if wte_out is None else wte_out).T


def gpt64(seed=0, **kw):
    model = fnnet.functional(GPT(V, **{**CFG, **kw}).double())
    params = {k: v.double() for k, v in model.init(fnnet.random.key(seed)).items()}
    # non-trivial LayerNorm affines and biases, so the reference checks where each one goes
    g = torch.Generator().manual_seed(seed)
    return model, {k: v + 0.05 * torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in params.items()}


def test_forward_equals_reference_and_is_causal():
    model, params = gpt64()
    idx = torch.randint(0, V, (3, 8), generator=torch.Generator().manual_seed(1))
    out = model.apply(params, idx)
    assert out.shape == (3, 8, V)
    torch.testing.assert_close(out, reference_forward(params, idx, 2, 2), rtol=1e-10, atol=1e-10)
    for t in range(8):  # changing token t never changes an earlier position's output; it changes position t's
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        other = model.apply(params, changed)
        assert torch.equal(other[:, :t], out[:, :t])
        assert not torch.allclose(other[:, t], out[:, t])


def test_tied_output_layer_is_one_parameter_with_one_gradient():
    net = GPT(V, **CFG)
    model = fnnet.functional(net)
    assert set(model.params) == set(net.state_dict()) and "lm_head.weight" not in model.params
    assert sum(p.numel() for p in model.params.values()) == sum(p.numel() for p in net.parameters())
    model64, params = gpt64()
    idx = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(2))
    grads = fnnet.grad(lambda p: model64.apply(p, idx).square().mean())(params)
    # the same values as two separate tensors: the tied gradient is the sum of both uses' gradients
    wte_in, wte_out = params["wte.weight"].clone(), params["wte.weight"].clone()
    split = torch.func.grad(lambda a, b: reference_forward({**params, "wte.weight": a}, idx, 2, 2, wte_out=b)
                            .square().mean(), argnums=(0, 1))(wte_in, wte_out)
    torch.testing.assert_close(grads["wte.weight"], split[0] + split[1], rtol=1e-9, atol=1e-12)
    assert split[0].abs().sum() > 0 and split[1].abs().sum() > 0


def test_gpt2_initialisation():
    net = GPT(50, block_size=32, n_layer=6, n_head=4, n_embd=256)
    model = fnnet.functional(net)
    a, b = model.init(fnnet.random.key(3)), model.init(fnnet.random.key(3))
    assert all(torch.equal(a[k], b[k]) for k in a)
    proj = torch.cat([a[f"blocks.{i}.mlp.c_proj.weight"].flatten() for i in range(6)])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(12), rel=0.02)
    assert a["blocks.0.mlp.c_fc.weight"].std().item() == pytest.approx(0.02, rel=0.02)
    assert a["wte.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert all(a[k].abs().max() == 0 for k in a if k.endswith(".bias"))
    assert all(torch.equal(a[k], torch.ones_like(a[k])) for k in a if k.endswith("ln_1.weight"))


def test_bad_config_and_too_long_input():
    with pytest.raises(ValueError, match="multiple of n_head"):
        GPT(V, block_size=8, n_layer=1, n_head=3, n_embd=16)
    with pytest.raises(ValueError, match="block_size"):
        GPT(V, **CFG)(torch.zeros(1, 9, dtype=torch.long))


def test_dropout_runs_under_the_key_and_bf16_trains():
    model = fnnet.functional(GPT(V, **CFG, dropout=0.2))
    idx = torch.randint(0, V, (2, 8))
    before = torch.random.get_rng_state()
    a = model.apply(model.params, idx, train=True, key=fnnet.random.key(1))
    b = model.apply(model.params, idx, train=True, key=fnnet.random.key(1))
    c = model.apply(model.params, idx, train=True, key=fnnet.random.key(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(before, torch.random.get_rng_state())
    with pytest.raises(ValueError, match="needs key"):
        model.apply(model.params, idx, train=True)

    def loss_fn(p, batch, key):
        return fnnet.loss.cross_entropy(model.apply(p, batch[0], train=True, key=key), batch[1])

    opt = fnnet.optim.adamw(1e-2)
    step = fnnet.make_train_step(loss_fn, opt, precision="bf16-mixed")
    state = fnnet.TrainState.create(model.init(fnnet.random.key(0)), opt, key=fnnet.random.key(5))
    x = torch.randint(0, V, (8, 8))
    batch = (x, x.roll(-1, dims=1))
    first = None
    for _ in range(15):
        state, m = step(state, batch)
        first = float(m["loss"]) if first is None else first
    assert float(m["loss"]) < first - 0.3 and state.params["wte.weight"].dtype == torch.float32


def test_cross_entropy_over_tokens():
    logits = torch.randn(3, 5, V)
    targets = torch.randint(0, V, (3, 5))
    torch.testing.assert_close(fnnet.loss.cross_entropy(logits, targets),
                               F.cross_entropy(logits.permute(0, 2, 1), targets))
    with pytest.raises(ValueError, match=r"targets of shape \(3, 5\)"):
        fnnet.loss.cross_entropy(logits, targets[:, :4])


# -- sampling --------------------------------------------------------------------------------------
def test_categorical_frequencies_chi_square_and_no_global_rng():
    probs = torch.tensor([0.05, 0.1, 0.2, 0.25, 0.4])
    logits = probs.log().expand(40_000, 5).clone()
    saved = logits.clone()
    before = torch.random.get_rng_state()
    draws = fnnet.random.categorical(fnnet.random.key(0), logits)
    assert torch.equal(before, torch.random.get_rng_state()) and torch.equal(logits, saved)
    assert draws.shape == (40_000,) and draws.dtype == torch.int64
    counts = torch.bincount(draws, minlength=5).double()
    expected = probs.double() * 40_000
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # chi-square, 4 degrees of freedom, p = 0.001
    assert torch.equal(draws, fnnet.random.categorical(fnnet.random.key(0), logits))
    assert not torch.equal(draws, fnnet.random.categorical(fnnet.random.key(1), logits))
    # axis, and -inf never drawn
    masked = torch.tensor([[0.0, float("-inf")], [0.0, float("-inf")], [0.0, 0.0]]).repeat(1, 50)
    along0 = fnnet.random.categorical(fnnet.random.key(2), masked, axis=0)
    assert along0.shape == (100,) and bool((along0[1::2] == 2).all())
    with pytest.raises(ValueError, match="floating-point"):
        fnnet.random.categorical(fnnet.random.key(0), torch.zeros(3, dtype=torch.long))


def test_generate_is_reproducible_under_a_key_and_crops_the_context():
    net = GPT(V, **CFG)
    model = fnnet.functional(net)
    params = model.init(fnnet.random.key(0))
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    saved = prompt.clone()
    before = torch.random.get_rng_state()
    a = fnnet.generate(model, params, prompt, 20, key=fnnet.random.key(7))  # 23 > block_size 8: cropped
    b = fnnet.generate(model, params, prompt, 20, key=fnnet.random.key(7))
    c = fnnet.generate(model, params, prompt, 20, key=fnnet.random.key(8))
    assert torch.equal(before, torch.random.get_rng_state()) and torch.equal(prompt, saved)
    assert a.shape == (2, 23) and torch.equal(a[:, :3], prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = fnnet.generate(net, params, prompt, 5, key=fnnet.random.key(1), top_k=1)  # top-1: the argmax
    ctx = prompt
    for _ in range(5):
        nxt = model.apply(params, ctx[:, -8:])[:, -1].argmax(-1, keepdim=True)
        ctx = torch.cat([ctx, nxt], 1)
    assert torch.equal(greedy, ctx)
    with pytest.raises(ValueError, match="top_k"):
        fnnet.generate(model, params, prompt, 1, key=fnnet.random.key(1), top_k=V + 1)
    with pytest.raises(ValueError, match="temperature"):
        fnnet.generate(model, params, prompt, 1, key=fnnet.random.key(1), temperature=0)


# -- fnnet train charlm ------------------------------------------------------------------------------
SMALL = ["--eval-iters", "4", "--max-chars", "30000", "--n-layer", "2", "--n-embd", "64", "--sample-tokens", "40",
         "--device", "cpu"]


def _charlm(out, *args, torchrun=0, timeout=300):
    import os
    import subprocess
    import sys

    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(torchrun)]
              if torchrun else [sys.executable])
    proc = subprocess.run([*launch, "-m", "fnnet", "train", "charlm", *SMALL, "--out", str(out), *args],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_charlm_50_steps_on_two_gloo_ranks_learns_and_equals_one_process(tmp_path):
    """`torchrun -m fnnet train charlm --steps 50` on a small slice: the loss goes down, the files are written, and
    --batch-size being the global batch, 2 ranks with 6 windows each take the steps one process takes."""
    proc = _charlm(tmp_path / "two", "--steps", "50", "--eval-interval", "25", torchrun=2)
    rows = _rows(tmp_path / "two" / "history.csv")
    assert [int(r["step"]) for r in rows] == [25, 50]
    val = [float(r["val_loss"]) for r in rows]
    assert val[1] < val[0] < math.log(95) and float(rows[1]["loss"]) < float(rows[0]["loss"])
    assert float(rows[1]["tokens_per_sec"]) > 0 and "step 50" in proc.stdout and "tokens_per_sec" in proc.stdout
    assert len((tmp_path / "two" / "sample.txt").read_text(encoding="utf-8")) == 40
    assert (tmp_path / "two" / "history.png").exists()
    from fnnet import recipes

    _, one = recipes.train_charlm(steps=50, eval_interval=25, eval_iters=4, max_chars=30000, n_layer=2, n_embd=64,
                                  sample_tokens=40, device="cpu", out=tmp_path / "one", verbose=0)
    assert one["history"]["val_loss"] == pytest.approx(val, rel=1e-5)
    [f1] = [p for p in (tmp_path / "one").iterdir() if p.name.startswith("epoch=")]
    [f2] = [p for p in (tmp_path / "two").iterdir() if p.name.startswith("epoch=")]
    p1, p2 = fnnet.load(f1)["state"].params, fnnet.load(f2)["state"].params
    for k in p1:
        torch.testing.assert_close(p1[k], p2[k], rtol=1e-4, atol=1e-5)


@pytest.mark.extended
def test_jit_step_equals_the_eager_step():
    """jit=True compiles gradient, clip and AdamW as one graph: the same losses and params (float32 rounding)."""
    from fnnet.recipes import charlm_optimizer

    model = fnnet.functional(GPT(V, **CFG))
    params = model.init(fnnet.random.key(0))

    def loss_fn(p, batch):
        return fnnet.loss.cross_entropy(model.apply(p, batch[0]), batch[1])

    opt = charlm_optimizer(params, warmup=2, decay_steps=10)
    x = torch.randint(0, V, (6, 8), generator=torch.Generator().manual_seed(0))
    runs = []
    for jit in (False, True):
        step = fnnet.make_train_step(loss_fn, opt, jit=jit, donate=True)
        state = fnnet.TrainState.create({k: v.clone() for k, v in params.items()}, opt)
        losses = []
        for i in range(4):
            state, m = step(state, (x.roll(i, 1), x.roll(i + 1, 1)))
            losses.append(float(m["loss"]))
        runs.append((losses, state.params))
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-5)
    for k in params:
        torch.testing.assert_close(runs[0][1][k], runs[1][1][k], rtol=1e-4, atol=1e-5)
