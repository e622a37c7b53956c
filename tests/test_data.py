import gzip
import os
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import fnnet
from fnnet import data, random as fr, tree
from fnnet.data import ArrayLoader
from conftest import requires_cuda


def dataset(n):
    """A tree whose every leaf encodes the sample index, so batches can be checked row by row."""
    ids = torch.arange(n)
    return {"x": torch.stack([ids, -ids], 1).float(), "y": (ids, ids * 2)}


def ids_of(batch):
    x, (y0, y1) = batch["x"], batch["y"]
    assert torch.equal(x[:, 0].long(), y0) and torch.equal(x[:, 1].long(), -y0) and torch.equal(y1, 2 * y0)
    return y0


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 60),
    batch_size=st.integers(1, 70),
    shuffle=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_one_epoch_batches(n, batch_size, shuffle, drop_last, seed):
    if drop_last and n < batch_size:
        with pytest.raises(ValueError, match="no batch"):
            ArrayLoader(dataset(n), batch_size, drop_last=True)
        return
    arrays = dataset(n)
    loader = ArrayLoader(arrays, batch_size, shuffle=shuffle, drop_last=drop_last, key=fr.key(seed))
    batches = list(loader)
    expected_len = n // batch_size if drop_last else -(-n // batch_size)
    assert len(loader) == len(batches) == expected_len
    sizes = [data.batch_size_of(b) for b in batches]
    if drop_last or n % batch_size == 0:
        assert sizes == [batch_size] * expected_len
    else:
        assert sizes == [batch_size] * (expected_len - 1) + [n % batch_size]
    assert all(tree.structure(b) == tree.structure(arrays) for b in batches)
    seen = torch.cat([ids_of(b) for b in batches])
    assert len(set(seen.tolist())) == len(seen)  # no sample twice
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))  # every sample exactly once
    assert torch.equal(seen, loader.indices(0)[: len(seen)])
    if not shuffle:
        assert torch.equal(seen, torch.arange(len(seen)))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(10, 60), batch_size=st.integers(1, 16), seed=st.integers(0, 2**32))
def test_keyed_order_is_deterministic_per_epoch_and_resumable(n, batch_size, seed):
    def epochs(loader, k):
        return [torch.cat([ids_of(b) for b in loader]) for _ in range(k)]

    a = ArrayLoader(dataset(n), batch_size, shuffle=True, key=fr.key(seed))
    b = ArrayLoader(dataset(n), batch_size, shuffle=True, key=fr.key(seed))
    ea, eb = epochs(a, 3), epochs(b, 3)
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))  # same key, same orders
    assert not torch.equal(ea[0], ea[1]) and not torch.equal(ea[1], ea[2])  # new order each epoch
    assert a.epoch == 3
    other = ArrayLoader(dataset(n), batch_size, shuffle=True, key=fr.key(seed + 1))
    assert not torch.equal(epochs(other, 1)[0], ea[0])
    # a resumed run: a fresh loader set to epoch 1 continues exactly
    resumed = ArrayLoader(dataset(n), batch_size, shuffle=True, key=fr.key(seed))
    resumed.set_epoch(1)
    assert all(torch.equal(x, y) for x, y in zip(epochs(resumed, 2), ea[1:]))
    # and mid-epoch: batches(epoch, start=s)
    s = len(a) // 2
    tail = torch.cat([ids_of(x) for x in a.batches(2, start=s)] or [torch.zeros(0, dtype=torch.int64)])
    assert torch.equal(tail, ea[2][s * batch_size:])
    assert a.epoch == 3  # batches() does not advance the epoch


def test_shuffle_never_touches_global_rng():
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = torch.cat(list(ArrayLoader(torch.arange(50), 7, shuffle=True, key=fr.key(4))))
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)
    again = torch.cat(list(ArrayLoader(torch.arange(50), 7, shuffle=True, key=fr.key(4))))
    assert torch.equal(first, again)
    assert torch.equal(first, fr.permutation(fr.fold_in(fr.key(4), 0), 50))  # the documented order


def test_unshuffled_batches_are_views_and_single_tensor_datasets():
    x = torch.randn(10, 3)
    batches = list(ArrayLoader(x, 4))
    assert [b.shape[0] for b in batches] == [4, 4, 2]
    assert all(b.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() for b in batches)
    assert torch.equal(torch.cat(batches), x)


