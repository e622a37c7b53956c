"""Shared test fixtures and hypothesis strategies."""

import os

import pytest
import torch
from hypothesis import strategies as st

os.environ.setdefault("MPLBACKEND", "Agg")

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool]


@st.composite
def tensors(draw, dtypes=DTYPES, max_dims=3, max_side=4):
    dtype = draw(st.sampled_from(dtypes))
    shape = tuple(draw(st.lists(st.integers(0, max_side), max_size=max_dims)))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g) < 0.5
    if dtype in (torch.int64, torch.int32):
        return torch.randint(-100, 100, shape, generator=g, dtype=dtype)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


scalars = st.one_of(st.integers(-5, 5), st.floats(-10, 10, allow_nan=False), st.booleans(), st.text(max_size=3))


def trees(leaves=None, max_leaves=8):
    """Nested dicts/lists/tuples/None of tensors and scalars."""
    leaves = leaves if leaves is not None else st.one_of(tensors(), scalars)
    keys = st.text(alphabet="abcdefgh_", min_size=1, max_size=4)
    return st.recursive(
        st.one_of(leaves, st.none()),
        lambda children: st.one_of(
            st.lists(children, max_size=3),
            st.lists(children, max_size=3).map(tuple),
            st.dictionaries(keys, children, max_size=3),
        ),
        max_leaves=max_leaves,
    )


@pytest.fixture
def one_thread():
    """These models are tiny: one thread is as fast, and on a shared, loaded machine two OpenMP threads that wait
    for each other are several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
