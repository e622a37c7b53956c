"""fnnet.recipes: what ``fnnet train digits|mnist`` runs, checked on the embedded digits.

The recipe picks its best checkpoint on a validation split held out of the training data and
evaluates the test set once, at the end. A Trainer subclass records which arrays each fit and
evaluate call gets (the training itself is the real Trainer's).
"""

from __future__ import annotations

import os
import re

import pytest
import torch

import fnnet
from fnnet import recipes
from fnnet.data import load_digits

SIZE = 14  # the smallest image the chapter's CNN takes: a quick run


def _arrays(data):
    return None if data is None else tuple(t.cpu() for t in getattr(data, "arrays", data))


@pytest.fixture
def recorded(monkeypatch):
    calls = []

    class RecordingTrainer(fnnet.Trainer):
        def fit(self, train_data, val_data=None, **kwargs):
            calls.append(("fit", _arrays(train_data), _arrays(val_data)))
            self._in_fit = True
            try:
                return super().fit(train_data, val_data, **kwargs)
            finally:
                self._in_fit = False

        def evaluate(self, data, **kwargs):
            calls.append(("evaluate in fit" if getattr(self, "_in_fit", False) else "evaluate", _arrays(data)))
            return super().evaluate(data, **kwargs)

    monkeypatch.setattr(recipes, "Trainer", RecordingTrainer)
    return calls


def _same(a, b):
    return a is not None and b is not None and all(torch.equal(x, y) for x, y in zip(a, b))


def test_digits_chooses_on_a_validation_split_of_the_training_data_and_tests_once_at_the_end(recorded, tmp_path):
    (X, y), test = load_digits(SIZE)
    trainer, result = recipes.train_digits(size=SIZE, epochs=2, device="cpu", out=tmp_path, verbose=0)
    fits = [c for c in recorded if c[0] == "fit"]
    assert len(fits) == 1
    _, train_part, val_part = fits[0]
    # the validation data is the last tenth of the training data (Keras' validation_split), and fit trains on the rest
    cut = len(y) - round(0.1 * len(y))
    assert _same(train_part, (X[:cut], y[:cut])) and _same(val_part, (X[cut:], y[cut:]))
    # every evaluation during fit is on that split; the test set is evaluated once, after fit
    assert [c[0] for c in recorded] == ["fit", "evaluate in fit", "evaluate in fit", "evaluate"]
    assert all(_same(c[1], val_part) for c in recorded if c[0] == "evaluate in fit")
    assert _same(recorded[-1][1], test)
    assert set(result["final"]) == {"test_loss", "test_accuracy"}
    # the state the trainer ends with is the best checkpoint by val_loss, on the validation split
    history = result["history"]
    best = min(range(2), key=lambda i: history["val_loss"][i])
    assert int(re.match(r"epoch=(\d+)-", os.path.basename(result["best_model_path"])).group(1)) == best + 1
    again = trainer.evaluate(val_part)
    assert again["loss"] == pytest.approx(history["val_loss"][best], rel=1e-5)
    assert trainer.evaluate(test, prefix="test_") == pytest.approx(result["final"], rel=1e-6)


def test_validation_split_must_leave_data_to_train_and_to_validate():
    train, test = load_digits(SIZE)
    with pytest.raises(ValueError, match=r"validation_split must be a fraction in \(0, 1\)"):
        recipes.train_classifier(train, test, epochs=1, device="cpu", verbose=0, validation_split=0)
    with pytest.raises(ValueError, match="leaves no samples to train or to validate on"):
        recipes.train_classifier((train[0][:3], train[1][:3]), test, epochs=1, device="cpu", verbose=0,
                                 validation_split=0.1)


def test_train_digits_accumulate_updates_once_per_k_batches(capsys):
    from fnnet import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "digits", "--accumulate", "0"])
    assert "--accumulate" in capsys.readouterr().err
    trainer, _ = recipes.train_digits(size=SIZE, epochs=1, batch_size=128, accumulate=3, device="cpu", verbose=0)
    batches = -(-int(1500 * 0.9) // 128)  # 1,350 training images in batches of 128: 11 batches
    assert trainer.accumulate == 3 and trainer.state.step == -(-batches // 3) and trainer.state.accum is None