def test_numpy_arrays_and_tuples():
    X = np.arange(12, dtype=np.float32).reshape(6, 2)
    y = np.arange(6)
    (xb, yb), *_ = ArrayLoader((X, y), 4)
    assert isinstance(xb, torch.Tensor) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert torch.equal(xb, torch.from_numpy(X[:4]))


def test_validation_errors():
    with pytest.raises(ValueError, match=r"'a': 5.*'b\.0': 4"):
        ArrayLoader({"a": torch.zeros(5, 2), "b": [torch.zeros(4)]}, 2)
    for bad in (0, -1, 2.5, True, "3", None):
        with pytest.raises(ValueError, match="batch_size must be a positive int"):
            ArrayLoader(torch.zeros(4), bad)
    with pytest.raises(ValueError, match="empty"):
        ArrayLoader((torch.zeros(0, 3), torch.zeros(0)), 2)
    with pytest.raises(ValueError, match="no tensors"):
        ArrayLoader({}, 2)
    with pytest.raises(ValueError, match=r"key=fnnet\.random\.key"):
        ArrayLoader(torch.zeros(4), 2, shuffle=True)
    with pytest.raises(TypeError, match="Key"):
        ArrayLoader(torch.zeros(4), 2, shuffle=True, key=0)
    with pytest.raises(TypeError, match=r"'1\.0'.*int"):
        ArrayLoader((torch.zeros(2), [1, 2]), 2)
    with pytest.raises(ValueError, match=r"'<root>'.*0-d"):
        ArrayLoader(torch.tensor(3.0), 1)
    loader = ArrayLoader(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)
    with pytest.raises(ValueError, match=r"start must be an int in \[0, 2\]"):
        loader.batches(0, start=3)


def test_any_iterable_is_a_loader():
    pairs = [(torch.zeros(3, 2), torch.zeros(3)), (torch.zeros(1, 2), torch.zeros(1))]
    assert [data.batch_size_of(b) for b in pairs] == [3, 1]
    assert data.batch_size_of({"img": torch.zeros(5, 1), "label": torch.zeros(5)}) == 5
    assert data.batch_size_of(torch.zeros(7, 2)) == 7
    assert data.num_batches(pairs) == 2 and data.num_batches(iter(pairs)) is None
    ds = torch.utils.data.TensorDataset(torch.arange(10.0), torch.arange(10))
    sampler = torch.utils.data.DistributedSampler(ds, num_replicas=1, rank=0, shuffle=False)
    dl = torch.utils.data.DataLoader(ds, batch_size=4, sampler=sampler)
    assert [data.batch_size_of(b) for b in dl] == [4, 4, 2] and data.num_batches(dl) == 3
    data.set_epoch(dl, 3)
    assert sampler.epoch == 3
    loader = ArrayLoader(torch.zeros(4), 2)
    data.set_epoch(loader, 5)
    assert loader.epoch == 5
    data.set_epoch(pairs, 1)  # nothing to tell a list; no error
    with pytest.raises(ValueError, match="no leaves"):
        data.batch_size_of((None, {}))
    # one rule (fnnet.batch): leaves without a first dimension are shared, not counted
    assert data.batch_size_of((3, torch.zeros(2))) == 2
    assert data.batch_size_of({"tag": "a", "x": torch.zeros(4, 1)}) == 4
    with pytest.raises(ValueError, match=r"no tensor with a first.*'0' \(int\)"):
        data.batch_size_of((3, torch.zeros(())))


def test_device_cpu_places_once():
    loader = ArrayLoader(dataset(9), 4, device="cpu", shuffle=True, key=fr.key(0))
    assert loader.device == torch.device("cpu")
    assert all(x.device.type == "cpu" for b in loader for x in tree.leaves(b))
    with pytest.raises(ValueError, match="(?i)devices here"):
        ArrayLoader(dataset(9), 4, device="cuda:99")


@pytest.mark.cuda
@requires_cuda
def test_cuda_dataset_batches_stay_on_device_with_the_cpu_order():
    cpu = ArrayLoader(dataset(50), 8, shuffle=True, key=fr.key(3))
    gpu = ArrayLoader(dataset(50), 8, shuffle=True, key=fr.key(3), device="cuda")
    assert all(x.is_cuda for x in tree.leaves(gpu.arrays))
    for bc, bg in zip(cpu, gpu):
        assert all(x.is_cuda for x in tree.leaves(bg))
        assert tree.all_equal(bc, tree.map(lambda x: x.cpu(), bg))
    plain = ArrayLoader(dataset(50), 8, device="cuda")
    first = next(iter(plain))
    assert first["x"].untyped_storage().data_ptr() == plain.arrays["x"].untyped_storage().data_ptr()


