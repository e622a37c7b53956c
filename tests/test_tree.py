import collections
import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

from fnnet import tree
from conftest import trees

Point = collections.namedtuple("Point", ["x", "y"])


@tree.register_dataclass
@dataclasses.dataclass
class Pair:
    a: object
    b: object


@tree.register_dataclass(static=("name",))
@dataclasses.dataclass(frozen=True)
class Named:
    value: object
    name: str = "n"


def test_none_is_empty_subtree_and_dict_keys_sorted():
    t = {"b": 2, "a": None, "c": [1, None, 3]}
    assert tree.leaves(t) == [2, 1, 3]
    assert tree.paths(t) == ["b", "c.0", "c.2"]


def test_containers_namedtuple_dataclass():
    t = {"p": Point(torch.ones(1), 2), "d": Pair([1, 2], None), "n": Named(5, name="static")}
    assert tree.leaves_with_path(t)[:3] == [("d.a.0", 1), ("d.a.1", 2), ("n.value", 5)]
    assert [p for p, _ in tree.leaves_with_path(t)][3:] == ["p.x", "p.y"]
    doubled = tree.map(lambda x: x * 2, t)
    assert isinstance(doubled["p"], Point) and isinstance(doubled["d"], Pair)
    assert doubled["n"].name == "static" and doubled["n"].value == 10
    assert torch.equal(doubled["p"].x, torch.full((1,), 2.0))


def test_state_dict_keys_kept_whole_in_paths():
    params = {"layers.0.weight": torch.zeros(2), "layers.0.bias": torch.zeros(1)}
    assert tree.paths(params) == ["layers.0.bias", "layers.0.weight"]


@settings(max_examples=60, deadline=None)
@given(trees())
def test_unflatten_roundtrip(t):
    leaves, spec = tree.flatten(t)
    back = tree.unflatten(spec, leaves)
    assert tree.all_equal(back, t)
    assert tree.structure(back) == spec


@settings(max_examples=60, deadline=None)
@given(trees(), trees())
def test_structure_mismatch_always_names_a_path(t1, t2):
    if tree.structure(t1) == tree.structure(t2):
        tree.assert_same_structure(t1, t2)
    else:
        with pytest.raises(ValueError, match=r"differ in structure at '[^']+'"):
            tree.assert_same_structure(t1, t2)


@settings(max_examples=40, deadline=None)
@given(trees(), st.integers(1, 3))
def test_map_mismatch_raises_value_error_with_path(t, n):
    a = {"model": t, "extra": [0] * (n + 1)}
    b = {"model": t, "extra": [0] * n}
    with pytest.raises(ValueError, match=rf"at 'extra\.{n}'"):
        tree.map(lambda x, y: x, a, b)


def test_map_mismatch_message_names_first_differing_key_path():
    a = {"layers": [{"weight": 1, "bias": 2}]}
    b = {"layers": [{"weight": 1, "gamma": 2}]}
    with pytest.raises(ValueError, match=r"at 'layers\.0\.bias'.*missing \['bias'\].*unexpected \['gamma'\]"):
        tree.map(lambda x, y: x, a, b)
    with pytest.raises(ValueError, match=r"at 'x': expected None, got a leaf"):
        tree.map(lambda x, y: x, {"x": None}, {"x": 1})
    with pytest.raises(ValueError, match=r"at '<root>': expected tuple"):
        tree.map(lambda x, y: x, (1, 2), [1, 2])


def test_map_allows_prefix_like_jax():
    out = tree.map(lambda x, y: (x, y), {"a": 1}, {"a": [2, 3]})
    assert out == {"a": (1, [2, 3])}


def test_map_with_path():
    out = tree.map_with_path(lambda p, x: p, {"a": [0, {"b": 1}]})
    assert out == {"a": ["a.0", {"b": "a.1.b"}]}


def test_unflatten_wrong_leaf_count():
    with pytest.raises(ValueError, match="2 leaves but 1"):
        tree.unflatten(tree.structure([1, 2]), [1])


def test_register_dataclass_rejects_non_dataclass_and_unknown_static():
    class NotDC:
        pass

    with pytest.raises(TypeError, match="not a dataclass"):
        tree.register_dataclass(NotDC)

    @dataclasses.dataclass
    class D:
        x: int

    with pytest.raises(ValueError, match="no fields"):
        tree.register_dataclass(D, static=("y",))
