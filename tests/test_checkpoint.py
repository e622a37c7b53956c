import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import types
from typing import Any, NamedTuple

import pytest
import safetensors
import safetensors.torch
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

import fnnet
from fnnet import checkpoint, random as fr, tree
from conftest import requires_cuda, scalars, tensors, trees


class AdamLike(NamedTuple):
    count: torch.Tensor
    mu: Any
    nu: Any


@tree.register_dataclass
@dataclasses.dataclass(frozen=True)
class State:
    """The shape of fnnet.TrainState, for tests that must not depend on fnnet.train."""

    params: Any
    opt_state: Any
    step: int = 0
    buffers: Any = None
    key: Any = None


@tree.register_dataclass(static=("period", "factor"))
@dataclasses.dataclass(frozen=True)
class Scale:
    scale: torch.Tensor
    period: int = 2000
    factor: float = 2.0


def roundtrip(t, **load_kwargs):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.safetensors")
        checkpoint.save(path, t)
        names = set(checkpoint.load_state_dict(path))
        return checkpoint.load(path, **load_kwargs), names


def tensor_paths(t):
    return {p for p, x in tree.leaves_with_path(t) if isinstance(x, torch.Tensor)}


leaves = st.one_of(tensors(), scalars, st.integers(0, 2**64 - 1).map(fr.key), st.sampled_from([float("nan"), float("-inf")]))


def same(a, b):
    """tree.all_equal, with nan == nan for float leaves."""
    if tree.structure(a) != tree.structure(b):
        return False
    nan = lambda x: isinstance(x, float) and x != x  # noqa: E731
    pairs = zip(tree.leaves(a), tree.leaves(b))
    return all((nan(x) and nan(y)) or tree.all_equal(x, y) for x, y in pairs)


@settings(max_examples=30, deadline=None)
@given(trees(leaves))
def test_roundtrip_random_trees(t):
    loaded, names = roundtrip(t)
    assert same(loaded, t)
    assert names == tensor_paths(t)  # tensors are keyed by their fnnet.tree key paths
    restored, _ = roundtrip(t, like=t)
    assert same(restored, t)


@settings(max_examples=30, deadline=None)
@given(st.dictionaries(st.one_of(st.integers(-3, 3), st.text("xyz", min_size=1, max_size=2)), tensors(), max_size=4))
def test_roundtrip_int_keys_and_insertion_order(d):
    t = {"d": d, "od": collections.OrderedDict(reversed(list(d.items())))}
    loaded, _ = roundtrip(t)
    assert same(loaded, t)
    assert list(loaded["d"]) == list(d) and list(loaded["od"]) == list(reversed(list(d)))
    assert type(loaded["od"]) is collections.OrderedDict


def make_state(k=0):
    g = torch.Generator().manual_seed(k)
    params = {"layers.0.weight": torch.randn(4, 3, generator=g), "layers.0.bias": torch.randn(4, generator=g)}
    opt = (AdamLike(torch.tensor(3), tree.map(torch.zeros_like, params), tree.map(torch.ones_like, params)), None)
    return State(params, opt, step=3, buffers={"bn.mean": torch.zeros(2, dtype=torch.bfloat16)}, key=fr.key(k))


def test_user_classes_roundtrip_through_like_and_are_never_rebuilt_without_it():
    s = {"state": make_state(), "scale": Scale(torch.tensor(8.0), period=7, factor=0.5)}
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "ckpt.safetensors")
        checkpoint.save(path, s)
        with pytest.raises(ValueError, match=r"ckpt\.safetensors.*'state'.*'test_checkpoint\.State'.*not a registered type.*like="):
            checkpoint.load(path)
        loaded = checkpoint.load(path, like=s)
        names = set(checkpoint.load_state_dict(path))
    assert tree.all_equal(loaded, s)
    assert type(loaded["state"]) is State and type(loaded["state"].opt_state[0]) is AdamLike
    assert loaded["state"].step == 3 and loaded["state"].key == fr.key(0)
    assert (loaded["scale"].period, loaded["scale"].factor) == (7, 0.5)
    assert "state.opt_state.0.mu.layers.0.weight" in names


def test_trainstate_with_real_optimizer_and_loss_scale_roundtrips_without_like():
    from fnnet import optim

    params = {"layers.0.weight": torch.randn(3, 2), "layers.0.bias": torch.zeros(3)}
    opt = optim.chain(optim.clip_by_global_norm(1.0), optim.masked(optim.adam(1e-3, weight_decay=0.1),
                                                                    {"layers.0.weight": True, "layers.0.bias": False}))
    s = fnnet.TrainState.create(params, opt, key=fr.key(2), loss_scale=fnnet.DynamicScale.create(period=7),
                                buffers={"bn.mean": torch.zeros(2)})
    loaded, names = roundtrip(s)
    assert type(loaded) is fnnet.TrainState and tree.all_equal(loaded, s)
    assert tree.structure(loaded) == tree.structure(s) and loaded.loss_scale.period == 7
    assert names == tensor_paths(s)
    assert tree.all_equal(roundtrip(s, like=s)[0], s)
    metric = fnnet.metrics.accuracy.init("cpu")
    assert type(roundtrip({"m": metric})[0]["m"]) is type(metric)


def test_metadata_is_documented_json(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"a": [torch.ones(1), 2]})
    with safetensors.safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["a.0"]
    assert meta["fnnet.format"] == "3" and len(meta["fnnet.checksum"]) == 64
    structure = json.loads(meta["fnnet.tree"])
    assert structure == {
        "kind": "dict",
        "keys": ["a"],
        "children": [{"kind": "list", "children": [{"kind": "tensor", "name": "a.0"}, {"kind": "int", "value": 2}]}],
    }


