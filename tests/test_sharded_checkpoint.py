"""Sharded checkpoints (fnnet/checkpoint/sharded.py, the Trainer's sharded and async saves): the load
matrix across strategies and world sizes against the uninterrupted run, kill points, bad folders."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st

import fnnet, fnnet._saving
from fnnet.checkpoint import sharded
from _ckpt_worker import STOP, loader as rank_loader, trainer  # noqa: F401
from _dist_worker import StopAt, resume_data

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("_ckpt_worker.py")
TIMEOUT = 240

# these tests reuse a folder on purpose: ModelCheckpoint's "already holds ... checkpoint(s) this callback did not
# write" warning is expected here (its own test: test_callbacks.py)
_REUSED_FOLDER = pytest.mark.filterwarnings("ignore:ModelCheckpoint. the folder .* already holds:UserWarning")


def run_ranks(script: Path, args: list, nproc: int, *, torchrun: tuple = (), env: dict | None = None,
              check: bool = True) -> subprocess.CompletedProcess:
    """``script args`` on ``nproc`` gloo ranks (torch.distributed.run, ``torchrun`` its extra options)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(port), *torchrun, str(script), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    assert not check or proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def launch(action: str, strategy: str, out: Path, nproc: int) -> subprocess.CompletedProcess:
    return run_ranks(WORKER, [action, strategy, out], nproc)


def one_loader():
    return fnnet.ArrayLoader(resume_data(), 8, shuffle=True, key=fnnet.random.key(1), global_batch=True)


@pytest.fixture(scope="module")
def uninterrupted():
    t = trainer("single")
    t.fit(one_loader(), epochs=2, verbose=0)
    return t.state


def close(a, b, tol=1e-10):
    la, lb = fnnet.tree.leaves(a), fnnet.tree.leaves(b)
    return len(la) == len(lb) and all(
        torch.allclose(x, y, rtol=0, atol=tol) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def resume_here(folder: Path):
    """W = 1: this process resumes from the sharded folder (resume="auto") and finishes the run."""
    t = trainer("single")
    t.fit(one_loader(), epochs=2, verbose=0, resume="auto",
          callbacks=[fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1, sharded=True)])
    return t.state


def saved_by(tmp_path_factory, strategy: str, world: int) -> Path:
    out = tmp_path_factory.mktemp(f"save-{strategy}-{world}")
    launch("save", strategy, out, world)
    assert sharded.is_complete(out / "ckpt" / "step.ckpt")
    return out / "ckpt"


def resumed_by(src: Path, tmp_path: Path, strategy: str, world: int):
    shutil.copytree(src, tmp_path / "ckpt")
    launch("resume", strategy, tmp_path, world)
    return fnnet.load(tmp_path / f"final-{strategy}-{world}.safetensors")


