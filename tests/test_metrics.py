"""fnnet.metrics: streaming metrics equal the metric on the concatenated epoch, purely."""

import doctest

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fnnet.metrics as M
from fnnet import tree


def run(metric, batches, device="cpu"):
    state = metric.init(device)
    for outputs, targets in batches:
        state = metric.update(state, outputs, targets)
    return metric.compute(state)


def split(x, y, sizes):
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


def batch_sizes():
    return st.lists(st.integers(1, 17), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(sizes=batch_sizes(), seed=st.integers(0, 2**16))
def test_accuracy_is_exact_over_uneven_batches(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    outputs = torch.randn(n, 5, generator=g)
    targets = torch.randint(0, 5, (n,), generator=g)
    expected = (outputs.argmax(1) == targets).double().mean()
    got = run(M.accuracy, split(outputs, targets, sizes))
    assert got.ndim == 0
    assert torch.equal(got, expected)


def test_mean_of_batch_means_differs_from_the_exact_value():
    # 3 correct of 3, then 0 correct of 1: exact accuracy 0.75, mean of batch means 0.5
    outputs = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    targets = torch.tensor([1, 1, 1, 0])
    got = run(M.accuracy, split(outputs, targets, [3, 1]))
    assert got.item() == 0.75


@settings(max_examples=40, deadline=None)
@given(sizes=batch_sizes(), seed=st.integers(0, 2**16))
def test_mean_of_a_plain_function_is_the_epoch_mean(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    outputs = torch.randn(n, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (n,), generator=g)
    expected = F.cross_entropy(outputs, targets)
    got = run(M.mean_of(F.cross_entropy), split(outputs, targets, sizes))
    assert torch.allclose(got, expected, rtol=1e-12, atol=0)
    # a per-sample (reduction="none") function counts every element once
    per_sample = M.mean_of(lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert torch.allclose(run(per_sample, split(outputs, targets, sizes)), expected, rtol=1e-12, atol=0)


@settings(max_examples=30, deadline=None)
@given(sizes=batch_sizes(), seed=st.integers(0, 2**16), k=st.integers(1, 6))
def test_top_k_accuracy_is_exact(sizes, seed, k):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    outputs = torch.randn(n, 6, generator=g)
    targets = torch.randint(0, 6, (n,), generator=g)
    rank = (outputs > outputs.gather(1, targets[:, None])).sum(1)  # classes scored above the target
    expected = (rank < k).double().mean()
    assert torch.equal(run(M.top_k_accuracy(k), split(outputs, targets, sizes)), expected)


def test_top_k_accuracy_examples_and_errors():
    outputs = torch.tensor([[0.1, 0.5, 0.4], [0.7, 0.2, 0.1], [0.1, 0.2, 0.7]])
    targets = torch.tensor([2, 1, 0])
    assert run(M.top_k_accuracy(1), [(outputs, targets)]).item() == 0.0
    assert run(M.top_k_accuracy(2), [(outputs, targets)]).item() == pytest.approx(2 / 3)
    assert run(M.top_k_accuracy(3), [(outputs, targets)]).item() == 1.0
    assert torch.equal(run(M.top_k_accuracy(1), [(outputs, targets)]), run(M.accuracy, [(outputs, targets)]))
    with pytest.raises(ValueError, match="larger than the number of classes, 3"):
        M.top_k_accuracy(4).update(M.top_k_accuracy(4).init(), outputs, targets)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive int"):
            M.top_k_accuracy(bad)


def test_binary_accuracy_thresholds_logits_at_zero():
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0, 0.0])
    labels = torch.tensor([1, 0, 0, 1, 0])
    # predictions 1, 0, 1, 0, 0 -> correct, correct, wrong, wrong, correct
    for outputs in (logits, logits[:, None]):
        for targets in (labels, labels.float(), labels.bool(), labels[:, None].float()):
            assert run(M.accuracy, [(outputs, targets)]).item() == pytest.approx(3 / 5)
    probs = torch.sigmoid(logits)
    assert run(M.binary_accuracy(0.5), [(probs, labels)]).item() == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match="expects outputs of shape"):
        run(M.binary_accuracy(), [(torch.randn(4, 3), torch.zeros(4))])
    with pytest.raises(ValueError, match="one 0/1 target per sample"):
        run(M.accuracy, [(logits, torch.zeros(5, 2))])


def test_accuracy_accepts_one_hot_and_per_position_targets():
    outputs = torch.randn(8, 4)
    idx = torch.randint(0, 4, (8,))
    one_hot = F.one_hot(idx, 4).float()
    assert torch.equal(run(M.accuracy, [(outputs, one_hot)]), run(M.accuracy, [(outputs, idx)]))
    seq_out, seq_t = torch.randn(3, 4, 7), torch.randint(0, 4, (3, 7))  # (N, C, L), CrossEntropyLoss layout
    expected = (seq_out.argmax(1) == seq_t).double().mean()
    assert torch.equal(run(M.accuracy, [(seq_out, seq_t)]), expected)
    with pytest.raises(ValueError, match=r"outputs of shape \(8, 4\) and targets of shape \(8, 3\)"):
        run(M.accuracy, [(outputs, torch.zeros(8, 3))])


def test_update_is_pure():
    outputs = torch.randn(6, 3, requires_grad=True)
    targets = torch.randint(0, 3, (6,))
    o_copy, t_copy = outputs.detach().clone(), targets.clone()
    for metric in (M.accuracy, M.top_k_accuracy(2), M.mean_of(F.cross_entropy)):
        state = metric.update(metric.init(), outputs[:2], targets[:2])
        before = tree.map(torch.clone, state)
        new = metric.update(state, outputs, targets)
        assert tree.all_equal(state, before)  # the old state is untouched
        again = metric.update(state, outputs, targets)
        assert tree.all_equal(new, again)  # same inputs, same result
        assert not any(t.requires_grad for t in tree.leaves(new))  # no autograd graph is kept
    assert torch.equal(outputs.detach(), o_copy) and torch.equal(targets, t_copy)


def test_mean_metric_weights_and_empty_state():
    m = M.mean_metric()
    state = m.init("cpu")
    assert torch.isnan(m.compute(state))
    state = m.update(state, torch.tensor(2.0), 3)  # a batch of 3 with mean 2
    state = m.update(state, 1.0, 1)  # a Python float
    state = m.update(state, torch.tensor([4.0, 0.0]))  # per-sample values, weight 1 each
    state = m.update(state, torch.tensor([1.0, 3.0]), torch.tensor([0.5, 1.5]))  # tensor weights
    assert m.compute(state).item() == pytest.approx((6 + 1 + 4 + 0 + 0.5 + 4.5) / (3 + 1 + 2 + 2))
    assert state.count.item() == 8


def test_merge_of_split_states_equals_one_pass():
    outputs, targets = torch.randn(20, 3), torch.randint(0, 3, (20,))
    a = M.accuracy.update(M.accuracy.init(), outputs[:7], targets[:7])
    b = M.accuracy.update(M.accuracy.init(), outputs[7:], targets[7:])
    whole = M.accuracy.update(M.accuracy.init(), outputs, targets)
    assert tree.all_equal(M.merge(a, b), whole)


def test_as_metric():
    assert M.as_metric(M.accuracy) is M.accuracy
    wrapped = M.as_metric(lambda o, t: (o.argmax(1) == t).float().mean())
    assert isinstance(wrapped, M.Metric)
    outputs, targets = torch.randn(10, 3), torch.randint(0, 3, (10,))
    batches = split(outputs, targets, [7, 3])
    assert torch.allclose(run(wrapped, batches), run(M.accuracy, batches))
    # sklearn-style functions that return numpy scalars work too (the chapter's accuracy)
    numpy_fn = M.as_metric(lambda o, t: (o.argmax(1) == t).float().mean().numpy())
    assert torch.allclose(run(numpy_fn, batches), run(M.accuracy, batches))
    for bad in ("accuracy", 3, None):
        with pytest.raises(TypeError, match="fnnet.metrics.Metric .* or a function"):
            M.as_metric(bad)


def test_state_stays_on_the_init_device_with_float64_sums():
    state = M.accuracy.update(M.accuracy.init(torch.device("cpu")), torch.randn(4, 2), torch.tensor([0, 1, 1, 0]))
    assert all(t.device.type == "cpu" and t.dtype == torch.float64 and t.ndim == 0 for t in state)


def test_updates_compile_without_graph_breaks():
    outputs, targets = torch.randn(6, 4), torch.randint(0, 4, (6,))
    for metric in (M.accuracy,):  # one is enough: every built-in metric is mean_of(...) over tensor ops
        compiled = torch.compile(metric.update, backend="eager", fullgraph=True)
        state = compiled(metric.init(), outputs, targets)
        assert torch.equal(metric.compute(state), metric.compute(metric.update(metric.init(), outputs, targets)))


def test_docstring_f1_example_is_exact_over_batches():
    (example,) = [t for t in doctest.DocTestFinder().find(M) if t.name == M.__name__]
    runner = doctest.DocTestRunner()
    runner.run(example, clear_globs=False)
    assert runner.failures == 0 and runner.tries > 5
    f1 = example.globs["f1"]()
    outputs, targets = torch.randn(50, 2), torch.randint(0, 2, (50,))
    got = run(f1, split(outputs, targets, [13, 30, 7]))
    pred = outputs.argmax(1) == 1
    true = targets == 1
    precision = (pred & true).sum() / pred.sum()
    recall = (pred & true).sum() / true.sum()
    assert got.item() == pytest.approx((2 * precision * recall / (precision + recall)).item())


# -- torchmetrics objects -------------------------------------------------------------------------------


class _FakeTorchmetricsMetric:
    """Stands in for torchmetrics.Metric (same module name) so the adapter is tested without the package."""

    def __init__(self):
        self.device, self.total, self.count = None, None, None
        self.reset()

    def reset(self):
        self.total, self.count = torch.tensor(0.0, dtype=torch.float64), 0

    def to(self, device):
        self.device = torch.device(device)
        self.total = self.total.to(self.device)
        return self

    def update(self, outputs, targets):
        assert not outputs.requires_grad  # the adapter detaches
        self.total = self.total + (outputs.argmax(1) == targets).sum()
        self.count += len(targets)

    def compute(self):
        return self.total / self.count


_FakeTorchmetricsMetric.__module__ = "torchmetrics.metric"
_FakeTorchmetricsMetric.__name__ = _FakeTorchmetricsMetric.__qualname__ = "Metric"


class _FakeAccuracy(_FakeTorchmetricsMetric):
    pass


_FakeAccuracy.__module__ = "torchmetrics.classification.accuracy"


def test_a_torchmetrics_object_is_recognized_by_module_name_and_is_exact():
    obj = _FakeAccuracy()
    metric = M.as_metric(obj)
    assert isinstance(metric, M.Metric)
    outputs = torch.randn(30, 4, requires_grad=True)
    targets = torch.randint(0, 4, (30,))
    state = metric.init("cpu")
    assert obj.device == torch.device("cpu")
    for o, t in split(outputs, targets, [17, 3, 10]):
        state = metric.update(state, o, t)
    assert state.item() == 3  # batches seen
    assert torch.equal(metric.compute(state), run(M.accuracy, [(outputs.detach(), targets)]))
    metric.init("cpu")  # init resets the object: the adapter is stateful
    assert obj.count == 0


def test_detecting_torchmetrics_never_imports_it():
    code = ("import sys, torch, fnnet.metrics as M\n"
            "M.as_metric(M.accuracy); M.as_metric(lambda o, t: 0.0); M.as_metric(torch.nn.Linear(2, 2))\n"
            "assert 'torchmetrics' not in sys.modules, 'torchmetrics was imported'\n")
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def _uneven(n_classes=5, sizes=(37, 5, 64, 1, 23, 50), seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    targets = torch.randint(0, n_classes, (n,), generator=g)
    # informative but noisy logits: an F1 around 0.7, with per-class differences
    outputs = 1.2 * F.one_hot(targets, n_classes).float() + torch.randn(n, n_classes, generator=g)
    return outputs, targets, split(outputs, targets, sizes)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_torchmetrics_macro_f1_is_exact_over_uneven_batches(seed):
    classification = pytest.importorskip("torchmetrics.classification")
    from sklearn.metrics import f1_score

    outputs, targets, batches = _uneven(seed=seed)
    expected = f1_score(targets.numpy(), outputs.argmax(1).numpy(), average="macro")
    metric = M.as_metric(classification.MulticlassF1Score(num_classes=5, average="macro"))
    got = run(metric, batches)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)  # torchmetrics sums in float32
    # what a per-batch mean of the same object gives (the old behaviour) is measurably off
    per_batch = run(M.mean_of(classification.MulticlassF1Score(num_classes=5, average="macro")), batches)
    assert abs(per_batch.item() - expected) > 1e-3


def test_torchmetrics_multiclass_accuracy_and_errors():
    classification = pytest.importorskip("torchmetrics.classification")
    import torchmetrics

    outputs, targets, batches = _uneven(n_classes=4, sizes=(9, 30, 2, 14), seed=3)
    micro = M.as_metric(classification.MulticlassAccuracy(num_classes=4, average="micro"))
    assert run(micro, batches).item() == pytest.approx(run(M.accuracy, batches).item(), rel=1e-6)
    from sklearn.metrics import balanced_accuracy_score

    macro = M.as_metric(classification.MulticlassAccuracy(num_classes=4, average="macro"))  # mean per-class recall
    assert run(macro, batches).item() == pytest.approx(
        balanced_accuracy_score(targets.numpy(), outputs.argmax(1).numpy()), rel=1e-6)
    per_class = M.as_metric(classification.MulticlassAccuracy(num_classes=4, average=None))
    with pytest.raises(ValueError, match=r"MulticlassAccuracy.compute\(\) returned \(4,\).*average="):
        run(per_class, batches)
    with pytest.raises(TypeError, match="not a torchmetrics.Metric; pass each metric on its own"):
        M.as_metric(torchmetrics.MetricCollection([classification.MulticlassAccuracy(num_classes=4)]))
    with pytest.raises(TypeError, match="expects a torchmetrics.Metric"):
        M.from_torchmetrics(M.accuracy)


def test_torchmetrics_in_the_trainer_are_exact_for_train_and_validation():
    classification = pytest.importorskip("torchmetrics.classification")
    from sklearn.metrics import f1_score
    import fnnet
    from torch import nn

    outputs, targets, _ = _uneven(n_classes=3, seed=4)
    x = outputs[:, :3]  # features: the noisy one-hot logits of 3 classes
    train = split(x[:120], targets[:120] % 3, [50, 50, 20])
    val = split(x[120:], targets[120:] % 3, [27, 27, 6])
    torch.manual_seed(0)
    trainer = fnnet.Trainer(nn.Linear(3, 3), F.cross_entropy, fnnet.optim.sgd(0.1), devices="cpu",
                            metrics={"f1": classification.MulticlassF1Score(num_classes=3, average="macro")})
    seen = []

    class Record:  # the predictions the train metric saw, batch by batch
        def on_train_batch_end(self, trainer, step, metrics):
            seen.append((metrics["outputs"].detach().argmax(1), metrics["targets"]))

    history = trainer.fit(train, val, epochs=1, callbacks=[Record()], verbose=0)
    pred, true = torch.cat([p for p, _ in seen]), torch.cat([t for _, t in seen])
    assert history["f1"][0] == pytest.approx(f1_score(true.numpy(), pred.numpy(), average="macro"), rel=1e-6)
    val_pred = trainer.predict(torch.cat([b[0] for b in val])).argmax(1)
    val_true = torch.cat([b[1] for b in val])
    assert history["val_f1"][0] == pytest.approx(f1_score(val_true.numpy(), val_pred.numpy(), average="macro"), rel=1e-6)


def test_a_metric_called_like_a_factory_says_to_pass_it_as_it_is():
    # metrics={"acc": fnnet.metrics.accuracy()} gave Python's bare "'Metric' object is not callable"
    import fnnet

    with pytest.raises(TypeError, match=r"without parentheses \(metrics=\{'acc': fnnet.metrics.accuracy\}\)"):
        fnnet.metrics.accuracy()