def test_shared_storage_views_and_parameters(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    p = nn.Parameter(torch.randn(2))
    t = {"w": base, "tied": base, "row": base[1], "t": base.T, "cols": base[:, 1:3], "e": torch.zeros(1).expand(3), "p": p,
         "own_t": torch.arange(6.0).reshape(2, 3).T}
    checkpoint.save(tmp_path / "c.safetensors", t)
    loaded = checkpoint.load(tmp_path / "c.safetensors")
    for k, v in t.items():
        assert torch.equal(loaded[k], v.detach()), k
    assert loaded["w"].untyped_storage().data_ptr() != loaded["tied"].untyped_storage().data_ptr()
    assert not loaded["p"].requires_grad
    assert base.requires_grad is False and torch.equal(base, torch.arange(12.0).reshape(3, 4))


def test_unsavable_leaves_name_their_path(tmp_path):
    import numpy as np

    with pytest.raises(TypeError, match=r"'a\.1'.*numpy"):
        checkpoint.save(tmp_path / "c", {"a": [torch.ones(1), np.ones(2)]})
    with pytest.raises(TypeError, match=r"'x'.*object"):
        checkpoint.save(tmp_path / "c", {"x": object()})
    with pytest.raises(TypeError, match=r"dict key \(1, 2\)"):
        checkpoint.save(tmp_path / "c", {(1, 2): torch.ones(1)})
    with pytest.raises(ValueError, match=r"'a\.b'"):
        checkpoint.save(tmp_path / "c", {"a.b": torch.ones(1), "a": {"b": torch.zeros(1)}})
    assert os.listdir(tmp_path) == []


# -- like= ---------------------------------------------------------------------------------
def reported(message):
    """{category: set of key paths} from the one ValueError that load(like=) raises."""
    out = collections.defaultdict(set)
    for line in message.splitlines()[1:]:
        title, _, rest = line.strip().partition(": ")
        if title.startswith(("missing", "unexpected")):
            out[title.split()[0]] |= set(rest.split(", "))
        else:
            out[title.split()[0]].add(rest.split(": ")[0])
    return out


def test_like_reports_every_bad_path(tmp_path):
    path = tmp_path / "c.safetensors"
    s = make_state()
    checkpoint.save(path, s)
    w = s.params["layers.0.weight"]
    bad = dataclasses.replace(
        s,
        params={"layers.0.weight": w.T, "layers.0.bias": s.params["layers.0.bias"].double(), "extra": w},
        step=3.0,
        buffers=None,
    )
    with pytest.raises(ValueError) as info:
        checkpoint.load(path, like=bad)
    msg = str(info.value)
    assert str(path) in msg
    got = reported(msg)
    assert got["missing"] == {"params.extra"}
    assert got["unexpected"] == {"buffers.bn.mean"}
    assert got["shape"] == {"params.layers.0.weight"}
    assert got["dtype"] == {"params.layers.0.bias"}
    assert got["type"] == {"step"}
    assert "file (4, 3), like (3, 4)" in msg and "torch.float64" in msg


@settings(max_examples=30, deadline=None)
@given(trees(tensors(dtypes=[torch.float32, torch.int64])), st.data())
def test_like_mismatch_lists_exactly_the_changed_paths(t, data):
    flat, spec = tree.flatten_with_path(t)
    changed = {"shape": set(), "dtype": set()}
    like_leaves = []
    for p, x in flat:
        what = data.draw(st.sampled_from(["keep", "shape", "dtype"])) if isinstance(x, torch.Tensor) else "keep"
        if what == "shape":
            x = torch.zeros(x.shape + (1,), dtype=x.dtype)
        elif what == "dtype":
            x = x.to(torch.float64)
        if what != "keep":
            changed[what].add(p)
        like_leaves.append(x)
    like = tree.unflatten(spec, like_leaves)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.safetensors")
        checkpoint.save(path, t)
        if not changed["shape"] and not changed["dtype"]:
            assert same(checkpoint.load(path, like=like), t)
            return
        with pytest.raises(ValueError) as info:
            checkpoint.load(path, like=like)
    got = reported(str(info.value))
    assert got["shape"] == changed["shape"] and got["dtype"] == changed["dtype"]
    assert not got["missing"] and not got["unexpected"]


def test_like_restores_into_like_structure_and_values_from_file(tmp_path):
    path = tmp_path / "c.safetensors"
    saved = make_state(1)
    checkpoint.save(path, saved)
    fresh = make_state(2)  # same structure, other values: what a resumed run builds before loading
    loaded = checkpoint.load(path, like=fresh)
    assert tree.all_equal(loaded, saved)
    # like='s containers win; only the key paths have to match
    as_dict = {
        "params": fresh.params,
        "opt_state": [fresh.opt_state[0]._asdict(), None],
        "step": 0,
        "buffers": fresh.buffers,
        "key": fresh.key,
    }
    plain = checkpoint.load(path, like=as_dict)
    assert type(plain) is dict and type(plain["opt_state"][0]) is dict
    assert plain["step"] == 3 and plain["key"] == saved.key
    assert torch.equal(plain["opt_state"][0]["nu"]["layers.0.bias"], saved.opt_state[0].nu["layers.0.bias"])
    part = {"params": fresh.params}
    with pytest.raises(ValueError, match="unexpected"):
        checkpoint.load(path, like=part)


def test_like_with_plain_safetensors_file(tmp_path):
    path = str(tmp_path / "hf.safetensors")
    sd = {"a.weight": torch.randn(2, 3), "b": torch.arange(3)}
    safetensors.torch.save_file(sd, path)
    assert tree.all_equal(checkpoint.load(path), sd)
    like = {"a.weight": torch.zeros(2, 3), "b": torch.zeros(3, dtype=torch.int64)}
    assert tree.all_equal(checkpoint.load(path, like=like), sd)


# -- class lookup safety ---------------------------------------------------------------
def test_a_class_named_in_a_file_is_never_looked_up_or_imported(tmp_path, monkeypatch):
    # a module on sys.path that would leave a mark if load() imported it
    marker = tmp_path / "imported"
    (tmp_path / "fnnet_ckpt_probe.py").write_text(
        f"open({str(marker)!r}, 'w').close()\n"
        "from typing import NamedTuple\n"
        "class Probe(NamedTuple):\n    a: object\n"
    )
    mod = types.ModuleType("fnnet_ckpt_probe")

    class Probe(NamedTuple):
        a: object

    Probe.__module__ = "fnnet_ckpt_probe"
    Probe.__qualname__ = "Probe"
    mod.Probe = Probe
    monkeypatch.setitem(sys.modules, "fnnet_ckpt_probe", mod)
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"p": Probe(torch.ones(2))})
    with pytest.raises(ValueError, match=r"'p'.*'fnnet_ckpt_probe\.Probe'.*not a registered type.*like="):
        checkpoint.load(path)  # refused although the class is importable right here
    monkeypatch.delitem(sys.modules, "fnnet_ckpt_probe")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match=r"'p'.*like="):
        checkpoint.load(path)
    assert not marker.exists() and "fnnet_ckpt_probe" not in sys.modules
    # like= never looks a class up
    loaded = checkpoint.load(path, like={"p": Probe(torch.zeros(2))})
    assert type(loaded["p"]) is Probe and torch.equal(loaded["p"].a, torch.ones(2))


