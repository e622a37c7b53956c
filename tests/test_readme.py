"""Every Python block in README.md runs as written, top to bottom, in one fresh process.

The blocks share one namespace, as the README reads (a later block uses what an earlier one
built). The process runs in a temporary folder, with the environment ``torchrun`` gives a
single process (so ``fnnet.distributed.init()`` joins a group of one), and with JAX installed
(the "Coming from JAX" block needs the ``fnnet[jax]`` extra, which CI installs).
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


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 8


@pytest.mark.slow
def test_every_python_block_in_the_readme_runs_as_written(tmp_path):
    pytest.importorskip("jax")
    pytest.importorskip("flax")
    program = "import matplotlib\nmatplotlib.use('Agg')\n"
    for i, block in enumerate(python_blocks()):
        program += f"\nprint('--- README block {i}', flush=True)\n" + block
    script = tmp_path / "readme_blocks.py"
    script.write_text(program)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    assert proc.stdout.count("--- README block") == len(python_blocks())