def saved_here(folder: Path, stop: int = STOP) -> Path:
    """W = 1: this process trains with sharded checkpoints every step and stops after step ``stop``."""
    t = trainer("single")
    t.fit(one_loader(), epochs=2, verbose=0, callbacks=[
        fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", every_n_steps=1, sharded=True), StopAt(stop)])
    return folder


def test_one_process_to_zero2_on_two_ranks_and_back_equals_the_uninterrupted_run(tmp_path, uninterrupted):
    # one launch: W=1 (step 4) -> ZeRO-2 on 2 ranks (async sharded saves, stops after step 8) -> W=1 to the end
    saved_here(tmp_path / "ckpt")
    launch("resume-stop", "zero2", tmp_path, 2)
    folder = tmp_path / "ckpt" / "step.ckpt"
    assert sorted(os.listdir(folder)) == ["fnnet-checkpoint.json", "part-00000-of-00002.safetensors",
                                          "part-00001-of-00002.safetensors"]
    whole = sharded.load_sharded(folder)  # the whole tree, the optimizer state read from both ranks' ranges
    assert whole["state"].step == 2 * STOP and whole["epoch"] == 1
    final = resume_here(tmp_path / "ckpt")
    assert final.step == uninterrupted.step and close(final, uninterrupted)


@pytest.mark.extended
@pytest.mark.parametrize("save,load", [(("zero2", 2), ("ddp", 3)), (("zero2", 2), ("single", 1)), (("zero2", 2), ("zero2", 3)), (("zero2", 2), ("zero2", 4)),
                                       (("ddp", 3), ("zero2", 2)), (("zero2", 3), ("zero2", 2)),
                                       (("single", 1), ("zero2", 2)), (("zero2", 4), ("ddp", 2))])
def test_the_load_matrix_equals_the_uninterrupted_run(tmp_path_factory, tmp_path, uninterrupted, save, load):
    src = saved_here(tmp_path / "single") if save == ("single", 1) else saved_by(tmp_path_factory, *save)
    final = resume_here(src) if load == ("single", 1) else resumed_by(src, tmp_path, *load)
    assert final.step == uninterrupted.step and close(final, uninterrupted)


def test_bad_folders_are_clear_errors_naming_the_part(tmp_path):
    folder = saved_here(tmp_path / "ckpt") / "step.ckpt"
    part = "part-00000-of-00001.safetensors"
    with pytest.raises(ValueError, match=r"is a folder, not a checkpoint: no manifest .*\(it holds ckpt\)"):
        sharded.load_sharded(tmp_path)  # a folder of other things (no part): said so, not called a torn save
    torn = tmp_path / "torn"
    shutil.copytree(folder, torn)
    os.remove(torn / "fnnet-checkpoint.json")
    with pytest.raises(ValueError, match=r"manifest 'fnnet-checkpoint.json'.*missing: a save that did not finish"):
        sharded.load_sharded(torn)  # parts without their manifest: never loaded
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    os.remove(bad / part)
    with pytest.raises(ValueError, match=r"the part 'part-00000-of-00001.safetensors'.*missing \(rank 0 of 1\)"):
        sharded.load_sharded(bad)
    shutil.rmtree(bad)
    shutil.copytree(folder, bad)
    shutil.copy(folder / part, bad / "part-00001-of-00002.safetensors")  # a stray part of another save
    with pytest.raises(ValueError, match=r"mixes two saves: \['part-00001-of-00002.safetensors'\]"):
        sharded.load_sharded(bad)
    other = tmp_path / "other"
    sharded.save_sharded(other, {"w": torch.ones(3)}).wait()
    shutil.copy(other / part, bad / part)  # a part written by another run / model
    os.remove(bad / "part-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"part-00000-of-00001.safetensors' is not the part the manifest wrote"):
        sharded.load_sharded(bad)
    with pytest.raises(ValueError, match=r"does not match `like`.*\n.*w: checkpoint float32\[3\], like float32\[4\]"):
        sharded.load_sharded(other, like={"w": torch.zeros(4)})
    with pytest.raises(ValueError, match=r"missing \(in like, not in the checkpoint\): b"):
        sharded.load_sharded(other, like={"w": torch.zeros(3), "b": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"its range \[2, 3\) of a whole \[3\] does not fit"):
        sharded.save_sharded(tmp_path / "x", {"w": torch.ones(7)}, parts={"w": (2, 3, (3,))})


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 12), st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), min_size=1, max_size=4),
       st.booleans())
def test_a_part_leaf_is_accepted_exactly_when_the_ranks_ranges_tile_it(n, ranges, cut):
    # half of the examples: a true tiling (cut points, one range per rank, a replica of one of them); the
    # reference: every element lies in exactly one of the distinct non-empty ranges
    if cut:
        points = sorted({min(a, n) for a, _ in ranges} | {0, n})
        ranges = [(lo, hi) for lo, hi in zip(points, points[1:])] + [(0, points[1] if len(points) > 1 else 0)]
    ranges = [(min(a, b, n), min(max(a, b), n)) for a, b in ranges]
    distinct = {r for r in ranges if r[1] > r[0]}
    tiles = all(sum(lo <= i < hi for lo, hi in distinct) == 1 for i in range(n))
    plans = [{"p": {"shape": [n], "dtype": "float32", "range": list(r)}} for r in ranges]
    if tiles:
        pieces = sharded._assign(plans)[0]["p"]["pieces"]
        assert sorted((lo, hi) for _, lo, hi in pieces) == sorted(distinct)
    else:
        with pytest.raises(ValueError, match=r"ranges of 'p' .* do not tile"):
            sharded._assign(plans)


