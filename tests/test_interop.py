"""fnnet.interop: DLPack round trips, flax twins (outputs and gradients), checkpoints, the optax table.

Everything but the first two tests needs the ``fnnet[jax]`` extra (jax, flax, optax) and skips
without it; those two check what happens when it is missing.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import einops
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import fnnet
import fnnet.optim as O
from fnnet import interop, tree
from fnnet.models import CnnModel

from conftest import requires_cuda
from models import bn_net

ROOT = Path(__file__).resolve().parent.parent
FAST = settings(max_examples=25, deadline=None)

# -- without the extra (these two always run) ------------------------------------------------------


def test_every_function_says_how_to_install_the_extra_when_jax_is_missing(monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "optax")] + ["jax", "flax", "optax"]:
        monkeypatch.setitem(sys.modules, name, None)  # "import jax" now fails, as without the extra
    net = nn.Linear(2, 3)
    calls = {
        "to_jax": lambda: interop.to_jax({"w": torch.ones(2)}),
        "from_jax": lambda: interop.from_jax({"w": torch.ones(2)}),
        "to_flax": lambda: interop.to_flax(dict(net.named_parameters()), net),
        "from_flax": lambda: interop.from_flax({"params": {}}, net),
        "flax_names": lambda: interop.flax_names(net),
    }
    for name, call in calls.items():
        with pytest.raises(ImportError, match=re.escape('pip install "fnnet[jax]"')) as info:
            call()
        assert f"fnnet.interop.{name} needs the optional JAX extra" in str(info.value)


def test_import_fnnet_and_interop_does_not_import_jax():
    code = ("import sys, fnnet, fnnet.interop; fnnet.interop.to_jax; fnnet.optim; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'optax')); "
            "assert not loaded, loaded")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env, timeout=120)


# -- fixtures: the extra --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def jax():
    return pytest.importorskip("jax")


@pytest.fixture(scope="module")
def optax(jax):
    return pytest.importorskip("optax")


@pytest.fixture(scope="module")
def flax(jax):
    pytest.importorskip("flax")
    import flax.linen
    import flax.serialization
    import flax.traverse_util

    return flax


# -- to_jax / from_jax ------------------------------------------------------------------------------------

DTYPES = [torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
          torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
          torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2]
VIEWS = ["fresh", "transposed", "strided", "broadcast", "offset", "channels_last"]


def _random(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 20
    if dtype == torch.bool:
        return x > 0
    if dtype.is_complex:
        return torch.complex(x, -x / 3).to(dtype)
    if not dtype.is_floating_point:
        x = x.round().abs() if dtype in (torch.uint8, torch.uint16, torch.uint32, torch.uint64) else x.round()
    return x.to(dtype)


@st.composite
def array_leaves(draw):
    """A tensor of any supported dtype, fresh or one of the views JAX cannot read in place."""
    dtype = draw(st.sampled_from(DTYPES))
    view = draw(st.sampled_from(VIEWS))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=0 if view == "fresh" else 4, max_size=4)))
    x = _random(shape, dtype, draw(st.integers(0, 2**31 - 1)))
    if view == "transposed":
        x = x.transpose(0, 2)
    elif view == "strided":
        x = _random((shape[0], 2 * shape[1], *shape[2:]), dtype, 1)[:, ::2]
    elif view == "broadcast":
        x = x[:1].expand(3, *shape[1:])
    elif view == "offset":
        x = x.reshape(-1)[1:]  # contiguous, but starts 1 element into its buffer
    elif view == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _assert_identical(a: torch.Tensor, b: torch.Tensor, where: str = "") -> None:
    assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}"
    assert torch.equal(_bits(a), _bits(b)), f"{where}: values differ"


def _shares_memory_promised(t: torch.Tensor) -> bool:
    """The documented zero-copy case: row-major contiguous, and (on the CPU) 64-byte aligned."""
    return t.numel() > 0 and t.is_contiguous() and t.data_ptr() % 64 == 0


@FAST
@given(leaves=st.lists(array_leaves(), min_size=1, max_size=5), extra=st.sampled_from([None, 3, "s", 2.5, True]))
def test_round_trip_is_exact_and_shares_memory_where_promised(jax, leaves, extra):
    src = {"a": leaves[:2], "b": {"c": tuple(leaves[2:]), "extra": extra}, "none": None}
    with jax.enable_x64(True):
        arrays = interop.to_jax(src)
        back = interop.from_jax(arrays)
    assert tree.structure(back) == tree.structure(src)
    assert back["b"]["extra"] is extra or back["b"]["extra"] == extra  # non-array leaves pass through
    for (path, t), a, u in zip(tree.leaves_with_path(src), tree.leaves(arrays), tree.leaves(back)):
        if not isinstance(t, torch.Tensor):
            continue
        assert isinstance(a, jax.Array) and str(a.dtype) == str(t.dtype).replace("torch.", ""), path
        _assert_identical(u, t, path)
        np.testing.assert_array_equal(np.asarray(a).reshape(-1).view(np.uint8), _bits(t).numpy(), err_msg=path)
        if _shares_memory_promised(t):
            assert a.unsafe_buffer_pointer() == t.data_ptr() == u.data_ptr(), f"{path}: copied"
        # JAX arrays always go to torch without a copy
        assert u.numel() == 0 or u.data_ptr() == a.unsafe_buffer_pointer(), f"{path}: from_jax copied"


@FAST
@given(leaves=st.lists(array_leaves(), min_size=1, max_size=4))
def test_copy_true_shares_nothing(jax, leaves):
    with jax.enable_x64(True):
        arrays = interop.to_jax(leaves, copy=True)
        back = interop.from_jax(arrays, copy=True)
    for t, a, u in zip(leaves, arrays, back):
        _assert_identical(u, t)
        if t.numel():
            assert a.unsafe_buffer_pointer() != t.data_ptr() and u.data_ptr() != a.unsafe_buffer_pointer()


def test_64_bit_leaves_need_jax_64_bit_mode(jax):
    batch = {"x": torch.ones(2, 3, dtype=torch.float64), "y": torch.tensor([1, 2]), "w": torch.ones(2)}
    assert not jax.config.jax_enable_x64
    with pytest.raises(TypeError, match=r"64-bit mode is off.*x \(float64 -> float32\), y \(int64 -> int32\).*jax_enable_x64"):
        interop.to_jax(batch)
    ok = interop.to_jax({"y": batch["y"].int(), "w": batch["w"]})
    assert ok["y"].dtype == np.int32 and ok["w"].dtype == np.float32


def test_numpy_leaves_negative_strides_read_only_and_bfloat16(jax):
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    frozen = base.copy()
    frozen.setflags(write=False)
    bf16 = np.asarray(jax.numpy.linspace(-3, 3, 7, dtype=jax.numpy.bfloat16))  # an ml_dtypes numpy array
    cases = {"reversed": base[::-1], "both": base[::-1, ::-2], "transposed": base.T, "read_only": frozen,
             "bf16": bf16, "bool": base > 3}
    back = interop.from_jax(cases)
    for name, x in cases.items():
        t = back[name]
        expected = x.view(np.uint16) if name == "bf16" else x
        got = t.view(torch.uint16) if name == "bf16" else t
        np.testing.assert_array_equal(got.numpy(), expected, err_msg=name)
    assert back["bf16"].dtype == torch.bfloat16 and back["bool"].dtype == torch.bool
    assert back["transposed"].data_ptr() == base.ctypes.data  # writable, positive strides: shared
    assert back["read_only"].data_ptr() != frozen.ctypes.data  # a read-only buffer stays unwritten
    arrays = interop.to_jax({k: v for k, v in cases.items() if k != "bf16"})
    for name, a in arrays.items():
        np.testing.assert_array_equal(np.asarray(a), cases[name], err_msg=name)


def test_from_jax_keeps_jax_containers_and_refuses_tracers(jax, optax, flax):
    params = {"w": jax.numpy.ones((2, 3)), "b": jax.numpy.zeros(3)}
    state = optax.adam(0.1).init(params)
    back = interop.from_jax(state)
    assert type(back) is type(state) and type(back[0]) is type(state[0])
    assert isinstance(back[0].mu["w"], torch.Tensor) and back[0].count.dtype == torch.int32
    frozen = interop.from_jax(flax.core.FrozenDict(params))
    assert isinstance(frozen, flax.core.FrozenDict) and isinstance(frozen["w"], torch.Tensor)
    with pytest.raises(TypeError, match="'x' is a JAX tracer"):
        jax.jit(lambda x: interop.from_jax({"x": x}))(params["w"])


def test_devices_jax_cannot_read_are_errors_that_say_what_to_do(jax):
    with pytest.raises(ValueError, match=r"'p' is on meta; JAX reads CPU and CUDA tensors"):
        interop.to_jax({"p": torch.ones(2, device="meta")})
    if any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("JAX sees a GPU here")
    from fnnet.interop.jax import _jax_gpu

    with pytest.raises(ValueError, match=r"'p' is on cuda:0, but JAX sees no such GPU.*jax\[cuda12\].*fnnet.place"):
        _jax_gpu(jax, torch.device("cuda:0"), "to_jax", "p")


@requires_cuda
def test_cuda_tensors_become_jax_gpu_arrays_on_the_same_device(jax):
    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("JAX sees no GPU (the CPU-only jax wheel)")
    t = torch.randn(64, 32, device=f"cuda:{torch.cuda.device_count() - 1}")
    a = interop.to_jax(t)
    (device,) = a.devices()
    assert device.platform == "gpu" and getattr(device, "local_hardware_id", device.id) == t.device.index
    assert a.unsafe_buffer_pointer() == t.data_ptr()
    u = interop.from_jax(a * 2)
    assert u.device == t.device and torch.equal(u, t * 2)


# -- flax twins ------------------------------------------------------------------------------------------------


class EmbedNet(nn.Module):
    """Embedding, LayerNorm and Linear; its twin is flax's Embed, LayerNorm(epsilon=1e-5), Dense."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 4)

    def forward(self, ids):
        return self.head(self.norm(self.embed(ids)).mean(1))


