"""Every Python block in README.md runs as written: the blocks in one plain process, the script under torchrun.

The blocks fenced ```` ```python ```` share one namespace, as the README reads (a later block
uses what an earlier one built), and run top to bottom in one fresh ``python`` process in a
temporary folder, with no launcher, with JAX installed (the "Coming from JAX" block needs the
``fnnet[jax]`` extra, which CI installs). A block fenced ```` ```python train.py ```` is a file
for a launcher (the distributed training script): it runs on its own under
``torchrun --nproc-per-node 2`` (gloo on the CPU).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def script_blocks() -> list[tuple[str, str]]:
    """``(file name, code)`` of every block fenced ```python NAME.py: scripts for a launcher."""
    return re.findall(r"^```python (\S+\.py)\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def test_the_readme_has_python_blocks_and_the_distributed_script():
    assert len(python_blocks()) >= 8
    assert [name for name, _ in script_blocks()] == ["train.py"]
    # a script for a launcher is never among the blocks that run in one plain process
    assert not any("fnnet.distributed.init()" in block for block in python_blocks())


@pytest.mark.slow
def test_every_python_block_in_the_readme_runs_as_written(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    program = "import matplotlib\nmatplotlib.use('Agg')\n"
    for i, block in enumerate(python_blocks()):
        program += f"\nprint('--- README block {i}', flush=True)\n" + block
    script = tmp_path / "readme_blocks.py"
    script.write_text(program)
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}  # no launcher
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("--- README block") == len(python_blocks())


@pytest.mark.slow
@pytest.mark.parametrize("name, code", script_blocks(), ids=[name for name, _ in script_blocks()])
def test_the_readme_script_runs_under_torchrun(tmp_path, name, code):
    (tmp_path / name).write_text(code)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**_env(), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port), name]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert list((tmp_path / "ckpt-ddp").glob("*.safetensors")), "rank 0 wrote no checkpoint"