# -- load_digits ----------------------------------------------------------------------------
def test_load_digits_shapes_range_split_and_determinism():
    (X, y), (Xt, yt) = data.load_digits()
    assert X.shape == (1500, 1, 28, 28) and Xt.shape == (297, 1, 28, 28)
    assert X.dtype == Xt.dtype == torch.float32 and y.dtype == yt.dtype == torch.int64
    assert 0.0 <= float(X.min()) and float(X.max()) <= 1.0 and float(X.max()) > 0.9
    assert set(y.tolist()) == set(yt.tolist()) == set(range(10))
    (X2, y2), (Xt2, yt2) = data.load_digits()
    assert torch.equal(X, X2) and torch.equal(y, y2) and torch.equal(Xt, Xt2) and torch.equal(yt, yt2)


def test_load_digits_is_sklearn_order_scaled_and_bilinear():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16
    (X8, y8), (Xt8, yt8) = data.load_digits(size=8)
    assert torch.equal(X8, images[:1500]) and torch.equal(Xt8, images[1500:])
    assert torch.equal(torch.cat([y8, yt8]), torch.tensor(raw.target))
    (X16, _), _ = data.load_digits(size=16)
    ref = torch.nn.functional.interpolate(images[:1500], size=(16, 16), mode="bilinear", align_corners=False)
    assert X16.shape == (1500, 1, 16, 16) and torch.allclose(X16, ref.clamp(0, 1))
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="size"):
            data.load_digits(size=bad)


def test_load_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        data.load_digits()


# -- load_mnist on synthetic IDX files ------------------------------------------------------
def idx_bytes(magic, dims, values):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    return header + bytes(values)


def write(path, payload, gz):
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def fake_mnist(folder, n=5, rows=28, cols=28, prefix="train", gz=False, seed=0):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(n, rows, cols), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(2051, (n, rows, cols), pixels.tobytes()), gz)
    write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(2049, (n,), labels.tobytes()), gz)
    return pixels, labels


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), rows=st.integers(1, 5), cols=st.integers(1, 5), gz=st.booleans(), train=st.booleans())
def test_load_mnist_reads_what_was_written(tmp_path_factory, n, rows, cols, gz, train):
    root = tmp_path_factory.mktemp("mnist")
    pixels, labels = fake_mnist(root, n, rows, cols, "train" if train else "t10k", gz)
    X, y = data.load_mnist(root, train=train)
    assert X.shape == (n, 1, rows, cols) and X.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(X, torch.from_numpy(pixels).unsqueeze(1).float() / 255)
    assert torch.equal(y, torch.from_numpy(labels).long())


def test_load_mnist_torchvision_layout(tmp_path):
    pixels, _ = fake_mnist(tmp_path / "MNIST" / "raw", prefix="t10k", gz=True)
    X, _ = data.load_mnist(tmp_path, train=False)
    assert X.shape == (5, 1, 28, 28) and float(X.max()) <= 1.0
    assert torch.equal(X[:, 0], torch.from_numpy(pixels).float() / 255)


