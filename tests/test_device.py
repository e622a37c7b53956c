import pytest
import torch
from hypothesis import given, settings

import fnnet
from hypothesis import strategies as st

from conftest import CUDA, requires_cuda, tensors, trees


def test_devices_and_default():
    devs = fnnet.devices()
    assert all(isinstance(d, torch.device) for d in devs)
    if CUDA:
        assert devs == [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
        assert fnnet.default_device() == torch.device("cuda", 0)
    else:
        assert devs == [torch.device("cpu")]
        assert fnnet.default_device() == torch.device("cpu")
    assert fnnet.device_count() == (torch.cuda.device_count() if CUDA else 0)


@pytest.mark.parametrize("spec", ["cpu", torch.device("cpu"), "auto", None, "CPU", " Auto "])
def test_resolve_cpu_spellings(spec):
    dev = fnnet.resolve_device(spec)
    auto = spec is None or (isinstance(spec, str) and spec.strip().lower() == "auto")
    assert dev == (fnnet.default_device() if auto else torch.device("cpu"))


@pytest.mark.parametrize("spec", ["gpu0", "tpu", "cuda:abc", "", "xla"])
def test_unknown_spelling_lists_existing_devices(spec):
    with pytest.raises(ValueError, match=r"(?s)Devices here: cpu|devices here: cpu"):
        fnnet.place(torch.zeros(1), spec)


def test_missing_cuda_device_is_an_error():
    n = fnnet.device_count()
    for spec in ([f"cuda:{n}", n, torch.device("cuda", n)] + ([] if n else ["cuda"])):
        with pytest.raises(ValueError, match=r"devices here: cpu"):
            fnnet.place({"a": torch.zeros(1)}, spec)


def test_bad_device_types():
    with pytest.raises(TypeError):
        fnnet.place(torch.zeros(1), 1.5)
    with pytest.raises(TypeError):
        fnnet.place(torch.zeros(1), True)
    with pytest.raises(ValueError, match="negative"):
        fnnet.place(torch.zeros(1), -1)


@settings(max_examples=50, deadline=None)
@given(trees())
def test_place_keeps_structure_and_values(t):
    before = fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)
    out = fnnet.place(t, "cpu")
    assert fnnet.tree.structure(out) == fnnet.tree.structure(t)
    assert fnnet.tree.all_equal(out, before)
    # already on the device: the very same objects come back, no copy
    for a, b in zip(fnnet.tree.leaves(out), fnnet.tree.leaves(t)):
        assert a is b
    assert fnnet.tree.all_equal(t, before)


def test_memory_stats_and_empty_cache_on_cpu():
    fnnet.empty_cache()
    stats = fnnet.memory_stats("cpu")
    assert stats == {"allocated": 0, "reserved": 0, "max_allocated": 0}  # torch keeps no CPU allocator stats
    with pytest.raises(ValueError, match="devices here"):
        fnnet.memory_stats("cuda:9")


def test_device_info_keys():
    info = fnnet.device_info()
    assert info["torch"] == torch.__version__
    assert info["device_count"] == len(info["devices"])
    assert info["cpu_threads"] == torch.get_num_threads()


@pytest.mark.cuda
@requires_cuda
def test_place_on_cuda_and_back():
    t = {"w": torch.randn(3, 3), "n": 3, "none": None, "l": [torch.arange(4)]}
    g = fnnet.place(t, "cuda")
    assert g["w"].device.type == "cuda" and g["l"][0].is_cuda and g["n"] == 3
    again = fnnet.place(g, 0)
    assert again["w"] is g["w"]
    back = fnnet.place(g, "cpu")
    assert torch.equal(back["w"], t["w"]) and torch.equal(back["l"][0], t["l"][0])
    stats = fnnet.memory_stats("cuda")
    assert stats["allocated"] > 0
    fnnet.empty_cache()


@settings(max_examples=30, deadline=None)
@given(t=trees(leaves=st.one_of(tensors(dtypes=[torch.float32, torch.int64], max_dims=5), st.integers())))
def test_place_channels_last_relayouts_4d_leaves_only(t):
    out = fnnet.place(t, "cpu", memory_format=torch.channels_last)
    assert fnnet.tree.structure(out) == fnnet.tree.structure(t)
    for a, b in zip(fnnet.tree.leaves(t), fnnet.tree.leaves(out)):
        if isinstance(a, torch.Tensor) and a.ndim == 4:
            assert b.is_contiguous(memory_format=torch.channels_last) and torch.equal(a, b)
        else:
            assert b is a


def test_place_channels_last_values_strides_and_no_second_copy():
    g = torch.Generator().manual_seed(0)
    tree = {"w": torch.randn(8, 3, 5, 5, generator=g), "b": torch.randn(8, generator=g), "x": torch.randn(2, 3, 4, 4, generator=g)}
    before = {k: v.clone() for k, v in tree.items()}
    out = fnnet.place(tree, "cpu", memory_format=torch.channels_last)
    assert out["w"].stride() == (75, 1, 15, 3) and out["x"].stride() == (48, 1, 12, 3)
    assert out["b"] is tree["b"]
    assert all(torch.equal(out[k], before[k]) and torch.equal(tree[k], before[k]) for k in tree)  # inputs untouched
    again = fnnet.place(out, "cpu", memory_format=torch.channels_last)
    assert all(again[k] is out[k] for k in out)
    back = fnnet.place(out, "cpu", memory_format=torch.contiguous_format)
    assert back["w"].is_contiguous() and torch.equal(back["w"], before["w"])
    assert fnnet.place(tree, "cpu", memory_format=torch.preserve_format)["w"] is tree["w"]


def test_place_rejects_a_bad_memory_format_and_handles_3d():
    with pytest.raises(TypeError, match="torch.channels_last"):
        fnnet.place({"w": torch.zeros(1, 1, 1, 1)}, "cpu", memory_format="channels_last")
    v = torch.randn(2, 3, 4, 5, 6)
    out = fnnet.place({"v": v, "w": torch.randn(2, 3, 4, 5)}, "cpu", memory_format=torch.channels_last_3d)
    assert out["v"].is_contiguous(memory_format=torch.channels_last_3d) and torch.equal(out["v"], v)
    assert out["w"].is_contiguous()


@pytest.mark.cuda
@requires_cuda
def test_place_on_cuda_channels_last():
    w = torch.randn(8, 3, 5, 5)
    g = fnnet.place({"w": w, "b": torch.randn(8)}, "cuda", memory_format=torch.channels_last)
    assert g["w"].is_cuda and g["w"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(g["w"].cpu(), w) and g["b"].is_cuda


def test_place_refuses_containers_it_cannot_see_into():
    import collections
    import dataclasses

    @dataclasses.dataclass
    class Unregistered:
        w: torch.Tensor

    for hidden in (Unregistered(torch.zeros(2)), collections.UserDict({"w": torch.zeros(2)})):
        with pytest.raises(TypeError, match=r"leaf at 'a\.1' is a (Unregistered|UserDict) holding tensors.*register"):
            fnnet.place({"a": [torch.zeros(1), hidden]}, "cpu")
    key = fnnet.random.key(0)  # a dataclass without tensors is an ordinary leaf
    assert fnnet.place({"k": key, "s": "text", "n": None}, "cpu")["k"] == key