class Tower(nn.Module):
    """Nested modules whose flax twin uses explicit names: the names= case."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 8))
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.encoder(x)))


TOWER_NAMES = {"encoder.0": "encoder/Dense_0", "encoder.2": "encoder/Dense_1", "head": "head"}


@pytest.fixture(scope="module")
def twins(jax, flax):
    """Torch module, flax twin, and a batch for each (torch NCHW, flax NHWC)."""
    fnn, jnp = flax.linen, jax.numpy

    class FlaxMlp(fnn.Module):
        @fnn.compact
        def __call__(self, x, train=False):
            x = fnn.relu(fnn.Dense(16)(x))
            x = jnp.tanh(fnn.Dense(16)(x))
            return fnn.Dense(3)(x)

    class FlaxCnn(fnn.Module):  # the chapter's CnnModel
        @fnn.compact
        def __call__(self, x, train=False):
            x = fnn.Conv(32, (3, 3), padding="VALID")(x)
            x = fnn.max_pool(x, (2, 2), strides=(2, 2))
            x = fnn.Conv(64, (5, 5), padding="VALID")(x)
            x = fnn.max_pool(x, (2, 2), strides=(2, 2))
            x = fnn.Dropout(0.1, broadcast_dims=(1, 2), deterministic=not train)(x)  # Dropout2d
            x = jnp.max(x, axis=(1, 2))  # AdaptiveMaxPool2d((1, 1)) + Flatten
            x = fnn.relu(fnn.Dense(32)(x))
            return fnn.Dense(10)(x)

    class FlaxBnNet(fnn.Module):  # tests/models.py's bn_net
        @fnn.compact
        def __call__(self, x, train=False):
            x = fnn.Dense(8)(x)
            x = fnn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
            return fnn.Dense(3)(fnn.relu(x))

    class FlaxEmbedNet(fnn.Module):
        @fnn.compact
        def __call__(self, ids, train=False):
            x = fnn.LayerNorm(epsilon=1e-5)(fnn.Embed(11, 6)(ids))
            return fnn.Dense(4)(x.mean(1))

    class Encoder(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.relu(fnn.Dense(8)(x))  # one layer per line: flax numbers layers as they are built
            return fnn.Dense(8)(x)

    class FlaxTower(fnn.Module):
        @fnn.compact
        def __call__(self, x, train=False):
            return fnn.Dense(2, name="head")(jnp.tanh(Encoder(name="encoder")(x)))

    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 1, 28, 28, generator=g)
    vectors = torch.randn(7, 5, generator=g)
    return {
        "mlp": SimpleNamespace(torch=lambda: nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Linear(16, 16), nn.Tanh(),
                                                           nn.Linear(16, 3)),
                               flax=FlaxMlp(), x=vectors, xj=vectors, names=None, y=torch.tensor([0, 1, 2, 0, 1, 2, 0])),
        "cnn": SimpleNamespace(torch=CnnModel, flax=FlaxCnn(), x=images,
                               xj=einops.rearrange(images, "n c h w -> n h w c"), names=None,
                               y=torch.tensor([0, 3, 9, 1, 4, 7])),
        "bn": SimpleNamespace(torch=bn_net, flax=FlaxBnNet(), x=torch.randn(8, 4, generator=g), names=None),
        "embed": SimpleNamespace(torch=EmbedNet, flax=FlaxEmbedNet(), x=torch.randint(0, 11, (5, 7), generator=g),
                                 names=None),
        "tower": SimpleNamespace(torch=Tower, flax=FlaxTower(), x=vectors, xj=vectors, names=TOWER_NAMES),
    }


def _jax_in(twin):
    """The twin's batch for flax: NHWC images, int32 ids (JAX's default integer)."""
    x = getattr(twin, "xj", twin.x)
    return interop.to_jax(x.int() if x.dtype == torch.int64 else x)


def _flax_init(jax, twin):
    """The flax model's own initial variables (made once per twin: initialising is JAX's slow part)."""
    if not hasattr(twin, "variables"):
        twin.variables = jax.jit(twin.flax.init)(jax.random.key(1), _jax_in(twin))
    return twin.variables


def _close(a, b, what, tol=1e-5):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("name", ["mlp", "cnn", "embed", "tower"])
def test_params_converted_both_ways_give_the_same_outputs(jax, twins, name):
    twin = twins[name]
    torch.manual_seed(2)
    net = twin.torch()
    model = fnnet.functional(net)
    xj = _jax_in(twin)
    # flax -> torch: the flax model's initial weights serve the torch model
    variables = _flax_init(jax, twin)
    params, buffers = interop.from_flax(variables, net, names=twin.names)
    assert list(params) == list(model.params) and buffers == {}
    _close(model.apply(params, twin.x), interop.from_jax(twin.flax.apply(variables, xj)), f"{name} flax -> torch")
    # torch -> flax: torch's weights serve the flax model
    converted = interop.to_flax(model.params, net, names=twin.names)
    assert tree.structure(interop.from_jax(converted)) == tree.structure(interop.from_jax(variables))
    _close(interop.from_jax(twin.flax.apply(converted, xj)), model.apply(model.params, twin.x), f"{name} torch -> flax")
    # and both round trips are exact
    again, _ = interop.from_flax(converted, net, names=twin.names)
    assert tree.all_equal(again, model.params)
    for (path, a), b in zip(tree.leaves_with_path(interop.from_jax(variables)),
                            tree.leaves(interop.from_jax(interop.to_flax(params, net, names=twin.names)))):
        _assert_identical(b, a, path)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_jax_grad_of_the_flax_model_equals_fnnet_grad_of_its_torch_twin(jax, optax, twins, name):
    twin = twins[name]
    net = twin.torch()
    model = fnnet.functional(net)
    variables = _flax_init(jax, twin)
    params, _ = interop.from_flax(variables, net)
    xj, yj = _jax_in(twin), interop.to_jax(twin.y.int())

    def flax_loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(twin.flax.apply({"params": p}, xj), yj).mean()

    def torch_loss(p):
        return F.cross_entropy(model.apply(p, twin.x), twin.y)

    jax_grads = jax.jit(jax.grad(flax_loss))(variables["params"])
    torch_grads = fnnet.grad(torch_loss)(params)
    _close(float(flax_loss(variables["params"])), float(torch_loss(params)), f"{name} loss")
    # compare in flax's layout and in torch's (gradients are keyed like params)
    ours = interop.from_jax(interop.to_flax(torch_grads, net)["params"])
    for (path, a), b in zip(tree.leaves_with_path(interop.from_jax(jax_grads)), tree.leaves(ours)):
        _close(b, a, f"{name} grad {path}")
    theirs, _ = interop.from_flax({"params": jax_grads}, net)
    for k in torch_grads:
        _close(theirs[k], torch_grads[k], f"{name} grad {k}")


def test_batch_stats_round_trip_and_serve_both_sides(jax, twins):
    twin = twins["bn"]
    net = twin.torch()
    with torch.no_grad():  # running stats that are not the initial 0 and 1
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].num_batches_tracked.fill_(7)
    model = fnnet.functional(net)
    variables = interop.to_flax(model.params, net, buffers=model.buffers)
    assert set(variables) == {"params", "batch_stats"}
    assert set(variables["batch_stats"]["BatchNorm_0"]) == {"mean", "var"}
    xj = interop.to_jax(twin.x)
    _close(interop.from_jax(twin.flax.apply(variables, xj)), model.apply(model.params, twin.x), "eval torch -> flax")
    params, buffers = interop.from_flax(variables, net)
    assert list(buffers) == list(model.buffers) and tree.all_equal(buffers, model.buffers)
    assert tree.all_equal(params, model.params)
    # statistics flax computes in train mode come back as torch buffers
    _, updated = twin.flax.apply(variables, xj, train=True, mutable=["batch_stats"])
    new_vars = {"params": variables["params"], **updated}
    params, buffers = interop.from_flax(new_vars, net)
    assert not torch.equal(buffers["1.running_mean"], model.buffers["1.running_mean"])
    assert int(buffers["1.num_batches_tracked"]) == 7  # flax does not count batches: the module's value
    _close(model.apply(params, twin.x, buffers=buffers), interop.from_jax(twin.flax.apply(new_vars, xj)),
           "eval flax -> torch")


def test_default_names_are_flax_automatic_names():
    pytest.importorskip("jax")
    assert interop.flax_names(CnnModel()) == {"layers.0": "Conv_0", "layers.2": "Conv_1", "layers.7": "Dense_0",
                                              "layers.9": "Dense_1"}
    assert interop.flax_names(Tower(), names={"head": ("Out",)}) == {
        "encoder.0": "Dense_0", "encoder.2": "Dense_1", "head": "Out"}


def test_every_mismatch_is_listed_in_one_error_by_path(jax, twins):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 4)
            self.rnn = nn.GRU(4, 4)
            self.out = nn.Linear(4, 2, bias=False)

    net = Odd()
    variables = {"params": {"Dense_0": {"kernel": np.zeros((4, 5), np.float32), "bias": np.zeros(4, np.float32)},
                            "Dense_2": {"kernel": np.zeros((4, 2), np.float32)}},
                 "intermediates": {"x": np.zeros(1, np.float32)}}
    with pytest.raises(ValueError) as info:
        interop.from_flax(variables, net)
    msg = str(info.value)
    assert msg.startswith("from_flax: variables do not match Odd:")
    for part in ["unknown layer type: 'rnn' (GRU)",
                 "missing (in the module, not in variables): params/Dense_1/kernel (for out.weight)",
                 "unexpected (in variables, not in the module): params/Dense_2/kernel, intermediates/x",
                 "shape mismatch: params/Dense_0/kernel is (4, 5), Odd needs (5, 4) (fc.weight (4, 5) as o i -> i o)"]:
        assert part in msg, f"{part!r} not in:\n{msg}"

    bn = bn_net()
    sd = bn.state_dict()
    with pytest.raises(ValueError) as info:
        interop.to_flax({**sd, "0.weight": torch.zeros(3, 3)}, bn)
    msg = str(info.value)
    for part in ["missing buffers (in the module, not given): 1.running_mean, 1.running_var (pass buffers=",
                 ("unexpected params (given, not in the module): 1.running_mean, 1.running_var, "
                  "1.num_batches_tracked (buffers go in buffers=)"),
                 "shape mismatch: params['0.weight'] is (3, 3), the module has (8, 4)"]:
        assert part in msg, f"{part!r} not in:\n{msg}"

    with pytest.raises(ValueError, match=r"names: 'encoder' is not a layer of Tower.*\n.*'encoder.0' and 'head' both map to flax 'Out'"):
        interop.flax_names(Tower(), names={"encoder": "Encoder_0", "encoder.0": "Out", "head": "Out"})
    with pytest.raises(ValueError, match=r"must hold a 'params' collection.*wrap it as \{'params': params\}"):
        interop.from_flax({"Dense_0": {"kernel": np.zeros((5, 4))}}, nn.Linear(5, 4))
    with pytest.raises(TypeError, match="pass the nn.Module it was made from"):
        interop.to_flax({}, fnnet.functional(nn.Linear(2, 2)))


def test_tied_weights_convert_once():
    pytest.importorskip("jax")
    net = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 7, bias=False))
    net[1].weight = net[0].weight  # weight tying, as in a language model's head
    model = fnnet.functional(net)
    variables = interop.to_flax(model.params, net)
    assert list(variables["params"]) == ["Embed_0"]  # flax holds a tie once (Embed.attend)
    params, _ = interop.from_flax(variables, net)
    assert tree.all_equal(params, model.params)


# -- checkpoints ------------------------------------------------------------------------------------------------


def test_fnnet_checkpoints_are_read_by_safetensors_flax(jax, flax, twins, tmp_path):
    import safetensors.flax

    twin = twins["cnn"]
    net = twin.torch()
    model = fnnet.functional(net)
    extra = {"half": torch.randn(3, 2).to(torch.bfloat16), "mask": torch.tensor([True, False, True])}
    fnnet.save(tmp_path / "ckpt.safetensors", {"params": model.params, **extra})
    loaded = safetensors.flax.load_file(str(tmp_path / "ckpt.safetensors"))  # flat key paths
    assert set(loaded) == {f"params.{k}" for k in model.params} | set(extra)
    for k, t in {**{f"params.{k}": v for k, v in model.params.items()}, **extra}.items():
        _assert_identical(interop.from_jax(loaded[k]), t, k)
    # a flax model's variables saved by fnnet, read back on the JAX side, serve the flax model
    fnnet.save(tmp_path / "flax.safetensors", interop.from_jax(interop.to_flax(model.params, net)))
    variables = flax.traverse_util.unflatten_dict(safetensors.flax.load_file(str(tmp_path / "flax.safetensors")),
                                                  sep=".")
    _close(interop.from_jax(twin.flax.apply(variables, interop.to_jax(twin.xj))), model.apply(model.params, twin.x),
           "flax from an fnnet checkpoint")


def test_fnnet_load_and_from_flax_read_checkpoints_written_from_jax(jax, flax, twins, tmp_path):
    import safetensors.flax

    twin = twins["cnn"]
    net = twin.torch()
    variables = _flax_init(jax, twin)
    path = str(tmp_path / "from_jax.safetensors")
    safetensors.flax.save_file(flax.traverse_util.flatten_dict(variables, sep="."), path)
    flat = fnnet.load(path)  # no fnnet metadata: a flat {name: tensor} dict
    assert set(flat) == {f"params.{layer}.{name}" for layer in ("Conv_0", "Conv_1", "Dense_0", "Dense_1")
                         for name in ("kernel", "bias")}
    expected, _ = interop.from_flax(variables, net)
    assert tree.all_equal(interop.from_flax(flat, net)[0], expected)
    # msgpack bytes (flax.serialization.to_bytes) and "/"-separated flat dicts too
    assert tree.all_equal(interop.from_flax(flax.serialization.to_bytes(variables), net)[0], expected)
    slashed = flax.traverse_util.flatten_dict(variables, sep="/")
    assert tree.all_equal(interop.from_flax(slashed, net)[0], expected)
    net.load_state_dict(expected)  # and into the module itself
    _close(net.eval()(twin.x), interop.from_jax(twin.flax.apply(variables, interop.to_jax(twin.xj))), "module")


# -- what fnnet.interop refuses, and says why ----------------------------------------------------------------

NOT_MSGPACK = r"^from_flax: these \d+ bytes are not a flax msgpack state dict"


def _damage(data: bytes, kind: str, where: int, mask: int) -> tuple[bytes, int]:
    """``data`` cut at ``where`` or with the byte at ``where`` XOR-ed with ``mask``; and the position."""
    where %= len(data)
    if kind == "truncated":
        return data[:where], where
    return data[:where] + bytes([data[where] ^ mask]) + data[where + 1:], where


@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from(["truncated", "flipped"]), where=st.integers(0, 2**31), mask=st.integers(1, 255))
def test_corrupt_or_truncated_msgpack_either_loads_or_is_a_clear_value_error(jax, flax, twins, kind, where, mask):
    torch.manual_seed(0)
    net = twins["mlp"].torch()
    # torch's initial weights, biases included, so that no two arrays hold the same bytes (found below)
    variables = interop.to_flax(fnnet.functional(net).params, net)
    data = flax.serialization.to_bytes(variables)
    expected, _ = interop.from_flax(data, net)
    damaged, at = _damage(data, kind, where, mask)
    try:
        params, _ = interop.from_flax(damaged, net)
    except ValueError as exc:
        msg = str(exc)
        # bytes that do not decode, or decode to something that is not a state dict, say so; bytes that decode
        # to a state dict whose names or shapes were hit list what does not match, as for any variables
        assert re.match(NOT_MSGPACK, msg) or msg.startswith(("from_flax: variables do not match Sequential:",
                                                             "from_flax: variables must hold a 'params' collection")), msg
        if re.match(NOT_MSGPACK, msg):
            assert "flax.serialization.to_bytes" in msg, msg
        return
    assert kind == "flipped", "a truncated file loaded"
    if tree.all_equal(params, expected):
        return
    # msgpack holds no checksum: a flipped byte inside an array's raw data is a valid file with another number
    inside = []
    for leaf in jax.tree_util.tree_leaves(variables):
        raw = np.asarray(leaf).tobytes()
        start = data.find(raw)
        assert start >= 0 and data.find(raw, start + 1) < 0
        inside.append(start <= at < start + len(raw))
    assert any(inside), f"byte {at} XOR {mask} changed the loaded params outside any array's data"


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x82", b"\x81\xa6params", b"\x81\x91\x01\x02", b"\x07", b"\x90"],
                         ids=["empty", "reserved-byte", "map-cut", "key-cut", "list-key", "an-int", "a-list"])
def test_bytes_that_are_not_a_flax_state_dict_say_so(jax, flax, data):
    with pytest.raises(ValueError, match=NOT_MSGPACK + r".*flax.serialization.to_bytes\(variables\)"):
        interop.from_flax(data, nn.Linear(2, 3))


@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_to_jax_of_a_sparse_tensor_says_dense_is_supported(jax, layout):
    t = torch.eye(3).to_sparse() if layout == "sparse_coo" else torch.eye(3).to_sparse_csr()
    with pytest.raises(TypeError, match=rf"to_jax: 'w' is a torch.{layout} tensor.*dense.*\.to_dense\(\)"):
        interop.to_jax({"w": t})
    np.testing.assert_array_equal(np.asarray(interop.to_jax({"w": t.to_dense()})["w"]), np.eye(3))


# -- from_flax(..., check=): does the converted torch module compute what the flax model does? ---------------


@pytest.fixture(scope="module")
def mnist_example(jax, flax):
    """flax's MNIST example CNN (examples/mnist), and its torch twin with a given flatten."""
    fnn = flax.linen

    class FlaxMnist(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.relu(fnn.Conv(32, (3, 3))(x))
            x = fnn.avg_pool(x, (2, 2), strides=(2, 2))
            x = fnn.relu(fnn.Conv(64, (3, 3))(x))
            x = fnn.avg_pool(x, (2, 2), strides=(2, 2))
            x = x.reshape((x.shape[0], -1))  # flatten: flax's arrays are NHWC
            x = fnn.relu(fnn.Dense(256)(x))
            return fnn.Dense(10)(x)

    class TorchMnist(nn.Module):
        def __init__(self, flatten):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                                          nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
            self.flatten = flatten
            self.head = nn.Sequential(nn.Linear(7 * 7 * 64, 256), nn.ReLU(), nn.Linear(256, 10))

        def forward(self, x):
            return self.head(self.flatten(self.features(x)))

    x = torch.rand(3, 28, 28, 1, generator=torch.Generator().manual_seed(0))  # NHWC, as flax takes it
    flax_model = FlaxMnist()
    variables = jax.jit(flax_model.init)(jax.random.key(0), interop.to_jax(x))
    return SimpleNamespace(flax=flax_model, variables=variables, x_nhwc=x, torch=TorchMnist)


def _flatten_nchw(x):
    return x.flatten(1)  # the obvious torch twin of x.reshape((n, -1)): channels first


def _flatten_like_flax(x):
    return einops.rearrange(x, "n c h w -> n (h w c)")


def test_the_flatten_order_trap_is_real_and_check_names_the_layer_after_it(jax, mnist_example):
    ex = mnist_example
    net = ex.torch(_flatten_nchw)
    x_nchw = einops.rearrange(ex.x_nhwc, "n h w c -> n c h w")
    params, _ = interop.from_flax(ex.variables, net)  # the weights convert: every shape matches
    flax_out = interop.from_jax(ex.flax.apply(ex.variables, interop.to_jax(ex.x_nhwc)))
    gap = float((fnnet.functional(net).apply(params, x_nchw) - flax_out).abs().max())
    assert gap > 0.05, gap  # ...and the outputs are wrong, with no error
    with pytest.raises(ValueError) as info:
        interop.from_flax(ex.variables, net, check=(ex.flax, interop.to_jax(ex.x_nhwc)))
    msg = str(info.value)
    assert msg.startswith("from_flax: check: the torch module's output differs from the flax model's"), msg
    assert "first layer whose output differs is 'head.0' (Linear, flax 'Dense_0')" in msg, msg
    assert "layers before it agree: 'features.0' (flax 'Conv_0'), 'features.3' (flax 'Conv_1')" in msg, msg
    assert "n c h w -> n (h w c)" in msg, msg  # the fix for the likeliest cause


@pytest.mark.parametrize("sample", ["jax", "torch", "numpy"])
def test_check_passes_for_the_right_flatten_and_takes_any_array(jax, mnist_example, sample):
    ex = mnist_example
    net = ex.torch(_flatten_like_flax)
    x = {"jax": interop.to_jax(ex.x_nhwc), "torch": ex.x_nhwc, "numpy": ex.x_nhwc.numpy()}[sample]
    params, buffers = interop.from_flax(ex.variables, net, check=(ex.flax, x))
    assert tree.all_equal(params, interop.from_flax(ex.variables, net)[0]) and buffers == {}
    model = fnnet.functional(net)
    _close(model.apply(params, einops.rearrange(ex.x_nhwc, "n h w c -> n c h w")),
           interop.from_jax(ex.flax.apply(ex.variables, interop.to_jax(ex.x_nhwc))), "right flatten", tol=1e-4)


@pytest.mark.parametrize("name", ["mlp", "cnn", "bn", "embed", "tower"])
def test_check_passes_for_every_twin(jax, flax, twins, name):
    twin = twins[name]
    net = twin.torch()
    variables = interop.to_flax(fnnet.functional(net).params, net, names=twin.names,
                                buffers=fnnet.functional(net).buffers or None)
    flat = dict(flax.traverse_util.flatten_dict(interop.from_jax(variables), sep="."))  # a torch checkpoint's form
    for given in (variables, flat):
        training = [m.training for m in net.modules()]
        params, _ = interop.from_flax(given, net, names=twin.names, check=(twin.flax, _jax_in(twin)))
        assert tree.all_equal(params, fnnet.functional(net).params)
        assert [m.training for m in net.modules()] == training  # the module's modes are left as they were
        assert not net._forward_hooks and all(not m._forward_hooks for m in net.modules())


def test_check_finds_a_wrong_epsilon_and_a_missing_activation(jax, flax, twins):
    fnn, jnp = flax.linen, jax.numpy
    twin = twins["embed"]
    net = twin.torch()

    class DefaultEpsilon(fnn.Module):  # flax's LayerNorm default eps (1e-6), not torch's 1e-5
        @fnn.compact
        def __call__(self, ids):
            return fnn.Dense(4)(fnn.LayerNorm()(fnn.Embed(11, 6)(ids)).mean(1))

    with torch.no_grad():
        net.embed.weight.mul_(1e-3)  # embeddings with a variance near eps, where eps shows
    variables = interop.to_flax(fnnet.functional(net).params, net)
    ids = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    with pytest.raises(ValueError, match=r"first layer whose output differs is 'norm' \(LayerNorm, flax 'LayerNorm_0'\)"):
        interop.from_flax(variables, net, check=(DefaultEpsilon(), ids))

    mlp = twins["mlp"].torch()

    class NoTanh(fnn.Module):
        @fnn.compact
        def __call__(self, x):
            x = fnn.relu(fnn.Dense(16)(x))
            x = fnn.Dense(16)(x)  # the torch twin has a tanh here
            return fnn.Dense(3)(x)

    variables = interop.to_flax(fnnet.functional(mlp).params, mlp)
    with pytest.raises(ValueError, match=r"first layer whose output differs is '4' \(Linear, flax 'Dense_2'\)"):
        interop.from_flax(variables, mlp, check=(NoTanh(), interop.to_jax(twins["mlp"].x)))


def test_check_must_be_a_flax_module_and_a_sample(jax, twins):
    net = twins["mlp"].torch()
    variables = interop.to_flax(fnnet.functional(net).params, net)
    for bad in (twins["mlp"].flax, (twins["mlp"].flax,), (net, twins["mlp"].x)):
        with pytest.raises(TypeError, match=r"check must be \(flax_module, sample_input\)"):
            interop.from_flax(variables, net, check=bad)


# -- the optax table (docs/guides/coming-from-jax.md): one test per row ------------------------------------------------

# (id, fnnet.optim expression, optax expression, optax expression that must differ, or None).
# Symbols mean the same on both sides; `sched` is exponential_decay(lr, k, rate) on each side.
OPTAX_TABLE = [
    ("sgd", "sgd(lr)", "optax.sgd(lr)", None),
    ("sgd_momentum", "sgd(lr, momentum=m)", "optax.sgd(lr, momentum=m)", None),
    ("sgd_nesterov", "sgd(lr, momentum=m, nesterov=True)", "optax.sgd(lr, momentum=m, nesterov=True)", None),
    ("sgd_l2", "sgd(lr, momentum=m, weight_decay=wd)",
     "optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=m))", None),
    ("adam", "adam(lr, b1, b2, eps)", "optax.adam(lr, b1, b2, eps)", None),
    ("adam_l2", "adam(lr, weight_decay=wd)", "optax.chain(optax.add_decayed_weights(wd), optax.adam(lr))", None),
    ("adamw", "adamw(lr, weight_decay=wd)", "optax.adamw(lr, weight_decay=wd)", None),
    ("adamw_default", "adamw(lr)", "optax.adamw(lr, weight_decay=1e-2)", "optax.adamw(lr)"),
    ("adamw_optax_default", "adamw(lr, weight_decay=1e-4)", "optax.adamw(lr)", None),
    ("rmsprop", "rmsprop(lr, alpha, eps)", "optax.rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False)",
     "optax.rmsprop(lr, decay=alpha, eps=eps)"),
    ("rmsprop_default", "rmsprop(lr)", "optax.rmsprop(lr, decay=0.99, eps_in_sqrt=False)", None),
    ("rmsprop_eps_in_sqrt", "chain(scale_by_rms(alpha, eps), scale_by_learning_rate(lr))",
     "optax.rmsprop(lr, decay=alpha, eps=eps)", None),
    ("rmsprop_centered_momentum", "rmsprop(lr, alpha, eps, momentum=m, centered=True)",
     "optax.rmsprop(lr, decay=alpha, eps=eps, eps_in_sqrt=False, centered=True, momentum=m)", None),
    ("rmsprop_momentum_schedule", "rmsprop(sched, alpha, eps, momentum=m)",
     ("optax.chain(optax.scale_by_rms(alpha, eps, eps_in_sqrt=False), optax.trace(m), "
      "optax.scale_by_learning_rate(sched))"),
     "optax.rmsprop(sched, decay=alpha, eps=eps, eps_in_sqrt=False, momentum=m)"),
    ("rmsprop_momentum_schedule_optax",
     "chain(scale_by_rms(alpha, eps, eps_in_sqrt=False), scale_by_learning_rate(sched), trace(m))",
     "optax.rmsprop(sched, decay=alpha, eps=eps, eps_in_sqrt=False, momentum=m)", None),
    ("adagrad_optax", "chain(scale_by_rss(0.1, 1e-7), scale_by_learning_rate(lr))", "optax.adagrad(lr)", None),
    ("clip_by_global_norm", "chain(clip_by_global_norm(c), adam(lr))",
     "optax.chain(optax.clip_by_global_norm(c), optax.adam(lr))", None),
    ("exponential_decay", "exponential_decay(lr, k, rate, transition_begin=5, end_value=1e-3)",
     "optax.exponential_decay(lr, k, rate, transition_begin=5, end_value=1e-3)", None),
    ("step_lr", "step_lr(lr, k, rate)", "optax.exponential_decay(lr, k, rate, staircase=True)", None),
    ("warmup_cosine_decay_schedule", "warmup_cosine_decay_schedule(0.0, lr, w, n, end)",
     "optax.warmup_cosine_decay_schedule(0.0, lr, w, n, end)", None),
]
SYMBOLS = dict(lr=0.02, m=0.9, wd=0.05, b1=0.8, b2=0.99, eps=1e-3, alpha=0.9, c=0.5, k=10, rate=0.5, w=10, n=50,
               end=1e-3)
STEPS = 50


def _grad(p: torch.Tensor, step: int) -> torch.Tensor:
    """A gradient that depends on the parameter (a wavy bowl, as in test_optim): trajectories feed back."""
    return p - math.sin(0.3 * step) + 0.1 * torch.sin(3.0 * p + step)


def _build(expr: str, side: str, optax):
    if side == "fnnet":
        scope = {**{name: getattr(O, name) for name in O.__all__}, **SYMBOLS, "sched": O.exponential_decay(SYMBOLS["lr"], SYMBOLS["k"], SYMBOLS["rate"])}
    else:
        scope = {"optax": optax, **SYMBOLS,
                 "sched": optax.exponential_decay(SYMBOLS["lr"], SYMBOLS["k"], SYMBOLS["rate"])}
    return eval(expr, scope)  # the table's own text, so that the docs cannot drift from the tests


def _params():
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(5, 3, generator=g), "b": torch.randn(3, generator=g), "s": torch.randn((), generator=g)}


