"""Step-based training in the Trainer: fit(max_steps=), val_check_interval, throughput, mid-epoch continuation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fnnet
from fnnet import optim
from fnnet.callbacks import ModelCheckpoint
from fnnet.data import WindowLoader
from fnnet.models import GPT


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run on one thread


def data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x.sum(1) > 0).long()


def linear():
    torch.manual_seed(0)
    return nn.Linear(4, 2)


def test_max_steps_and_val_check_interval_rows():
    (x, y), (xv, yv) = data(), data(50, 1)
    trainer = fnnet.Trainer(linear(), F.cross_entropy, optim.adam(0.01))
    history = trainer.fit((x, y), (xv, yv), batch_size=32, max_steps=17, val_check_interval=5, verbose=0)
    assert history["step"] == [5, 10, 15, 17] and history.stop_reason == "max_steps"
    assert trainer.state.step == 17 and history["epoch"] == [1, 2, 3, 3]  # 7 batches an epoch
    # each row's loss is the mean over the samples of the updates since the previous row; val_loss an evaluation
    assert len(history["val_loss"]) == 4 and history["val_loss"][-1] == pytest.approx(
        trainer.evaluate((xv, yv))["loss"])
    assert all(v > 0 for v in history["samples_per_sec"]) and "tokens_per_sec" not in history


def test_max_steps_takes_an_endless_stream_of_batches():
    (x, y) = data()

    def stream():  # nanoGPT's loop: a batch drawn at every step, no epochs
        g = torch.Generator().manual_seed(0)
        while True:
            i = torch.randint(0, len(x), (16,), generator=g)
            yield x[i], y[i]

    trainer = fnnet.Trainer(linear(), F.cross_entropy, optim.adam(0.01))
    history = trainer.fit(stream(), max_steps=12, val_check_interval=4, verbose=0)
    assert trainer.state.step == 12 and history["step"] == [4, 8, 12]
    with pytest.raises(TypeError, match="one-shot iterator"):
        trainer.fit(stream(), epochs=2, verbose=0)


def test_stopping_inside_an_epoch_continues_with_its_next_batch():
    (x, y) = data()

    def run(*limits):
        trainer = fnnet.Trainer(linear(), F.cross_entropy, optim.adam(0.01), key=3)
        loader = fnnet.ArrayLoader((x, y), 32, shuffle=True, key=fnnet.random.key(1))
        for limit in limits:
            trainer.fit(loader, max_steps=limit, verbose=0)
        return trainer

    straight, split = run(30), run(10, 30)
    assert straight.state.step == split.state.step == 30
    assert all(torch.equal(straight.state.params[k], split.state.params[k]) for k in straight.state.params)
    assert split.history["step"] == [7, 10, 14, 21, 28, 30]  # epoch ends, and the two max_steps stops
    assert run(10).fit(fnnet.ArrayLoader((x, y), 32), max_steps=10, verbose=0).stop_reason == "max_steps"


def test_gpt_resumes_mid_epoch_from_a_step_checkpoint(tmp_path):
    tokens = torch.randint(0, 13, (2000,), generator=torch.Generator().manual_seed(0))
    net_params = fnnet.functional(GPT(13, block_size=8, n_layer=1, n_head=2, n_embd=16)).init(fnnet.random.key(0))

    def trainer():
        net = GPT(13, block_size=8, n_layer=1, n_head=2, n_embd=16)
        return fnnet.Trainer(net, fnnet.loss.cross_entropy, optim.adamw(1e-2), params=net_params, key=1)

    def loader():
        return WindowLoader(tokens, 8, 6, key=fnnet.random.key(2), global_batch=True, windows_per_epoch=60)

    straight = trainer()
    history = straight.fit(loader(), max_steps=14, verbose=0)
    assert "tokens_per_sec" in history and history["tokens_per_sec"][0] > history["samples_per_sec"][0]
    first = trainer()
    first.fit(loader(), max_steps=8, verbose=0, callbacks=[ModelCheckpoint(tmp_path, monitor="loss", every_n_steps=4)])
    again = trainer()  # a new process would do this: the newest checkpoint, step 8, inside epoch 1 (10 batches)
    again.fit(loader(), max_steps=14, verbose=0, resume=tmp_path / "step.safetensors")
    assert again.state.step == 14
    for k, v in straight.state.params.items():
        assert torch.equal(v, again.state.params[k]), k


def test_bad_step_options():
    trainer = fnnet.Trainer(linear(), F.cross_entropy, optim.adam(0.01))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_steps must be a positive int"):
            trainer.fit(data(), max_steps=bad, verbose=0)
    with pytest.raises(ValueError, match="val_check_interval must be a positive int"):
        trainer.fit(data(), val_check_interval=0, verbose=0)
