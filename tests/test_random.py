import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from fnnet import random as fr

seeds = st.integers(0, 2**64 - 1)


@settings(max_examples=50, deadline=None)
@given(seeds)
def test_same_seed_same_key_and_numbers(seed):
    a, b = fr.key(seed), fr.key(seed)
    assert a == b
    assert torch.equal(fr.normal(a, (5,)), fr.normal(b, (5,)))
    assert fr.split(a, 3) == fr.split(b, 3)
    assert fr.fold_in(a, 7) == fr.fold_in(b, 7)


@settings(max_examples=50, deadline=None)
@given(seeds)
def test_split_children_are_distinct(seed):
    k = fr.key(seed)
    children = fr.split(k, 4)
    assert len(set(children + (k,))) == 5
    assert fr.fold_in(k, 0) != fr.fold_in(k, 1)


# An independent SplitMix64 (Vigna's generator, written as the stream it is: a state advanced
# by the golden gamma, each output the mixed state), in NumPy's wrapping uint64 arithmetic.
# fnnet's keys are defined in terms of its first output, so these pin real values.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)


def splitmix64_stream(seed, n):
    state, out = np.uint64(seed), []
    with np.errstate(over="ignore"):
        for _ in range(n):
            state = state + _GAMMA
            z = state
            z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            out.append(int(z ^ (z >> np.uint64(31))))
    return out


def h(x):
    """The first SplitMix64 output from seed ``x``: fnnet's mixing function."""
    return splitmix64_stream(x & (2**64 - 1), 1)[0]


def test_the_reference_is_splitmix64():
    # The published first outputs of SplitMix64 seeded with 0 (e.g. the test vectors of
    # Vigna's splitmix64.c and of Java's SplittableRandom); if this fails, the reference is wrong.
    assert splitmix64_stream(0, 3) == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]


@settings(max_examples=30, deadline=None)
@given(seeds, st.integers(1, 4), st.integers(-(2**63), 2**64 - 1))
def test_key_split_fold_in_and_seed_match_the_reference(seed, num, data):
    k = fr.key(seed)
    assert (k.hi, k.lo) == (h(seed), h(seed ^ 0x6A09E667F3BCC909))
    for i, child in enumerate(fr.split(k, num)):
        c = h((i << 1) | 1)
        assert (child.hi, child.lo) == (h(k.hi ^ c), h(k.lo + c))
    d = h(data ^ 0x3C6EF372FE94F82B)
    assert fr.fold_in(k, data) == fr.Key(h(k.hi ^ d), h(k.lo ^ h(d)))
    assert fr.seed_of(k) == h(k.hi ^ h(k.lo)) >> 1


def test_known_values_are_pinned():
    # Literal values, so a change to the hashing (which would change every user's results) fails here.
    k = fr.key(0)
    assert k.hi == 0xE220A8397B1DCDAF
    assert fr.key(0) == fr.Key(h(0), h(0x6A09E667F3BCC909))
    assert fr.seed_of(k) == h(k.hi ^ h(k.lo)) >> 1 and 0 <= fr.seed_of(k) < 2**63
    # The samplers are torch's, seeded with seed_of(key): the same numbers as a Generator seeded by hand.
    g = torch.Generator().manual_seed(h(k.hi ^ h(k.lo)) >> 1)
    assert torch.equal(fr.normal(k, (4,)), torch.randn(4, generator=g))


N = 200_000


@pytest.mark.parametrize("low,high", [(0.0, 1.0), (-5.0, 3.0)])
def test_uniform_is_uniform(low, high):
    u = fr.uniform(fr.key(1), (N,), low=low, high=high, dtype=torch.float64)
    assert u.min() >= low and u.max() < high
    width = high - low
    # The sample mean's standard error is width / sqrt(12 N); 6 of them are a bound a correct
    # sampler misses with probability ~2e-9, and a constant or a half-range sampler cannot meet.
    assert abs(u.mean().item() - (low + high) / 2) < 6 * width / (12 * N) ** 0.5
    assert u.var().item() == pytest.approx(width**2 / 12, rel=0.02)
    counts = torch.histc(u, bins=10, min=low, max=high)
    assert (counts - N / 10).abs().max() < 6 * (N / 10) ** 0.5