def test_load_mnist_missing_file_names_everything(tmp_path):
    fake_mnist(tmp_path)
    (tmp_path / "train-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as info:
        data.load_mnist(tmp_path, mirror="https://example.invalid/mnist/")
    msg = str(info.value)
    for p in (tmp_path / "train-labels-idx1-ubyte", tmp_path / "train-labels-idx1-ubyte.gz",
              tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"):
        assert str(p) in msg
    assert "https://example.invalid/mnist/" in msg and "download=True" in msg


@pytest.mark.parametrize("gz", [False, True])
def test_load_mnist_corruption_errors(tmp_path, gz):
    pixels = bytes(range(256)) * 6 + bytes(32)  # 2 * 28 * 28 = 1568 bytes
    images = idx_bytes(2051, (2, 28, 28), pixels)
    labels = idx_bytes(2049, (2,), b"\x01\x02")
    img, lab = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    cases = [
        ("truncated", images[:-10], labels, r"images-idx3-ubyte.*1574 bytes.*expected 1584.*truncated"),
        ("extra bytes", images + b"\x00", labels, r"images-idx3-ubyte.*1585 bytes.*expected 1584.*longer"),
        ("swapped", labels, images, r"images-idx3-ubyte.*magic number 2049.*expected 2051"),
        ("short header", images[:10], labels, r"images-idx3-ubyte.*10 bytes.*header"),
        ("tiny", images[:2], labels, r"images-idx3-ubyte.*2 bytes.*too short"),
        ("count mismatch", images, idx_bytes(2049, (3,), b"\x01\x02\x03"), r"2 images.*3 labels"),
        ("label out of range", images, idx_bytes(2049, (2,), b"\x01\x0c"), r"labels-idx1-ubyte.*label 12 at index 1.*0-9"),
    ]
    for what, img_payload, lab_payload, pattern in cases:
        for p in tmp_path.iterdir():
            p.unlink()
        write(img, img_payload, gz)
        write(lab, lab_payload, gz)
        with pytest.raises(ValueError, match=pattern):
            data.load_mnist(tmp_path)
    # the good pair loads
    for p in tmp_path.iterdir():
        p.unlink()
    write(img, images, gz)
    write(lab, labels, gz)
    X, y = data.load_mnist(tmp_path)
    assert X.shape == (2, 1, 28, 28) and y.tolist() == [1, 2]


def test_load_mnist_bad_gzip(tmp_path):
    fake_mnist(tmp_path, gz=True)
    gz_path = tmp_path / "train-images-idx3-ubyte.gz"
    gz_path.write_bytes(gz_path.read_bytes()[:40])  # truncated stream
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        data.load_mnist(tmp_path)
    gz_path.write_bytes(b"definitely not gzip data")
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*gzip"):
        data.load_mnist(tmp_path)
    gz_path.unlink()
    raw = tmp_path / "train-images-idx3-ubyte"
    raw.write_bytes(gzip.compress(idx_bytes(2051, (5, 28, 28), bytes(5 * 784))))
    with pytest.raises(ValueError, match=r"gzip-compressed.*\.gz suffix"):
        data.load_mnist(tmp_path)


def test_load_mnist_download_from_file_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    pixels, labels = fake_mnist(mirror, n=3, prefix="t10k", gz=True)
    root = tmp_path / "data"
    X, y = data.load_mnist(root, train=False, download=True, mirror=mirror.as_uri() + "/")
    assert torch.equal(X[:, 0], torch.from_numpy(pixels).float() / 255) and y.tolist() == labels.tolist()
    assert sorted(os.listdir(root)) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    X2, _ = data.load_mnist(root, train=False)  # now found locally
    assert torch.equal(X, X2)


def test_load_mnist_download_failures_leave_nothing(tmp_path):
    root = tmp_path / "data"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConnectionError, match=r"could not download file:.*train-images-idx3-ubyte\.gz.*copy them into"):
        data.load_mnist(root, download=True, mirror=empty.as_uri() + "/")
    assert os.listdir(root) == []
    (empty / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"<html>not found</html>"))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*magic number"):
        data.load_mnist(root, download=True, mirror=empty.as_uri() + "/")
    assert os.listdir(root) == []


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 40), batch_size=st.integers(1, 9), shuffle=st.booleans(), drop_last=st.booleans(),
       seed=st.integers(0, 100))
def test_streamed_batches_equal_device_resident_ones(n, batch_size, shuffle, drop_last, seed):
    if drop_last and n < batch_size:
        return
    g = torch.Generator().manual_seed(seed)
    arrays = {"x": torch.randn(n, 3, generator=g), "y": torch.randint(0, 5, (n,), generator=g)}
    kw = dict(shuffle=shuffle, drop_last=drop_last, key=fnnet.random.key(seed) if shuffle else None, device="cpu")
    resident, streamed = ArrayLoader(arrays, batch_size, **kw), ArrayLoader(arrays, batch_size, stream=True, **kw)
    for epoch in range(2):
        a, b = list(resident), list(streamed)
        assert len(a) == len(b) == len(resident)
        for x, y in zip(a, b):
            assert fnnet.tree.all_equal(x, y)
    # each streamed batch is its own tensor: a later batch never overwrites an earlier one
    kept = list(streamed.batches(0))
    assert fnnet.tree.all_equal(kept, list(resident.batches(0)))
    with pytest.raises(ValueError, match="stream=True.*device="):
        ArrayLoader(arrays, batch_size, stream=True)