def test_a_changed_fnnet_class_suggests_like(tmp_path, monkeypatch):
    from fnnet.checkpoint import _types
    from fnnet.optim import transforms

    path = tmp_path / "c.safetensors"
    state = transforms.ScaleByAdamState(torch.ones(()), {"w": torch.zeros(2)}, {"w": torch.zeros(2)})
    checkpoint.save(path, state)

    class Changed(NamedTuple):
        count: object
        mu: object

    monkeypatch.setitem(_types._CLASSES, "fnnet.optim.ScaleByAdamState", Changed)  # what a later fnnet might have
    with pytest.raises(ValueError, match=r"fields \['count', 'mu', 'nu'\].*like="):
        checkpoint.load(path)
    monkeypatch.undo()
    assert tree.all_equal(checkpoint.load(path), state)


# -- type tags: a file names a registered tag, never a module ------------------------------------
_LOAD_AND_LIST_IMPORTS = r"""
import sys, torch
from fnnet import checkpoint
checkpoint.save(sys.argv[2], {"w": torch.ones(1)})
checkpoint.load(sys.argv[2])  # warm up: what any load imports, imported before the snapshot
before = set(sys.modules)
try:
    checkpoint.load(sys.argv[1])
    print("LOADED")
except ValueError as exc:
    print("REFUSED", exc)
print("IMPORTED", sorted(set(sys.modules) - before))
"""