@pytest.mark.parametrize("async_save", [False, True])
def test_fnnet_save_refuses_a_non_finite_state_before_anything_is_written(tmp_path, async_save):
    # the guide's promise, for fnnet.save(sharded=True) as for the Trainer: no folder, no hidden .partial folder
    (tmp_path / "nan").mkdir()
    fnnet.save(tmp_path / "nan", {"w": torch.ones(3), "b": torch.zeros(2)}, sharded=True).wait()
    with pytest.raises(ValueError, match=r"non-finite values at rank 0: \['w'\]; not written to '.*nan'"):
        fnnet.save(tmp_path / "nan", {"w": torch.tensor([1.0, float("nan"), 2.0]), "b": torch.zeros(2)},
                   sharded=True, async_save=async_save).wait()  # sync: raised by save, async: by wait
    assert sorted(os.listdir(tmp_path)) == ["nan"]  # the checkpoint before is kept, nothing else is there
    assert torch.equal(fnnet.load(tmp_path / "nan")["w"], torch.ones(3))


def test_parts_are_checked_on_save_and_load_and_the_ranges_must_tile_each_leaf(tmp_path):
    tree = {"w": torch.arange(10.0).reshape(2, 5), "p": torch.arange(3.0), "n": 3}
    # a part holding [2, 5) of a whole [5] in one process: elements 0 and 1 are nowhere (was: a "complete"
    # folder that no load could read)
    with pytest.raises(ValueError, match=r"ranges of 'p' \(whole \[5\], 5 elements\) do not tile \[0, 5\): gaps "
                                         r"\[\[0, 2\]\], overlaps \[\] \(ranges per rank: \[\[2, 5\]\]\)"):
        fnnet.save(tmp_path / "gap", tree, sharded=True, parts={"p": (2, 5, (5,))})
    assert os.listdir(tmp_path) == []
    plans = [{"p": {"shape": [6], "dtype": "float32", "range": r}} for r in ([0, 4], [2, 6], [0, 4])]
    with pytest.raises(ValueError, match=r"'p' .* gaps \[\], overlaps \[\[2, 4\]\]"):
        sharded._assign(plans)  # three ranks' plans: rank 1 overlaps rank 0 (rank 2 is rank 0's replica)
    plans[1]["p"]["range"] = [4, 6]
    assert sharded._assign(plans)[0]["p"]["pieces"] == [[0, 0, 4], [1, 4, 6]]  # a replica is written once
    ok = {**tree, "p": torch.arange(5.0)}
    fnnet.save(tmp_path / "ok", ok, sharded=True, parts={"p": (0, 5, [5])}).wait()
    bad_values = {"p": 3, "q": "x", "r": (0, 2), "s": (0.0, 2, (5,)), "t": (0, 2, 5), "u": (True, 2, (5,))}
    for key, value in bad_values.items():
        for call in (lambda: fnnet.save(tmp_path / "v", tree, sharded=True, parts={key: value}),
                     lambda: fnnet.load(tmp_path / "ok", like=ok, parts={key: value})):
            with pytest.raises(TypeError, match=rf"parts\['{key}'\] must be \(lo, hi, whole shape\): two ints"):
                call()
    for value in [(3, 2, (5,)), (-1, 2, (5,)), (0, 6, (5,))]:
        with pytest.raises(ValueError, match=r"parts\['p'\] must be .* 0 <= lo <= hi <= its numel; got .*\(numel 5\)"):
            fnnet.save(tmp_path / "v", tree, sharded=True, parts={"p": value})
        with pytest.raises(ValueError, match=r"parts\['p'\] must be .*\(numel 5\)"):
            fnnet.load(tmp_path / "ok", like=ok, parts={"p": value})
    assert os.listdir(tmp_path) == ["ok"]
    with pytest.raises(ValueError, match=r"does not match `like`.*\n  p: like holds 2 elements, its range \[0, 3\) in "
                                         r"parts 3"):
        fnnet.load(tmp_path / "ok", like={**tree, "p": torch.zeros(2)}, parts={"p": (0, 3, (5,))})
    back = fnnet.load(tmp_path / "ok", like={**tree, "p": torch.zeros(2)}, parts={"p": (1, 3, (5,))})
    assert back["p"].tolist() == [1.0, 2.0] and torch.equal(back["w"], tree["w"])


