"""Jobs that die and come back: mid-epoch resume in one process (the multi-process cases are in
``test_distributed.py``)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

import fnnet
from fnnet import optim
from _dist_worker import StopAt  # noqa: E402  (tests/ is on the path, as for conftest)

N, BATCH, EPOCHS = 45, 8, 3  # 6 batches per epoch, the last one short (5 samples)

# these tests reuse a folder on purpose: ModelCheckpoint's "already holds ... checkpoint(s) this callback did not
# write" warning is expected here (its own test: test_callbacks.py)
pytestmark = pytest.mark.filterwarnings("ignore:ModelCheckpoint. the folder .* already holds:UserWarning")


def data():
    g = torch.Generator().manual_seed(3)
    return torch.randn(N, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (N,), generator=g)


def trainer(**kwargs):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Dropout(0.2), torch.nn.Linear(16, 2))
    return fnnet.Trainer(net.double(), F.cross_entropy, optim.adam(0.05), devices="cpu", key=7, **kwargs)


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


# -- issue 34 item 1: a checkpoint callback deletes only its own files ------------------------------------------


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_run_resumed_into_another_folder_deletes_nothing_of_the_first_run(tmp_path):
    run_a, run_b = tmp_path / "runA", tmp_path / "runB"
    trainer().fit(loader(), epochs=1, verbose=0,  # epoch 2 then improves on epoch 1's loss
                  callbacks=[fnnet.callbacks.ModelCheckpoint(run_a, monitor="loss", save_last=True)])
    before = _files(run_a)
    ckpt = fnnet.callbacks.ModelCheckpoint(run_b, monitor="loss")
    with pytest.warns(UserWarning, match="dirpath"):  # another folder: another book
        trainer().fit(loader(), epochs=EPOCHS, verbose=0, resume=run_a / "last.safetensors", callbacks=[ckpt])
    assert _files(run_a) == before
    assert ckpt.best_model_path is not None and ckpt.best_model_path.startswith(str(run_b))


def test_a_copied_run_folder_resumed_deletes_nothing_of_the_original(tmp_path):
    import shutil

    original, copy = tmp_path / "original", tmp_path / "copy"
    trainer().fit(loader(), epochs=1, verbose=0,
                  callbacks=[fnnet.callbacks.ModelCheckpoint(original, monitor="loss", save_last=True)])
    before = _files(original)
    shutil.copytree(original, copy)
    with pytest.warns(UserWarning, match="not restored"):
        trainer().fit(loader(), epochs=EPOCHS, verbose=0, resume=copy / "last.safetensors",
                      callbacks=[fnnet.callbacks.ModelCheckpoint(copy, monitor="loss")])
    assert _files(original) == before


def test_a_crafted_book_never_names_a_file_to_delete(tmp_path):
    import json

    folder = tmp_path / "run"
    ckpt = fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", save_last=True)
    t = trainer()
    t.fit(loader(), epochs=1, verbose=0, callbacks=[ckpt])
    victims = [tmp_path / "victim.safetensors", folder / "notes.safetensors", tmp_path / "epoch=009-loss=9.0000.safetensors"]
    for v in victims:
        v.write_text("precious")
    saved = fnnet.load(folder / "last.safetensors")
    books = json.loads(saved["position"]["callbacks"])
    (name, book), = books.items()
    book["best_k"] = [[9e9, str(victims[0])], [9e9, "notes.safetensors"], [9e9, "../epoch=009-loss=9.0000.safetensors"]]
    saved["position"]["callbacks"] = json.dumps({name: book})
    fnnet.save(folder / "crafted.safetensors", saved)
    fresh = fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", save_top_k=1, save_last=True)
    with pytest.warns(UserWarning, match="never deleted"):
        trainer().fit(loader(), epochs=3, verbose=0, resume=folder / "crafted.safetensors", callbacks=[fresh])
    assert all(v.read_text() == "precious" for v in victims)
    assert fresh.best_model_path.startswith(str(folder)) and len(fresh.best_k) == 1


def test_crafted_books_that_are_not_json_name_the_file(tmp_path):
    t = trainer()
    t.fit(loader(), epochs=1, verbose=0)
    saved = t.checkpoint()
    saved["position"]["callbacks"] = "{not json"
    fnnet.save(tmp_path / "bad.safetensors", saved)
    with pytest.raises(ValueError, match=r"bad\.safetensors.*not valid JSON"):
        trainer().fit(loader(), epochs=2, verbose=0, resume=tmp_path / "bad.safetensors")


# -- issue 34 item 2: a book is restored only under the settings it was kept with ----------------------------


def test_books_kept_under_other_settings_start_fresh_with_a_warning(tmp_path):
    zero = {"zero": lambda outputs, targets: outputs.sum() * 0}  # a score below every loss
    t = trainer(metrics=zero)
    t.fit(loader(), epochs=2, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", mode="min"),
        fnnet.callbacks.EarlyStopping(monitor="loss", mode="min", patience=5),
        fnnet.callbacks.ReduceLROnPlateau(monitor="loss", mode="min", patience=0)])
    t.save(tmp_path / "here.safetensors")
    # another monitor, maximised: the old book's best (a loss) would block every save and count every epoch bad
    ckpt = fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="zero", mode="max")
    stopper = fnnet.callbacks.EarlyStopping(monitor="zero", mode="max", patience=5)
    plateau = fnnet.callbacks.ReduceLROnPlateau(monitor="zero", mode="max", patience=0)
    again = trainer(metrics=zero)
    with pytest.warns(UserWarning, match="monitor='loss', mode='min'.*this callback has monitor='zero', mode='max'.*"
                      "starts fresh") as seen:
        again.fit(loader(), epochs=3, verbose=0, resume=tmp_path / "here.safetensors", callbacks=[ckpt, stopper, plateau])
    assert {str(w.message).split(":")[0] for w in seen if "starts fresh" in str(w.message)} == {
        "ModelCheckpoint", "EarlyStopping", "ReduceLROnPlateau"}
    assert [s for s, _ in ckpt.best_k] == [0.0] and os.path.exists(ckpt.best_model_path)
    assert (stopper.best, stopper.wait) == (0.0, 0)
    assert (plateau.best, plateau.num_bad_epochs) == (0.0, 0)


# -- issue 34 item 6: a global batch resumed on a world where an epoch has other batches is refused ----------------


def test_a_global_batch_resume_onto_a_world_that_changes_the_epoch_is_refused(tmp_path):
    # 50 samples in global batches of 12: 5 batches on 2 ranks (the last, of 2 samples, split 1 + 1), 4 on 3
    # ranks (2 samples cannot give 3 ranks one each: the last joins the one before), so a resume would run 8
    # steps in 2 epochs where the 2-rank run ran 10. The position is the one a 2-rank run writes (world_size 2).
    g = torch.Generator().manual_seed(5)
    arrays = torch.randn(50, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (50,), generator=g)

    def part(rank, world):
        return fnnet.ArrayLoader(arrays, 12, shuffle=True, key=fnnet.random.key(1), global_batch=True,
                                 shard=(rank, world))

    t = trainer()
    t.fit(part(0, 2), epochs=1, verbose=0, callbacks=[StopAt(2)])
    saved = t.checkpoint()
    saved["position"]["world_size"] = 2
    fnnet.save(tmp_path / "two.safetensors", saved)
    with pytest.raises(ValueError, match=r"two\.safetensors' was written by 2 rank\(s\), where an epoch of this loader "
                                         r"has 5 batches; on 3 ranks it has 4.*Resume on 2 ranks"):
        trainer().fit(part(0, 3), epochs=2, verbose=0, resume=tmp_path / "two.safetensors")
    for world in (1, 2):  # where an epoch has the same 5 batches, the resume goes on
        again = trainer()
        again.fit(part(0, world), epochs=2, verbose=0, resume=tmp_path / "two.safetensors")
        assert again.state.step == 10  # 5 batches in each of the 2 epochs


# -- issue 34, weak messages: resume says what it does, picks only its own files, refuses what would not continue --


def test_resume_auto_takes_only_the_callbacks_files_and_says_where_it_continues(tmp_path, capsys):
    folder = tmp_path / "run"
    trainer().fit(loader(), epochs=1, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1), StopAt(4)])
    fnnet.save(folder / "pretrained.safetensors", trainer().state.params)  # newer, and no checkpoint of this run
    os.symlink(folder / "gone.safetensors", folder / "epoch=009-loss=0.1000.safetensors")  # a broken link
    again = trainer()
    again.fit(loader(), epochs=2, verbose=1, resume="auto",
              callbacks=[fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1)])
    out = capsys.readouterr().out
    assert f"resuming from '{folder / 'step.safetensors'}' (step 4): continuing at epoch 1 after batch 4 of 6" in out
    assert again.state.step == 12
    done = trainer()
    done.fit(loader(), epochs=2, verbose=1, resume=folder / "step.safetensors")
    assert "2 of 2 epochs done, nothing to do" in capsys.readouterr().out and done.state.step == 12


def test_resume_refuses_what_would_not_continue_the_saved_run(tmp_path):
    t = trainer()
    t.fit(loader(), epochs=2, verbose=0, callbacks=[StopAt(9)])  # epoch 2, after batch 3
    t.save(tmp_path / "mid.safetensors")
    with pytest.raises(TypeError, match="pass resume='auto'"):
        trainer().fit(loader(), epochs=3, verbose=0, resume=True)
    with pytest.raises(ValueError, match=r"has already completed 1 epochs; with resume=, epochs is the total"):
        trainer().fit(loader(), epochs=0, verbose=0, resume=tmp_path / "mid.safetensors")
    g = torch.Generator().manual_seed(3)
    longer = fnnet.ArrayLoader((torch.randn(53, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (53,))),
                               BATCH, shuffle=True, key=fnnet.random.key(1))
    with pytest.raises(ValueError, match=r"mid\.safetensors' stopped after batch 3 of epoch 2 of a dataset of 45 "
                                         r"samples; train_data has 53"):
        trainer().fit(longer, epochs=3, verbose=0, resume=tmp_path / "mid.safetensors")
    with pytest.raises(ValueError, match="accumulate_grad_batches must be an int >= 1"):
        trainer(accumulate_grad_batches=0)


def test_a_file_saved_inside_an_accumulation_window_says_why_it_does_not_resume(tmp_path):
    class StopInsideAWindow(fnnet.callbacks.Callback):
        def on_train_batch_end(self, trainer, step, metrics):
            if trainer.state.accum is not None:
                raise KeyboardInterrupt

    t = trainer(accumulate_grad_batches=2)
    t.fit(loader(), epochs=1, verbose=0, callbacks=[StopInsideAWindow()])
    t.save(tmp_path / "window.safetensors")
    with pytest.raises(ValueError, match=r"window\.safetensors' was saved inside a gradient-accumulation window"):
        trainer(accumulate_grad_batches=2).fit(loader(), epochs=1, verbose=0, resume=tmp_path / "window.safetensors")
    with pytest.raises(ValueError, match="inside a gradient-accumulation window"):
        trainer(accumulate_grad_batches=2).load(tmp_path / "window.safetensors")


def test_the_cli_says_in_one_line_that_a_resume_file_is_missing(tmp_path, capsys):
    from fnnet import cli

    assert cli.main(["train", "digits", "--out", str(tmp_path), "--resume", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--resume" in err and "missing.safetensors': no such file" in err


# -- issue 34, tests that could not fail ---------------------------------------------------------------------------


def test_a_run_resumed_twice_inside_one_epoch_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    # the second stop is a checkpoint written by the resumed run itself: its position counts the batches before
    # the first resume too (a mutant that restarts the count at the resume, seen here, passes the one-resume test)
    callbacks = lambda *extra: [fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", every_n_steps=1), *extra]  # noqa: E731
    trainer().fit(loader(), epochs=EPOCHS, verbose=0, callbacks=callbacks(StopAt(8)))   # epoch 2, batch 2
    second = trainer()
    second.fit(loader(), epochs=EPOCHS, verbose=0, resume="auto", callbacks=callbacks(StopAt(10)))  # batch 4
    assert fnnet.load(tmp_path / "step.safetensors")["position"]["batch"] == 4
    last = trainer()
    last.fit(loader(), epochs=EPOCHS, verbose=0, resume="auto", callbacks=callbacks())
    expected, _ = uninterrupted
    assert last.state.step == expected.step and last.epoch == EPOCHS
    assert fnnet.tree.all_equal(last.state.params, expected.params)
    assert fnnet.tree.all_equal(last.state.opt_state, expected.opt_state)


def test_every_n_steps_keeps_the_last_multiple_of_n(tmp_path):
    t = trainer()
    t.fit(loader(), epochs=1, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", every_n_steps=3), StopAt(5)])
    at3 = trainer()
    at3.fit(loader(), epochs=1, verbose=0, callbacks=[StopAt(3)])
    saved = fnnet.load(tmp_path / "step.safetensors")
    assert saved["state"].step == 3 and saved["position"]["batch"] == 3 and t.state.step == 5
    assert fnnet.tree.all_equal(saved["state"].params, at3.state.params)


def test_an_epochs_file_records_that_epochs_books(tmp_path):
    import json

    # ModelCheckpoint first in the list: the callback list still runs it last at an epoch's end, so its file holds
    # EarlyStopping's and ReduceLROnPlateau's books after this epoch (a mutant that keeps the list's order fails)
    ckpt = fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", save_top_k=-1)
    stopper = fnnet.callbacks.EarlyStopping(monitor="loss", patience=50)
    plateau = fnnet.callbacks.ReduceLROnPlateau(monitor="loss", patience=5)
    history = trainer().fit(loader(), epochs=3, verbose=0, callbacks=[ckpt, stopper, plateau])
    losses = history["loss"]
    for epoch in (1, 2, 3):
        (path,) = [p for p in tmp_path.iterdir() if p.name.startswith(f"epoch={epoch:03d}-")]
        books = json.loads(fnnet.load(path)["position"]["callbacks"])
        seen = losses[:epoch]
        best = min(seen)
        assert books["1:EarlyStopping"]["best"] == best
        assert books["1:EarlyStopping"]["wait"] == epoch - 1 - seen.index(best)
        assert books["2:ReduceLROnPlateau"]["best"] == best
        assert sorted(s for s, _ in books["0:ModelCheckpoint"]["best_k"]) == sorted(seen)
        assert books["0:ModelCheckpoint"]["best_k"][0][1] == os.path.basename(ckpt.best_k[[s for s, _ in ckpt.best_k].index(best)][1])


def test_a_position_without_samples_still_resumes_inside_its_epoch(tmp_path, uninterrupted):
    import warnings

    t = trainer()
    t.fit(loader(), epochs=EPOCHS, verbose=0, callbacks=[StopAt(8)])
    saved = t.checkpoint()
    del saved["position"]["samples"]  # what fnnet 0.3 wrote
    fnnet.save(tmp_path / "v03.safetensors", saved)
    again = trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "older fnnet" fallback to the next epoch
        again.fit(loader(), epochs=EPOCHS, verbose=0, resume=tmp_path / "v03.safetensors")
    assert fnnet.tree.all_equal(again.state.params, uninterrupted[0].params)


def test_a_file_after_an_epochs_last_step_resumes_at_the_next_epoch_and_records_its_start(tmp_path, uninterrupted):
    # found by the soak (benches/soak_restarts.py): the skipped epoch end kept its batch count, so the next file
    # claimed 6 batches of the following epoch done
    trainer().fit(loader(), epochs=EPOCHS, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(tmp_path, monitor="loss", every_n_steps=1), StopAt(12)])  # epoch 2's last step
    assert fnnet.load(tmp_path / "step.safetensors")["position"]["batch"] == 6
    again = trainer()
    again.fit(loader(), epochs=2, verbose=0, resume=tmp_path / "step.safetensors")
    assert again.epoch == 2 and again.checkpoint()["position"]["batch"] == 0
    again.fit(loader(), epochs=1, verbose=0)
    assert fnnet.tree.all_equal(again.state.params, uninterrupted[0].params)