@pytest.mark.parametrize("fmt", ["2", "3"])
@pytest.mark.parametrize("kind", ["namedtuple", "custom"])
def test_a_file_never_makes_load_import_or_run_anything(tmp_path, fmt, kind):
    # fnnet.__main__ runs the fnnet command line when imported: fnnet 0.2 imported it from this file
    node = {"kind": kind, "fields" if kind == "namedtuple" else "entries": [], "children": []}
    if kind == "custom":
        node["meta"] = {"kind": "none"}
    node["class" if fmt == "2" else "tag"] = "fnnet.__main__:X"
    path = tmp_path / "crafted.safetensors"
    _craft(path, {"x": torch.zeros(1)}, {"kind": "dict", "keys": ["x", "p"], "children": [
        {"kind": "tensor", "name": "x"}, node]}, **{"fnnet.format": fmt})
    proc = subprocess.run([sys.executable, "-c", _LOAD_AND_LIST_IMPORTS, str(path), str(tmp_path / "ok.safetensors")],
                          capture_output=True, text=True, timeout=120, cwd=os.path.dirname(fnnet.__path__[0]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("REFUSED") and "crafted.safetensors" in lines[0] and "'fnnet.__main__:X'" in lines[0]
    assert "like=" in lines[0]
    assert lines[1] == "IMPORTED []"


def test_names_reached_through_a_module_are_never_rebuilt(tmp_path):
    # fnnet.data imports urllib: fnnet 0.2 rebuilt urllib's ParseResult from "fnnet.data:urllib.parse.ParseResult"
    path = tmp_path / "crafted.safetensors"
    fields = ["scheme", "netloc", "path", "params", "query", "fragment"]
    for fmt, key in (("2", "class"), ("3", "tag")):
        node = {"kind": "namedtuple", key: "fnnet.data:urllib.parse.ParseResult", "fields": fields,
                "children": [{"kind": "str", "value": "x"} for _ in fields]}
        _craft(path, {}, node, **{"fnnet.format": fmt})
        with pytest.raises(ValueError, match=r"crafted\.safetensors.*'fnnet\.data:urllib\.parse\.ParseResult'.*like="):
            checkpoint.load(path)
        like = collections.namedtuple("Parsed", fields)(*"abcdef")
        assert checkpoint.load(path, like=like) == like._make("xxxxxx")  # like= still reads the values
    # an fnnet class that is not a registered state class is refused too, by its tag
    node = {"kind": "namedtuple", "tag": "fnnet.optim.GradientTransformation", "fields": [], "children": []}
    _craft(path, {}, node)
    with pytest.raises(ValueError, match=r"crafted\.safetensors.*'fnnet\.optim\.GradientTransformation'.*"
                                         r"fnnet\.TrainState.*like="):
        checkpoint.load(path)


def previous_release_tree():
    """A tree with every class fnnet 0.2 (checkpoint format 2) named in its files."""
    from fnnet.metrics import MeanState
    from fnnet.optim import (EmptyState, MaskedState, MultiStepsState, ScaleByAdamState, ScaleByLearningRateState,
                             ScaleByRmsState, ScaleByRssState, ScaleByRStdDevState, TraceState)
    from fnnet.optim.base import ScaleByScheduleState

    g = torch.Generator().manual_seed(0)
    p = {"w": torch.randn(2, 3, generator=g), "b": torch.randn(3, generator=g)}
    n = torch.tensor
    opt = (EmptyState(), ScaleByLearningRateState(n(3), n(0.1)), ScaleByScheduleState(n(3), n(0.05)),
           ScaleByAdamState(n(3), p, p), ScaleByRmsState(p), ScaleByRStdDevState(p, p), ScaleByRssState(p),
           TraceState(p), MaskedState(TraceState({"w": p["w"]})), MultiStepsState(n(1), n(2), EmptyState(), p))
    state = fnnet.TrainState(p, opt, step=3, buffers={"bn.mean": torch.zeros(2)}, key=fr.key(7),
                             loss_scale=fnnet.DynamicScale.create(period=7))
    return {"state": state, "metric": MeanState(n(2.0), n(4.0)), "epoch": 3}


FORMAT_2_FILE = os.path.join(os.path.dirname(__file__), "data", "format2.safetensors")


def test_files_of_the_previous_release_load_without_like():
    """tests/data/format2.safetensors was written by fnnet 0.2 (commit 5a3fa21), which named classes
    ``module:qualname``: ``checkpoint.save(FORMAT_2_FILE, previous_release_tree())``."""
    with safetensors.safe_open(FORMAT_2_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["fnnet.format"] == "2" and '"class":"fnnet.state:TrainState"' in meta["fnnet.tree"]
    loaded = checkpoint.load(FORMAT_2_FILE)
    expected = previous_release_tree()
    assert tree.all_equal(loaded, expected) and tree.structure(loaded) == tree.structure(expected)
    assert type(loaded["state"]) is fnnet.TrainState and loaded["state"].loss_scale.period == 7
    assert tree.all_equal(checkpoint.load(FORMAT_2_FILE, like=expected), expected)


def test_register_lets_load_rebuild_a_class_and_refuses_a_second_meaning(tmp_path, monkeypatch):
    from fnnet.checkpoint import _types

    monkeypatch.setattr(_types, "_CLASSES", dict(_types._CLASSES))
    monkeypatch.setattr(_types, "_TAGS", dict(_types._TAGS))

    class Accumulated(NamedTuple):
        grads: Any
        count: torch.Tensor

    checkpoint.save(tmp_path / "c", {"acc": Accumulated({"w": torch.ones(2)}, torch.tensor(2))})
    with pytest.raises(ValueError, match=r"'acc'.*Accumulated.*not a registered.*like="):
        checkpoint.load(tmp_path / "c")
    assert checkpoint.register("tests.Accumulated", Accumulated) is Accumulated
    checkpoint.register("tests.Accumulated", Accumulated)  # again: the same meaning is fine
    value = {"acc": Accumulated({"w": torch.ones(2)}, torch.tensor(2))}
    checkpoint.save(tmp_path / "c", value)
    assert '"tag":"tests.Accumulated"' in safetensors.safe_open(str(tmp_path / "c"), "pt").metadata()["fnnet.tree"]
    loaded = checkpoint.load(tmp_path / "c")
    assert type(loaded["acc"]) is Accumulated and tree.all_equal(loaded, value)
    with pytest.raises(ValueError, match=r"'tests\.Accumulated' already names .*Accumulated"):
        checkpoint.register("tests.Accumulated", AdamLike)
    with pytest.raises(ValueError, match=r"already registered as 'tests\.Accumulated'"):
        checkpoint.register("tests.Other", Accumulated)
    with pytest.raises(TypeError, match=r"register.*dict.*NamedTuple.*fnnet\.tree"):
        checkpoint.register("tests.dict", dict)


# -- atomic writes and damaged files -------------------------------------------------------
def test_failed_write_leaves_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, {"w": torch.ones(3)})
    before = path.read_bytes()
    real = safetensors.torch.save_file

    def half_then_fail(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_fail)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(path, {"w": torch.zeros(1000)})
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]
    monkeypatch.undo()

    def interrupted(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, {"w": torch.zeros(1000)})
    monkeypatch.undo()
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.safetensors"]
    assert torch.equal(checkpoint.load(path)["w"], torch.ones(3))

    checkpoint.save(path, {"w": torch.zeros(2)})  # a successful save replaces it
    assert torch.equal(checkpoint.load(path)["w"], torch.zeros(2))
    assert os.listdir(tmp_path) == ["c.safetensors"]


def test_save_creates_folders_and_respects_umask(tmp_path):
    path = tmp_path / "runs" / "a" / "c.safetensors"
    checkpoint.save(path, {"w": torch.ones(1)})
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, make_state())
    data = path.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (0, 5, 8, 60, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=r"bad\.safetensors.*truncated"):
            checkpoint.load(bad)
    flipped = bytearray(data)
    flipped[-3] ^= 0x40  # inside the last tensor's bytes
    bad.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=r"bad\.safetensors.*corrupted.*checksum"):
        checkpoint.load(bad)
    bad.write_bytes(b"this is not a checkpoint at all" * 4)
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        checkpoint.load(bad)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.safetensors"):
        checkpoint.load(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        checkpoint.load_state_dict(tmp_path / "nope.pt")
    with pytest.raises(IsADirectoryError):
        checkpoint.load(tmp_path)


def test_load_device_cpu(tmp_path):
    checkpoint.save(tmp_path / "c", make_state())
    loaded = checkpoint.load(tmp_path / "c", like=make_state(), device="cpu")
    assert all(x.device.type == "cpu" for x in tree.leaves(loaded) if isinstance(x, torch.Tensor))
    with pytest.raises(ValueError, match="(?i)devices here"):
        checkpoint.load(tmp_path / "c", device="nonsense")


@pytest.mark.cuda
@requires_cuda
def test_load_onto_cuda_and_like_devices(tmp_path):
    s = make_state()
    checkpoint.save(tmp_path / "c", fnnet.place(s, "cuda"))  # saving from the GPU works
    on_gpu = checkpoint.load(tmp_path / "c", like=s, device="cuda")
    assert all(x.is_cuda for x in tree.leaves(on_gpu) if isinstance(x, torch.Tensor))
    assert tree.all_equal(fnnet.place(on_gpu, "cpu"), s)
    like = fnnet.place(make_state(5), "cuda")
    resumed = checkpoint.load(tmp_path / "c", like=like)
    assert all(x.is_cuda for x in tree.leaves(resumed) if isinstance(x, torch.Tensor))
    assert tree.all_equal(fnnet.place(resumed, "cpu"), s)


# -- torch interop -------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))

    def forward(self, x):
        return self.layers(x)


def test_torch_save_state_dict_loads_as_flat_dict(tmp_path):
    torch.manual_seed(0)
    net = Net()
    net(torch.randn(8, 3))  # move the BatchNorm running stats
    sd = net.state_dict()
    torch.save(sd, tmp_path / "net.pt")
    flat = checkpoint.load_state_dict(tmp_path / "net.pt")
    assert list(flat) == list(sd) and all(torch.equal(flat[k], sd[k]) for k in sd)
    fresh = Net()
    fresh.load_state_dict(flat)  # strict
    x = torch.randn(4, 3)
    assert torch.equal(fresh.eval()(x), net.eval()(x))
    # the flat dict is fnnet's params format
    model = fnnet.functional(Net())
    params = {k: flat[k] for k in model.params}
    assert set(params) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias",
                           "layers.3.weight", "layers.3.bias"}
    nested = {"model": sd, "extra": {"ema": sd["layers.0.weight"]}}
    torch.save(nested, tmp_path / "nested.pt")
    assert set(checkpoint.load_state_dict(tmp_path / "nested.pt", prefix="model.")) == set(sd)


