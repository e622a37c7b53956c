"""Text data for language models: load_text, CharVocab, WindowLoader (positions, resume, sharding)."""

import pytest
import torch

import fnnet
from fnnet.data import WindowLoader
from fnnet.datasets import CharVocab, load_text, stdlib_text


def test_load_text_default_is_fixed_and_split_90_10(tmp_path):
    a = load_text(max_chars=50_000)
    b = load_text(max_chars=50_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert len(a.train) == 45_000 and len(a.val) == 5_000 and a.train.dtype == torch.int64
    text = stdlib_text(50_000)
    assert len(text) == 50_000 and a.vocab.decode(torch.cat([a.train, a.val])) == text
    path = tmp_path / "t.txt"
    path.write_text("hello world, hello text\n" * 10, encoding="utf-8")
    train, val, vocab = load_text(path)
    assert vocab.chars == "".join(sorted(set("hello world, hello text\n"))) and len(train) + len(val) == 240
    with pytest.raises(FileNotFoundError, match="no file"):
        load_text(tmp_path / "missing.txt")
    (tmp_path / "bin").write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text(tmp_path / "bin")


def test_char_vocab_round_trip_and_errors():
    vocab = CharVocab("abcabc d")
    assert len(vocab) == 5 and vocab.decode(vocab.encode("a cab")) == "a cab"
    with pytest.raises(ValueError, match="'z' is not in the vocabulary"):
        vocab.encode("az")
    with pytest.raises(ValueError, match="ids must be ints"):
        vocab.decode([0, 9])


def test_windows_are_shifted_pairs_drawn_under_the_key():
    tokens = torch.arange(500)
    loader = WindowLoader(tokens, 16, 4, key=fnnet.random.key(0), windows_per_epoch=40)
    before = torch.random.get_rng_state()
    batches = list(loader)
    assert torch.equal(before, torch.random.get_rng_state())
    assert len(batches) == len(loader) == 10
    for x, y in batches:
        assert x.shape == y.shape == (4, 16) and x.is_contiguous() and y.is_contiguous()
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # consecutive tokens, y = x shifted
    again = list(WindowLoader(tokens, 16, 4, key=fnnet.random.key(0), windows_per_epoch=40))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    assert not torch.equal(next(iter(loader))[0], batches[0][0])  # the next epoch draws other windows
    with pytest.raises(ValueError, match="1-D integer"):
        WindowLoader(torch.zeros(10), 4, 2, key=fnnet.random.key(0))
    with pytest.raises(ValueError, match="hold no window"):
        WindowLoader(torch.arange(4), 4, 2, key=fnnet.random.key(0))


def test_state_dict_resumes_bit_exactly_mid_epoch_and_across_epochs():
    tokens = torch.randint(0, 50, (3000,), generator=torch.Generator().manual_seed(0))

    def make():
        return WindowLoader(tokens, 8, 5, key=fnnet.random.key(3), windows_per_epoch=30)

    whole = make_epochs(make(), 2)
    run = make()
    it, seen = iter(run), []
    for _ in range(4):
        seen.append(next(it))
    saved = run.state_dict()
    assert saved == {"epoch": 0, "batch": 4, "global_batch": 5}
    resumed = make()
    resumed.load_state_dict(saved)
    rest = list(iter(resumed)) + list(iter(resumed))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(seen + rest, whole))
    assert resumed.state_dict() == {"epoch": 2, "batch": 0, "global_batch": 5}
    with pytest.raises(ValueError, match="global batch of 5"):
        WindowLoader(tokens, 8, 4, key=fnnet.random.key(3), windows_per_epoch=30).load_state_dict(saved)


def make_epochs(loader, n):
    return [b for _ in range(n) for b in loader]


@pytest.mark.parametrize("world", [2, 3])
def test_a_global_batch_is_the_same_windows_on_any_number_of_ranks(world):
    tokens = torch.randint(0, 50, (3000,), generator=torch.Generator().manual_seed(1))
    one = list(WindowLoader(tokens, 8, 12, key=fnnet.random.key(4), global_batch=True, windows_per_epoch=60))
    parts = [list(WindowLoader(tokens, 8, 12, key=fnnet.random.key(4), global_batch=True, windows_per_epoch=60,
                               shard=(r, world))) for r in range(world)]
    for i, (x, y) in enumerate(one):
        assert torch.equal(torch.cat([p[i][0] for p in parts]), x)
        assert torch.equal(torch.cat([p[i][1] for p in parts]), y)
    # a position saved on `world` ranks continues on one process
    rank0 = WindowLoader(tokens, 8, 12, key=fnnet.random.key(4), global_batch=True, windows_per_epoch=60,
                         shard=(0, world))
    it = iter(rank0)
    next(it), next(it)
    single = WindowLoader(tokens, 8, 12, key=fnnet.random.key(4), global_batch=True, windows_per_epoch=60)
    single.load_state_dict(rank0.state_dict())
    assert torch.equal(next(iter(single))[0], one[2][0])
