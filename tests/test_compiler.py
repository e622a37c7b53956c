"""fnnet.compiler: the skinny-matmul pass rewrites what it should, keeps the maths, and compile() routes options."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx

import fnnet
from fnnet import compiler, optim
from fnnet.models import LinearRegression, linreg_data
from conftest import requires_cuda

pytestmark = pytest.mark.skipif(compiler._hash_files is None, reason="this torch has no inductor custom passes")

aten = torch.ops.aten
MATMULS = (aten.mm.default, aten.addmm.default)


def _traced(fn, *args):
    """An aten graph of ``fn`` with fake values on its nodes, as inductor's post-grad passes see it."""
    return make_fx(fn, tracing_mode="fake")(*args)


def _matmuls(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in MATMULS)


@contextlib.contextmanager
def large_dim(value):
    """Let the pass act on small products (tests use small shapes; the default leaves them to BLAS)."""
    saved = compiler.LARGE_DIM
    compiler.LARGE_DIM = value
    try:
        yield
    finally:
        compiler.LARGE_DIM = saved


def _rewritten(fn, *args):
    gm = _traced(fn, *args)
    before = _matmuls(gm)
    compiler.SkinnyMatmulPass()(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, before, _matmuls(gm)


dims = st.sampled_from([0, 1, 2, 3, 8, 9, 33, 200])


@settings(max_examples=40, deadline=None)
@given(m=dims, k=dims, n=dims, with_bias=st.booleans(), double=st.booleans(), seed=st.integers(0, 2**16))
def test_pass_keeps_values_and_rewrites_exactly_the_skinny_products(m, k, n, with_bias, double, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if double else torch.float32
    a, b, bias = (torch.randn(s, generator=g, dtype=dtype) for s in ((m, k), (k, n), (1, n)))

    def fn(a, b, bias):
        return torch.addmm(bias, a, b) if with_bias else a @ b

    with large_dim(1):
        gm, before, after = _rewritten(fn, a, b, bias)
    assert before == 1
    short = k <= compiler.SHORT_CONTRACTION and min(m, n) <= compiler.TINY_OUTPUT
    skinny = (short or 1 <= m * n <= compiler.TINY_OUTPUT) and max(m, k, n) >= 1  # LARGE_DIM is 1 here
    assert after == (0 if skinny else 1)
    want = fn(a, b, bias)
    got = gm(a, b, bias)
    assert got.shape == want.shape and got.dtype == want.dtype
    tol = 1e-12 if double else 1e-5
    torch.testing.assert_close(got, want, rtol=tol, atol=tol * k)


def test_pass_leaves_small_products_to_blas_and_takes_large_skinny_ones():
    a, b = torch.randn(compiler.LARGE_DIM - 1, 2), torch.randn(2, 3)
    assert _rewritten(lambda a, b: a @ b, a, b)[1:] == (1, 1)
    a = torch.randn(compiler.LARGE_DIM, 2)
    assert _rewritten(lambda a, b: a @ b, a, b)[1:] == (1, 0)
    assert _rewritten(lambda a, b: a.t() @ b, a, torch.randn(compiler.LARGE_DIM, 3))[1:] == (1, 0)


@large_dim(1)
def test_pass_leaves_other_products_alone():
    a32, b32 = torch.randn(100, 2), torch.randn(2, 3)
    # a scaled addmm and low precision are not rewritten
    gm, before, after = _rewritten(lambda c, a, b: torch.addmm(c, a, b, beta=0.5), torch.randn(1, 3), a32, b32)
    assert before == after == 1
    gm, before, after = _rewritten(lambda a, b: a @ b, a32.bfloat16(), b32.bfloat16())
    assert before == after == 1


@large_dim(1)
def test_pass_only_touches_cpu_products():
    # The device is read from the fake values: a graph traced on the meta device stands in
    # for any non-CPU one (the CUDA case itself runs in the GPU check's compiled tests).
    a, b = torch.randn(100, 2, device="meta"), torch.randn(2, 1, device="meta")
    gm = make_fx(lambda a, b: a @ b, tracing_mode="fake")(a, b)
    compiler.SkinnyMatmulPass()(gm.graph)
    assert _matmuls(gm) == 1


def test_pass_cache_id_is_the_same_in_another_process_and_changes_with_the_pass(tmp_path, monkeypatch):
    """Inductor's on-disk cache is shared across processes: the id must be a value of the pass's
    code and thresholds (the same in a fresh interpreter), never of the process (an id() or a
    random uuid), or every run would recompile, or a changed pass would reuse stale graphs."""
    here = compiler.SkinnyMatmulPass().uuid()
    assert here is not None
    script = "from fnnet import compiler; print(repr(compiler.SkinnyMatmulPass().uuid()))"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"}).stdout.strip()
    assert out == repr(here)
    monkeypatch.setattr(compiler, "LARGE_DIM", compiler.LARGE_DIM + 1)
    assert compiler.SkinnyMatmulPass().uuid() != here
    monkeypatch.undo()
    edited = tmp_path / "compiler.py"
    edited.write_text(open(compiler.__file__).read() + "\n# an edit\n")
    monkeypatch.setattr(compiler, "__file__", str(edited))
    assert compiler.SkinnyMatmulPass().uuid() != here


def _linreg_step(jit, compile_options=None, donate=False):
    with torch.random.fork_rng():  # the same initial parameters for every step built here
        torch.manual_seed(0)
        model = fnnet.functional(LinearRegression())

    def loss_fn(params, batch):
        x, y = batch
        return F.mse_loss(model.apply(params, x), y)

    opt = optim.adam(0.1)
    state = fnnet.TrainState.create(model.params, opt)
    return fnnet.make_train_step(loss_fn, opt, jit=jit, donate=donate, compile_options=compile_options), state


@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_compiled_linreg_step_is_one_fused_kernel_and_matches_eager(donate):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    X, Y = linreg_data(20_000, seed=3)
    eager, state = _linreg_step(False)
    jitted, jstate = _linreg_step(True, donate=donate)
    (jstate, jmetrics), codes = run_and_get_code(jitted, jstate, (X, Y))
    code = "\n".join(codes)
    assert "extern_kernels.mm" not in code and "extern_kernels.addmm" not in code
    # the whole step (forward, loss, gradient, Adam) is one generated kernel call
    assert len([line for line in code.splitlines() if line.strip().startswith("cpp_fused_") and "(" in line
                and "async_compile" not in line]) == 1
    state, metrics = eager(state, (X, Y))
    for _ in range(30):
        state, metrics = eager(state, (X, Y))
        jstate, jmetrics = jitted(jstate, (X, Y))
    torch.testing.assert_close(jmetrics["loss"], metrics["loss"], rtol=1e-4, atol=1e-5)
    for name in state.params:
        torch.testing.assert_close(jstate.params[name], state.params[name], rtol=1e-4, atol=1e-5)


def _compiled_and_eager_linreg_agree(device, donate, options):
    torch._dynamo.reset()
    batch = fnnet.place(linreg_data(20_000, seed=3), device)
    eager, state = _linreg_step(False)
    jitted, jstate = _linreg_step(True, compile_options=options, donate=donate)
    state, jstate = fnnet.place(state, device), fnnet.place(jstate, device)
    for _ in range(30):
        state, metrics = eager(state, batch)
        jstate, jmetrics = jitted(jstate, batch)
    assert all(p.device.type == torch.device(device).type for p in jstate.params.values())
    torch.testing.assert_close(jmetrics["loss"], metrics["loss"], rtol=1e-4, atol=1e-5)
    for name in state.params:
        torch.testing.assert_close(jstate.params[name], state.params[name], rtol=1e-4, atol=1e-5)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("donate, options", [(False, None), (True, None), (True, {"mode": "reduce-overhead"})],
                         ids=["pure", "donated", "cudagraphs"])
def test_compiled_linreg_step_matches_eager_on_cuda(donate, options):
    # Compiled through fnnet.compiler.compile, its CPU pass installed: the CUDA graph must still
    # compute what eager computes (the pass's own test shows it leaves non-CPU products alone).
    _compiled_and_eager_linreg_agree("cuda", donate, options)


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("donate", [False, True], ids=["pure", "donated"])
def test_compiled_cnn_step_matches_eager_on_cuda(donate, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _compiled_and_eager_cnn_agree("cuda", donate)


def _compiled_and_eager_cnn_agree(device, donate):
    from fnnet.models import CnnModel

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = CnnModel()
    net.layers[4].p = 0.0  # compiled code draws dropout masks with other kernels: compare without
    model = fnnet.functional(net)

    def loss_fn(params, batch):
        x, y = batch
        return F.cross_entropy(model.apply(params, x), y)

    g = torch.Generator().manual_seed(1)
    batch = fnnet.place((torch.rand(128, 1, 28, 28, generator=g), torch.randint(0, 10, (128,), generator=g)), device)
    opt = optim.sgd(0.05, momentum=0.9)
    eager = fnnet.make_train_step(loss_fn, opt)
    jitted = fnnet.make_train_step(loss_fn, opt, jit=True, donate=donate)
    state = fnnet.TrainState.create(fnnet.place(model.params, device), opt)
    jstate = fnnet.TrainState.create(fnnet.place(model.params, device), opt)
    for _ in range(10):
        state, metrics = eager(state, batch)
        jstate, jmetrics = jitted(jstate, batch)
    torch.testing.assert_close(jmetrics["loss"], metrics["loss"], rtol=1e-4, atol=1e-5)
    for name in state.params:
        torch.testing.assert_close(jstate.params[name], state.params[name], rtol=1e-3, atol=1e-5)


class _TiedNet(torch.nn.Module):
    """Embedding and output layer sharing a weight: a scatter-add and skinny products in one backward."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.out = torch.nn.Linear(4, 7, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.emb(idx)))


def _small_cases():
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tied, mlp = _TiedNet(), torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))
    idx = torch.randint(0, 7, (2, 3), generator=g)
    yield tied, (idx, torch.randint(0, 7, (2, 3), generator=g)), lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten())
    x = torch.randn(64, 2, generator=g)
    yield mlp, (x, x[:, :1] * 2 - x[:, 1:]), F.mse_loss
    with torch.random.fork_rng():
        torch.manual_seed(1)
        bn = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        conv = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                   torch.nn.Flatten(), torch.nn.Linear(2, 2))
    yield bn, (torch.randn(64, 4, generator=g), torch.randint(0, 3, (64,), generator=g)), F.cross_entropy
    yield conv, (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 2, (16,), generator=g)), F.cross_entropy


# (case, every product rewritten?): the BatchNorm net's first-layer weight gradient
# (8 x 64) @ (64 x 4) is neither short nor tiny and stays a BLAS call.
@pytest.mark.parametrize("case,all_rewritten", [(0, True), (1, True), (2, False), (3, True)],
                         ids=["tied-embedding", "mlp-2-inputs", "batchnorm-mlp", "conv-skinny-head"])
def test_pass_forced_on_small_graphs_trains_like_eager(case, all_rewritten):
    """With the size threshold off, the pass rewrites the skinny products of these steps:
    inductor's code for the rewritten graph must train exactly as the eager step does."""
    from torch._inductor.utils import run_and_get_code

    module, batch, loss = list(_small_cases())[case]
    model = fnnet.functional(module)
    loss_fn = fnnet.supervised_loss(model, loss, return_outputs=False)

    opt = optim.sgd(0.1)
    buffers = dict(model.buffers) if model.buffers else None
    state = fnnet.TrainState.create(model.params, opt, buffers=buffers)
    eager = fnnet.make_train_step(loss_fn, opt)
    torch._dynamo.reset()
    with large_dim(1):
        jitted = fnnet.make_train_step(loss_fn, opt, jit=True)
        (jstate, _), codes = run_and_get_code(jitted, state, batch)
    code = "\n".join(codes)
    assert ("extern_kernels.mm" not in code) == all_rewritten
    assert "cpp_fused" in code
    estate, _ = eager(state, batch)
    for _ in range(3):
        estate, _ = eager(estate, batch)
        jstate, _ = jitted(jstate, batch)
    for name in estate.params:
        torch.testing.assert_close(jstate.params[name], estate.params[name], rtol=1e-5, atol=1e-6)
    for name in estate.buffers or {}:
        torch.testing.assert_close(jstate.buffers[name], estate.buffers[name], rtol=1e-5, atol=1e-6)


def test_pass_can_be_turned_off():
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    X, Y = linreg_data(20_000, seed=3)
    step, state = _linreg_step(True, {"options": {"post_grad_custom_post_pass": None}})
    _, codes = run_and_get_code(step, state, (X, Y))
    assert "extern_kernels.mm" in "\n".join(codes)


def test_compile_options_routing(monkeypatch):
    seen = {}

    def fake_compile(fn, **kwargs):
        seen.clear()
        seen.update(kwargs)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    f = lambda x: x  # noqa: E731
    compiler.compile(f, dynamic=False)
    assert isinstance(seen["options"]["post_grad_custom_post_pass"], compiler.SkinnyMatmulPass)
    compiler.compile(f, mode="reduce-overhead")
    assert "mode" not in seen and seen["options"]["triton.cudagraphs"] is True
    assert isinstance(seen["options"]["post_grad_custom_post_pass"], compiler.SkinnyMatmulPass)
    compiler.compile(f, mode="max-autotune", options={"post_grad_custom_post_pass": None, "max_autotune": False})
    assert "post_grad_custom_post_pass" not in seen["options"] and seen["options"]["max_autotune"] is False
    compiler.compile(f, backend="eager", mode="default")
    assert seen == {"backend": "eager", "mode": "default"}


def test_a_globally_installed_pass_is_left_in_charge(monkeypatch):
    from torch._inductor import config as inductor_config

    seen = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.update(kw) or fn)
    with inductor_config.patch(post_grad_custom_post_pass=compiler.SkinnyMatmulPass()):
        compiler.compile(lambda x: x)
    assert "options" not in seen
    compiler.compile(lambda x: x)  # the global setting is back to None: fnnet's pass again
    assert isinstance(seen["options"]["post_grad_custom_post_pass"], compiler.SkinnyMatmulPass)


def test_full_precision_jit_step_traces_whole_under_a_callers_autocast():
    torch._dynamo.reset()
    model = fnnet.functional(torch.nn.Linear(3, 2))

    def loss_fn(params, batch):
        out = model.apply(params, batch[0])
        return F.mse_loss(out, batch[1]), {"fp32": torch.tensor(float(out.dtype == torch.float32))}

    opt = optim.sgd(0.1)
    step = fnnet.make_train_step(loss_fn, opt, jit=True, compile_options={"backend": "eager", "fullgraph": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, metrics = step(fnnet.TrainState.create(model.params, opt), (torch.randn(4, 3), torch.randn(4, 2)))
    assert metrics["fp32"] == 1.0  # precision "32" switched the caller's autocast off, in one graph