def test_torch_save_refusals(tmp_path):
    torch.save(Net(), tmp_path / "module.pt")  # a pickled module needs unrestricted pickle
    with pytest.raises(ValueError, match=r"module\.pt.*weights_only"):
        checkpoint.load_state_dict(tmp_path / "module.pt")
    torch.save(Net().state_dict(), tmp_path / "sd.pt")
    data = (tmp_path / "sd.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pt.*truncated or corrupted"):
        checkpoint.load_state_dict(tmp_path / "cut.pt")
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.raises(ValueError, match=r"list\.pt.*not a state_dict"):
        checkpoint.load_state_dict(tmp_path / "list.pt")
    torch.save({"w": torch.ones(1), "epoch": 3}, tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"mixed\.pt.*epoch"):
        checkpoint.load_state_dict(tmp_path / "mixed.pt")
    with pytest.raises(ValueError, match=r"no tensor name starts with 'params\.'.*'layers\.'"):
        checkpoint.load_state_dict(tmp_path / "sd.pt", prefix="params.")


def test_saved_params_load_into_module(tmp_path):
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    model = fnnet.functional(net)
    state = fnnet.TrainState(params=tree.map(lambda p: p * 2, model.params), opt_state=None, step=1)
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, state)
    target = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    target.load_state_dict(checkpoint.load(path).params)  # strict: keys like "0.weight"
    assert all(torch.equal(target.state_dict()[k], state.params[k]) for k in state.params)
    again = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    again.load_state_dict(checkpoint.load_state_dict(path, prefix="params."))
    x = torch.randn(5, 3)
    assert torch.equal(again(x), target(x))


def test_to_state_dict_flattens_nested_params():
    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 1)])

    src = Stack()
    nested = {"layers": [{"weight": m.weight.detach(), "bias": m.bias.detach()} for m in src.layers]}
    sd = checkpoint.to_state_dict(nested)
    assert set(sd) == {"layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"}
    dst = Stack()
    dst.load_state_dict(sd)
    assert all(torch.equal(dst.state_dict()[k], src.state_dict()[k]) for k in sd)
    with pytest.raises(TypeError, match=r"layers\.0\.scale \(int\)"):
        checkpoint.to_state_dict({"layers": [{"scale": 3}]})


# -- abuse: corrupted metadata, crafted headers, faults ------------------------------------------------


def _saved(tmp_path, tree_=None):
    path = tmp_path / "c.safetensors"
    checkpoint.save(path, tree_ if tree_ is not None else {"state": fnnet.TrainState({"w": torch.arange(4.0)}, None, step=2),
                                                          "epoch": 2})
    return path