def test_load_sharded_is_pure_and_reads_a_range_and_consolidates(tmp_path):
    state = fnnet.TrainState.create({"w": torch.randn(4, 5, dtype=torch.float64)}, fnnet.optim.adam(0.1))
    tree = {"state": state, "epoch": 2}
    copy = lambda t: fnnet.tree.map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, t)  # noqa: E731
    before = copy(tree)
    sharded.save_sharded(tmp_path / "c", tree).wait()
    assert fnnet.tree.all_equal(tree, before)  # the saved tree is untouched
    like = {"state": state.replace(opt_state=copy(state.opt_state)), "epoch": 0}
    back = sharded.load_sharded(tmp_path / "c", like=like)
    assert fnnet.tree.all_equal(back, tree) and fnnet.tree.all_equal(like["state"], state)
    part_like = {**like, "state": state.replace(params={"w": torch.zeros(6, dtype=torch.float64)})}
    got = sharded.load_sharded(tmp_path / "c", like=part_like, parts={"state.params.w": (7, 13, (4, 5))})
    assert torch.equal(got["state"].params["w"], state.params["w"].reshape(-1)[7:13])
    out = tmp_path / "whole.safetensors"
    proc = subprocess.run([sys.executable, "-m", "fnnet", "checkpoint", "consolidate", str(tmp_path / "c"), str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stderr
    assert fnnet.tree.all_equal(fnnet.load(out), tree)


def test_fnnet_save_and_load_name_the_sharded_folder_and_refuse_its_options_for_a_file(tmp_path):
    tree = {"w": torch.arange(6.0).reshape(2, 3), "n": 3}
    handle = fnnet.save(tmp_path / "c", tree, sharded=True)  # a folder: one process writes every part
    assert handle.wait() == str(tmp_path / "c") and sharded.is_complete(tmp_path / "c")
    assert fnnet.tree.all_equal(fnnet.load(tmp_path / "c"), tree)
    got = fnnet.load(tmp_path / "c", like={"w": torch.zeros(4), "n": 0}, parts={"w": (1, 5, (2, 3))})
    assert torch.equal(got["w"], torch.arange(1.0, 5.0)) and got["n"] == 3
    with pytest.raises(ValueError, match=r"\['parts', 'async_save'\] apply to a sharded checkpoint only"):
        fnnet.save(tmp_path / "f.safetensors", tree, parts={"w": (0, 6, (2, 3))}, async_save=True)
    fnnet.save(tmp_path / "f.safetensors", tree)
    with pytest.raises(ValueError, match=r"parts= reads ranges of a sharded checkpoint folder; this is a file"):
        fnnet.load(tmp_path / "f.safetensors", parts={"w": (0, 6, (2, 3))})


KILL = """
import os, signal, sys
sys.path.insert(0, sys.argv[3])
import fnnet, fnnet._saving
from fnnet.checkpoint import sharded
from _ckpt_worker import trainer
from _dist_worker import resume_data
point, folder = sys.argv[1], sys.argv[2]
die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
replace = os.replace
def arm():
    if point == "data":
        sharded._file.write = die                   # a rank dies while writing its part
    elif point == "marker":
        sharded._write_json = die                   # every part durable, the manifest not yet written
    else:                                           # the manifest written, the folder not yet moved into place
        os.replace = lambda a, b: die() if str(a).endswith(".partial") else replace(a, b)
class Arm(fnnet.callbacks.Callback):
    def on_train_batch_start(self, trainer, step):
        if trainer.state.step == 2:
            fnnet._saving.wait_pending(trainer)  # step 2's save completes; step 3's is the one killed
            arm()
loader = fnnet.ArrayLoader(resume_data(), 8, shuffle=True, key=fnnet.random.key(1), global_batch=True)
trainer("single").fit(loader, epochs=2, verbose=0, callbacks=[Arm(), fnnet.callbacks.ModelCheckpoint(
    folder, monitor="loss", every_n_steps=1, sharded=True, async_save=True)])
"""


@_REUSED_FOLDER
@pytest.mark.extended  # the default suite kills a rank of a 2-rank run (test_a_rank_killed_between_the_parts_...)
@pytest.mark.parametrize("point", ["data", "marker", "rename"])
def test_a_save_killed_between_its_steps_is_never_picked_and_is_cleaned_up(tmp_path, uninterrupted, point):
    from fnnet._resume import find_latest

    folder = tmp_path / "ckpt"
    proc = subprocess.run([sys.executable, "-c", KILL, point, str(folder), str(Path(__file__).parent)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = [e for e in os.listdir(folder) if e.endswith(".partial")]
    picked = find_latest([fnnet.callbacks.ModelCheckpoint(folder, monitor="loss", sharded=True)])
    assert find_latest([fnnet.callbacks.ModelCheckpoint(folder, monitor="loss")]) is None  # folders: sharded=True's
    if point == "rename":  # killed between moving the old folder aside and the new one in: both are complete
        old = [e for e in os.listdir(folder) if e.endswith(".old")]
        assert len(old) == 1 and sharded.load_sharded(folder / old[0])["state"].step == 2
        assert picked == str(folder / partial[0]) and sharded.load_sharded(picked)["state"].step == 3
    else:  # torn: no manifest, never loaded, never picked
        assert len(partial) == 1 and sharded.load_sharded(folder / "step.ckpt")["state"].step == 2
        if point == "marker":  # the data were durable before the marker would have been written
            assert any(e.startswith("part-") for e in os.listdir(folder / partial[0]))
        with pytest.raises(ValueError, match="manifest .* is missing"):
            sharded.load_sharded(folder / partial[0])
        assert picked == str(folder / "step.ckpt")
    final = resume_here(folder)  # resume="auto", then saves again: the leftovers are removed
    assert final.step == uninterrupted.step and close(final, uninterrupted)
    assert not [e for e in os.listdir(folder) if e.startswith(".")]


@_REUSED_FOLDER
def test_a_sharded_callback_deletes_only_its_own_folders_and_a_crafted_book_names_none(tmp_path):
    """Issue 34's deletion safety for sharded folders: the book names folders, not paths; a name outside
    dirpath, a foreign name or a link of its own form is never removed; its own stale folders are."""
    import json

    folder = tmp_path / "run"
    kw = dict(monitor="loss", save_top_k=1, save_last=True, sharded=True)
    trainer("single").fit(one_loader(), epochs=1, verbose=0, callbacks=[fnnet.callbacks.ModelCheckpoint(folder, **kw)])
    outside = [tmp_path / "victim.ckpt", folder / "notes.ckpt", tmp_path / "epoch=009-loss=9.0000.ckpt",
               tmp_path / "linked"]
    for v in outside:
        v.mkdir()
        (v / "keep.txt").write_text("precious")
    os.symlink(tmp_path / "linked", folder / "epoch=008-loss=8.0000.ckpt")  # its own form, but a link
    saved = sharded.load_sharded(folder / "last.ckpt")
    books = json.loads(saved["position"]["callbacks"])
    (name, book), = books.items()
    first = book["best_k"][0][1]  # the real entry: its folder is removed once a better one is saved
    book["best_k"] += [[9e8, "epoch=008-loss=8.0000.ckpt"], [9e9, str(outside[0])], [9e9, "notes.ckpt"],
                       [9e9, "../epoch=009-loss=9.0000.ckpt"]]
    saved["position"]["callbacks"] = json.dumps({name: book})
    fnnet.save(tmp_path / "crafted.safetensors", saved)
    fresh = fnnet.callbacks.ModelCheckpoint(folder, **kw)
    with pytest.warns(UserWarning, match="never deleted"):
        trainer("single").fit(one_loader(), epochs=2, verbose=0, resume=tmp_path / "crafted.safetensors",
                              callbacks=[fresh])
    assert all((v / "keep.txt").read_text() == "precious" for v in outside)
    assert os.path.islink(folder / "epoch=008-loss=8.0000.ckpt")
    own = sorted(e for e in os.listdir(folder) if e.startswith("epoch=") and not os.path.islink(folder / e))
    assert len(own) == 1 and own[0] != first and fresh.best_model_path == str(folder / own[0])
    (folder / "epoch=007-loss=7.0000.ckpt").mkdir()  # its form, but no manifest: incomplete, never picked
    assert sorted(fresh.checkpoint_files()) == sorted(str(folder / e) for e in own + ["last.ckpt"])


LOOP = Path(__file__).with_name("_ckpt_loop_worker.py")


@pytest.fixture(scope="module")
def loop_reference():
    """The uninterrupted own-loop run (W = 1, 6 steps of 12 samples): the state after every step."""
    from _ckpt_loop_worker import phase

    return phase("single", 0, 6, None, None)[1]


def continue_here(src: Path, start: int):
    """W = 1: load ``src`` (fnnet.load of the folder, this process's layout) and take the remaining steps."""
    from _ckpt_loop_worker import phase

    return phase("single", start, 6, str(src), None)[1]


def param_pieces(folder: Path) -> int:
    """How many files hold pieces of the parameters (a ZeRO-3 folder: every rank's, not one whole copy)."""
    import json

    leaves = json.loads((folder / sharded.MANIFEST).read_text())["leaves"]
    return len({r for n, v in leaves.items() if n.startswith("params.") for r, lo, hi in v["pieces"] if hi > lo})


def kill_launch(out: Path, points: str, then: list[str] = (), nonfinite: bool = False) -> None:
    """One launch of 2 ranks (ZeRO-2, async sharded saves every step) under torchrun --max-restarts: attempt k
    is SIGKILLed at the k-th of ``points`` (see _ckpt_worker.arm), the next resumes; ``then``: own-loop phases
    the last attempt runs after its fit (sharing the launch)."""
    n = len(points.split(","))
    run_ranks(WORKER, ["kill", "zero2", out], 2, torchrun=("--max-restarts", str(n)),
              env={"KILL_POINTS": points, "THEN_PHASES": " ".join(then), "NONFINITE": "1" if nonfinite else ""})


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The default suite's one launch of 2 ranks for this file's new tests: a rank killed between the parts and
    the manifest, the restart resuming; a nan in rank 1's part refused; then, in the same launch, W=1's
    checkpoint (steps 0-1, written here) continued by ZeRO-3 (2-3, saving its parameter and optimizer parts)
    and that one by ZeRO-2 (4-5)."""
    from _ckpt_loop_worker import phase

    out = tmp_path_factory.mktemp("two-ranks")
    phase("single", 0, 2, None, str(out / "s"))
    kill_launch(out, "manifest", [f"zero3:2:4:{out / 's'}:{out / 'z3'}", f"zero2:4:6:{out / 'z3'}:{out / 'z2'}",
                                  f"zero3/window:0:1:-:{out / 'w3'}", f"zero2/window:0:1:-:{out / 'w2'}"],
                nonfinite=True)
    return out


def check_kills(out: Path, points: list[str], uninterrupted) -> None:
    """After each kill: one torn ``.partial`` folder (no manifest; with the parts written before the kill), the
    previous checkpoint picked by resume="auto"; at the end no leftovers and the uninterrupted run's state."""
    import json

    for k, point in enumerate(points, 1):
        seen = json.loads((out / f"attempt-{k}.json").read_text())
        (torn, files), = seen["hidden"].items()  # the torn folder of this kill; earlier ones were cleaned up
        assert torn.endswith(".partial") and sharded.MANIFEST not in files, seen
        written = {"part": ["part-00000-of-00002.safetensors"], "confirm": ["part-00000-of-00002.safetensors",
                   "part-00001-of-00002.safetensors"], "manifest": ["part-00000-of-00002.safetensors",
                                                                  "part-00001-of-00002.safetensors"]}[point]
        assert files == written or (point == "part" and "part-00001-of-00002.safetensors" not in files), (point, seen)
        assert seen["picked"] != torn and seen["step"] == 2 * k, seen  # the save before the killed one
        assert re.search("manifest .* is missing", seen["refused"][torn]), seen  # fnnet.load refused it
    assert not [e for e in json.loads((out / "after.json").read_text()) if e.startswith(".")]
    final = fnnet.load(out / "final-zero2-2.safetensors")
    assert final.step == uninterrupted.step and close(final, uninterrupted)


def test_a_rank_killed_between_the_parts_and_the_manifest_leaves_the_previous_checkpoint(two_ranks, uninterrupted):
    check_kills(two_ranks, ["manifest"], uninterrupted)


@pytest.mark.parametrize("strategy", ["zero3", "zero2"])
def test_a_state_inside_an_accumulation_window_is_refused_by_local_parts_and_the_sharded_save(two_ranks, strategy):
    # each rank's state.accum holds its own partial window: a folder written as if replicated would keep rank 0's
    # only. Refused (every rank, nothing written); after step.flush the state saves and loads as usual
    for r in (0, 1):
        parts_said, save_said, written, equal = (two_ranks / f"w{strategy[-1]}-{r}.txt").read_text().split("\n")
        assert re.fullmatch(r"\w+\.local_parts: state\.accum holds an unfinished gradient-accumulation window "
                            r"\(1 of 2 micro-batches: .*step\.flush\(state\).*", parts_said), parts_said
        assert re.fullmatch(r"rank 0: save_sharded: 'accum' holds an unfinished gradient-accumulation window: .*; "
                            r"rank 1: save_sharded: 'accum' holds .*step\.flush\(state\).*", save_said), save_said
        assert written == "[]" and equal == "True", (written, equal)  # no folder, no .partial; then saved


def test_a_non_finite_part_on_one_rank_is_refused_on_every_rank_naming_it(two_ranks, tmp_path):
    # the nan is in rank 1's part of the ZeRO-2 optimizer state only: one flag all-reduced, both ranks refuse
    texts = [(two_ranks / f"nonfinite-{r}.txt").read_text() for r in (0, 1)]
    for text in texts:
        assert re.search(r"non-finite values at rank 1: \['opt_state\.[^']+'\]; not written to '.*nan'", text), text
        assert "rank 0:" not in text and text.endswith("written: []")  # no folder, no .partial
    t = trainer("single")  # one process: the same check, the same words
    t.state = t.state.replace(params={**t.state.params, "0.bias": t.state.params["0.bias"] * float("inf")})
    with pytest.raises(ValueError, match=r"non-finite values at rank 0: \['params.0.bias'\]; not written"):
        t.save(tmp_path / "inf", sharded=True)
    assert not os.listdir(tmp_path)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
                          st.integers(0, 40), st.sampled_from([None, "nan", "inf", "-inf", "huge"])), max_size=4))
def test_the_fast_finiteness_check_agrees_with_all_finite(leaves):
    # a finite sum per leaf proves it finite; a sum that overflowed ("huge": finite values) falls back to the
    # exact check
    tree = {}
    for i, (dtype, n, bad) in enumerate(leaves):
        x = torch.randn(n).to(dtype)
        if n and bad:
            x[n // 2] = torch.finfo(dtype).max if bad == "huge" else float(bad)
            x[-1] = torch.finfo(dtype).max if bad == "huge" else x[-1]
        tree[f"x{i}"] = x
    tree["count"] = torch.tensor(3)
    assert fnnet.state.host_finite(tree) == bool(fnnet.all_finite(tree))


@pytest.mark.extended
def test_a_rank_killed_at_every_point_of_an_async_save(tmp_path, uninterrupted):
    # one launch, three kills: rank 1 while writing its part, rank 1 after its part (before the confirmation),
    # rank 0 between the confirmed parts and the manifest; each restart resumes from the save before
    points = ["part", "confirm", "manifest"]
    kill_launch(tmp_path, ",".join(points))
    check_kills(tmp_path, points, uninterrupted)


def test_zero3_parts_save_and_load_from_your_own_loop_at_other_world_sizes(two_ranks, loop_reference):
    # W=1 (steps 0-1) -> ZeRO-3 on 2 ranks (2-3), which writes its parameter and optimizer parts -> ZeRO-2 on 2
    # ranks (4-5) and, apart, W=1 (4-5): both equal the uninterrupted run (float64, 1e-10)
    assert param_pieces(two_ranks / "z3") == 2 and param_pieces(two_ranks / "z2") == 2
    for final in (fnnet.load(two_ranks / "z2"), continue_here(two_ranks / "z3", 4)):
        assert final.step == loop_reference.step == 6 and close(final, loop_reference)


@pytest.mark.extended
def test_zero3_on_four_ranks_continues_under_zero2_hsdp_and_one_process(tmp_path, loop_reference):
    # issue 31's test: ZeRO-3 at W=4 -> ZeRO-2 at W=2 and W=1; and ZeRO-3 (W=4) -> HSDP 2x2 -> ZeRO-3 (W=2)
    z3, hsdp, z2, back = (str(tmp_path / n) for n in ("z3", "hsdp", "z2", "back"))
    run_ranks(LOOP, [f"zero3:0:2:-:{z3}", f"hsdp:2:4:{z3}:{hsdp}"], 4)
    run_ranks(LOOP, [f"zero2:2:6:{z3}:{z2}", f"zero3:4:6:{hsdp}:{back}"], 2)
    assert param_pieces(tmp_path / "z3") == 4
    for final in (fnnet.load(z2), fnnet.load(back), continue_here(tmp_path / "z3", 2)):
        assert final.step == 6 and close(final, loop_reference)
