"""Jobs that die and come back: mid-epoch resume in one process (the multi-process cases are in
``test_distributed.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fnnet
from fnnet import optim
from _dist_worker import StopAt  # noqa: E402  (tests/ is on the path, as for conftest)

N, BATCH, EPOCHS = 45, 8, 3  # 6 batches per epoch, the last one short (5 samples)


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (N,), generator=g)


def trainer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    return fnnet.Trainer(net.double(), F.cross_entropy, optim.adam(0.05), devices="cpu", key=7)


def loader():
    return fnnet.ArrayLoader(data(), BATCH, shuffle=True, key=fnnet.random.key(1))



@pytest.fixture(scope="module")
def uninterrupted():
    t = trainer()
    history = t.fit(loader(), epochs=EPOCHS, verbose=0)
    return t.state, history


@settings(max_examples=6, deadline=None)
@given(epoch=st.integers(0, EPOCHS - 1), step=st.integers(1, 6))
def test_a_run_stopped_inside_an_epoch_resumes_bit_for_bit(tmp_path_factory, uninterrupted, epoch, step):
    folder = tmp_path_factory.mktemp("ckpt")
    stop = epoch * 6 + step
    first = trainer()
    first.fit(loader(), epochs=EPOCHS, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1), StopAt(stop)])
    assert first.history.stop_reason == "interrupted" and first.state.step == stop
    again = trainer()  # a new process would build the same trainer and call the same fit
    again.fit(loader(), epochs=EPOCHS, verbose=0, resume="auto",
              callbacks=[fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1)])
    expected, _ = uninterrupted
    assert again.state.step == expected.step and again.epoch == EPOCHS
    assert fnnet.tree.all_equal(again.state.params, expected.params)
    assert fnnet.tree.all_equal(again.state.opt_state, expected.opt_state)
    assert fnnet.tree.all_equal(again.state.key, expected.key)


def test_resume_auto_without_a_checkpoint_starts_afresh_and_needs_a_checkpoint_folder(tmp_path, uninterrupted):
    t = trainer()
    t.fit(loader(), epochs=EPOCHS, verbose=0, resume="auto",
          callbacks=[fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss")])
    assert fnnet.tree.all_equal(t.state.params, uninterrupted[0].params)
    with pytest.raises(ValueError, match="ModelCheckpoint"):
        trainer().fit(loader(), epochs=1, verbose=0, resume="auto")


def test_a_checkpoint_without_a_position_resumes_at_the_next_epoch_with_a_warning(tmp_path, uninterrupted):
    t = trainer()
    t.fit(loader(), epochs=1, verbose=0)
    fnnet.save(tmp_path / "old.safetensors", {"state": t.state, "epoch": 1})  # what fnnet 0.2 wrote
    again = trainer()
    with pytest.warns(UserWarning, match="older fnnet.*start of epoch 2"):
        again.fit(loader(), epochs=EPOCHS, verbose=0, resume=tmp_path / "old.safetensors")
    assert fnnet.tree.all_equal(again.state.params, uninterrupted[0].params)


def test_a_mid_epoch_checkpoint_refuses_another_global_batch(tmp_path):
    first = trainer()
    first.fit(loader(), epochs=1, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", every_n_steps=1), StopAt(3)])
    other = fnnet.ArrayLoader(data(), 4, shuffle=True, key=fnnet.random.key(1))
    with pytest.raises(ValueError, match="global batch of 8 samples; this loader's global batch is 4"):
        trainer().fit(other, epochs=1, verbose=0, resume=tmp_path / "step.safetensors")


def test_callbacks_keep_their_book_across_a_resume(tmp_path):
    stopper = fnnet.callbacks.EarlyStopping(monitor="loss", patience=50)
    plateau = fnnet.callbacks.ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5)
    ckpt = fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", save_top_k=2)
    t = trainer()
    t.fit(loader(), epochs=2, verbose=0, callbacks=[ckpt, stopper, plateau])
    t.save(tmp_path / "here.safetensors")
    fresh = [fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", save_top_k=2),
             fnnet.callbacks.EarlyStopping(monitor="loss", patience=50),
             fnnet.callbacks.ReduceLROnPlateau(monitor="loss", patience=1, factor=0.5)]
    again = trainer()
    again.fit(loader(), epochs=2, verbose=0, resume=tmp_path / "here.safetensors", callbacks=fresh)  # nothing left
    assert fresh[0].best_k == ckpt.best_k
    assert (fresh[1].best, fresh[1].wait) == (stopper.best, stopper.wait)
    assert (fresh[2].best, fresh[2].num_bad_epochs) == (plateau.best, plateau.num_bad_epochs)