def test_the_checksum_covers_the_metadata_too(tmp_path):
    path = _saved(tmp_path)
    data = path.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    header = data[:header_end].decode()
    # the case: one digit of the epoch in the structure JSON
    at = header.index('\\"epoch\\"')
    digit = header.index('\\"value\\":2', at) + len('\\"value\\":')
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:digit] + b"3" + data[digit + 1:])
    with pytest.raises(ValueError, match=r"bad\.safetensors.*metadata.*fails its checksum"):
        checkpoint.load(bad)
    # a deleted or malformed checksum entry is an error, not an unchecked load
    import safetensors.torch as st

    tensors = st.load_file(path)
    with safetensors.safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
    for name, value in (("deleted", None), ("malformed", "not a digest"), ("wrong type", "0" * 63 + "z")):
        changed = {k: v for k, v in meta.items() if k != "fnnet.checksum"}
        if value is not None:
            changed["fnnet.checksum"] = value
        st.save_file(tensors, str(bad), metadata=changed)
        with pytest.raises(ValueError, match=r"bad\.safetensors.*checksum entry is missing or malformed"):
            checkpoint.load(bad)


def _craft(path, tensors, structure, **metadata_changes):
    """A file whose checksums are right for crafted contents (what an attacker can do)."""
    from fnnet.checkpoint import _file

    tree_json = structure if isinstance(structure, str) else json.dumps(structure)
    meta = {"format": "pt", _file.META_FORMAT: _file.FORMAT_VERSION, _file.META_TREE: tree_json,
            _file.META_CRC: json.dumps({k: _file.crc32(v) for k, v in tensors.items()}), **metadata_changes}
    meta[_file.META_DIGEST] = _file._digest(meta, tensors)
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def test_crafted_headers_are_clear_errors_naming_the_file(tmp_path):
    path = tmp_path / "crafted.safetensors"
    for depth in (150, 100_000):  # deeper than fnnet reads; deeper than Python's JSON parser can go
        deep = '{"kind":"list","children":[' * depth + '{"kind":"none"}' + "]}" * depth
        _craft(path, {"x": torch.zeros(1)}, deep)
        with pytest.raises(ValueError, match=r"crafted\.safetensors.*(nested|corrupted)"):
            checkpoint.load(path)
    good = {"kind": "dict", "keys": ["x"], "children": [{"kind": "tensor", "name": "x"}]}
    _craft(path, {"x": torch.zeros(1)}, good, **{"fnnet.crc32": json.dumps([1, 2])})
    with pytest.raises(ValueError, match=r"crafted\.safetensors.*per-tensor checksums"):
        checkpoint.load(path)
    _craft(path, {"x": torch.zeros(1)}, {"kind": "dict", "keys": ["x", "y"], "children": [{"kind": "tensor", "name": "x"}]})
    with pytest.raises(ValueError, match=r"crafted\.safetensors.*corrupted"):
        checkpoint.load(path)
    _craft(path, {"x": torch.zeros(1)}, {"kind": "namedtuple", "class": "os:system", "fields": [], "children": []},
           **{"fnnet.format": "2"})
    with pytest.raises(ValueError, match=r"crafted\.safetensors.*'os:system'.*not a registered type.*like="):
        checkpoint.load(path)


def test_unreadable_file_is_a_permission_error(tmp_path, monkeypatch):
    path = _saved(tmp_path)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(path) else real_access(p, mode))
    with pytest.raises(PermissionError, match=r"cannot read '.*c\.safetensors': permission denied"):
        checkpoint.load(path)


def test_bad_save_targets_are_clear_errors(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a folder"):
        checkpoint.save(tmp_path, {"x": torch.zeros(1)})
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile.*is a file, not a folder"):
        checkpoint.save(tmp_path / "afile" / "sub" / "c.safetensors", {"x": torch.zeros(1)})
    loop = [torch.zeros(1)]
    loop.append(loop)
    with pytest.raises(ValueError, match=r"contains itself at '1'"):
        checkpoint.save(tmp_path / "loop.safetensors", loop)
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # nothing was left behind


def test_a_read_only_checkpoint_is_not_replaced_and_modes_are_kept(tmp_path):
    path = _saved(tmp_path)
    os.chmod(path, 0o640)
    checkpoint.save(path, {"x": torch.ones(1)})
    assert path.stat().st_mode & 0o777 == 0o640  # a writable file keeps its mode
    os.chmod(path, 0o444)
    before = path.read_bytes()
    if os.geteuid() != 0:
        with pytest.raises(PermissionError, match="read-only"):
            checkpoint.save(path, {"x": torch.zeros(1)})
    else:  # root may write anything: the check is on the permission bits, as for everyone
        real_access = os.access
        try:
            os.access = lambda p, mode: False if mode == os.W_OK and os.fspath(p) == str(path) else real_access(p, mode)
            with pytest.raises(PermissionError, match="read-only"):
                checkpoint.save(path, {"x": torch.zeros(1)})
        finally:
            os.access = real_access
    assert path.read_bytes() == before and path.stat().st_mode & 0o777 == 0o444


def test_stale_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import socket

    from fnnet.checkpoint import _file

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host = socket.gethostname().replace(".", "_")
        assert _file._HOST == host
        stale = [f".c.safetensors.{host}.{dead.pid}.0123456789ab.tmp",  # fnnet 0.2's temporary file
                 f".d.safetensors.{host}.{dead.pid}.abcdef012345.tmp",  # another checkpoint's name
                 f".e.{host}.{dead.pid}.00000000000f.tmp"]  # a folder, below
        kept = [f".c.safetensors.{host}.{live.pid}.def456def456.tmp",  # a concurrent writer's
                f".c.safetensors.otherhost.{dead.pid}.fed789fed789.tmp",  # another host's
                f".c.safetensors.{host}.{dead.pid}.abc123.tmp",  # not named as fnnet names them
                f".f.{host}.{dead.pid}.00000000000f.tmp"]  # a folder holding a file fnnet did not write
        for name in stale[:2] + kept[:3]:
            (tmp_path / name).write_bytes(b"x" * 1000)
        for name, inner in ((stale[2], ["data", ".tmpAb12Cd"]), (kept[3], ["data", "mine.txt"])):
            (tmp_path / name).mkdir()
            for f in inner:
                (tmp_path / name / f).write_bytes(b"x")
        checkpoint.save(tmp_path / "c.safetensors", {"x": torch.zeros(1)})
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["c.safetensors"])
        assert sorted(os.listdir(tmp_path / kept[3])) == ["data", "mine.txt"]
    finally:
        live.kill()
        live.wait()


