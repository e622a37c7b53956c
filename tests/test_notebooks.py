"""The chapter notebook (notebooks/chapter_6_3_gpu_training.ipynb) runs top to bottom and says what it should.

The notebook is executed with nbclient in a fresh kernel ("python3", the interpreter running
pytest when no other python3 kernelspec is installed), in a temporary working directory, with
this checkout first on PYTHONPATH. It needs no GPU: on a CPU-only machine it runs the CPU parts
(about 30 s on 2 cores) and on a GPU machine the GPU parts too.
"""

from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
CHAPTER = NOTEBOOKS / "chapter_6_3_gpu_training.ipynb"
NUMBER = r"(-?\d+\.\d+)"


def _load_builder():
    spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOKS / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_without_outputs():
    nb = nbformat.read(CHAPTER, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"cell {i} was committed with outputs"
            assert cell.execution_count is None, f"cell {i} was committed with an execution count"


def test_committed_notebook_is_what_the_builder_writes():
    built = _load_builder().build()
    committed = nbformat.read(CHAPTER, as_version=4)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in built.cells], (
        "notebooks/chapter_6_3_gpu_training.ipynb is out of date: run `python notebooks/_build.py`"
    )


def _text(cell) -> str:
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif out.output_type in ("execute_result", "display_data"):
            parts.append(out.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.fixture(scope="module")
def executed(tmp_path_factory):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    workdir = tmp_path_factory.mktemp("chapter_6_3")
    nb = nbformat.read(CHAPTER, as_version=4)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(workdir)}})
    client.execute(env=env)  # raises CellExecutionError, with the traceback, if a cell fails
    return nb, workdir


def _find(nb, pattern: str) -> re.Match:
    for cell in nb.cells:
        if cell.cell_type == "code":
            m = re.search(pattern, _text(cell))
            if m:
                return m
    raise AssertionError(f"no cell output matches {pattern!r}")


@pytest.mark.slow
def test_chapter_runs_on_any_machine(executed):
    nb, workdir = executed
    assert all(o.output_type != "error" for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    # 0: device information
    _find(nb, r"gpu_count = \d+")
    # 1, 3: a device that does not exist is a ValueError listing the ones that do
    _find(nb, r"-> ValueError: .*devices here: cpu")
    # 2: fnnet.save'd params load into a plain nn.Linear
    _find(nb, r"loaded into nn.Linear: True")
    # 3: data parallel over two shards equals single-device training
    gap = float(_find(nb, r"largest difference from single-device training after 9 steps: (\S+)").group(1))
    assert gap < 1e-10
    # 5: a synchronised, median timing on the CPU
    _find(nb, r"cpu : median +\d+\.\d+ ms")
    # nothing is written into the working folder (the source tree, for a learner): only the temp folder
    assert sorted(p.name for p in workdir.iterdir()) == []


@pytest.mark.slow
def test_linear_regression_recovers_the_chapters_weights(executed):
    nb, _ = executed
    m = _find(nb, rf"w = \[{NUMBER}, {NUMBER}\] \(true \[2, -3\]\), b = {NUMBER}")
    w0, w1, b = map(float, m.groups())
    assert abs(w0 - 2) < 0.05 and abs(w1 + 3) < 0.05, (w0, w1)
    assert abs(b - 10) < 0.1, b
    _find(nb, r"\{'step': 250, 'loss': ")


@pytest.mark.slow
def test_flax_weights_serve_the_chapters_cnn_and_back(executed):
    nb, _ = executed
    try:
        import jax  # noqa: F401
    except ImportError:
        _find(nb, r'needs JAX and flax: pip install "fnnet\[jax\]"')
        return
    assert float(_find(nb, r"flax -> torch: largest difference of the logits (\S+)").group(1)) < 1e-5
    assert float(_find(nb, r"torch -> flax: largest difference of the logits (\S+)").group(1)) < 1e-5
    same, total = map(int, _find(nb, r"test predictions agree on (\d+) of (\d+) images").groups())
    assert same == total
    _find(nb, r"round trip torch -> flax -> torch exact: True")


@pytest.mark.slow
def test_cnn_trains_checkpoints_and_reloads(executed):
    nb, workdir = executed
    for epoch in (1, 2, 3):
        _find(nb, rf"Epoch {epoch} \({epoch}/3\) .*val_loss=")
    best = float(_find(nb, rf"best val_loss : {NUMBER}").group(1))
    reloaded = float(_find(nb, rf"reloaded +: val_loss {NUMBER}").group(1))
    assert reloaded == pytest.approx(best, abs=1e-5)
    accuracy = float(_find(nb, rf"plain nn.Module with the best checkpoint's params: accuracy {NUMBER}").group(1))
    assert accuracy > 0.5  # 10 classes: chance is 0.1
    _find(nb, r"best checkpoint: \S+/cnn/epoch=\d+-val_loss=\S+\.safetensors")  # the file reloaded above
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4  # plot_samples twice, plot_history twice


@pytest.mark.slow
def test_the_gpt_section_learns_and_samples_reproducibly(executed):
    nb, _ = executed
    rows = re.findall(rf"step +(\d+)  train loss {NUMBER}  held-out loss {NUMBER}", "".join(
        _text(c) for c in nb.cells if c.cell_type == "code"))
    assert [int(r[0]) for r in rows] == [50, 100, 150, 200]
    held_out = [float(r[2]) for r in rows]
    assert held_out[-1] < held_out[0] < 4.6, held_out  # below log(vocabulary), and falling
    _find(nb, r"same key, same text: True")


@pytest.mark.slow
def test_the_notebook_removes_its_temporary_folder(executed):
    nb, _ = executed
    work = Path(_find(nb, r"files in (\S+)").group(1))
    assert not work.exists(), f"the notebook left {work} behind"
    _find(nb, r"removed \S+: True")