@pytest.mark.cuda
@requires_cuda
def test_streamed_batches_reach_the_gpu_from_pinned_memory_and_train_alike():
    g = torch.Generator().manual_seed(0)
    arrays = (torch.randn(300, 4, generator=g), torch.randint(0, 3, (300,), generator=g))
    streamed = ArrayLoader(arrays, 64, shuffle=True, key=fnnet.random.key(1), device="cuda", stream=True)
    resident = ArrayLoader(arrays, 64, shuffle=True, key=fnnet.random.key(1), device="cuda")
    assert all(t.is_pinned() and t.device.type == "cpu" for t in fnnet.tree.leaves(streamed.arrays))
    for a, b in zip(streamed, resident):
        assert a[0].is_cuda and fnnet.tree.all_equal(a, b)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 60), batch_size=st.integers(1, 9), world=st.integers(1, 4), shuffle=st.booleans(),
       drop_last=st.booleans(), epoch=st.integers(0, 3))
def test_shards_are_disjoint_cover_the_epoch_and_never_empty(n, batch_size, world, shuffle, drop_last, epoch):
    if n < world or (drop_last and n < batch_size * world):
        return
    data = torch.arange(n)
    kw = dict(shuffle=shuffle, drop_last=drop_last, key=fnnet.random.key(5) if shuffle else None)
    loaders = [ArrayLoader(data, batch_size, shard=(r, world), **kw) for r in range(world)]
    per_rank = [list(loader.batches(epoch)) for loader in loaders]
    assert len({len(b) for b in per_rank}) == 1 == len({len(loader) for loader in loaders})  # same count everywhere
    assert all(len(b) == len(loaders[0]) for b in per_rank)
    seen = torch.cat([x for batches in per_rank for x in batches])
    assert len(set(seen.tolist())) == len(seen)  # disjoint
    assert all(len(x) >= 1 for batches in per_rank for x in batches)  # never empty
    order = loaders[0].indices(epoch)
    if not drop_last:
        assert sorted(seen.tolist()) == list(range(n))  # covering
    # each global batch, put back together rank by rank, is the single-process order
    for i in range(len(loaders[0])):
        glued = torch.cat([per_rank[r][i] for r in range(world)])
        start = i * batch_size * world
        assert torch.equal(glued, data[order[start:start + len(glued)]])
    sizes = [len(per_rank[r][0]) for r in range(world)]
    assert max(sizes) - min(sizes) <= 1


def test_shard_argument_errors():
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        ArrayLoader(torch.arange(5), 2, shard=(2, 2))
    with pytest.raises(TypeError, match="rank, world_size"):
        ArrayLoader(torch.arange(5), 2, shard=[0, 2])
    with pytest.raises(ValueError, match="3 samples cannot give each of 4 ranks"):
        ArrayLoader(torch.arange(3), 2, shard=(0, 4))


def test_fit_loaders_turns_arrays_into_loaders_and_passes_loaders_through():
    import numpy as np

    from fnnet.data import fit_loaders

    X, y = np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10)
    train, val = fit_loaders((X, y), batch_size=4, validation_split=0.3, key=fnnet.random.key(0))
    assert isinstance(train, fnnet.ArrayLoader) and isinstance(val, fnnet.ArrayLoader)
    seen = torch.cat([b[1] for b in train])
    assert sorted(seen.tolist()) == list(range(7))  # the first 70 %, shuffled
    assert torch.cat([b[1] for b in val]).tolist() == [7, 8, 9]  # the last 30 %, in order
    loader = fnnet.ArrayLoader((torch.zeros(4, 1), torch.zeros(4)), 2)
    assert fit_loaders(loader, None) == (loader, None)
    with pytest.raises(ValueError, match="a loader brings its own batches"):
        fit_loaders(loader, batch_size=8)
    with pytest.raises(ValueError, match="either val_data or validation_split"):
        fit_loaders((X, y), (X, y), validation_split=0.2)
    with pytest.raises(ValueError, match="leaves no samples"):
        fit_loaders((X[:1], y[:1]), validation_split=0.5)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="validation_split"):
            fit_loaders((X, y), validation_split=bad)