_KILLED_SAVE = r"""
import os, signal, sys, threading, time, torch
from fnnet import checkpoint
folder, name, when = sys.argv[1], sys.argv[2], sys.argv[3]
state = {"w": torch.ones(16_000_000)}  # 64 MB: safetensors takes a good fraction of a second to write it

def die(*args):
    os.kill(os.getpid(), signal.SIGKILL)

if when == "write":  # SIGKILL while safetensors writes its own .tmpXXXXXX file
    def watch():
        while True:
            for _, _, files in os.walk(folder):
                if any(f.startswith(".tmp") and f != ".tmpUSER01" for f in files):
                    die()
    threading.Thread(target=watch, daemon=True).start()
elif when == "rename":  # SIGKILL after the file is written, before it is renamed into place
    os.replace = die
elif when == "hang":  # a live writer, stopped before its rename
    def hang(*args):
        print("WRITTEN", flush=True)
        time.sleep(120)
    os.replace = hang
checkpoint.save(os.path.join(folder, name), state)
print("SAVED")
"""


def test_killed_saves_leave_one_temporary_each_and_the_next_save_of_any_name_removes_them(tmp_path):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    run = [sys.executable, "-c", _KILLED_SAVE, str(folder)]
    cwd = os.path.dirname(fnnet.__path__[0])
    # a user's files that look like temporaries, but not like fnnet's (of a live writer on this host)
    for name in (".tmpUSER01", "notes.tmp", ".e9.safetensors.tmp", ".e9.safetensors.otherhost.1.0123456789ab.tmp"):
        (folder / name).write_bytes(b"mine")
    users = set(os.listdir(folder))
    for epoch, when in enumerate(["write", "rename", "write"], 1):  # ModelCheckpoint's names change every epoch
        before = set(os.listdir(folder))
        proc = subprocess.run(run + [f"e{epoch}.safetensors", when], capture_output=True, text=True, timeout=120, cwd=cwd)
        assert proc.returncode == -signal.SIGKILL, (when, proc.returncode, proc.stdout, proc.stderr[-2000:])
        left = set(os.listdir(folder)) - before
        assert len(left) <= 1, f"a save killed at '{when}' left {sorted(left)}"  # at most the in-flight temporary
    assert set(os.listdir(folder)) - users, "the killed saves left their temporaries (until the next save)"
    live = subprocess.Popen(run + ["e4.safetensors", "hang"], stdout=subprocess.PIPE, text=True, cwd=cwd)
    try:
        before = set(os.listdir(folder))
        assert live.stdout.readline() == "WRITTEN\n"
        busy = set(os.listdir(folder)) - before  # a concurrent writer's temporary
        checkpoint.save(folder / "e5.safetensors", {"w": torch.ones(2)})
        assert set(os.listdir(folder)) == users | busy | {"e5.safetensors"}
        assert all((folder / name).read_bytes() == b"mine" for name in users)
    finally:
        live.kill()
        live.wait()
    checkpoint.save(folder / "e6.safetensors", {"w": torch.ones(2)})  # its writer is dead now
    assert set(os.listdir(folder)) == users | {"e5.safetensors", "e6.safetensors"}
    assert tree.all_equal(checkpoint.load(folder / "e6.safetensors"), {"w": torch.ones(2)})


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_changed_byte_or_truncation_is_refused(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("corrupt")
    path = folder / "c.safetensors"
    state = fnnet.TrainState.create({"layers.0.weight": torch.randn(3, 4), "b": torch.zeros(3)}, fnnet.optim.adam(0.1),
                                    key=fr.key(3))
    checkpoint.save(path, {"state": state, "epoch": 4, "note": "ok"})
    raw = path.read_bytes()
    header_len = 8 + int.from_bytes(raw[:8], "little")
    region = data.draw(st.sampled_from(["length", "header", "data"]), label="region")
    lo, hi = {"length": (0, 8), "header": (8, header_len), "data": (header_len, len(raw))}[region]
    bad = folder / "bad.safetensors"
    if data.draw(st.booleans(), label="truncate"):
        cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
        bad.write_bytes(raw[:cut])
    else:
        at = data.draw(st.integers(lo, hi - 1), label="offset")
        value = data.draw(st.integers(0, 255).filter(lambda v: v != raw[at]), label="byte")
        bad.write_bytes(raw[:at] + bytes([value]) + raw[at + 1:])
    with pytest.raises(ValueError, match=r"bad\.safetensors"):
        checkpoint.load(bad)


def test_every_single_byte_of_the_header_is_covered(tmp_path):
    """Deterministic sweep: each byte of the length and the header (metadata included) flipped or
    made whitespace, and every seventh truncation point, is refused."""
    path = tmp_path / "c.safetensors"
    state = fnnet.TrainState.create({"w": torch.randn(2, 3)}, fnnet.optim.sgd(0.1, momentum=0.9), key=fr.key(1))
    for note in ("", "x", "xx", "xxx", "xxxx", "xxxxx", "xxxxxx", "xxxxxxx"):  # a header with padding spaces
        checkpoint.save(path, {"state": state, "epoch": 3, "note": note})
        raw = path.read_bytes()
        header_len = 8 + int.from_bytes(raw[:8], "little")
        if raw[header_len - 1] == ord(" "):
            break
    assert raw[header_len - 1] == ord(" ")
    bad = tmp_path / "bad.safetensors"
    accepted = []
    for at in range(header_len):
        # Two bit flips, and whitespace a JSON parser would skip (in the padding, say).
        for value in {raw[at] ^ 0x01, raw[at] ^ 0x20, ord("\t"), ord("\n")} - {raw[at]}:
            bad.write_bytes(raw[:at] + bytes([value]) + raw[at + 1:])
            try:
                checkpoint.load(bad)
                accepted.append((at, value))
            except ValueError:
                pass
    assert accepted == []
    for cut in range(0, len(raw), 7):
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError):
            checkpoint.load(bad)