def test_normal_has_mean_0_and_variance_1():
    x = fr.normal(fr.key(2), (N,), dtype=torch.float64)
    assert abs(x.mean().item()) < 6 / N**0.5
    assert x.var().item() == pytest.approx(1.0, rel=0.02)
    assert abs((x.abs() < 1).double().mean().item() - 0.6827) < 0.005


def test_randint_and_bernoulli_frequencies():
    r = fr.randint(fr.key(3), (N,), 3, 7)
    assert r.dtype == torch.int64 and r.min() >= 3 and r.max() < 7
    counts = torch.bincount(r - 3, minlength=4)
    assert (counts - N / 4).abs().max() < 6 * (N * 0.25 * 0.75) ** 0.5
    b = fr.bernoulli(fr.key(4), 0.3, (N,))
    assert b.dtype == torch.bool and abs(b.double().mean().item() - 0.3) < 6 * (0.3 * 0.7 / N) ** 0.5
    assert fr.bernoulli(fr.key(4), 0.0, (10,)).sum() == 0 and fr.bernoulli(fr.key(4), 1.0, (10,)).all()


def test_permutations_are_permutations_and_differ_across_keys():
    perms = [fr.permutation(k, 50) for k in fr.split(fr.key(5), 20)]
    for p in perms:
        assert sorted(p.tolist()) == list(range(50))
    assert len({tuple(p.tolist()) for p in perms}) == 20
    assert torch.equal(fr.permutation(fr.key(5), 50), fr.permutation(fr.key(5), 50))
    # Each position is uniform over 0..n-1: the mean position of element 0 is (n-1)/2.
    many = torch.stack([fr.permutation(k, 10) for k in fr.split(fr.key(6), 2000)])
    where0 = (many == 0).double().argmax(dim=1).double()
    assert abs(where0.mean().item() - 4.5) < 6 * (99 / 12 / 2000) ** 0.5


def test_different_keys_give_different_numbers():
    a, b = fr.split(fr.key(7))
    assert not torch.equal(fr.uniform(a, (8,)), fr.uniform(b, (8,)))
    assert not torch.equal(fr.normal(a, (8,)), fr.normal(fr.fold_in(a, 1), (8,)))


def test_global_rng_untouched():
    state = torch.random.get_rng_state()
    k = fr.key(3)
    fr.normal(k, (10,))
    with fr.rng_scope(k):
        torch.rand(10)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_rng_scope_is_deterministic():
    k = fr.key(11)
    with fr.rng_scope(k):
        a = torch.nn.functional.dropout(torch.ones(100), 0.5)
    with fr.rng_scope(k):
        b = torch.nn.functional.dropout(torch.ones(100), 0.5)
    assert torch.equal(a, b)


def test_key_tensor_roundtrip_and_errors():
    k = fr.fold_in(fr.key(2**63 + 5), 9)
    assert fr.Key.from_tensor(k.to_tensor()) == k
    with pytest.raises(ValueError):
        fr.Key.from_tensor(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError):
        fr.key(1.5)
    with pytest.raises(TypeError):
        fr.split(123)
    with pytest.raises(ValueError):
        fr.split(fr.key(0), 0)
    with pytest.raises(ValueError):
        fr.Key(-1, 0)


def test_tracing_key_refuses_use():
    with pytest.raises(ValueError, match="compiled"):
        fr.split(fr.TRACING_KEY)


def test_generator_is_the_keys_torch_generator_as_documented():
    k = fr.key(3)
    before = torch.random.get_rng_state()
    g = fr.generator(k)
    assert isinstance(g, torch.Generator) and g.device.type == "cpu"
    # the docstring's promise: torch's sampler with the key's generator is fnnet's sampler under the key
    assert torch.equal(torch.randn(3, generator=fr.generator(k)), fr.normal(k, (3,)))
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=fr.generator(k)))  # fresh each call
    assert not torch.equal(torch.rand(5, generator=fr.generator(fr.fold_in(k, 1))),
                           torch.rand(5, generator=fr.generator(k)))
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG neither read nor changed