def _fnnet_trajectory(opt):
    params, out = _params(), []
    state = opt.init(params)
    for step in range(STEPS):
        updates, state = opt.update(tree.map(lambda p: _grad(p, step), params), state, params)
        params = O.apply_updates(params, updates)
        out.append(params)
    return out


def _optax_trajectory(opt, optax, jax):
    params, out = interop.to_jax(_params(), copy=True), []
    state = opt.init(params)
    update = jax.jit(opt.update)
    for step in range(STEPS):
        # the same gradient, computed by torch on the JAX params (no copies either way)
        grads = interop.to_jax(tree.map(lambda p: _grad(p, step), interop.from_jax(params)))
        updates, state = update(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append(interop.from_jax(params, copy=True))
    return out


def _max_relative_gap(ours, theirs):
    gap = 0.0
    for a, b in zip(ours, theirs):
        for x, y in zip(tree.leaves(a), tree.leaves(b)):
            gap = max(gap, float((x - y).abs().max()) / max(float(y.abs().max()), 1.0))
    return gap


@pytest.mark.parametrize("row", OPTAX_TABLE, ids=[r[0] for r in OPTAX_TABLE])
def test_optax_table_row(jax, optax, row):
    _, ours_expr, theirs_expr, differs_expr = row
    ours, theirs = _build(ours_expr, "fnnet", optax), _build(theirs_expr, "optax", optax)
    if not isinstance(ours, O.GradientTransformation):  # a schedule: the same values, and as Adam's learning rate
        np.testing.assert_allclose([ours(s) for s in range(70)], [float(theirs(s)) for s in range(70)], rtol=1e-6)
        ours, theirs = O.adam(ours), optax.adam(theirs)
    ours_run = _fnnet_trajectory(ours)
    for step, (a, b) in enumerate(zip(ours_run, _optax_trajectory(theirs, optax, jax))):
        for path, x in tree.leaves_with_path(a):
            scale = max(float(b[path].abs().max()), 1.0)
            torch.testing.assert_close(x, b[path], rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"step {step} {path}: {m}")
    if differs_expr is not None:  # the row's warning is real: the look-alike call gives other numbers
        gap = _max_relative_gap(ours_run, _optax_trajectory(_build(differs_expr, "optax", optax), optax, jax))
        assert gap > 1e-3, f"{differs_expr} was expected to differ from {ours_expr}, max relative gap {gap:.1e}"


def _readme_table() -> list[tuple[str, str]] | None:
    text = (ROOT / "docs" / "guides" / "coming-from-jax.md").read_text()
    start = text.find("| `fnnet.optim` | `optax` |")
    if start < 0:
        return None
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows.append((cells[0].strip("`"), cells[1].strip("`")))
    return rows


def test_readme_optax_table_is_the_tested_table():
    rows = _readme_table()
    if rows is None:
        pytest.fail("docs/guides/coming-from-jax.md has no optax table")
    assert rows == [(ours, theirs) for _, ours, theirs, _ in OPTAX_TABLE]
