"""fnnet.plot: figures hold the history's data and the samples' images and labels."""

import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from fnnet.plot import plot_history, plot_samples  # noqa: E402

HISTORY = {
    "epoch": [1, 2, 3],
    "loss": [0.9, 0.5, 0.3],
    "val_loss": [1.0, 0.6, 0.45],
    "accuracy": [0.7, 0.85, 0.9],
    "val_accuracy": [0.65, 0.8, 0.88],
    "lr": [0.01, 0.01, 0.005],
}


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def lines_of(fig):
    (ax,) = fig.axes
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}


def test_plot_history_draws_train_and_val_curves():
    fig = plot_history(HISTORY, "accuracy")
    assert isinstance(fig, matplotlib.figure.Figure)
    assert lines_of(fig) == {
        "train_accuracy": ([1, 2, 3], [0.7, 0.85, 0.9]),
        "val_accuracy": ([1, 2, 3], [0.65, 0.8, 0.88]),
    }
    ax = fig.axes[0]
    assert ax.get_ylabel() == "accuracy" and ax.get_xlabel() == "Epochs"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["train_accuracy", "val_accuracy"]
    assert lines_of(plot_history(HISTORY)) == {  # "loss" by default
        "train_loss": ([1, 2, 3], HISTORY["loss"]), "val_loss": ([1, 2, 3], HISTORY["val_loss"])}
    assert all(float(t).is_integer() for t in ax.get_xticks())  # whole epochs on the x axis
    assert lines_of(plot_history(HISTORY, "val_loss")) == lines_of(plot_history(HISTORY, "loss"))


def test_plot_history_without_epoch_or_val_and_with_tensors():
    fig = plot_history({"loss": [torch.tensor(2.0), torch.tensor(1.0)], "lr": [0.1, 0.1]}, "loss")
    assert lines_of(fig) == {"train_loss": ([1, 2], [2.0, 1.0])}


def test_plot_history_takes_a_dataframe_and_an_axes():
    pd = pytest.importorskip("pandas")
    fig, (left, right) = plt.subplots(1, 2)
    out = plot_history(pd.DataFrame(HISTORY), "loss", ax=right)
    assert out is fig and not left.lines
    assert [list(line.get_ydata()) for line in right.lines] == [HISTORY["loss"], HISTORY["val_loss"]]


def test_plot_history_missing_metric_lists_what_is_there():
    with pytest.raises(KeyError, match=r"'acc'.*metrics available: \['accuracy', 'loss', 'lr'\]"):
        plot_history(HISTORY, "acc")
    with pytest.raises(TypeError, match="mapping of per-epoch lists"):
        plot_history([0.1, 0.2], "loss")


def test_plot_samples_grid_with_labels():
    X = torch.rand(12, 1, 28, 28)
    y = torch.arange(12) % 10
    fig = plot_samples(X, y)
    assert len(fig.axes) == 9
    assert [ax.get_title() for ax in fig.axes] == [f"label = {i}" for i in range(9)]
    for i, ax in enumerate(fig.axes):
        (image,) = ax.get_images()
        np.testing.assert_array_equal(image.get_array(), X[i, 0].numpy())
        assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []


def test_plot_samples_shapes_ndarray_and_predictions():
    X = np.random.rand(5, 8, 8)  # N x H x W
    y = np.array([3, 1, 4, 1, 5])
    logits = np.eye(10)[[3, 2, 4, 1, 0]]  # class scores: predictions 3, 2, 4, 1, 0
    fig = plot_samples(X, y, n=5, predictions=logits)
    assert len(fig.axes) == 6  # 3 x 2 grid, the last cell turned off
    titles = [ax.get_title() for ax in fig.axes[:5]]
    assert titles == ["label = 3, pred = 3", "label = 1, pred = 2", "label = 4, pred = 4",
                      "label = 1, pred = 1", "label = 5, pred = 0"]
    assert fig.axes[1].title.get_color() == "red" and fig.axes[0].title.get_color() != "red"
    assert not fig.axes[5].axison
    rgb = plot_samples(torch.rand(4, 3, 6, 6), [0, 1, 2, 3], n=4)
    assert rgb.axes[0].get_images()[0].get_array().shape == (6, 6, 3)


def test_plot_samples_errors():
    with pytest.raises(ValueError, match=r"got shape \(4, 5, 6, 7\)"):
        plot_samples(torch.rand(4, 5, 6, 7), torch.zeros(4))
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        plot_samples(torch.rand(4, 6, 6), torch.zeros(3))


def test_missing_matplotlib_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # import now raises ImportError
    with pytest.raises(ImportError, match=r"pip install fnnet\[plot\]"):
        plot_history(HISTORY, "loss")
