"""fnnet.summary: parameter totals equal sum(numel) over unique parameters; shapes and sizes as torchkeras'."""

import pytest
import torch
from torch import nn

import fnnet
from fnnet import SummaryRow, SummaryTable, summary


class CnnModel(nn.Module):
    """The chapter's CNN."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([
            nn.Conv2d(1, 32, 3), nn.MaxPool2d(2, 2), nn.Conv2d(32, 64, 5), nn.MaxPool2d(2, 2),
            nn.Dropout2d(0.1), nn.AdaptiveMaxPool2d((1, 1)), nn.Flatten(),
            nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10),
        ])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def unique_numel(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def check_totals(table, module):
    assert table.total_params == unique_numel(module)
    assert table.trainable_params == unique_numel(module, trainable_only=True)
    assert table.non_trainable_params == table.total_params - table.trainable_params
    assert sum(r.params for r in table.rows) == table.total_params


def test_chapter_cnn_matches_the_chapters_torchkeras_table():
    model = CnnModel()
    table = summary(model, input_shape=(1, 32, 32), print_fn=None)
    check_totals(table, model)
    assert table.total_params == 53_994
    assert [r.params for r in table.rows] == [320, 0, 51_264, 0, 0, 0, 0, 2_080, 0, 330]
    # the chapter's printout (torchkeras, batch dimension -1 for 1)
    assert round(table.input_size_mb, 6) == 0.003906
    assert round(table.forward_backward_size_mb, 6) == 0.359695
    assert round(table.params_size_mb, 6) == 0.205971
    assert round(table.total_size_mb, 6) == 0.569572


def test_chapter_cnn_output_shapes_on_mnist_input():
    table = summary(CnnModel(), input_shape=(1, 28, 28), batch_size=2, print_fn=None)
    assert [(r.name, r.type) for r in table.rows] == [
        ("layers.0", "Conv2d"), ("layers.1", "MaxPool2d"), ("layers.2", "Conv2d"), ("layers.3", "MaxPool2d"),
        ("layers.4", "Dropout2d"), ("layers.5", "AdaptiveMaxPool2d"), ("layers.6", "Flatten"),
        ("layers.7", "Linear"), ("layers.8", "ReLU"), ("layers.9", "Linear"),
    ]
    assert [r.output_shape for r in table.rows] == [
        (2, 32, 26, 26), (2, 32, 13, 13), (2, 64, 9, 9), (2, 64, 4, 4), (2, 64, 4, 4),
        (2, 64, 1, 1), (2, 64), (2, 32), (2, 32), (2, 10),
    ]
    assert table.input_shape == (1, 28, 28)
    assert table.input_size_mb == 2 * 28 * 28 * 4 / 2**20


def test_table_text_and_print_fn():
    printed = []
    table = summary(CnnModel(), (1, 28, 28), print_fn=printed.append)
    assert printed == [str(table)]
    text = str(table)
    assert "Layer (type)" in text and "Output Shape" in text and "Param #" in text
    assert "layers.2 (Conv2d)" in text and "[1, 64, 9, 9]" in text and "51,264" in text
    assert "Total params: 53,994" in text and "Non-trainable params: 0" in text
    assert "Estimated Total Size (MB): " in text
    assert isinstance(table, SummaryTable) and all(isinstance(r, SummaryRow) for r in table.rows)
    lines = text.splitlines()
    assert len({len(line) for line in lines[:14]}) == 1  # rules, header and rows share one width


def test_mlp():
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))
    table = summary(model, (28, 28), print_fn=None)
    check_totals(table, model)
    assert table.total_params == 784 * 128 + 128 + 128 * 10 + 10
    assert table.rows[-1].output_shape == (1, 10)


def test_batchnorm_buffers_are_not_params_and_state_is_restored():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    table = summary(model, (3, 8, 8), batch_size=4, print_fn=None)
    check_totals(table, model)
    assert table.rows[1].params == 16  # weight and bias; running_mean/var/num_batches_tracked are buffers
    assert table.total_params == 3 * 8 * 9 + 8 + 16 + 8 * 36 * 2 + 2
    assert all(m.training for m in model.modules())  # train mode is back
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # running stats untouched
    assert not any(m._forward_hooks for m in model.modules())


def test_frozen_params_are_non_trainable():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 3))
    for p in model[0].parameters():
        p.requires_grad_(False)
    table = summary(model, (10,), print_fn=None)
    check_totals(table, model)
    assert table.trainable_params == 20 * 3 + 3 < table.total_params == 10 * 20 + 20 + 63
    assert "Non-trainable params: 220" in str(table)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.block = nn.Linear(4, 4)
        self.decode = nn.Linear(4, 10)
        self.decode.weight = self.embed.weight  # tied: (10, 4) both
        self.scale = nn.Parameter(torch.ones(()))  # a container's own parameter
        self.unused = nn.Linear(2, 2)  # never called in forward

    def forward(self, tokens):
        return self.decode(self.block(self.block(self.embed(tokens)))) * self.scale


def test_tied_weights_and_reused_modules_are_counted_once():
    model = Tied()
    table = summary(model, (5,), dtype=torch.long, print_fn=None)
    check_totals(table, model)
    assert table.total_params == 40 + 20 + 10 + 1 + 6 == unique_numel(model)
    calls = [(r.name, r.params, r.shared) for r in table.rows if r.output_shape is not None]
    assert calls == [("embed", 40, False), ("block", 20, False), ("block", 0, True), ("decode", 10, True)]
    leftovers = {(r.name, r.type, r.params) for r in table.rows if r.output_shape is None}
    assert leftovers == {("", "Tied", 1), ("unused", "Linear", 6)}
    # torchsummary-style counting (own params per call) would give 40 + 20 + 20 + 50 = 130 for the calls
    assert "* shares parameters" in str(table)


def test_fnnet_model_input():
    module = CnnModel()
    model = fnnet.functional(module)
    table = summary(model, (1, 28, 28), print_fn=None)
    check_totals(table, module)
    assert table.rows[-1].output_shape == (1, 10)
    assert str(table) == str(summary(module, (1, 28, 28), print_fn=None))


def test_several_inputs():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(5, 2)

        def forward(self, x, y):
            return self.a(x) + self.b(y)

    table = summary(Two(), [(3,), (5,)], batch_size=2, print_fn=None)
    assert [r.output_shape for r in table.rows] == [(2, 2), (2, 2)]
    assert table.input_size_mb == 2 * (3 + 5) * 4 / 2**20


def test_bad_input_shape_gives_the_shape_and_the_gist():
    with pytest.raises(ValueError, match=r"\(1, 3, 28, 28\).*expected input.*to have 1 channels") as info:
        summary(CnnModel(), (3, 28, 28), print_fn=None)
    assert isinstance(info.value.__cause__, RuntimeError)
    for bad in ("abc", (1, -2, 3), (1.5, 2), None):
        with pytest.raises(ValueError, match="input_shape"):
            summary(CnnModel(), bad, print_fn=None)
    with pytest.raises(TypeError, match="nn.Module or an fnnet.Model"):
        summary(lambda x: x, (3,), print_fn=None)
    with pytest.raises(ValueError, match="parameters are on cpu but device='meta'"):
        summary(CnnModel(), (1, 28, 28), device="meta", print_fn=None)