# -- issue 34 items 7, 8: sizes checked before anything is allocated; only regular files are read ---------------


def _peak_rss_kb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])


def _sparse_crafted(tmp_path, nbytes):
    """An fnnet checkpoint declaring one float32 tensor of ``nbytes`` over a sparse file: its digest recomputed
    (it is unkeyed: anyone can), its CRC-32 that of the 4 bytes-long tensor it replaced."""
    import hashlib

    small = tmp_path / "small.safetensors"
    checkpoint.save(small, {"w": torch.zeros(4)})
    data = small.read_bytes()
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    name = next(k for k in header if k != "__metadata__")
    header[name] = {"dtype": "F32", "shape": [nbytes // 4], "data_offsets": [0, nbytes]}
    meta = header["__metadata__"]
    h = hashlib.sha256()  # the digest as _file.py documents it: every metadata entry, then each tensor's name/dtype/shape
    for key in sorted(k for k in meta if k != "fnnet.checksum"):
        h.update(key.encode() + b"\0" + meta[key].encode() + b"\0")
    h.update(f"{name}\0torch.float32\0{[nbytes // 4]}\0".encode())
    meta["fnnet.checksum"] = h.hexdigest()
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "sparse.safetensors"
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        f.truncate(8 + len(raw) + nbytes)  # a hole: no disk used
    return path


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak memory read from Linux's /proc")
def test_a_crafted_size_is_refused_before_it_is_allocated(tmp_path):
    nbytes = 1 << 28
    path = _sparse_crafted(tmp_path, nbytes)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size
    before = _peak_rss_kb()
    with pytest.raises(ValueError, match=r"sparse\.safetensors.*fails its CRC-32"):
        checkpoint.load(path)
    assert (_peak_rss_kb() - before) * 1024 < nbytes // 4  # the 256 MB declared were never allocated
    cut = tmp_path / "cut.safetensors"  # a declared size past the file's end: refused from the header alone
    with open(path, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(4096))
    with pytest.raises(ValueError, match=r"cut\.safetensors.*declared at bytes \[0, 268435456\)"):
        checkpoint.load(cut)


def test_a_fifo_is_refused_at_once_and_a_full_disk_names_the_file_and_what_was_kept(tmp_path):
    fifo, target = tmp_path / "pipe.safetensors", tmp_path / "kept.safetensors"
    os.mkfifo(fifo)
    checkpoint.save(target, {"w": torch.ones(4)})
    # in a child process: the old behaviour blocked in open(), holding the interpreter, until a writer came; and a
    # file size limit (RLIMIT_FSIZE) makes writes fail as a full disk does, without filling one
    code = f"""
import resource, signal, torch, fnnet
try:
    fnnet.load({str(fifo)!r})
except ValueError as err:
    print(err)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
try:
    fnnet.save({str(target)!r}, {{"w": torch.zeros(1 << 16)}})
except OSError as err:
    print(err)
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        pytest.fail("fnnet.load waited on a FIFO")
    assert "pipe.safetensors' is a FIFO (named pipe), not a regular file" in out
    assert "could not write '" + str(target) + "' (File too large" in out and "the file already there is kept" in out
    assert torch.equal(checkpoint.load(target)["w"], torch.ones(4))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left
    with pytest.raises(ValueError, match="FIFO"):
        checkpoint.load_state_dict(fifo)
    link = tmp_path / "link.safetensors"
    os.symlink(tmp_path / "gone.safetensors", link)
    with pytest.raises(FileNotFoundError, match=r"link\.safetensors.*broken link"):
        checkpoint.load(link)


@dataclasses.dataclass
class Grown:
    """A state class that gained fields since a file was written (as TrainState gained ``accum``)."""

    a: torch.Tensor
    b: Any = None
    c: int = 3
    d: list = dataclasses.field(default_factory=lambda: [1, 2])


tree.register_dataclass(Grown)
checkpoint.register("tests.Grown", Grown)


def test_an_older_file_loads_into_a_class_with_added_fields_with_their_defaults(tmp_path):
    path = tmp_path / "new.safetensors"
    checkpoint.save(path, Grown(torch.arange(3.0), b=torch.ones(2), c=7, d=[5]))
    with safetensors.safe_open(str(path), "pt") as f:
        structure = json.loads(f.metadata()["fnnet.tree"])
    tensors = {"a": torch.arange(3.0)}
    for kept in (1, 2):  # written when the class had fields a (then b too): the others were added since
        older = {**structure, "entries": structure["entries"][:kept], "children": structure["children"][:kept]}
        _craft(tmp_path / "old.safetensors", {**tensors, **({"b": torch.ones(2)} if kept == 2 else {})}, older)
        got = checkpoint.load(tmp_path / "old.safetensors")
        assert isinstance(got, Grown) and torch.equal(got.a, torch.arange(3.0))
        assert (got.b is None) if kept == 1 else torch.equal(got.b, torch.ones(2))
        assert (got.c, got.d) == (3, [1, 2])
        again = checkpoint.load(tmp_path / "old.safetensors")
        assert again.d is not got.d  # a default_factory gives each load its own
